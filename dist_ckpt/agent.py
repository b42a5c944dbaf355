"""The agent: every rank's DEALER connection to the coordinator.

An I/O thread owns the socket (ZeroMQ sockets are not thread-safe). Callers
on any thread queue messages with :meth:`Agent.send` and wait for the
coordinator's answer about one save with :meth:`Agent.wait`. While a save is
active the I/O thread sends heartbeats; if the coordinator stays silent past
``heartbeat_timeout_s`` every waiter on that save gets a
:class:`~dist_ckpt.errors.CoordinatorTimeout` instead of hanging, or a
:class:`~dist_ckpt.errors.CommitOutcomeUnknown` once the coordinator has said
the commit started. Time this process itself was frozen does not count as the
coordinator's silence: a rank stopped past the deadline hears the ``Aborted``
that names it, not a coordinator it wrongly presumes dead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import zmq

from . import wire
from .config import Config
from .errors import ABORT_ERRORS, CheckpointError, CommitOutcomeUnknown, CoordinatorTimeout, WireError
from .transport import secure_client

log = logging.getLogger(__name__)


class _Silence:
    """Mailbox marker: the coordinator has not answered for too long."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Agent:
    """Connect ``rank`` to the coordinator at ``endpoint``.

    Args:
        endpoint: ``tcp://host:port`` of the coordinator.
        secret: per-job HMAC key.
        job: job id.
        rank: this rank.
        config: heartbeat settings and limits.
    """

    def __init__(self, endpoint: str, secret: bytes, job: str, rank: int, config: Config) -> None:
        self.endpoint, self.job, self.rank = endpoint, job, rank
        self._secret, self._config = secret, config
        self._limits = wire.Limits(max_frame=config.max_message_bytes, max_total=config.max_message_bytes)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"r{rank}-{os.getpid()}-{os.urandom(4).hex()}".encode())
        secure_client(self._sock, secret, rank, max(config.max_message_bytes, self._limits.max_header))
        self._sock.connect(endpoint)
        self._wake_addr = f"inproc://dist_ckpt-agent-{id(self)}"
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(self._wake_addr)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._outbox: queue.SimpleQueue[wire.Message] = queue.SimpleQueue()
        self._mailboxes: dict[str, queue.SimpleQueue[Any]] = {}
        self._active: dict[str, str] = {}  # ckpt -> phase, for heartbeats
        self._lock = threading.Lock()
        self._last_heard = time.monotonic()
        self._stop = threading.Event()
        self.stop_at: int | None = None  # set once by the I/O thread from StopAt (see preempt.py)
        self._stop_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dist_ckpt-agent-{rank}", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------

    def open(self, ckpt: str) -> None:
        """Keep the coordinator's messages about save ``ckpt`` from now on, without heartbeats yet.

        A rank that fails before its first request (e.g. while staging) must
        still receive the ``Aborted`` its own ``Failed`` causes.
        """
        with self._lock:
            self._mailboxes.setdefault(ckpt, queue.SimpleQueue())

    def begin(self, ckpt: str, phase: str) -> None:
        """Start (or move) heartbeats for save ``ckpt`` (and keep its messages, as :meth:`open`)."""
        with self._lock:
            self._mailboxes.setdefault(ckpt, queue.SimpleQueue())
            if ckpt not in self._active:
                self._last_heard = max(self._last_heard, time.monotonic())
            self._active[ckpt] = phase

    def end(self, ckpt: str) -> None:
        """Stop heartbeats for ``ckpt`` and forget its mailbox."""
        with self._lock:
            self._active.pop(ckpt, None)
            self._mailboxes.pop(ckpt, None)

    def send(self, msg: wire.Message) -> None:
        """Queue ``msg`` for the coordinator (any thread)."""
        self._outbox.put(msg)
        with self._wake_lock:
            self._wake_send.send(b"", zmq.NOBLOCK)

    def wait(self, ckpt: str, expect: type, phase: str, timeout: float) -> Any:
        """Wait for a message of type ``expect`` about save ``ckpt``.

        A ``CommitInProgress`` restarts the ``timeout``: the coordinator is
        alive and committing, and from then on losing it leaves the outcome open.

        Raises:
            CheckpointError: the coordinator aborted the save (lists each rank's cause).
            CoordinatorTimeout: no answer within ``timeout`` or the coordinator went silent.
            CommitOutcomeUnknown: either of those after the coordinator had started the commit.
        """
        with self._lock:
            box = self._mailboxes.setdefault(ckpt, queue.SimpleQueue())
        deadline = time.monotonic() + timeout
        committing = False
        while True:
            try:  # a message already queued wins over a deadline passed while this process was frozen
                msg = box.get(timeout=max(0.0, min(deadline - time.monotonic(), 1.0)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise self._lost(ckpt, phase, committing, f"sent no {expect.__name__} within {timeout:.0f} s") from None
                continue
            if isinstance(msg, _Silence):
                raise self._lost(ckpt, phase, committing, f"has not answered for {msg.seconds:.1f} s")
            if isinstance(msg, wire.Aborted):
                raise ABORT_ERRORS.get(msg.error, CheckpointError)(f"save {ckpt} aborted by the coordinator; failed rank(s):", msg.reasons)
            if isinstance(msg, wire.CommitInProgress):
                committing, deadline = True, time.monotonic() + timeout
            elif isinstance(msg, expect):
                return msg

    def _lost(self, ckpt: str, phase: str, committing: bool, what: str) -> Exception:
        """The error for a coordinator that stopped answering (``what`` it did not do)."""
        if committing:
            return CommitOutcomeUnknown(
                f"rank {self.rank}: the coordinator (rank 0) at {self.endpoint} started committing save {ckpt} and then {what}; "
                "the checkpoint may or may not be committed: a MANIFEST at its path means it is"
            )
        if what.startswith("has not answered"):
            return CoordinatorTimeout(f"rank {self.rank}: the coordinator (rank 0) at {self.endpoint} {what} (save {ckpt}, phase {phase}); it is presumed dead")
        return CoordinatorTimeout(f"rank {self.rank}: the coordinator at {self.endpoint} {what} (save {ckpt}, phase {phase})")

    # -- stop agreement (driven by preempt.StopWatch) -------------------------

    def subscribe_stop(self) -> None:
        """Tell the coordinator this rank takes part in stop agreement (once, at start).

        The coordinator learns a rank's socket from its first message; without
        this a rank that never saved could not hear a ``StopAt``.
        """
        self.send(wire.StopSubscribe(self.job, "", self.rank))

    def request_stop(self, step: int) -> None:
        """Ask the coordinator to stop every rank; it answers ``StopAt(step + 1)`` (or an earlier request's)."""
        self.send(wire.StopRequest(self.job, "", self.rank, step))

    def wait_stop_ready(self, timeout: float) -> bool:
        """Wait until the coordinator confirms every rank knows ``stop_at``; False on timeout."""
        return self._stop_ready.wait(timeout)

    def _on_stop(self, msg: wire.Message) -> None:
        """(I/O thread) Record ``StopAt`` and acknowledge it at once, whatever the training thread is doing."""
        if isinstance(msg, wire.StopAt):
            if self.stop_at is None:  # the coordinator fixes one value per job: first one wins
                self.stop_at = msg.stop_at
            ack = wire.StopAck(self.job, "", self.rank, msg.stop_at)
            self._sock.send_multipart(wire.encode(ack, self._secret), copy=False)
        elif isinstance(msg, wire.StopReady) and msg.stop_at == self.stop_at:
            self._stop_ready.set()

    def close(self) -> None:
        """Stop the I/O thread and close the sockets."""
        self._stop.set()
        with self._wake_lock:
            try:
                self._wake_send.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._thread.join(timeout=10)
        self._sock.close(linger=2000)  # deliver a last queued Done/Failed
        for s in (self._wake_recv, self._wake_send):
            s.close(linger=0)
        self._ctx.term()

    # -- I/O thread ---------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        interval = self._config.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        tick = time.monotonic()
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(max(1, int(1000 * min(interval, next_beat - time.monotonic())))))
                tick = self._discount_freeze(tick, interval)
                if self._wake_recv in events:
                    while self._wake_recv.poll(0):
                        self._wake_recv.recv()
                self._flush()
                self._receive()  # always: after a freeze the socket may hold the outcome without a poll event yet
                now = time.monotonic()
                if now >= next_beat:
                    self._beat(now)
                    next_beat = now + interval
            except Exception:
                log.exception("[rank %d] agent I/O error (continuing)", self.rank)
        self._flush()

    def _discount_freeze(self, tick: float, interval: float) -> float:
        """Do not count time this process was frozen (SIGSTOP, swapped out) as the coordinator's silence.

        The loop wakes at least every ``interval``; a longer gap means this
        rank, not the coordinator, was unresponsive. The coordinator gets a
        fresh deadline to answer the heartbeat sent now (with the save's
        outcome, if it ended meanwhile).
        """
        now = time.monotonic()
        gap = now - tick
        if gap > 2 * interval + 0.5:
            log.warning("[rank %d] this process was unresponsive for %.1f s (frozen or starved); not counting it against the coordinator", self.rank, gap)
            self._last_heard += gap
        return now

    def _flush(self) -> None:
        """Send everything queued by callers."""
        while True:
            try:
                msg = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._sock.send_multipart(wire.encode(msg, self._secret), copy=False)

    def _receive(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = wire.decode(frames, self._secret, self._limits)
            except WireError as e:
                log.warning("[rank %d] dropped a malformed message from the coordinator: %s", self.rank, e)
                continue
            if msg.job != self.job or msg.rank != self.rank:
                continue
            self._last_heard = time.monotonic()
            if isinstance(msg, (wire.StopAt, wire.StopReady)):
                self._on_stop(msg)
                continue
            with self._lock:
                box = self._mailboxes.get(msg.ckpt)
            if box is not None and not isinstance(msg, wire.HeartbeatAck):
                box.put(msg)

    def _beat(self, now: float) -> None:
        with self._lock:
            active = dict(self._active)
            boxes = {c: self._mailboxes.get(c) for c in active}
        if not active:
            return
        silent = now - self._last_heard
        if silent > self._config.heartbeat_timeout_s:
            for box in boxes.values():
                if box is not None:
                    box.put(_Silence(silent))
        for ckpt, phase in active.items():
            self._sock.send_multipart(wire.encode(wire.Heartbeat(self.job, ckpt, self.rank, phase), self._secret), copy=False)
