"""``bench_coordinator.py --in-process``: the coordinator's save path past the socket limit, without sockets.

The socket benchmark holds one TCP connection per simulated rank in the
coordinator's process; this container's hard open-file limit (20,000, which
we cannot raise) ends it at ~19,744 ranks. This mode drives the SAME
coordinator code to 65,536 ranks and beyond: a real
:class:`~dist_ckpt.coordinator.Coordinator` runs in its own process (so its
peak memory is its own), but its event loop is stopped and this module is its
loop: each simulated rank's real wire message (``wire.encode``, as the socket
mode's ranks send it) is decoded (``wire.decode``) and handed to the
coordinator's own handler for its type, which decodes the description or the
fragment report, plans (``plan_save``, ``plan_cells``), encodes every reply
(the coordinator's own encoding, its ``_send_frames`` here collecting the frames instead of
writing them to a socket) and commits (``commit_checkpoint``: ``build_index``,
the index written with fsync, the directory renamed) on its I/O thread, whose
results this loop runs as the event loop would.

Not measured: the sockets (CURVE, the kernel, ZeroMQ's queues), ZAP
handshakes, heartbeats and deadlines. The simulated ranks are the socket
mode's own (:class:`bench_coordinator.Ranks` without sockets, so their plan
handling follows that code) in the driver's process; their fragment writes
are not fsync'd here (64k fsyncs at ~7 ms on this VM would take minutes and
are no coordinator cost); the coordinator's own writes are.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import select
import shutil
import tempfile
import time
from typing import Any

import bench_coordinator as bc
import numpy as np
import psutil

from dist_ckpt import wire
from dist_ckpt.commit import MANIFEST
from dist_ckpt.config import Config
from dist_ckpt.coordinator import Coordinator
from dist_ckpt.storage import get_storage
from dist_ckpt.storage.local import LocalWriteStream

BLOCK = 1024  # simulated ranks per batch handed to the coordinator's process


class LocalRanks(bc.Ranks):
    """Simulated ranks without sockets: the driver carries their messages to the coordinator's handlers."""

    def __init__(self, layout: bc.Layout, lo: int, hi: int, fmt: int) -> None:
        super().__init__(layout, lo, hi, "", fmt)
        self.inbox: list[wire.Message] = []

    def _connect(self, endpoint: str) -> list:
        return []

    def recv(self, kind: type) -> tuple[float, list[wire.Message]]:
        """This block's messages of type ``kind`` (``CommitInProgress`` skipped, as the socket ranks do)."""
        got = sorted((m for m in self.inbox if isinstance(m, kind)), key=lambda m: m.rank)  # the socket ranks read them rank by rank
        self.inbox = [m for m in self.inbox if not isinstance(m, (kind, wire.CommitInProgress))]
        if [m.rank for m in got] != self.ranks.tolist():
            raise RuntimeError(f"ranks {self.ranks[0]}..{self.ranks[-1]}: expected one {kind.__name__} each, got {len(got)}")
        return time.monotonic(), got


def coordinator_main(conn: Any, world: int, fmt: int, prefault_gib: float) -> None:
    """The coordinator's process: a real Coordinator whose loop is this function, fed messages over ``conn``."""
    if prefault_gib:  # as the socket mode's --prefault-gib
        np.ones(int(prefault_gib * 2**27))
    steps = bc._time_steps()
    cfg = Config(timeout_s=3600, heartbeat_interval_s=60, heartbeat_timeout_s=3600, format_version=fmt)
    coord = Coordinator(world, bc.JOB, bc.SECRET, "tcp://127.0.0.1:0", get_storage, cfg)
    coord._stop.set()  # its socket loop ends: from here on this function is its event loop
    coord._thread.join()
    sent: list[tuple[int, list[bytes]]] = []
    coord._identity = dict.fromkeys(range(world), b"")  # every rank "connected": the coordinator encodes for each as it would
    coord._send_frames = lambda rank, frames: sent.append((rank, [bytes(f) for f in frames]))  # type: ignore[method-assign]
    pending = _count_io(coord)
    proc = psutil.Process()
    conn.send(proc.memory_info().rss)
    while True:
        cmd, arg = conn.recv()
        if cmd == "feed":  # handle these messages as they would arrive; seconds and CPU seconds spent
            t, cpu = time.perf_counter(), time.process_time()
            for frames in arg:
                msg = wire.decode(frames, bc.SECRET, coord._limits, max_rank=world)
                coord._HANDLERS[type(msg)](coord, msg)
                _pump(coord, pending)
            conn.send((time.perf_counter() - t, time.process_time() - cpu))
        elif cmd == "reset_peak":  # restart the peak-RSS count (VmHWM) at this phase's start
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            conn.send(proc.memory_info().rss)
        elif cmd == "peak":
            conn.send(bc._peak_rss())
        elif cmd == "take":  # the next ``arg`` replies sent, outside every timed and peak-counted span
            conn.send(sent[:arg])
            del sent[:arg]
        elif cmd == "stop":
            conn.send({"steps": steps, "dropped": dict(coord.dropped), "failed": {c: s.failed for c, s in coord._saves.items() if s.failed}})
            coord.close()
            return


def _count_io(coord: Coordinator) -> list[int]:
    """Count the coordinator's storage jobs in flight (its I/O thread's submit), so the loop knows when to wait."""
    pending, submit = [0], coord._io.submit

    def counted(work: Any, then: Any) -> None:
        pending[0] += 1
        submit(work, then)

    coord._io.submit = counted  # type: ignore[method-assign]
    return pending


def _pump(coord: Coordinator, pending: list[int]) -> None:
    """Run the results of the coordinator's storage jobs on this loop, as its event loop does, until none is in flight."""
    while pending[0]:
        select.select([coord._io.wake_fd], [], [], 1.0)
        for then in coord._io.finished():
            pending[0] -= 1
            then()


class InProcessDriver:
    """The driver's side: the simulated ranks in blocks, the coordinator's process, and one phase at a time."""

    def __init__(self, world: int, n_tensors: int, fmt: int, prefault_gib: float) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=coordinator_main, args=(child, world, fmt, prefault_gib), daemon=True)
        self.proc.start()
        child.close()
        self.base = self.conn.recv()
        LocalWriteStream.sync = lambda self: None  # type: ignore[method-assign]  # the simulated ranks' fragments only: see the module docstring
        layout = bc.Layout.make(world, n_tensors)
        self.blocks = [LocalRanks(layout, lo, min(lo + BLOCK, world), fmt) for lo in range(0, world, BLOCK)]
        self.world, self.peaks, self.spans = world, {}, {}  # type: ignore[var-annotated]

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def phase(self, name: str, prepare: str, ckpt: str, path: str) -> tuple[float, float]:
        """Every rank's message of one phase, the last rank's alone (the clock's straggler); its (seconds, CPU seconds)."""
        self.call("reset_peak")
        earlier = [0.0, 0.0]
        for i, block in enumerate(self.blocks):
            getattr(block, prepare)(ckpt, path)
            frames = block.outbox if i < len(self.blocks) - 1 else block.outbox[:-1]
            spent = self.call("feed", frames)
            earlier = [earlier[0] + spent[0], earlier[1] + spent[1]]
            if i < len(self.blocks) - 1:
                block.outbox = []
            if prepare == "prepare_done":  # the block's plan is in its Done messages now
                block.plans, block.cells = [], []
        last = self.call("feed", self.blocks[-1].outbox[-1:])
        self.blocks[-1].outbox = []
        self.peaks[name] = round(self.call("peak") / 2**20, 1)
        self.spans[name] = {"earlier_messages_s": round(earlier[0], 3), "earlier_messages_cpu_s": round(earlier[1], 3)}
        while replies := self.call("take", 4 * BLOCK):
            for rank, frames in replies:
                self.blocks[rank // BLOCK].inbox.append(wire.decode(frames, bc.SECRET))
        return last

    def save(self, ckpt: str, path: str) -> tuple[tuple[float, float], tuple[float, float]]:
        plan = self.phase(f"plan{ckpt}", "prepare_plan", ckpt, path)
        for block in self.blocks:
            block.recv_plans()
        commit = self.phase(f"commit{ckpt}", "prepare_done", ckpt, path)
        for block in self.blocks:
            block.recv_committed()
        return plan, commit


def run_one(args: Any, ranks: int, fmt: int) -> dict:
    """One ``--in-process`` run: the socket run's fields where they mean the same, ``mode`` says which."""
    root = f"{args.dir}/inproc-v{fmt}-{ranks}" if args.dir else tempfile.mkdtemp(prefix="bench_coordinator-inproc-")
    os.makedirs(root, exist_ok=True)
    try:
        t0 = time.perf_counter()
        drv = InProcessDriver(ranks, args.tensors, fmt, args.prefault_gib)
        setup_s = time.perf_counter() - t0
        (plan, commit), (plan_c, commit_c) = drv.save("0", f"{root}/ckpt-0"), drv.save("1", f"{root}/ckpt-1")
        report = drv.call("stop")
        drv.proc.join(30)
        drv.blocks = []  # the loading rank is forked from here: not with millions of the simulated ranks' objects for its GC to walk
        gc.collect()
        if report["failed"]:
            raise RuntimeError(f"saves failed: {report['failed']}")
        manifest_bytes = os.path.getsize(f"{root}/ckpt-1/{MANIFEST}")
        fragment_bytes = sum(e.stat().st_size for e in os.scandir(f"{root}/ckpt-1/data") if e.name.endswith(".frag"))
        load = bc.load_plan_fresh(f"{root}/ckpt-1", ranks, args.tensors, ranks // 3)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    figures = {
        "plan_s": plan[0],
        "plan_cached_s": plan_c[0],
        "commit_s": commit[0],
        "commit_cached_s": commit_c[0],
        "plan_cpu_s": plan[1],
        "commit_cpu_s": commit[1],
    }
    out = bc.result_fields(ranks, args.tensors, fmt, figures, manifest_bytes, fragment_bytes, max(drv.peaks.values()) * 2**20, drv.base, load)
    out.update(
        mode="in-process",
        arrival="straggler",
        setup_s=round(setup_s, 2),
        coordinator_peak_mb_by_phase=drv.peaks,
        earlier_messages_by_phase=drv.spans,
        dropped=report["dropped"],
        coordinator_steps_s=[(name, round(t, 3), faults) for name, t, faults in report["steps"]],
        coordinator_log=[],
        prefault_gib=args.prefault_gib,
    )
    return out
