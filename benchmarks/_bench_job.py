"""One rank's view of a benchmark job: timing across ranks, peak RSS, cleanup, page-cache control, the state.

Shared by the disk contenders (``_bench_worker.py``) and the S3 ones
(``_bench_s3.py``): every timed step starts after a barrier, each rank
measures its own wall time, and the step's time is the maximum over ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
import torch.distributed as dist
from _bench_state import build_state, state_nbytes, tensors
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MiB = 1 << 20
LOG = logging.getLogger("bench")


class PeakRSS:
    """Peak resident set size of this process over a block (Linux ``clear_refs`` + ``VmHWM``).

    Falls back to sampling RSS every 5 ms where the kernel refuses the reset.
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm()
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, self._hwm())


def process_cpu_s() -> float:
    """This process's CPU seconds so far, user + system, every thread (not a writer subprocess's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Bench:
    """This rank's view of the job: timing across ranks, cleanup, page-cache control."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = args.device
        self.dropped_caches: bool | None = None  # None: not attempted yet

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def max_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # CPU tensor: goes through gloo on every backend
        return t.tolist()

    def sum_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def timed(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Run ``fn`` on every rank at once; its wall time and peak RSS, max over ranks, and its CPU seconds, summed over ranks.

        ``fn`` may return a dict of extra per-rank seconds (e.g. ``blocked_s``), also max-reduced.
        ``cpu_s`` is each rank's process CPU time (user + system, all its threads) over the step:
        on cores shared by the ranks, wall time moves 2x between runs, CPU time much less.
        """
        self.settle()
        self.sync()
        with PeakRSS() as mem:
            c0, t0 = process_cpu_s(), time.perf_counter()
            extra = fn()
            extra = extra if isinstance(extra, dict) else {}  # dcp.save returns its Metadata
            if self.device == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - t0, process_cpu_s() - c0
        keys = sorted(extra)
        vals = self.max_over_ranks([elapsed, mem.peak / MiB, (mem.peak - mem.start) / MiB] + [extra[k] for k in keys])
        out = {"s": vals[0], "peak_rss_mb": vals[1], "rss_growth_mb": vals[2], "cpu_s": self.sum_over_ranks(cpu)}
        out.update(zip(keys, vals[3:]))
        return out

    def settle(self) -> None:
        """Let the previous step's writeback, journal commit and discards finish before timing the next.

        The disk here is mounted with ``discard``: deleting a checkpoint trims its
        blocks at the next journal commit, which would otherwise land inside
        whichever step runs next.
        """
        if self.rank == 0:
            os.sync()
        dist.barrier()
        time.sleep(self.args.settle)

    def remove(self, paths: list[str]) -> None:
        """Delete checkpoints once every rank is done with them (rank 0 deletes), then settle."""
        dist.barrier()
        if self.rank == 0:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.settle()

    def drop_caches(self) -> None:
        """Empty the page cache before a load (root only), so loads read the disk."""
        if self.args.no_drop_caches:
            self.dropped_caches = False
            dist.barrier()
            return
        ok = 1.0
        if self.rank == 0:
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            except OSError as e:
                ok = 0.0
                if self.dropped_caches is None:
                    LOG.warning("cannot drop the page cache (%s): loads may be served from memory", e)
        ok = -self.max_over_ranks([-ok])[0]  # the barrier, and rank 0's answer for everyone
        self.dropped_caches = bool(ok) and self.dropped_caches is not False


def rotate(items: list[str], rep: int) -> list[str]:
    """Each repetition starts with a different contender, so none always runs first."""
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]


def progress(b: Bench, msg: str) -> None:
    if b.rank == 0:
        print(f"[bench] {msg}", flush=True)


def built_state(b: Bench, fill: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """This job's state (the pattern, or zeros as a load target) and its sizes for the results."""
    t0 = time.perf_counter()
    sd = build_state(b.args.total_bytes, init_device_mesh(b.device, (b.world,)), b.device, fill=fill)
    total, local = state_nbytes(sd)
    progress(b, f"world {b.world}: state of {total / MiB:.1f} MiB built in {time.perf_counter() - t0:.1f} s ({local / MiB:.1f} MiB on rank 0)")
    return sd, {"total_bytes": total, "local_bytes_rank0": local, "n_tensors": sum(1 for _ in tensors(sd))}


def sd_mesh(sd: dict[str, Any]) -> DeviceMesh:
    return next(iter(sd["model"].values())).device_mesh
