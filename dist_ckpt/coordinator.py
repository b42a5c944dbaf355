"""The coordinator: rank 0's thread that plans, merges and commits every save.

It owns a ROUTER socket and its own ``zmq.Context`` and never touches the
training process group. One save moves through these phases::

    plan    every rank sends PlanRequest(description)   -> plan (or reuse the cached plan)
            coordinator creates <path>.tmp-<job>-<seq>/data, replies PlanReply to all
    write   ranks write their own files, send Heartbeat while busy, then Done or Failed
    commit  all Done -> validate records against the plan -> MANIFEST -> rename -> fsync
            -> Committed to every rank;   any Failed / silent rank / timeout -> Aborted

Input is never trusted. The ROUTER is a CURVE server behind a ZAP gate that
admits only the job's rank keys (:mod:`dist_ckpt.transport`), so peers
without the secret never get a byte buffered; a message that then fails
authentication or validation is dropped and counted in
:attr:`Coordinator.dropped` (by reason, refused handshakes as
``handshake``), logged once per reason, and the coordinator keeps serving.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash
import zmq

from . import wire
from .commit import CommitRequest, RecordTable, commit_checkpoint, decode_objects, decode_records, prepare_tmp_dir
from .config import Config
from .description import BoxStore, RankColumns, SchemaCache, decode_description
from .errors import DistCkptError, WireError
from .plan import PlanCache, SavePlan
from .planner import plan_save
from .storage import Storage
from .transport import ConnectionGate, ZapGate, pending_cap, raise_fd_limit, require_curve, secure_server

log = logging.getLogger(__name__)

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):  # another libc: nothing to do
    _malloc_trim = None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    A save over thousands of ranks frees hundreds of MB of planning and
    merging temporaries and ZeroMQ message buffers, which glibc would keep
    mapped: the coordinator calls this while ranks write and after each
    save, so its footprint between phases is what it actually holds.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass
class _Save:
    """Book-keeping of one save at the coordinator."""

    ckpt: str
    started: float
    phase: str = "plan"
    path: str = ""
    overwrite: bool = False
    descs: dict[int, RankColumns | None] = field(default_factory=dict)  # None: the rank's description was invalid
    boxes: BoxStore | None = None  # every rank's boxes, one matrix per schema
    digests: dict[int, int] = field(default_factory=dict)
    plan: SavePlan | None = None
    tmp_path: str = ""
    done: set[int] = field(default_factory=set)
    records: RecordTable | None = None  # every Done's records, merged as they arrive
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)


class Coordinator:
    """Serve saves for ``world_size`` ranks on a ROUTER socket bound to ``bind``.

    Args:
        world_size: number of ranks taking part in every save.
        job: job id carried in every message.
        secret: HMAC key shared with every rank.
        bind: ``tcp://host:port`` (port 0 or ``*``: pick a free one).
        storage_for: returns the storage backend for a checkpoint path.
        config: timeouts and limits.
        on_connected: called once (on the coordinator thread) when every rank's key has been admitted.
    """

    def __init__(self, world_size: int, job: str, secret: bytes, bind: str, storage_for: Callable[[str], tuple[Storage, str]], config: Config, on_connected: Callable[[], None] | None = None) -> None:
        self.world_size = world_size
        self.job = job
        self._secret = secret
        self._storage_for = storage_for
        self._config = config
        self._limits = wire.Limits(max_frame=config.max_message_bytes, max_total=config.max_message_bytes)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._ctx, self._sock, self._zap, self._gate, self.endpoint = _listen(bind, secret, world_size, max(config.max_message_bytes, self._limits.max_header), self.dropped)
        self._leftovers: dict[str, str] = {}  # tmp dir -> checkpoint path, whose removal failed: retried
        self._next_retry = 0.0
        self._on_connected = on_connected
        self._identity: dict[int, bytes] = {}
        self._saves: dict[str, _Save] = {}
        self._finished: collections.OrderedDict[str, wire.Message] = collections.OrderedDict()
        self._cache = PlanCache()
        self._schemas = SchemaCache()  # FSDP ranks share one schema: decoded once, not once per rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dist_ckpt-coordinator", daemon=True)
        self._thread.start()
        log.info("[rank 0] coordinator for %d ranks listening on %s", world_size, self.endpoint)

    def close(self) -> None:
        """Stop serving and close the socket; saves in flight are abandoned.

        Replies already queued are still delivered (up to 5 s) to ranks that are alive.
        """
        self._stop.set()
        self._thread.join(timeout=10)
        self._retry_leftovers(force=True)
        # Linger: the last Committed/Aborted may still be queued for other ranks
        # when rank 0's own save has returned and its process is exiting.
        self._sock.close(linger=5000)
        self._gate.close()
        self._zap.close()
        self._ctx.term()

    # -- event loop ---------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        for s in (self._sock, self._zap.socket, self._gate.socket):
            poller.register(s, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                # While connections are unauthenticated, look at them every 10 ms: one may be
                # filling a handshake frame buffer (see ConnectionGate).
                ready = dict(poller.poll(10 if self._gate.pending else 100))
                # Handshakes first: they are what an honest rank waits on and what a flood holds.
                if self._gate.socket in ready or self._gate.pending:
                    self._gate.handle()
                if self._zap.socket in ready:
                    self._zap.handle()
                    if self._on_connected is not None and len(self._zap.admitted) == self.world_size:
                        callback, self._on_connected = self._on_connected, None
                        callback()
                if self._sock in ready:
                    self._receive()
                now = time.monotonic()
                self._check_deadlines(now)
                if self._leftovers and now >= self._next_retry:
                    self._retry_leftovers()
            except Exception:  # the coordinator must outlive any bug in one save's handling
                log.exception("[rank 0] coordinator error (continuing)")

    def _receive(self) -> None:
        # A bounded batch: a busy peer must not keep the loop from handshakes and deadlines.
        for _ in range(1024):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_frames(frames)

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if reason == "stale":  # e.g. a heartbeat crossing the Committed: routine
            log.debug("[rank 0] coordinator dropped a stale message: %s", detail)
        elif self.dropped[reason] == 1:
            log.warning("[rank 0] coordinator dropped a message (%s): %s; further drops of this kind are only counted", reason, detail)

    def _on_frames(self, frames: list) -> None:
        if len(frames) < 2:
            return self._drop("frames", "no identity frame")
        identity = bytes(frames[0].buffer)
        try:
            msg = wire.decode(frames[1:], self._secret, self._limits, max_rank=self.world_size)
        except WireError as e:
            return self._drop(getattr(e, "reason", "invalid"), str(e))
        if msg.job != self.job:
            return self._drop("job", f"message for job {msg.job!r}")
        # The ZAP gate admitted this connection with one rank's key: it may only speak for that rank.
        if (holder := _user_id(frames[1])) != str(msg.rank):
            return self._drop("identity", f"a peer holding rank {holder}'s key claims rank {msg.rank}")
        known = self._identity.setdefault(msg.rank, identity)
        if known != identity:
            return self._drop("identity", f"a second peer claims rank {msg.rank}")
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            return self._drop("type", f"{type(msg).__name__} is not sent to the coordinator")
        try:
            handler(self, msg)
        except Exception as e:  # a bug in handling one save must end that save, not stall every rank
            log.exception("[rank 0] coordinator failed handling %s from rank %d for save %s", type(msg).__name__, msg.rank, msg.ckpt)
            save = self._saves.get(msg.ckpt)
            if save is not None:
                self._abort(save, {0: f"coordinator error while handling {type(msg).__name__} from rank {msg.rank}: {type(e).__name__}: {e}"})

    def _send(self, rank: int, msg: wire.Message) -> None:
        identity = self._identity.get(rank)
        if identity is not None:
            self._sock.send_multipart([identity, *wire.encode(msg, self._secret)], copy=False)

    def _save_for(self, msg: Any) -> _Save | None:
        save = self._saves.get(msg.ckpt)
        if save is None:
            if msg.ckpt in self._finished:
                outcome = self._finished[msg.ckpt]
                if isinstance(msg, wire.PlanRequest) and isinstance(outcome, wire.Aborted):
                    self._send(msg.rank, wire.Aborted(self.job, msg.ckpt, msg.rank, outcome.reasons))
                else:
                    self._drop("stale", f"{type(msg).__name__} from rank {msg.rank} for finished save {msg.ckpt}")
                return None
            if not isinstance(msg, (wire.PlanRequest, wire.Failed)):
                self._drop("unknown-save", f"{type(msg).__name__} from rank {msg.rank} for unknown save {msg.ckpt}")
                return None
            save = self._saves[msg.ckpt] = _Save(msg.ckpt, time.monotonic())
        save.last_seen[msg.rank] = time.monotonic()
        return save

    # -- handlers -----------------------------------------------------------

    def _on_plan_request(self, msg: wire.PlanRequest) -> None:
        save = self._save_for(msg)
        if save is None:
            return
        if save.phase != "plan" or msg.rank in save.descs:
            return self._drop("replay", f"duplicate PlanRequest from rank {msg.rank} for {msg.ckpt}")
        desc: RankColumns | None = None
        try:
            # Box values are checked for every rank at once by plan_save; the
            # digest is checked here because the plan cache trusts it.
            if xxhash.xxh3_64_intdigest(msg.desc) != msg.desc_digest:
                raise WireError(f"rank {msg.rank}: description digest does not match its bytes")
            save.boxes = save.boxes or BoxStore(self.world_size)
            desc = save.boxes.put(decode_description(msg.desc, msg.rank, self._schemas))
        except WireError as e:
            save.failed[msg.rank] = f"invalid description: {e}"
        if msg.world_size != self.world_size:
            save.failed[msg.rank] = f"thinks the world has {msg.world_size} ranks, the coordinator serves {self.world_size}"
        if save.descs and msg.path != save.path:
            save.failed[msg.rank] = f"saves to {msg.path!r} while rank(s) {sorted(save.descs)} save to {save.path!r}"
        save.path = save.path or msg.path
        save.overwrite = save.overwrite or msg.overwrite
        save.descs[msg.rank] = desc
        save.digests[msg.rank] = msg.desc_digest
        if len(save.descs) == self.world_size:
            self._plan(save)

    def _plan(self, save: _Save) -> None:
        if save.failed:
            return self._abort(save, dict(save.failed))
        t0 = time.perf_counter()
        key = tuple(sorted(save.digests.items()))
        plan = self._cache.lookup(key)
        same = plan is not None
        try:
            if plan is None:
                self._cache.clear()  # free the old plan before building the new one
                plan = plan_save([save.descs[r] for r in range(self.world_size)])  # type: ignore[misc] (no None: failed saves abort above)
                self._cache.store(key, plan)
            storage, path = self._storage_for(save.path)
            save.tmp_path = prepare_tmp_dir(storage, path, f"{self.job[:8]}-{save.ckpt}", overwrite=save.overwrite)
        except (DistCkptError, OSError) as e:
            return self._abort(save, {0: f"planning failed: {e}"})
        save.plan, save.phase = plan, "write"
        t1 = time.perf_counter()
        for r in range(self.world_size):
            self._send(r, wire.PlanReply(self.job, save.ckpt, r, save.tmp_path, same, plan.to_msgpack_for(r)))
        t2 = time.perf_counter()
        # While the ranks write: place their chunks in the manifest (once per plan), free the boxes.
        save.records = RecordTable(plan)
        save.descs, save.boxes = dict.fromkeys(save.descs), None
        release_free_memory()
        log.info("[rank 0] plan for save %s: %s in %.3f s, replies %.3f s, layout %.3f s, %.1f MB to write", save.ckpt, "cached" if same else "new", t1 - t0, t2 - t1, time.perf_counter() - t2, plan.loads.sum() / 1e6)

    def _on_heartbeat(self, msg: wire.Heartbeat) -> None:
        if self._save_for(msg) is not None:
            self._send(msg.rank, wire.HeartbeatAck(self.job, msg.ckpt, msg.rank))

    def _on_done(self, msg: wire.Done) -> None:
        save = self._save_for(msg)
        if save is None:
            return
        if save.phase != "write" or msg.rank in save.done or msg.rank in save.failed:
            return self._drop("replay", f"Done from rank {msg.rank} for {msg.ckpt} in phase {save.phase}")
        try:  # decoded and merged as they arrive: the commit itself only writes
            save.records.add(msg.rank, decode_records(msg.records, msg.rank))  # type: ignore[union-attr] (set with the plan)
            save.objects[msg.rank] = decode_objects(msg.objects, msg.rank)
        except WireError as e:
            save.failed[msg.rank] = f"invalid Done payload: {e}"
        else:
            save.done.add(msg.rank)
        self._maybe_finish(save)

    def _on_failed(self, msg: wire.Failed) -> None:
        save = self._save_for(msg)
        if save is None:
            return
        save.failed[msg.rank] = f"{msg.error} (phase {msg.phase})"
        if save.phase == "plan":
            return self._abort(save, dict(save.failed))
        self._maybe_finish(save)

    _HANDLERS: dict[type, Callable[["Coordinator", Any], None]] = {
        wire.PlanRequest: _on_plan_request,
        wire.Heartbeat: _on_heartbeat,
        wire.Done: _on_done,
        wire.Failed: _on_failed,
    }

    # -- ending a save --------------------------------------------------------

    def _maybe_finish(self, save: _Save) -> None:
        if len(save.done) + len(save.failed) < self.world_size:
            return
        if save.failed:
            return self._abort(save, dict(save.failed))
        save.phase = "commit"
        release_free_memory()  # the Done messages' buffers, before the manifest is built: the coordinator's peak
        storage, path = self._storage_for(save.path)
        request = CommitRequest(path, save.tmp_path, save.overwrite, self.world_size, save.plan, save.records, save.objects)  # type: ignore[arg-type]
        try:
            commit_checkpoint(storage, request)
        except (DistCkptError, OSError) as e:
            log.error("[rank 0] commit of save %s to %s failed: %s", save.ckpt, path, e)
            return self._abort(save, {0: f"commit failed: {e}"})
        self._end(save, lambda r: wire.Committed(self.job, save.ckpt, r, path))

    def _abort(self, save: _Save, reasons: dict[int, str]) -> None:
        log.error("[rank 0] save %s to %s aborted: %s", save.ckpt, save.path, "; ".join(f"rank {r}: {m}" for r, m in sorted(reasons.items())))
        if save.tmp_path:
            self._remove_tmp(save.tmp_path, save.path)
        self._end(save, lambda r: wire.Aborted(self.job, save.ckpt, r, reasons))

    def _end(self, save: _Save, make: Callable[[int], wire.Message]) -> None:
        del self._saves[save.ckpt]
        self._finished[save.ckpt] = make(0)
        while len(self._finished) > 64:
            self._finished.popitem(last=False)
        # Every rank that took part hears the outcome, including one that failed
        # before its PlanRequest (e.g. while staging) and waits for the Aborted.
        for r in sorted(set(save.descs) | set(save.failed)):
            self._send(r, make(r))
        save.records = None
        release_free_memory()

    def _remove_tmp(self, tmp_path: str, path: str) -> None:
        """Remove an abandoned tmp dir; if that fails (no descriptors left, EIO), retry later."""
        try:
            storage, _ = self._storage_for(path)
            storage.remove_tree(tmp_path)
            if not storage.exists(tmp_path):  # remove_tree may ignore errors
                self._leftovers.pop(tmp_path, None)
                return
            error = "still there after removal"
        except (DistCkptError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        if tmp_path not in self._leftovers:
            log.warning("[rank 0] could not remove %s (%s); retrying every 5 s and at close", tmp_path, error)
        self._leftovers[tmp_path] = path

    def _retry_leftovers(self, force: bool = False) -> None:
        self._next_retry = time.monotonic() + 5.0
        for tmp_path, path in list(self._leftovers.items()):
            self._remove_tmp(tmp_path, path)
        if force and self._leftovers:
            log.error("[rank 0] left behind after repeated removal attempts: %s", sorted(self._leftovers))

    def _check_deadlines(self, now: float) -> None:
        cfg = self._config
        for save in list(self._saves.values()):
            if save.phase == "plan" and now - save.started > cfg.timeout_s:
                missing = sorted(set(range(self.world_size)) - set(save.descs))
                self._abort(save, {r: f"did not reach the save within {cfg.timeout_s:.0f} s (phase plan)" for r in missing})
                continue
            silent = {r: now - t for r, t in save.last_seen.items() if r not in save.done and r not in save.failed and now - t > cfg.heartbeat_timeout_s}
            if silent:
                self._abort(save, {r: f"sent no heartbeat for {s:.1f} s (phase {save.phase}); presumed dead" for r, s in silent.items()})
            elif save.phase == "write" and now - save.started > cfg.timeout_s:
                slow = sorted(set(range(self.world_size)) - set(save.done) - set(save.failed))
                self._abort(save, {r: f"did not finish writing within {cfg.timeout_s:.0f} s" for r in slow})


def _user_id(frame: zmq.Frame) -> str | None:
    """The rank the ZAP gate admitted ``frame``'s connection as (None if it carries none)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None


def _listen(bind: str, secret: bytes, world_size: int, max_frame: int, dropped: collections.Counter[str]) -> tuple[zmq.Context, zmq.Socket, ZapGate, ConnectionGate, str]:
    """The coordinator's context and CURVE ROUTER bound to ``bind``, its ZAP and connection gates.

    Returns:
        ``(context, router, zap, gate, endpoint)``; ``endpoint`` names the port actually bound.
    """
    require_curve()
    soft, _ = raise_fd_limit()
    ctx = zmq.Context()
    try:
        return _bind_gated(ctx, bind, secret, world_size, max_frame, pending_cap(soft), dropped)
    except BaseException:
        ctx.destroy(linger=0)  # e.g. the port is taken: no sockets or I/O thread left behind
        raise


def _bind_gated(ctx: zmq.Context, bind: str, secret: bytes, world_size: int, max_frame: int, cap: int, dropped: collections.Counter[str]) -> tuple[zmq.Context, zmq.Socket, ZapGate, ConnectionGate, str]:
    zap = ZapGate(ctx, secret, world_size)  # bound before the ROUTER: no handshake may precede it
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # The kernel's accept queue is what libzmq drains faster than the gate sheds: keep it near the cap.
    sock.setsockopt(zmq.BACKLOG, 2 * cap)
    secure_server(sock, secret, max_frame)
    host, _, port = bind[len("tcp://") :].rpartition(":")
    if port in ("0", "*", ""):
        port_n = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(bind)
        port_n = int(port)
    gate = ConnectionGate(sock, port_n, cap, dropped)
    return ctx, sock, zap, gate, f"tcp://{host}:{port_n}"
