"""The coordinator at scale: thousands of simulated ranks on one machine.

Drives the real :class:`dist_ckpt.coordinator.Coordinator` (in its own
process, so its peak memory is its own) with ``--ranks`` simulated ranks, each
a real DEALER socket sending real authenticated wire messages
(:func:`dist_ckpt.wire.encode`), spread over a few worker processes. Every rank
describes ``--tensors`` FSDP ``Shard(0)`` tensors (1-D and 2-D, some split
unevenly) plus two replicated ones (a 0-d step counter and a small buffer).
Ranks write no tensor bytes: after their plan arrives each creates its data
file as a sparse file of the right length and reports Done with records
pointing into it, so the manifest is valid.

Format (``--format 1``, ``2`` or ``both``, one fresh coordinator each): in
version 1 the records travel in Done and the coordinator merges them into one
MANIFEST; in version 2 each simulated rank writes its real fragment through
the library's own writer (:func:`dist_ckpt.index_build.write_fragment`, the
storage stream, fsync'd) and reports its name, size and xxh3 in Done, as a real
rank does; the coordinator writes only the index.

Two saves run with the same descriptions: the first plans, the second reuses
the cached plan. Measured:

* ``plan_s`` / ``plan_cached_s``: from the last PlanRequest sent to the last
  PlanReply received (the manifest layout of a new plan is built after the
  replies, while ranks write: ``coordinator_steps_s`` shows its time);
* ``commit_s`` / ``commit_cached_s``: from the last Done sent to the last
  Committed received (records merged and checked, manifest written with fsync,
  directory renamed);
* ``manifest_mb`` (= ``manifest_index_mb``): size of ``MANIFEST`` on disk (version 2: the index);
  ``fragments_mb``: all fragments together (version 1: 0);
* ``coordinator_peak_mb``: peak RSS of the coordinator's process (it imports
  torch, like rank 0: ``coordinator_base_mb`` is its RSS before any rank connects,
  ``coordinator_idle_mb`` with every rank connected and idle before the first save,
  so ``coordinator_growth_mb`` = peak - idle is what the saves add; in-process: idle = base);
* ``load_plan_s``: one rank (a fresh process) reads and validates the manifest
  and plans the reads of its shard of every tensor (``load_planner.plan_reads``).
  Version 1: ``loader.read_manifest``. Version 2: the load's selective path
  (``loader.read_metadata_at``, then ``fragments.needed_cells`` and
  ``fragments.needed_manifest``: the index, then only the fragments of the
  cells its shard touches). ``load_plan_read_mb``: the metadata bytes that rank
  read (counted at its storage); ``load_plan_records`` of ``chunks`` are the
  chunk records it decoded (``load_plan_records_pct``).

``plan_cpu_s`` / ``commit_cpu_s`` are the coordinator process's CPU seconds
over the same spans and ``load_plan_cpu_s`` the loading rank's: on a machine
that other work shares, they move less than the wall times do.

Arrival (``--arrival``): ``straggler`` (default) sends every rank's request
but one, waits until the coordinator is idle, then times from the last rank's
request — the usual shape of a save, where ranks arrive spread out and the
slowest one starts the clock. ``burst`` sends all requests at once and times
from the last one sent, so the coordinator's backlog of decoding is included.

Memory first touch (``--prefault-gib``): in a virtual machine whose host backs
guest memory lazily, the first touch of never-used memory is a host page
fault (measured ~18 us per 4 KiB page here, against well under 1 us on bare
metal): the first plan of a fresh coordinator then spends ~0.4 s in the kernel
for ~100 MB of new arrays. ``--prefault-gib 2`` touches and frees 2 GiB in the
coordinator's process before it serves, which leaves those pages backed; the
figures are then what the code costs rather than what this VM's memory costs.
The coordinator's page faults and kernel-side time per step are reported in
``coordinator_steps_s`` either way.

Past the socket limit (``--in-process``): the coordinator's process holds
one TCP connection per rank and this container's hard open-file limit is
20,000, so the socket runs end at ~19,744 ranks. ``--in-process`` drives the
same coordinator code without sockets (its handlers fed the ranks' real wire
messages; see ``_bench_coordinator_inprocess.py`` for what it leaves out) to
65,536 ranks, with the same JSON fields and ``"mode": "in-process"``
(``"sockets"`` otherwise). Every run also reports ``plan_us_per_rank``,
``commit_us_per_rank`` and ``coordinator_kb_per_rank`` (peak above the base).

Usage::

    python benchmarks/bench_coordinator.py --ranks 4096 --tensors 1000
    python benchmarks/bench_coordinator.py --in-process --ranks 16384,32768,65536 --out runs.jsonl
    python benchmarks/bench_coordinator.py --ranks 4096,16384 --format both --out runs.jsonl
    python benchmarks/bench_coordinator.py --from runs.jsonl --plot docs/figures/coordinator_scale.png

Each run prints one JSON object with every figure on a line of its own
(``--out`` appends them to a file); ``--plot`` draws time and coordinator
memory against ranks, version 1 beside version 2, from this invocation's runs
and those of ``--from`` files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import psutil
import zmq

from dist_ckpt import wire
from dist_ckpt.commit import MANIFEST, encode_objects, encode_record_columns
from dist_ckpt.config import Config
from dist_ckpt.coordinator import Coordinator
from dist_ckpt.description import RankColumns, Schema, encode_description
from dist_ckpt.flatten import flatten
from dist_ckpt.fragments import needed_cells, needed_manifest
from dist_ckpt.index_build import write_fragment
from dist_ckpt.load_planner import plan_reads
from dist_ckpt.loader import read_metadata_at
from dist_ckpt.manifest import ALIGN, Manifest
from dist_ckpt.plan import SavePlan
from dist_ckpt.storage import SaveTarget, get_storage
from dist_ckpt.storage.local import LocalStorage
from dist_ckpt.transport import secure_client
from dist_ckpt.writer import WriteRecord

JOB = "bench-coordinator"
SECRET = b"bench-coordinator-secret-0123456789"
RECV_TIMEOUT_MS = int(os.environ.get("BENCH_RECV_TIMEOUT_S", "600")) * 1000
NAMES = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3", "attn_norm", "mlp_norm")


# ---------------------------------------------------------------- the simulated job


@dataclass(frozen=True)
class Layout:
    """The tensors every rank describes: ``n_sharded`` Shard(0) ones, then the replicated ones."""

    world: int
    schema: Schema
    n_sharded: int

    @staticmethod
    def make(world: int, n_tensors: int) -> Layout:
        keys, shapes = [], []
        for i in range(n_tensors):
            layer, name = divmod(i, len(NAMES))
            rows = world * (4 if name < 7 else 2) - i % 5  # every rank holds rows; some splits uneven
            keys.append(("model", "layers", layer, NAMES[name]))
            shapes.append((rows, 64 * (1 + i % 4)) if name < 7 else (rows,))
        keys += [("optim", "step"), ("model", "rope", "inv_freq")]
        shapes += [(), (64,)]
        dtypes = ["float32"] * n_tensors + ["int64", "float32"]
        return Layout(world, Schema.build(keys, dtypes, shapes, [False] * len(keys)), n_tensors)

    def boxes(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, sizes)``, each ``(len(ranks), S)``: torch.chunk split of dim 0 for the sharded tensors."""
        sch = self.schema
        rows = sch.shape_flat[sch.start[: self.n_sharded]]
        chunk = -(-rows // self.world)
        start = np.minimum(ranks[:, None] * chunk, rows)
        size = np.clip(rows - start, 0, chunk)
        off = np.zeros((len(ranks), sch.width), np.int64)
        siz = np.tile(sch.shape_flat, (len(ranks), 1))
        off[:, sch.start[: self.n_sharded]] = start
        siz[:, sch.start[: self.n_sharded]] = size
        return off, siz

    def nbytes(self, siz: np.ndarray) -> np.ndarray:
        """``(ranks, T)`` bytes of each rank's box of each tensor."""
        sch = self.schema
        vol = np.ones((len(siz), len(sch)), np.int64)
        has = sch.ndim > 0
        vol[:, has] = np.multiply.reduceat(siz, sch.start[has], axis=1)
        return vol * sch.itemsize

    def chunks(self) -> int:
        """Chunk records of a save: every non-empty torch.chunk shard of each sharded tensor, and each replicated tensor once."""
        sch = self.schema
        rows = sch.shape_flat[sch.start[: self.n_sharded]].astype(np.int64)
        chunk = -(-rows // self.world)
        return int((-(-rows // chunk)).sum()) + len(sch) - self.n_sharded

    def structure(self) -> Any:
        nested: dict = {}
        for key in self.schema.keys + (("meta", "created_by"),):
            node = nested
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = 0
        return flatten(nested)[1]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------- processes


def coordinator_main(conn: Any, world: int, root: str, prefault_gib: float, fmt: int) -> None:
    """The coordinator's own process: serve, then report peak memory and its log lines."""
    raise_fd_limit()
    if prefault_gib:  # touch, then free: see --prefault-gib
        np.ones(int(prefault_gib * 2**27))
        with open("/proc/self/clear_refs", "w") as f:  # restart the peak-RSS count (VmHWM) from here
            f.write("5")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("dist_ckpt")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    steps = _time_steps()
    cfg = Config(timeout_s=3600, heartbeat_interval_s=60, heartbeat_timeout_s=3600, format_version=fmt)
    coord = Coordinator(world, JOB, SECRET, "tcp://127.0.0.1:0", get_storage, cfg)
    samples: list[tuple[float, int]] = []  # (monotonic time, RSS): which phase peaks
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.wait(0.01):
            samples.append((time.monotonic(), me.memory_info().rss))

    threading.Thread(target=sample, daemon=True).start()
    conn.send((coord.endpoint, psutil.Process().memory_info().rss))
    while conn.recv() != "stop":  # "stats": what the coordinator holds (diagnostics)
        conn.send({ckpt: (save.phase, len(save.descs), len(save.done), dict(list(save.failed.items())[:3])) for ckpt, save in list(coord._saves.items())})
    peak = _peak_rss()
    stop.set()
    conn.send({"peak": peak, "dropped": dict(coord.dropped), "log": lines, "rss": samples, "steps": steps})
    coord.close()


def _time_steps() -> list[tuple[str, float, int]]:
    """Wrap the coordinator's big steps to record their durations (this process only)."""
    import dist_ckpt.commit as commit
    import dist_ckpt.coordinator as coordinator
    from dist_ckpt.manifest import Manifest
    from dist_ckpt.storage.local import LocalStorage

    steps: list[tuple[str, float, int]] = []  # (step, seconds, page faults in the process meanwhile)

    def timed(name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            try:
                return fn(*a, **k)
            finally:
                steps.append((name, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))

        return run

    import dist_ckpt.plan as plan

    coordinator.plan_save = timed("plan_save", coordinator.plan_save)
    plan.chunk_layout = timed("chunk_layout (while ranks write)", plan.chunk_layout)
    LocalStorage.begin_save = timed("begin_save (tmp dir)", LocalStorage.begin_save)
    coordinator.release_free_memory = timed("release_free_memory", coordinator.release_free_memory)
    commit.build_manifest = timed("build_manifest", commit.build_manifest)
    for module, name, label in ((coordinator, "plan_cells", "plan_cells (v2 splits)"), (commit, "build_index", "build_index (v2)")):
        if hasattr(module, name):
            setattr(module, name, timed(label, getattr(module, name)))
    Manifest.to_msgpack = timed("manifest_to_msgpack", Manifest.to_msgpack)
    from dist_ckpt.manifest_v2 import Index

    Index.to_msgpack = timed("index_to_msgpack (v2)", Index.to_msgpack)
    LocalStorage.write_atomic = timed("write_manifest_fsync", LocalStorage.write_atomic)
    LocalStorage._rename_dir = timed("rename_dir_fsync", LocalStorage._rename_dir)
    return steps


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (VmHWM, which --prefault-gib resets)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Ranks:
    """Simulated ranks ``lo .. hi-1`` of one worker process: one DEALER socket each."""

    def __init__(self, layout: Layout, lo: int, hi: int, endpoint: str, fmt: int) -> None:
        self.layout, self.ranks, self.fmt = layout, np.arange(lo, hi), fmt
        self.socks = self._connect(endpoint)
        off, self.siz = layout.boxes(self.ranks)
        blob = layout.schema.blob
        self.descs = [encode_description(blob, off[i], self.siz[i]) for i in range(len(self.ranks))]
        self.row_bytes = layout.nbytes(self.siz)
        self.outbox: list[list] = []
        self.plans: list[tuple[int, ...]] = []
        self.cells: list[tuple[np.ndarray, np.ndarray] | None] = []  # version 2: each rank's (entries, cells) from its plan
        self.tmp_path = ""

    def _connect(self, endpoint: str) -> list[zmq.Socket]:
        """One DEALER per rank, connected to the coordinator (``--in-process`` ranks have none)."""
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.set(zmq.MAX_SOCKETS, len(self.ranks) + 64)
        socks = []
        for r in self.ranks.tolist():
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
            secure_client(s, SECRET, r, 1 << 30)  # CURVE with rank r's key, as a real rank's agent
            s.connect(endpoint)
            socks.append(s)
        return socks

    def prepare_plan(self, ckpt: str, path: str) -> None:
        world = self.layout.world
        import xxhash

        self.outbox = [
            wire.encode(wire.PlanRequest(JOB, ckpt, int(r), path, world, xxhash.xxh3_64_intdigest(d), d, False), SECRET) for r, d in zip(self.ranks, self.descs)
        ]

    def send(self, which: str) -> float:
        """Send the prepared messages of ``which`` ranks ("all", "all_but_last", "last"); time of the last send."""
        span = {"all": slice(None), "all_but_last": slice(0, -1), "last": slice(-1, None)}[which]
        for sock, frames in list(zip(self.socks, self.outbox))[span]:
            sock.send_multipart(frames, copy=False)
        return time.monotonic()

    def recv(self, kind: type) -> tuple[float, list[wire.Message]]:
        """One message per rank; the time the last one arrived, then the messages.

        Frames are only collected while waiting and authenticated afterwards,
        so the simulated ranks take no CPU from the coordinator (they share
        this machine's cores; real ranks would not).
        """
        frames = [self._recv_skipping(sock, kind) for sock in self.socks]
        t = time.monotonic()
        out = []
        for f in frames:
            msg = wire.decode(f, SECRET)
            if not isinstance(msg, kind):
                raise RuntimeError(f"rank {msg.rank}: expected {kind.__name__}, got {msg}")
            out.append(msg)
        return t, out

    @staticmethod
    def _recv_skipping(sock: zmq.Socket, kind: type) -> list[bytes]:
        """The next frames on ``sock`` that are not a ``CommitInProgress`` (sent before every Committed)."""
        while True:
            frames = sock.recv_multipart()
            if kind is wire.CommitInProgress or not isinstance(wire.decode(frames, SECRET), wire.CommitInProgress):
                return frames

    def recv_plans(self) -> float:
        t, replies = self.recv(wire.PlanReply)
        n = len(self.layout.schema)
        off, siz = self.layout.boxes(self.ranks)  # each rank derives its cells from its own boxes, as a real rank does
        sch = self.layout.schema
        own = [RankColumns(int(r), sch, np.concatenate([off[i], siz[i]])) for i, r in enumerate(self.ranks.tolist())]
        parsed = [SavePlan.parse_rank_plan_v2(m.plan, n, c) for m, c in zip(replies, own)]  # type: ignore[attr-defined]
        self.plans, self.cells = [p for p, _ in parsed], [c for _, c in parsed]
        if any((c is None) != (self.fmt == 1) for c in self.cells):
            raise RuntimeError(f"format {self.fmt} save, but the plan replies {'carry' if self.fmt == 1 else 'lack'} cells")
        self.tmp_path = replies[0].tmp_path  # type: ignore[attr-defined]
        return t

    def prepare_done(self, ckpt: str, path: str) -> None:
        """Sparse data files of the right length, and Done messages pointing into them (version 2: into the rank's fragment)."""
        os.makedirs(f"{self.tmp_path}/data", exist_ok=True)
        objects = {("meta", "created_by"): "bench_coordinator"}
        storage, final = get_storage(path)
        target = SaveTarget(final.rstrip("/"), self.tmp_path)
        self.outbox = []
        for i, r in enumerate(self.ranks.tolist()):
            tags = np.array(self.plans[i], np.int64)
            nbytes = self.row_bytes[i, tags]
            padded = -(-nbytes // ALIGN) * ALIGN
            offset = np.cumsum(padded) - padded
            name = f"data/r{r:05d}.bin"
            files = [name] if len(tags) else []
            if len(tags):
                with open(f"{self.tmp_path}/{name}", "wb") as f:
                    f.truncate(int(offset[-1] + nbytes[-1]))
            cells = self.cells[i]
            if cells is None:
                records = encode_record_columns(files, tags, np.zeros(len(tags)), offset, nbytes, np.zeros(len(tags), np.uint64))
            else:  # the real rank's path: its records into its fragment (written, fsync'd), Done names it
                recs = [WriteRecord(t, name, o, n, 0) for t, o, n in zip(tags.tolist(), offset.tolist(), nbytes.tolist())]
                records = write_fragment(storage, target, r, recs, cells[0], cells[1])
            objs = encode_objects(objects if r == 0 else {}, {}, self.layout.structure() if r == 0 else None)
            self.outbox.append(wire.encode(wire.Done(JOB, ckpt, r, records, objs), SECRET))

    def recv_committed(self) -> float:
        return self.recv(wire.Committed)[0]


def worker_main(conn: Any, world: int, n_tensors: int, lo: int, hi: int, endpoint: str, fmt: int) -> None:
    """Serve the driver's commands for ranks ``lo .. hi-1`` until "exit"."""
    raise_fd_limit()
    ranks = Ranks(Layout.make(world, n_tensors), lo, hi, endpoint, fmt)
    conn.send("ready")
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            break
        conn.send(getattr(ranks, cmd)(*args))
    for s in ranks.socks:
        s.close(0)
    ranks.ctx.term()


class CountingStorage(LocalStorage):
    """Local files, counting what whole-file reads (MANIFEST, fragments) return: the metadata a load reads."""

    def __init__(self) -> None:
        self.read_bytes_total, self.paths, self._lock = 0, [], threading.Lock()

    def read_bytes(self, path: str, *a: Any, **k: Any) -> bytes:
        data = super().read_bytes(path, *a, **k)
        with self._lock:  # fragments are read by a few threads at once
            self.read_bytes_total += len(data)
            self.paths.append(path)
        return data


def load_plan_main(conn: Any, path: str, world: int, n_tensors: int, rank: int) -> None:
    """One rank loading: read and validate the metadata its shard needs, plan the reads of its shard of every tensor."""
    layout = Layout.make(world, n_tensors)
    off, siz = layout.boxes(np.array([rank]))
    sch = layout.schema
    box = [(key, off[0, a : a + n], siz[0, a : a + n]) for key, a, n in zip(sch.keys, sch.start.tolist(), sch.ndim.tolist())]
    storage = CountingStorage()
    t0, cpu0 = time.perf_counter(), time.process_time()
    meta, root, _ = read_metadata_at(path, storage)
    fragments_read = 0
    if isinstance(meta, Manifest):
        manifest = meta
    else:  # version 2: what load_into does: the cells its boxes touch, from only their owners' fragments
        cells = needed_cells(meta, [(meta.number[(None, key)], o, z) for key, o, z in box])
        manifest, fragments_read = needed_manifest(storage, root, meta, cells)
    t1 = time.perf_counter()
    n_ops = 0
    for i, (key, o, z) in enumerate(box):
        c = manifest.tensors[key].chunks
        n_ops += len(plan_reads(o, z, int(sch.itemsize[i]), c.offsets, c.sizes, c.file, c.offset))
    t2, cpu2 = time.perf_counter(), time.process_time()
    # chunk records decoded: every one of a v1 MANIFEST; a v2 load's, those of the fragments it read
    decoded = sum(len(e.chunks) for e in manifest.tensors.values())
    if fragments_read:
        decoded = sum(msgpack.unpackb(LocalStorage().read_bytes(p), raw=False)["n"] for p in storage.paths if p.endswith(".frag"))
    conn.send(
        {
            "read_manifest_s": t1 - t0,
            "plan_reads_s": t2 - t1,
            "load_plan_s": t2 - t0,
            "load_plan_cpu_s": cpu2 - cpu0,
            "read_ops": n_ops,
            "load_plan_read_bytes": storage.read_bytes_total,
            "load_plan_fragments": fragments_read,
            "load_plan_records": decoded,
        }
    )


# ---------------------------------------------------------------- driver


class Driver:
    def __init__(self, world: int, n_tensors: int, procs: int, root: str, prefault_gib: float = 0.0, fmt: int = 2) -> None:
        self.world, self.n_tensors, self.root = world, n_tensors, root
        self.marks: list[tuple[str, float]] = []
        self.cpu: list[float] = []  # per phase (plan, commit, plan, commit): the coordinator's CPU seconds
        ctx = mp.get_context("fork")
        self.ctx = ctx
        self.coord_conn, child = ctx.Pipe()
        self.coord = ctx.Process(target=coordinator_main, args=(child, world, root, prefault_gib, fmt), daemon=True)
        self.coord.start()
        child.close()  # only the child holds its end now: its death ends our recv() with EOFError
        endpoint, self.coord_base = self.coord_conn.recv()
        bounds = np.linspace(0, world, procs + 1).astype(int).tolist()
        self.workers = []
        for lo, hi in zip(bounds, bounds[1:]):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(b, world, n_tensors, lo, hi, endpoint, fmt), daemon=True)
            p.start()
            b.close()
            self.workers.append((p, a))
        for _, c in self.workers:
            assert c.recv() == "ready"
        self.wait_connected(int(endpoint.rsplit(":", 1)[1]))
        self.wait_idle()  # every handshake done: what the connections alone cost
        self.coord_idle = psutil.Process(self.coord.pid).memory_info().rss

    def wait_connected(self, port: int, timeout: float = 300.0) -> None:
        """Until the coordinator holds one TCP connection per rank."""
        proc = psutil.Process(self.coord.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = sum(1 for c in proc.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            if n >= self.world:
                return
            time.sleep(0.2)
        raise TimeoutError(f"only {n} of {self.world} ranks connected")

    def call(self, conns: list[Any], *cmd: Any) -> list[Any]:
        for c in conns:
            c.send(cmd)
        return [c.recv() for c in conns]

    def wait_idle(self, quiet_s: float = 0.3) -> None:
        """Until the coordinator process has used no CPU for ``quiet_s``."""
        proc = psutil.Process(self.coord.pid)
        cpu = lambda: sum(proc.cpu_times()[:2])  # noqa: E731
        last, still = cpu(), 0.0
        while still < quiet_s:
            time.sleep(0.05)
            now = cpu()
            still = still + 0.05 if now - last < 0.004 else 0.0
            last = now

    def coordinator_cpu(self) -> float:
        """CPU seconds (user + system) the coordinator's process has used: less sensitive than wall time to other load on the machine."""
        return sum(psutil.Process(self.coord.pid).cpu_times()[:2])

    def phase(self, prepare: tuple, recv: str, arrival: str) -> float:
        """Send one message per rank, collect one reply per rank; seconds from the last send to the last reply
        (and in :attr:`cpu`, the coordinator's CPU seconds meanwhile)."""
        conns = [c for _, c in self.workers]
        self.call(conns, *prepare)
        if arrival == "burst":
            cpu = self.coordinator_cpu()
            sent = self.call(conns, "send", "all")
            got = self.call(conns, recv)
            self.cpu.append(self.coordinator_cpu() - cpu)
            return max(got) - max(sent)
        self.call(conns[:-1], "send", "all")
        self.call(conns[-1:], "send", "all_but_last")
        self.wait_idle()
        for c in conns[:-1]:
            c.send((recv,))
        last = conns[-1]
        cpu = self.coordinator_cpu()
        last.send(("send", "last"))
        last.send((recv,))
        t_sent = last.recv()
        got = [c.recv() for c in conns]
        self.cpu.append(self.coordinator_cpu() - cpu)
        return max(got) - t_sent

    def save(self, ckpt: str, path: str, arrival: str) -> tuple[float, float]:
        self.marks.append((f"plan{ckpt}", time.monotonic()))
        plan_s = self.phase(("prepare_plan", ckpt, path), "recv_plans", arrival)
        self.marks.append((f"commit{ckpt}", time.monotonic()))
        commit_s = self.phase(("prepare_done", ckpt, path), "recv_committed", arrival)
        self.marks.append(("end", time.monotonic()))
        return plan_s, commit_s

    def peaks(self, samples: list[tuple[float, int]]) -> dict[str, float]:
        """Peak coordinator RSS (MiB) in each phase."""
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            inside = [rss for t, rss in samples if a <= t < b]
            if inside and name != "end":
                out[name] = round(max(inside) / 2**20, 1)
        return out

    def close(self) -> dict:
        for p, c in self.workers:
            try:
                c.send(("exit",))
            except OSError:  # that worker died; its error is on stderr
                pass
        self.coord_conn.send("stop")
        report = self.coord_conn.recv()
        for p, _ in self.workers:
            p.join(30)
        self.coord.join(30)
        return report

    def load_plan(self, path: str, rank: int) -> dict:
        return load_plan_fresh(path, self.world, self.n_tensors, rank)


def load_plan_fresh(path: str, world: int, n_tensors: int, rank: int) -> dict:
    """:func:`load_plan_main` in a fresh process: its figures."""
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=load_plan_main, args=(b, path, world, n_tensors, rank))
    p.start()
    b.close()
    out = a.recv()
    p.join()
    return out


def run_one(args: argparse.Namespace, ranks: int, fmt: int) -> dict:
    """One benchmark run: ``ranks`` simulated ranks saving twice in format ``fmt``, then one rank's load plan."""
    procs = args.procs or min(16, max(1, math.ceil(ranks / 1024)))
    hard = raise_fd_limit()
    if ranks + 256 > hard:
        sys.exit(f"{ranks} ranks need {ranks + 256} file descriptors in the coordinator; RLIMIT_NOFILE allows {hard} (--in-process runs past it)")
    root = f"{args.dir}/v{fmt}-{ranks}" if args.dir else tempfile.mkdtemp(prefix="bench_coordinator-")
    os.makedirs(root, exist_ok=True)
    try:
        t0 = time.perf_counter()
        drv = Driver(ranks, args.tensors, procs, root, args.prefault_gib, fmt)
        setup_s = time.perf_counter() - t0
        try:
            plan_s, commit_s = drv.save("0", f"{root}/ckpt-0", args.arrival)
            plan_cached_s, commit_cached_s = drv.save("1", f"{root}/ckpt-1", args.arrival)
        finally:
            if sys.exc_info()[0] is not None:
                drv.coord_conn.send("stats")
                print("coordinator saves:", drv.coord_conn.recv(), file=sys.stderr)
            report = drv.close()
            if sys.exc_info()[0] is not None:
                print("coordinator log:", *report["log"], f"dropped: {report['dropped']}", sep="\n  ", file=sys.stderr)
        manifest_bytes = os.path.getsize(f"{root}/ckpt-1/{MANIFEST}")
        data_dir = f"{root}/ckpt-1/data"
        fragment_bytes = sum(e.stat().st_size for e in os.scandir(data_dir) if e.name.endswith(".frag"))
        load = drv.load_plan(f"{root}/ckpt-1", ranks // 3)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    figures = {"plan_s": plan_s, "plan_cached_s": plan_cached_s, "commit_s": commit_s, "commit_cached_s": commit_cached_s}
    figures.update(plan_cpu_s=drv.cpu[0], commit_cpu_s=drv.cpu[1])
    out = result_fields(ranks, args.tensors, fmt, figures, manifest_bytes, fragment_bytes, report["peak"], drv.coord_base, load, drv.coord_idle)
    out.update(
        mode="sockets",
        coordinator_peak_mb_by_phase=drv.peaks(report["rss"]),
        arrival=args.arrival,
        procs=procs,
        prefault_gib=args.prefault_gib,
        setup_s=round(setup_s, 2),
        dropped=report["dropped"],
        coordinator_log=[line for line in report["log"] if "plan for save" in line or "committed" in line],
        coordinator_steps_s=[(name, round(t, 3), faults) for name, t, faults in report["steps"]],
    )
    return out


def result_fields(
    ranks: int, tensors: int, fmt: int, t: dict[str, float], manifest_bytes: int, fragment_bytes: int, peak: int, base: int, load: dict, idle: int | None = None
) -> dict:
    """The JSON fields both modes share (``t``: the phases' seconds and CPU seconds), per rank too.

    ``idle``: the coordinator's RSS with every rank connected, before the first save (default ``base``: no connections).
    """
    idle = base if idle is None else idle
    layout = Layout.make(ranks, tensors)
    mb = lambda n: round(n / 2**20, 3)  # noqa: E731
    return {
        "format": fmt,
        "ranks": ranks,
        "tensors": tensors,
        "plan_s": round(t["plan_s"], 4),
        "plan_cached_s": round(t["plan_cached_s"], 4),
        "commit_s": round(t["commit_s"], 4),
        "manifest_mb": mb(manifest_bytes),
        "manifest_index_mb": mb(manifest_bytes),
        "fragments_mb": mb(fragment_bytes),
        "coordinator_peak_mb": round(peak / 2**20, 1),
        "load_plan_s": round(load["load_plan_s"], 4),
        "plan_cpu_s": round(t["plan_cpu_s"], 3),
        "commit_cpu_s": round(t["commit_cpu_s"], 3),
        "load_plan_cpu_s": round(load["load_plan_cpu_s"], 4),
        "load_plan_read_mb": mb(load["load_plan_read_bytes"]),
        "load_plan_fragments": load["load_plan_fragments"],
        "load_plan_records": load["load_plan_records"],
        "chunks": layout.chunks(),
        "load_plan_records_pct": round(100 * load["load_plan_records"] / max(1, layout.chunks()), 4),
        "commit_cached_s": round(t["commit_cached_s"], 4),
        "coordinator_base_mb": round(base / 2**20, 1),
        # per rank: what each added rank costs the coordinator (memory above its base before the first save)
        "plan_us_per_rank": round(1e6 * t["plan_s"] / ranks, 3),
        "commit_us_per_rank": round(1e6 * t["commit_s"] / ranks, 3),
        "coordinator_kb_per_rank": round((peak - base) / 1024 / ranks, 3),
        # what the saves themselves add: the peak over the idle coordinator with every rank connected
        "coordinator_idle_mb": round(idle / 2**20, 1),
        "coordinator_growth_mb": round((peak - idle) / 2**20, 1),
        "read_manifest_s": round(load["read_manifest_s"], 4),
        "plan_reads_s": round(load["plan_reads_s"], 4),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every (ranks, format) asked for, print each result as a JSON line, draw ``--plot``; returns the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default=None, help="rank counts, comma-separated (default 4096; none with --from)")
    ap.add_argument("--tensors", type=int, default=1000, help="Shard(0) tensors per rank (plus 2 replicated)")
    ap.add_argument("--format", choices=("1", "2", "both"), default="2", help="checkpoint format version the coordinator writes")
    ap.add_argument("--procs", type=int, default=0, help="worker processes for the simulated ranks (default: one per 1024 ranks, 1..16)")
    ap.add_argument("--arrival", choices=("straggler", "burst"), default="straggler")
    ap.add_argument("--dir", default=None, help="where checkpoints go, one subdirectory per run (default: a temporary directory, removed)")
    ap.add_argument(
        "--prefault-gib", type=float, default=0.0, help="touch and free this much memory in the coordinator's process first (see the module docstring)"
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="no sockets: the coordinator's own handlers fed the ranks' messages directly, past the ~19.7k ranks the open-file limit allows "
        "(benchmarks/_bench_coordinator_inprocess.py; no wire cost measured)",
    )
    ap.add_argument("--out", default=None, help="append each run's JSON line to this file")
    ap.add_argument("--from", dest="sources", action="append", default=[], help="earlier runs' JSON lines (a file of --out) to plot with these")
    ap.add_argument("--plot", default=None, help="draw time and coordinator memory against ranks, v1 beside v2, into this PNG")
    args = ap.parse_args(argv)
    ranks = [int(r) for r in (args.ranks or ("" if args.sources else "4096")).split(",") if r]
    formats = [1, 2] if args.format == "both" else [int(args.format)]
    results = []
    run = run_one
    if args.in_process:
        from _bench_coordinator_inprocess import run_one as run  # noqa: F811
    for r in ranks:
        for fmt in formats:
            out = run(args, r, fmt)
            for line in out.pop("coordinator_log"):
                print("coordinator:", line)
            print(json.dumps(out), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(out) + "\n")
            results.append(out)
    if args.plot:
        from _bench_coordinator_plot import plot  # matplotlib: the bench extra

        earlier = [json.loads(line) for src in args.sources for line in open(src) if line.strip().startswith("{")]
        plot(earlier + results, args.plot)
    return results


if __name__ == "__main__":
    main()
