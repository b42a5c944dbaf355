"""The coordinator: rank 0's thread that plans, merges and commits every save.

It owns a ROUTER socket and its own ``zmq.Context`` and never touches the
training process group. One save moves through these phases::

    plan    every rank sends PlanRequest(description)   -> plan (or reuse the cached plan)
    prepare (I/O thread) storage.begin_save (local: <path>.tmp-<job>-<seq>/data), then PlanReply to all
    write   ranks write their own files, send Heartbeat while busy, then Done or Failed
    commit  all Done -> CommitInProgress to every rank -> (I/O thread) storage.publish(MANIFEST)
            -> Committed to every rank;   any Failed / silent rank / timeout -> Aborted (storage.abort)

Storage calls (begin_save, publish, abort) run on one I/O thread,
in submission order, and hand their result back to the event loop: the loop
keeps acknowledging heartbeats and checking deadlines while a commit is slow,
so no rank gives up on a save that then commits. A loop that was itself
stalled (rank 0 frozen) past what ranks tolerate never starts a commit: a
rank may already have reported the save failed.

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
import dataclasses
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, cast

import xxhash
import zmq

from . import wire
from .commit import CommitRequest, RecordTable, commit_checkpoint, decode_objects, decode_records
from .config import Config
from .description import BoxStore, RankColumns, SchemaCache, decode_description
from .errors import CheckpointExists, DistCkptError, WireError
from .index_build import FragmentReport, PlanCells, decode_fragment_report, plan_cells
from .layout_names import save_tag
from .logs import SaveSummary, get_logger, summarize
from .plan import PlanCache, SavePlan
from .save_planner import plan_save
from .storage import SaveTarget, Storage, strip_scheme
from .transport import ConnectionGate, ZapGate, pending_cap, raise_fd_limit, require_curve, secure_server
from .wire import Phase

log = get_logger(__name__)
_SNDMORE = int(zmq.SNDMORE)
_SHARED_REPLIES = 256  # distinct plan replies packed once per pass; more (every rank's own rank-local entries) are packed per rank

_malloc_trim: Callable[[int], int] | None
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
    phase: Phase = Phase.PLAN
    path: str = ""
    overwrite: bool = False
    descs: dict[int, RankColumns | None] = field(default_factory=dict)  # None: the rank's description was invalid
    boxes: BoxStore | None = None  # every rank's boxes, one matrix per schema
    digests: dict[int, int] = field(default_factory=dict)
    plan: SavePlan | None = None
    target: SaveTarget | None = None  # where the save writes, named before it is prepared
    storage: Storage | None = None  # the backend that prepared it: commits and aborts through the same one
    done: set[int] = field(default_factory=set)
    records: RecordTable | None = None  # every Done's records, merged as they arrive (format version 1)
    cells: PlanCells | None = None  # format version 2: the plan's splits and its replies' group specs
    reports: dict[int, FragmentReport] = field(default_factory=dict)  # format version 2: each Done's fragment
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    stalled: float = 0.0  # longest stretch the event loop could not answer during this save


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

    def __init__(
        self,
        world_size: int,
        job: str,
        secret: bytes,
        bind: str,
        storage_for: Callable[[str], tuple[Storage, str]],
        config: Config,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.world_size = world_size
        self.job = job
        self._secret = secret
        self._storage_for = storage_for
        self._config = config
        self._cells: tuple[SavePlan, PlanCells] | None = None  # the last plan's splits (format version 2)
        self._limits = wire.Limits(max_frame=config.max_message_bytes, max_total=config.max_message_bytes)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._ctx, self._sock, self._zap, self._gate, self.endpoint = _listen(
            bind, secret, world_size, max(config.max_message_bytes, self._limits.max_header), self.dropped
        )
        self._leftovers: dict[str, tuple[Storage, SaveTarget]] = {}  # by location: aborted saves whose removal failed, retried
        self._next_retry = 0.0
        self._next_deadlines = 0.0  # deadlines are seconds long: checking each save's ranks every 50 ms is enough
        self._on_connected = on_connected
        self._identity: dict[int, bytes] = {}
        self._saves: dict[str, _Save] = {}
        self._finished: collections.OrderedDict[str, wire.Message] = collections.OrderedDict()
        self._summaries: collections.OrderedDict[str, SaveSummary] = collections.OrderedDict()
        self._cache = PlanCache()
        self._schemas = SchemaCache()  # FSDP ranks share one schema: decoded once, not once per rank
        self._stop = threading.Event()
        self._io = _IOThread()
        self._stop_at: int | None = None  # the step every rank stops at, once a rank asked (preempt.py)
        self._stop_acks: set[int] = set()
        self._thread = threading.Thread(target=self._serve, name="dist_ckpt-coordinator", daemon=True)
        self._thread.start()
        log.info("[rank 0] coordinator for %d ranks listening on %s", world_size, self.endpoint)

    def close(self) -> None:
        """Stop serving and close the socket; saves in flight are abandoned.

        Replies already queued are still delivered (up to 5 s) to ranks that are alive.
        """
        self._stop.set()
        self._thread.join(timeout=10)
        self._io.close()  # finishes the queued storage calls (a commit under way completes)
        self._remove_leftovers_now()
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
        poller.register(self._io.wake_fd, zmq.POLLIN)
        live = time.monotonic()  # when pending messages were last answered
        while not self._stop.is_set():
            try:
                # While connections are unauthenticated, look at them every 10 ms: one may be
                # filling a handshake frame buffer (see ConnectionGate).
                ready = dict(poller.poll(10 if self._gate.pending else 100))
                live = self._note_stall(live)
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
                for then in self._io.finished():
                    then()
                live = self._note_stall(live)  # a freeze while handling messages counts before any deadline
                now = time.monotonic()
                if now >= self._next_deadlines:  # a pass over every rank: ~10 ms at 16,384, and a loop turn per 1024 messages
                    self._next_deadlines = now + 0.05
                    self._check_deadlines(now)
                if self._leftovers and now >= self._next_retry:
                    self._retry_leftovers()
                live = self._note_stall(live)
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

    def _note_stall(self, live: float) -> float:
        """Record on every save in flight a stretch in which this loop answered nobody.

        Ranks hear an ack at most a heartbeat interval after their beat while
        the loop runs; a stretch longer than the heartbeat timeout less two
        intervals may have made a rank give up (rank 0 frozen, swapped out).
        """
        now = time.monotonic()
        gap = now - live - 0.1  # the poll's own wait is not a stall
        if gap > self._config.heartbeat_timeout_s - 2 * self._config.heartbeat_interval_s:
            log.warning("[rank 0] the coordinator could not answer for %.1f s (process stalled?)", gap)
            for save in self._saves.values():
                save.stalled = max(save.stalled, gap)
        return now

    @staticmethod
    def _stall_reason(save: _Save) -> str:
        return (
            f"the coordinator (rank 0) could not answer for {save.stalled:.1f} s during this save (rank 0 stalled); "
            "another rank may have given up on it, so it is not committed"
        )

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
        if rank in self._identity:
            self._send_frames(rank, wire.encode(msg, self._secret))

    def _send_each(self, ranks: Iterable[int], msg: wire.Message) -> None:
        """``msg`` to each of ``ranks``, its ``rank`` replaced: checked and packed once, signed per rank (:class:`wire.RankFrames`)."""
        frames = wire.RankFrames(msg, self._secret)
        for r in ranks:
            self._send_frames(r, frames.frames(r))

    def _send_frames(self, rank: int, frames: list) -> None:
        """Encoded frames to ``rank``'s connection (none yet: nothing to send to)."""
        identity = self._identity.get(rank)
        if identity is not None:
            # Frame by frame with int flags: send_multipart's enum arithmetic cost ~16 us a message,
            # a third of a Committed's cost; the coordinator sends three messages per rank per save.
            self._sock.send(identity, _SNDMORE, copy=False)
            for f in frames[:-1]:
                self._sock.send(f, _SNDMORE, copy=False)
            self._sock.send(frames[-1], 0, copy=False)

    def _save_for(self, msg: Any) -> _Save | None:
        save = self._saves.get(msg.ckpt)
        if save is None:
            if msg.ckpt in self._finished:
                outcome = self._finished[msg.ckpt]
                # A rank still beating (e.g. frozen while the outcome was sent) hears it again.
                if isinstance(msg, wire.Heartbeat) or (isinstance(msg, wire.PlanRequest) and isinstance(outcome, wire.Aborted)):
                    self._send(msg.rank, dataclasses.replace(outcome, rank=msg.rank))
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
        if save.phase != Phase.PLAN or msg.rank in save.descs:
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
                self._cells = None
                plan = plan_save([save.descs[r] for r in range(self.world_size)])  # type: ignore[misc]  # no None: failed saves abort above
                self._cache.store(key, plan)
            storage, path = self._storage_for(save.path)
            # Named before it exists, so that an abort meanwhile queues its removal behind the preparation.
            target = storage.save_target(path, save_tag(self.job, save.ckpt), save.overwrite)
        except (DistCkptError, OSError) as e:
            return self._abort(save, {0: f"planning failed: {e}"})
        save.target, save.storage, save.plan, save.phase = target, storage, plan, Phase.PREPARE
        self._io.submit(lambda: storage.begin_save(target), lambda out: self._prepared(save, same, out, t0))

    def _prepared(self, save: _Save, same: bool, out: object, t0: float) -> None:
        """(event loop) The tmp dir is ready (or failed): reply the plan to every rank."""
        if self._saves.get(save.ckpt) is not save:
            return  # aborted while the directory was made; its removal is queued behind the mkdir
        if isinstance(out, CheckpointExists):  # the caller's choice to make: say so, by type, on every rank
            return self._abort(save, {0: str(out)}, error="CheckpointExists")
        if isinstance(out, BaseException):
            return self._abort(save, {0: f"planning failed: {_text(out)}"})
        plan, target = save.plan, save.target
        assert plan is not None and target is not None
        save.phase = Phase.WRITE
        t1 = time.perf_counter()
        cells = self._plan_cells(plan) if self._config.format_version == 2 else None
        save.cells = cells
        self._send_replies(save, plan, cells, target.location, same)
        t2 = time.perf_counter()
        # While the ranks write: place their chunks in the manifest (once per plan), free the boxes.
        save.records = RecordTable(plan) if cells is None else None
        save.descs, save.boxes = dict.fromkeys(save.descs), None
        release_free_memory()
        log.debug(
            "[rank 0] plan for save %s: %s in %.3f s, replies %.3f s, layout %.3f s, %.1f MB to write",
            save.ckpt,
            "cached" if same else "new",
            t1 - t0,
            t2 - t1,
            time.perf_counter() - t2,
            plan.loads.sum() / 1e6,
        )

    def _send_replies(self, save: _Save, plan: SavePlan, cells: PlanCells | None, location: str, same: bool) -> None:
        """Every rank's PlanReply. Ranks whose replies are the same bytes (an FSDP group's: its rows' bitmaps and
        group spec) share one packed reply and header (:class:`wire.RankFrames`); each is still signed for its rank."""
        shared: dict[Hashable, wire.RankFrames] = {}
        for r in range(self.world_size):
            key = plan.reply_key(r) if cells is None else cells.reply_key(plan, r)
            frames = shared.get(key)
            if frames is None:
                reply = plan.to_msgpack_for(r) if cells is None else cells.reply(plan, r)
                frames = wire.RankFrames(wire.PlanReply(self.job, save.ckpt, r, location, same, reply), self._secret)
                if len(shared) < _SHARED_REPLIES:
                    shared[key] = frames
            self._send_frames(r, frames.frames(r))

    def _plan_cells(self, plan: SavePlan) -> PlanCells:
        """The splits of ``plan`` (format version 2), computed once per plan and kept with it."""
        if self._cells is None or self._cells[0] is not plan:
            self._cells = (plan, plan_cells(plan))
        return self._cells[1]

    def _on_heartbeat(self, msg: wire.Heartbeat) -> None:
        if self._save_for(msg) is not None:
            self._send(msg.rank, wire.HeartbeatAck(self.job, msg.ckpt, msg.rank))

    def _on_done(self, msg: wire.Done) -> None:
        save = self._save_for(msg)
        if save is None:
            return
        if save.phase != Phase.WRITE or msg.rank in save.done or msg.rank in save.failed:
            return self._drop("replay", f"Done from rank {msg.rank} for {msg.ckpt} in phase {save.phase}")
        try:  # decoded and merged as they arrive: the commit itself only writes
            if save.cells is not None:  # format version 2: the rank wrote its records into its fragment
                save.reports[msg.rank] = decode_fragment_report(msg.records, msg.rank)
            else:
                assert save.records is not None  # set with the plan, before the phase is WRITE
                save.records.add(msg.rank, decode_records(msg.records, msg.rank))
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
        if msg.rank in save.done:  # it already reported its chunks; the commit may be under way
            return self._drop("replay", f"Failed from rank {msg.rank} after its Done for {msg.ckpt}")
        save.failed[msg.rank] = f"{msg.error} (phase {msg.phase})"
        save.path = save.path or msg.path
        if save.phase in (Phase.PLAN, Phase.PREPARE):
            return self._abort(save, dict(save.failed))
        self._maybe_finish(save)

    # -- stop agreement (preempt.py): one stop step per job, first request wins --

    def _on_stop_subscribe(self, msg: wire.StopSubscribe) -> None:
        # The rank's socket is now known (_on_frames); a stop already decided reaches it now.
        if self._stop_at is not None:
            self._send(msg.rank, wire.StopAt(self.job, "", msg.rank, self._stop_at))

    def _on_stop_request(self, msg: wire.StopRequest) -> None:
        if msg.step < 0:
            return self._drop("field", f"StopRequest from rank {msg.rank} for step {msg.step}")
        if self._stop_at is None:
            # step + 1: no rank can pass should_stop(step + 1) before the requester has
            # joined step + 1's collectives, which it does only after every rank acked.
            self._stop_at = msg.step + 1
            log.warning("[rank 0] rank %d asked to stop at step %d: every rank stops at step %d", msg.rank, msg.step, self._stop_at)
            self._send_each(sorted(self._identity), wire.StopAt(self.job, "", 0, self._stop_at))
        else:  # a later request (or a resend) gets the same answer
            self._send(msg.rank, wire.StopAt(self.job, "", msg.rank, self._stop_at))
        if len(self._stop_acks) == self.world_size:
            self._send(msg.rank, wire.StopReady(self.job, "", msg.rank, self._stop_at))

    def _on_stop_ack(self, msg: wire.StopAck) -> None:
        if msg.stop_at != self._stop_at:
            return self._drop("stale", f"StopAck from rank {msg.rank} for step {msg.stop_at}, stopping at {self._stop_at}")
        self._stop_acks.add(msg.rank)
        if len(self._stop_acks) == self.world_size:
            log.info("[rank 0] every rank knows it stops at step %d", self._stop_at)
            self._send_each(range(self.world_size), wire.StopReady(self.job, "", 0, self._stop_at))

    _HANDLERS: dict[type, Callable[["Coordinator", Any], None]] = {
        wire.PlanRequest: _on_plan_request,
        wire.Heartbeat: _on_heartbeat,
        wire.Done: _on_done,
        wire.Failed: _on_failed,
        wire.StopSubscribe: _on_stop_subscribe,
        wire.StopRequest: _on_stop_request,
        wire.StopAck: _on_stop_ack,
    }

    # -- ending a save --------------------------------------------------------

    def _maybe_finish(self, save: _Save) -> None:
        if len(save.done) + len(save.failed) < self.world_size:
            return
        if save.failed:
            return self._abort(save, dict(save.failed))
        if save.stalled:
            return self._abort(save, {0: self._stall_reason(save)})
        save.phase = Phase.COMMIT
        # From here on a rank that loses the coordinator cannot say the save failed.
        self._send_each(range(self.world_size), wire.CommitInProgress(self.job, save.ckpt, 0))
        release_free_memory()  # the Done messages' buffers, before the manifest is built: the coordinator's peak
        storage, target = save.storage, save.target
        assert storage is not None and target is not None  # set when the plan was replied
        request = CommitRequest(target, self.world_size, save.plan, save.records, save.objects, cells=save.cells, reports=save.reports)  # type: ignore[arg-type]
        t_commit = time.perf_counter()
        self._io.submit(lambda: commit_checkpoint(storage, request), lambda out: self._committed(save, strip_scheme(save.path), out, t_commit))

    def _committed(self, save: _Save, path: str, out: object, t_commit: float) -> None:
        """(event loop) The commit's I/O finished: tell every rank its outcome."""
        if isinstance(out, BaseException):
            log.error("[rank 0] commit of save %s to %s failed: %s", save.ckpt, path, out)
            save.phase = Phase.COMMIT_FAILED
            # Another committer won (S3's create-only MANIFEST): every rank raises CheckpointExists, by type.
            error = "CheckpointExists" if isinstance(out, CheckpointExists) else ""
            return self._abort(save, {0: f"commit failed: {_text(out)}"}, error=error)
        self._remember_summary(save, time.perf_counter() - t_commit)
        self._end(save, wire.Committed(self.job, save.ckpt, 0, path))

    def summary(self, ckpt: str) -> SaveSummary | None:
        """The figures of committed save ``ckpt`` (kept for the last 64 saves), for rank 0's log line."""
        return self._summaries.get(ckpt)

    def _remember_summary(self, save: _Save, commit_s: float) -> None:
        stats = {r: o["stats"] for r, o in save.objects.items() if o.get("stats") is not None}
        if stats:
            self._summaries[save.ckpt] = summarize(stats, commit_s)
            while len(self._summaries) > 64:
                self._summaries.popitem(last=False)

    def _abort(self, save: _Save, reasons: dict[int, str], error: str = "") -> None:
        if save.phase == Phase.COMMIT:  # only the commit's own result may end it now
            log.error("[rank 0] save %s: not aborting while its commit is under way: %s", save.ckpt, reasons)
            return
        log.error(
            "[rank 0] save %s to %s aborted: %s",
            save.ckpt,
            save.path or "(no rank named its path)",
            "; ".join(f"rank {r}: {m}" for r, m in sorted(reasons.items())),
        )
        if save.target is not None and save.storage is not None:
            self._remove_tmp(save.storage, save.target)
        self._end(save, wire.Aborted(self.job, save.ckpt, 0, reasons, error))

    def _end(self, save: _Save, outcome: wire.Message) -> None:
        """Tell every rank that took part ``outcome`` (Committed or Aborted, for rank 0: each rank gets its own) and forget the save."""
        del self._saves[save.ckpt]
        self._finished[save.ckpt] = outcome
        while len(self._finished) > 64:
            self._finished.popitem(last=False)
        # Every rank that took part hears the outcome, including one that failed
        # before its PlanRequest (e.g. while staging) and waits for the Aborted.
        self._send_each(sorted(set(save.descs) | set(save.failed)), outcome)
        save.records, save.reports = None, {}
        release_free_memory()

    def _remove_tmp(self, storage: Storage, target: SaveTarget) -> None:
        """Abort an abandoned save's storage on the I/O thread (after its preparation); if that fails, retry later."""
        self._io.submit(lambda: storage.abort(target), lambda out: self._removed(storage, target, out))

    def _removed(self, storage: Storage, target: SaveTarget, out: object) -> None:
        """(event loop) An abort's removal finished: forget it, or keep it for the next retry."""
        if not isinstance(out, BaseException):
            self._leftovers.pop(target.location, None)
            return
        if target.location not in self._leftovers:
            log.warning("[rank 0] could not remove %s (%s); retrying every 5 s and at close", target.location, _text(out))
        self._leftovers[target.location] = (storage, target)

    def _retry_leftovers(self) -> None:
        self._next_retry = time.monotonic() + 5.0
        for storage, target in list(self._leftovers.values()):
            self._remove_tmp(storage, target)

    def _remove_leftovers_now(self) -> None:
        """(close, after the I/O thread stopped) One last synchronous try at the aborted saves still left."""
        for location, (storage, target) in list(self._leftovers.items()):
            try:
                storage.abort(target)
                del self._leftovers[location]
            except (DistCkptError, OSError) as e:
                log.error("[rank 0] removing %s at close failed: %s", location, e)
        if self._leftovers:
            log.error("[rank 0] left behind after repeated removal attempts: %s", sorted(self._leftovers))

    def _check_deadlines(self, now: float) -> None:
        cfg = self._config
        for save in list(self._saves.values()):
            if save.phase == Phase.PLAN and now - save.started > cfg.timeout_s:
                missing = sorted(set(range(self.world_size)) - set(save.descs))
                self._abort(save, {r: f"did not reach the save within {cfg.timeout_s:.0f} s (phase plan)" for r in missing})
                continue
            if save.phase == Phase.PREPARE and now - save.started > cfg.timeout_s:
                self._abort(
                    save,
                    {
                        0: f"preparing the save's storage ({save.target.location if save.target else save.path}) did not finish within {cfg.timeout_s:.0f} s (phase prepare)"
                    },
                )
                continue
            silent = {r: now - t for r, t in save.last_seen.items() if r not in save.done and r not in save.failed and now - t > cfg.heartbeat_timeout_s}
            if silent and save.stalled:  # the silence is this loop's own: blame rank 0's stall, not the ranks
                self._abort(save, {0: self._stall_reason(save)})
            elif silent:
                self._abort(save, {r: f"sent no heartbeat for {s:.1f} s (phase {save.phase}); presumed dead" for r, s in silent.items()})
            elif save.phase == Phase.WRITE and now - save.started > cfg.timeout_s:
                slow = sorted(set(range(self.world_size)) - set(save.done) - set(save.failed))
                self._abort(save, {r: f"did not finish writing within {cfg.timeout_s:.0f} s" for r in slow})


def _text(e: BaseException) -> str:
    """An error for a reason string: our own and OS errors say what they are; others get their type."""
    return str(e) if isinstance(e, (DistCkptError, OSError)) else f"{type(e).__name__}: {e}"


class _IOThread:
    """One thread for the coordinator's storage calls, run in submission order.

    ``submit(work, then)`` runs ``work()`` here; ``then(result or exception)``
    runs later on the event loop, from :meth:`finished`, woken through
    :attr:`wake_fd`. Exceptions are handed back, never dropped. The order
    matters: an abort queued after a ``begin_save`` runs after it.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Callable[[object], None]] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        self._thread = threading.Thread(target=self._run, name="dist_ckpt-coordinator-io", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], object], then: Callable[[object], None]) -> None:
        """Queue ``work``; ``then`` gets its return value or the exception it raised."""
        self._jobs.put((work, then))

    def finished(self) -> list[Callable[[], None]]:
        """(event loop) The ``then`` calls whose work has finished, ready to run."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            work, then = job
            try:
                out: object = work()
            except BaseException as e:  # handed to the event loop, which ends the save with it
                out = e
            self._results.put(functools.partial(then, out))
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Finish the queued work (a commit under way completes), then stop."""
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # storage hung: leave the pipe to the thread rather than close fds under it
            log.error("[rank 0] coordinator storage thread still busy after 30 s; abandoning it")
            return
        os.close(self.wake_fd)
        os.close(self._wake_w)


def _user_id(frame: zmq.Frame) -> str | None:
    """The rank the ZAP gate admitted ``frame``'s connection as (None if it carries none)."""
    try:
        return cast(str, frame.get("User-Id"))  # a str property; pyzmq's stub says int | str for every name
    except (zmq.ZMQError, AttributeError, TypeError):
        return None


def _listen(
    bind: str, secret: bytes, world_size: int, max_frame: int, dropped: collections.Counter[str]
) -> tuple[zmq.Context, zmq.Socket, ZapGate, ConnectionGate, str]:
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


def _bind_gated(
    ctx: zmq.Context, bind: str, secret: bytes, world_size: int, max_frame: int, cap: int, dropped: collections.Counter[str]
) -> tuple[zmq.Context, zmq.Socket, ZapGate, ConnectionGate, str]:
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
