"""One rank of the side-by-side checkpoint benchmark (see ``bench_checkpoint.py``).

Launched by ``bench_checkpoint.py`` through ``torchrun``; every rank builds the
same FSDP-like state (DTensor ``Shard(0)`` parameters and two Adam moments, one
replicated plain tensor, a few plain values), then times, interleaved within
each repetition, dist_ckpt, DCP, per-rank ``torch.save`` and the ceilings: raw
disk writes and reads with 1, 2 and 4 threads per rank, and a memcpy of the state.
Rank 0 writes every per-repetition figure to ``--out`` as JSON; the driver
takes the medians and prints the table.

With ``--storage s3`` the same modes run the S3 contenders of ``_bench_s3.py``.

Modes:
    ``main``     (world N) sync save, async save (unless ``--no-async``), memcpy
                 ceiling, load at the same world size;
                 leaves one checkpoint per library under ``<dir>/src`` for ...
    ``reshard``  (world M) loads ``<dir>/src`` into this job's own Shard(0) layout.

Timing rule: every timed step starts after a barrier, each rank measures its
own wall time, and the step's time is the maximum over ranks (the job waits for
the slowest rank). Throughput = the state's logical bytes / that time.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gc
import glob
import json
import logging
import mmap
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# The state lives beside this file (the driver runs it as a script, so its directory is on sys.path).
from _bench_job import Bench, built_state, progress, rotate, sd_mesh
from _bench_state import build_state, copy_into, local_state, tensors, verify_state, zero_state
from torch.distributed.tensor import DTensor

import dist_ckpt as dc
from dist_ckpt.storage.local import LocalWriteStream

MiB = 1 << 20
IO_PIECE = 16 * MiB  # write/read size of the raw disk ceiling measurement
LOG = logging.getLogger("bench")

# ---------------------------------------------------------------- the contenders


# Variants of the ceilings, by contender name: writer threads (one file each) and
# reader threads per rank. A ceiling is the best of its variants in the same run,
# so the library, which writes two files per rank and reads with several
# threads, is never measured against a narrower pipe than its own.
WRITERS = {"disk": 1, "disk_2w": 2, "disk_4w": 4}
# The read ceilings: each rank's share read into the load target's own local
# tensors (the pages every load writes into, zeroed before each step as before
# each load), so the ceiling does the same task as a load minus its format and
# checksums.
READERS = {"disk": 1, "disk_2r": 2, "disk_4r": 4}
# The same reads into one reused IO_PIECE buffer per reader thread: the bytes
# never leave the CPU's cache, a task no load can do (every load writes its
# share into memory the share's size). Reported for information, not a ceiling.
REUSED_READERS = {"reuse": 1, "reuse_2r": 2, "reuse_4r": 4}
RAW_READERS = {**READERS, **REUSED_READERS}


@functools.lru_cache(maxsize=1)
def _write_buffer() -> memoryview:
    """One page-aligned ``IO_PIECE`` of random bytes per process (O_DIRECT needs the alignment).

    Made by the untimed warm-up write, so no timed step pays for ``os.urandom``;
    every writer thread writes from it (nothing writes into it).
    """
    buf = mmap.mmap(-1, IO_PIECE)
    buf.write(os.urandom(IO_PIECE))
    return memoryview(buf)


def raw_write(path: str, nbytes: int, direct: bool) -> int:
    """Write ``nbytes`` in ``IO_PIECE`` pieces and fsync (the disk ceiling); returns bytes written.

    Buffered, each piece's writeback is started as soon as it is written
    (``sync_file_range``, the local backend's own handle), so the disk never
    idles waiting for ``fsync``. With ``direct`` (O_DIRECT) the last piece is
    rounded up to 4 KiB.
    """
    view = _write_buffer()
    offset = 0
    if direct:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            while offset < nbytes:
                n = -(-min(IO_PIECE, nbytes - offset) // 4096) * 4096
                offset += os.pwrite(fd, view[:n], offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return offset
    handle = LocalWriteStream(path)
    try:
        while offset < nbytes:
            n = min(IO_PIECE, nbytes - offset)
            handle.write_pieces(view[:n], offset)
            offset += n
        handle.sync()
    finally:
        handle.close()
    return offset


def raw_write_share(directory: str, rank: int, nbytes: int, writers: int, direct: bool = False) -> int:
    """Write this rank's ``nbytes`` as ``writers`` files, each by its own thread at once; returns bytes written.

    One writer writes ``rank{rank:05d}.bin``, the file :func:`raw_read_share` reads.
    """
    if writers == 1:
        return raw_write(f"{directory}/rank{rank:05d}.bin", nbytes, direct)
    cuts = [nbytes * i // writers for i in range(writers + 1)]
    with ThreadPoolExecutor(writers, thread_name_prefix="bench-write") as pool:
        parts = [pool.submit(raw_write, f"{directory}/rank{rank:05d}.{i}.part", cuts[i + 1] - cuts[i], direct) for i in range(writers)]
        return sum(f.result() for f in parts)  # a failed writer raises here, after the others finished


@functools.cache
def _read_buffer(slot: int = 0) -> memoryview:
    """One ``IO_PIECE`` buffer per reader slot and process, so a timed read does not include zeroing it."""
    return memoryview(bytearray(IO_PIECE))


def prime_read_buffers() -> None:
    """Allocate every reader's buffer before the first timed read."""
    for slot in range(max(READERS.values())):
        _read_buffer(slot)


IOV_MAX = 1024  # most buffers one preadv takes (Linux UIO_MAXIOV)


class Destinations:
    """The read ceiling's destinations: the load target's local bytes, end to end.

    On CPU these are the target's own local tensors, so the raw reads write
    the same pages a load writes (faulted in and zeroed the same way, by
    :meth:`zero` before each step). On CUDA the target is on the device: the
    reads go into one host buffer of the rank's local bytes, touched once,
    which leaves the host-to-device copy out (still a bound). A share larger
    than the local bytes (an uneven split) wraps around them.
    """

    def __init__(self, target: dict[str, Any], device: str) -> None:
        self.target = target
        local = [(t.to_local() if isinstance(t, DTensor) else t) for t in tensors(target)]
        assert all(t.is_contiguous() for t in local), "a load target's local tensors are contiguous"
        flat = [t.reshape(-1).view(torch.uint8) for t in local if t.numel()]
        self.host: torch.Tensor | None = None
        if device != "cpu":
            self.host = torch.zeros(sum(t.numel() for t in flat), dtype=torch.uint8)
            flat = [self.host]
        self.views = [memoryview(t.numpy()).cast("B") for t in flat]
        self.starts = [0]
        for v in self.views:
            self.starts.append(self.starts[-1] + len(v))
        self.total = self.starts[-1]

    def zero(self) -> None:
        """Reset the destinations before a timed read, as the loads' target is reset before each load."""
        if self.host is not None:
            self.host.zero_()
        else:
            zero_state(self.target)

    def iov(self, pos: int, n: int) -> list[memoryview]:
        """Up to ``n`` destination bytes from ``pos`` (modulo their total), as at most :data:`IOV_MAX` views."""
        out: list[memoryview] = []
        while n > 0 and len(out) < IOV_MAX:
            p = pos % self.total
            i = bisect.bisect_right(self.starts, p) - 1
            take = min(n, self.starts[i + 1] - p)
            out.append(self.views[i][p - self.starts[i] : p - self.starts[i] + take])
            pos, n = pos + take, n - take
        return out


# Where a raw read's bytes go: (position within the rank's share, bytes) -> buffers for preadv.
Sink = Callable[[int, int], list[memoryview]]


def _reused(view: memoryview) -> Sink:
    return lambda pos, n: [view[:n]]


def _read_span(files: list[tuple[str, int]], lo: int, hi: int, sink: Sink, share_lo: int) -> int:
    """Read bytes ``[lo, hi)`` of the files taken end to end, in ``IO_PIECE`` reads into ``sink`` (share offsets from ``share_lo``)."""
    done = base = 0
    for path, size in files:
        start, end = max(lo, base), min(hi, base + size)
        if start < end:
            with open(path, "rb", buffering=0) as f:
                pos = start - base
                while pos < end - base:
                    n = os.preadv(f.fileno(), sink(base + pos - share_lo, min(IO_PIECE, end - base - pos)), pos)
                    if n <= 0:
                        break
                    pos += n
                    done += n
        base += size
    return done


def raw_read_share(directory: str, rank: int, world: int, readers: int = 1, dests: Destinations | None = None) -> int:
    """Read this rank's 1/``world`` of the raw files' bytes (taken in name order) with ``readers`` threads.

    With as many ranks as files each rank reads its own file; with fewer or
    more, the bytes are split evenly across ranks, as a resharded load splits
    them. Each reader takes a contiguous 1/``readers`` of the rank's share.
    The bytes go into ``dests`` (the share laid over the load target's
    bytes), or without it into one reused ``IO_PIECE`` buffer per reader.
    Returns bytes read.
    """
    files = [(p, os.path.getsize(p)) for p in sorted(glob.glob(f"{directory}/rank*.bin"))]
    total = sum(size for _, size in files)
    lo, hi = total * rank // world, total * (rank + 1) // world
    cuts = [lo + (hi - lo) * i // readers for i in range(readers + 1)]
    # The buffers are taken here, not in the threads: the cache is not thread-safe.
    sinks = [dests.iov if dests is not None else _reused(_read_buffer(i)) for i in range(readers)]
    if readers == 1:
        return _read_span(files, lo, hi, sinks[0], lo)
    with ThreadPoolExecutor(readers, thread_name_prefix="bench-read") as pool:
        parts = [pool.submit(_read_span, files, cuts[i], cuts[i + 1], sinks[i], lo) for i in range(readers)]
        return sum(f.result() for f in parts)


MEMCPY_RING = 256 * MiB  # the memcpy ceiling's destination: far larger than any last-level cache


class MemcpyCeiling:
    """The staging ceiling: every local tensor of the state copied once into prefaulted host memory.

    The destination is as large as the rank's local bytes, up to
    ``MEMCPY_RING``; a larger state is copied through it as a ring. That
    bounds the measurement's memory (a 4 GiB state in one process does not
    need a second 4 GiB) while every byte still goes to memory, not to a
    cache-resident buffer, so the figure is a memcpy's real cost. On CUDA the
    destination is pinned and the copies are device-to-host, non-blocking
    (``Bench.timed`` synchronizes).
    """

    def __init__(self, sd: dict[str, Any], device: str) -> None:
        local = ((t.to_local() if isinstance(t, DTensor) else t) for t in tensors(sd))
        self.sources = [t.reshape(-1).view(torch.uint8) for t in local if t.numel()]
        size = min(sum(s.numel() for s in self.sources), MEMCPY_RING)
        self.cuda = device == "cuda"
        self.buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
        self.buf.zero_()  # fault the pages in before the timed copies

    def copy(self) -> None:
        """Copy every local tensor once (the timed step)."""
        size, pos = self.buf.numel(), 0
        for src in self.sources:
            for start in range(0, src.numel(), size):
                piece = src[start : start + size]
                if pos + piece.numel() > size:
                    pos = 0
                self.buf[pos : pos + piece.numel()].copy_(piece, non_blocking=self.cuda)
                pos += piece.numel()


def torch_save_fsync(sd: dict[str, Any], path: str) -> None:
    with open(path, "wb") as f:
        torch.save(local_state(sd), f)
        f.flush()
        os.fsync(f.fileno())


def _result_of(res: Any) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
    """(wait for the write, wait for staging or None) of whatever ``dcp.async_save`` returned."""
    staging = getattr(res, "staging_completion", None)
    upload = getattr(res, "upload_completion", res)
    return upload.result, (staging.result if staging is not None else None)


def dcp_async(sd: dict[str, Any], path: str, stager: Any = None) -> dict[str, float]:
    """DCP ``async_save``: blocked = until it returns, plus until staging completes when it returns a staging future."""
    t0 = time.perf_counter()
    res = dcp.async_save(sd, checkpoint_id=path, async_stager=stager) if stager is not None else dcp.async_save(sd, checkpoint_id=path)
    wait_write, wait_stage = _result_of(res)
    if wait_stage is not None:
        wait_stage()
    blocked = time.perf_counter() - t0
    wait_write()
    return {"blocked_s": blocked, "total_s": time.perf_counter() - t0}


def dc_async(ck: Any, sd: dict[str, Any], path: str) -> dict[str, float]:
    """dist_ckpt: blocked = from ``ck.save`` until ``stage_future.result()`` returns."""
    t0 = time.perf_counter()
    stage_f, write_f = ck.save(path, sd)
    stage_f.result()
    blocked = time.perf_counter() - t0
    write_f.result()
    return {"blocked_s": blocked, "total_s": time.perf_counter() - t0}


def make_dcp_stager(device: str) -> Any:
    """DCP's ``DefaultStager``: async staging into cached (pinned on CUDA) host memory.

    Pinned memory and non-blocking copies need CUDA. Shared memory is off: only
    DCP's process-based executor needs it, and /dev/shm is often small in containers.
    """
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda))


# ---------------------------------------------------------------- the phases


def staging_ceiling(local_bytes: int) -> dict[str, float]:
    """Pinned (and pageable) device→host copy bandwidth of this rank's bytes (CUDA only)."""
    src = torch.empty(local_bytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, pin in (("pinned", True), ("pageable", False)):
        dst = torch.empty(local_bytes, dtype=torch.uint8, pin_memory=pin)
        dst.zero_()
        dst.copy_(src, non_blocking=pin)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"d2h_{name}_GBps"] = local_bytes / statistics.median(times) / 1e9
        del dst
    return out


SYNC_SAVES = ["dist_ckpt", "dcp", "torch_save", *WRITERS, "disk_direct"]
ASYNC_SAVES = ["dist_ckpt", "dcp", "dcp_stager"]
LOADS = ["dist_ckpt", "dcp", "torch_load", *RAW_READERS]
RESHARD_LOADS = ["dist_ckpt", "dcp", *RAW_READERS]


class SavePhase:
    """The save steps of the main job: each contender once per repetition, in rotating order.

    Every timed checkpoint is deleted right after its step (then the disk
    settles): on this disk, saves slow down 2-3x while earlier checkpoints
    are still there, so keeping them would favour whichever contender runs
    first in a repetition. The load sources are written afterwards, untimed.
    Without ``with_async`` nothing holds a second copy of the state (no
    staging arena, no DCP stager, no memcpy ceiling).
    """

    def __init__(self, b: Bench, sd: dict[str, Any], total: int, with_async: bool) -> None:
        self.b, self.sd, self.total = b, sd, total
        self.root, self.src = b.args.dir, f"{b.args.dir}/src"
        self.ck, self.dcp_stager, self.memcpy = None, None, None
        self.prepare_s: float | None = None
        self.stager_error: str | None = None
        self.async_names: list[str] = []
        if with_async:
            self._start_async()

    def _start_async(self) -> None:
        self.ck = dc.make_async_checkpointer()  # created once, as a training job would
        t0 = time.perf_counter()
        self.ck.prepare(self.sd)
        self.prepare_s = self.b.max_over_ranks([time.perf_counter() - t0])[0]
        try:
            self.dcp_stager = make_dcp_stager(self.b.device)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            self.stager_error = f"{type(e).__name__}: {e}"
        self.async_names = [n for n in ASYNC_SAVES if n != "dcp_stager" or self.dcp_stager is not None]
        self.memcpy = MemcpyCeiling(self.sd, self.b.device)

    def _make_dir(self, name: str, path: str) -> None:
        """Create ``path`` for contenders that do not create their own directory (outside the timed step)."""
        if name not in ("dist_ckpt", "dcp"):
            if self.b.rank == 0:
                os.makedirs(path, exist_ok=True)
            dist.barrier()

    def _save(self, name: str, path: str) -> dict[str, float] | None:
        """One rank's part of contender ``name``'s sync save to ``path``."""
        b, sd = self.b, self.sd
        if name == "dist_ckpt":
            dc.save(sd, path)
        elif name == "dcp":
            dcp.save(sd, checkpoint_id=path)
        elif name == "torch_save":
            torch_save_fsync(sd, f"{path}/rank{b.rank:05d}.pt")
        else:  # the write ceiling's variants: this rank's share of the bytes in 16 MiB writes, fsync'd
            share = -(-self.total // b.world)
            return {"bytes": raw_write_share(path, b.rank, share, WRITERS.get(name, 1), name == "disk_direct")}
        return None

    def sync_save(self, name: str) -> dict[str, float]:
        path = f"{self.root}/scratch/{name}"
        self._make_dir(name, path)
        r = self.b.timed(lambda: self._save(name, path))
        if "bytes" in r:
            r["bytes"] *= self.b.world
        self.b.remove([path])
        return r

    def warm_up(self) -> None:
        """One untimed raw write of the whole state before the timed steps.

        The first write of a run was the slowest step in most runs here
        (0.5-1.0 s for 512 MiB against 0.25-0.4 s later, for dist_ckpt, which
        goes first; after a raw write first, dist_ckpt's first save was
        0.26-0.32 s), a one-time cost of the filesystem that would otherwise
        land on whichever contender goes first. It also makes the raw
        writers' source buffer, outside any timed step.
        """
        path = f"{self.root}/scratch/warm_up"
        self._make_dir("disk", path)
        self._save("disk", path)
        self.b.remove([path])

    def write_sources(self) -> None:
        """The checkpoints the load steps read, one per loading contender (untimed)."""
        for name in ("dist_ckpt", "dcp", "torch_save", "disk"):
            path = f"{self.src}/{name}"
            self._make_dir(name, path)
            self._save(name, path)
        self.b.settle()

    def async_save(self, name: str, rep: int) -> dict[str, float]:
        path = f"{self.root}/scratch/async_{name}_{rep}"
        if name == "dist_ckpt":
            r = self.b.timed(lambda: dc_async(self.ck, self.sd, path))
        else:
            r = self.b.timed(lambda: dcp_async(self.sd, path, self.dcp_stager if name == "dcp_stager" else None))
        self.b.remove([path])
        return r

    def close(self) -> None:
        if self.ck is not None:
            self.ck.close()
        if self.dcp_stager is not None:
            self.dcp_stager.close()


def run_saves(b: Bench, sd: dict[str, Any], res: dict[str, Any]) -> None:
    """Sync saves, then async saves and the memcpy ceiling, per repetition; then the load sources; fills ``res``."""
    reps = b.args.reps
    phase = SavePhase(b, sd, res["total_bytes"], with_async=not b.args.no_async)
    res["dc_prepare_s"] = phase.prepare_s
    phase.warm_up()
    for rep in range(reps):
        for name in rotate(SYNC_SAVES, rep):
            r = phase.sync_save(name)
            res["sync"].setdefault(name, []).append(r)
            progress(b, f"rep {rep + 1}/{reps} sync save  {name:<12} {r['s']:.3f} s")
        for name in rotate(phase.async_names, rep):
            r = phase.async_save(name, rep)
            res["async"].setdefault(name, []).append(r)
            progress(b, f"rep {rep + 1}/{reps} async save {name:<12} blocked {r['blocked_s']:.3f} s, total {r['total_s']:.3f} s")
        if phase.memcpy is not None:
            res["memcpy"].append(b.timed(phase.memcpy.copy))
            progress(b, f"rep {rep + 1}/{reps} memcpy of the state {res['memcpy'][-1]['s']:.3f} s")
    phase.write_sources()
    res["dcp_stager_error"] = phase.stager_error
    phase.close()


def run_main(b: Bench) -> dict[str, Any]:
    """The main job: (CUDA) staging ceiling, saves, then loads at the same world size."""
    sd, sizes = built_state(b, fill=True)
    res: dict[str, Any] = {"sync": {}, "async": {}, "memcpy": [], "load": {}, **sizes}
    if b.rank == 0:
        os.makedirs(f"{b.args.dir}/scratch", exist_ok=True)
    dist.barrier()
    if b.device == "cuda":
        ceiling = staging_ceiling(sizes["local_bytes_rank0"])  # this rank's bytes; the slowest rank's bandwidth counts
        res["staging_ceiling"] = dict(zip(ceiling, (-v for v in b.max_over_ranks([-x for x in ceiling.values()]))))
    run_saves(b, sd, res)
    mesh = sd_mesh(sd)
    # The loads need only their target: the source goes before the target is
    # built, so a large state in one process stays at ~2x its size in memory.
    del sd
    gc.collect()
    target = build_state(b.args.total_bytes, mesh, b.device, fill=False)
    res["load"], res["load_warm"] = run_loads(b, target, LOADS, b.args.reps)
    return res


def load_once(b: Bench, target: dict[str, Any], name: str, dests: Destinations) -> dict[str, float] | None:
    """Load the ``<dir>/src`` checkpoint of contender ``name`` into ``target`` (the read ceilings: into ``dests``)."""
    src = f"{b.args.dir}/src"
    if name == "dist_ckpt":
        dc.load(target, f"{src}/dist_ckpt")
    elif name == "dcp":
        dcp.load(target, checkpoint_id=f"{src}/dcp")
    elif name == "torch_load":
        copy_into(target, torch.load(f"{src}/torch_save/rank{b.rank:05d}.pt", weights_only=True, map_location=b.device))
    else:  # the read ceilings' variants, and the reused-buffer reads
        into = dests if name in READERS else None
        return {"bytes": raw_read_share(f"{src}/disk", b.rank, b.world, RAW_READERS[name], into)}
    return None


def run_loads(b: Bench, target: dict[str, Any], names: list[str], reps: int) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[dict[str, float]]]]:
    """Load each source checkpoint into ``target``; verify after each load.

    Returns ``(cold, warm)``: ``cold`` loads start with the page cache dropped
    (the DESIGN §7 figure: bytes come from the disk); each is followed at once
    by a ``warm`` load of the same checkpoint, whose bytes the cold load left
    in the page cache, which shows the library's own cost without the disk.
    The raw reads (the read ceilings) run the same way, so each ceiling has a
    cold and a warm figure.
    """
    cold: dict[str, list[dict[str, float]]] = {}
    warm: dict[str, list[dict[str, float]]] = {}
    prime_read_buffers()
    dests = Destinations(target, b.device)
    for rep in range(reps):
        for name in rotate(names, rep):
            raw = name in RAW_READERS
            for out, label in ((cold, "cold"), (warm, "warm")):
                if not raw:
                    zero_state(target)
                elif name in READERS:
                    dests.zero()  # the ceiling's destinations start as a load's target does
                if out is cold:
                    b.drop_caches()
                r = b.timed(lambda: load_once(b, target, name, dests))
                if raw:
                    r["bytes"] *= b.world
                else:
                    r["verified"] = -b.max_over_ranks([-float(verify_state(target, b.args.total_bytes))])[0]
                out.setdefault(name, []).append(r)
                bad = "" if r.get("verified", 1) else "  VERIFY FAILED"
                progress(b, f"rep {rep + 1}/{reps} load {b.args.saved_world}->{b.world} {name:<12} {label} {r['s']:.3f} s{bad}")
    return cold, warm


# ---------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one rank of benchmarks/bench_checkpoint.py (launched by it)")
    p.add_argument("--mode", choices=["main", "reshard"], required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--total-bytes", type=int, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--saved-world", type=int, required=True)
    p.add_argument("--no-drop-caches", action="store_true")
    p.add_argument("--no-async", action="store_true", help="skip the async saves and the memcpy ceiling (no second copy of the state)")
    p.add_argument("--settle", type=float, default=0.3)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--storage", choices=["file", "s3"], default="file", help="s3: --dir is s3://bucket/prefix on the server the driver started")
    return p.parse_args()


def init_distributed(a: argparse.Namespace) -> None:
    """Logging, threads and the process group (gloo on CPU; CPU gloo + NCCL on CUDA)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=a.log_level.upper(), format=f"%(asctime)s r{rank} %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores, as torchrun's OMP default
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")  # DCP async_save needs a CPU backend
    else:
        dist.init_process_group("gloo")


def main() -> None:
    a = parse_args()
    init_distributed(a)
    b = Bench(a)
    if a.storage == "s3":
        import _bench_s3  # boto3 and the S3 contenders only when asked for

        res = _bench_s3.run_main(b) if a.mode == "main" else _bench_s3.run_reshard(b)
    elif a.mode == "main":
        res = run_main(b)
    else:
        sd, sizes = built_state(b, fill=False)
        cold, warm = run_loads(b, sd, RESHARD_LOADS, a.reps)
        res = {"load": cold, "load_warm": warm, **sizes}
    res.update(world=b.world, dropped_caches=b.dropped_caches)
    if b.rank == 0:
        with open(a.out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter finalization: a gloo worker thread freeing the last collective's
    # tensors then would abort the process (see exit_now in launch/train.py).
    logging.shutdown()
    os._exit(0)
