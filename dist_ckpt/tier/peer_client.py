"""The peer client: requests to another rank's :class:`~dist_ckpt.tier.peer.PeerService`.

:class:`PeerClient` connects lazily, one DEALER per concurrent operation (a
small pool), over CURVE or (unless ``encryption``) over the service's bulk
socket with a session it asks for over CURVE (:mod:`dist_ckpt.tier.bulk`).
:class:`PeerWriteStream` writes one replica file with a credit window of
:data:`~dist_ckpt.tier.peer_protocol.WINDOW` pieces. Every reply is checked
like any untrusted input; a lost connection, an error reply or none in time
raise :class:`PeerError`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import operator
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from ..errors import PeerError, bounded_repr
from ..layout_names import MANIFEST
from ..logs import get_logger
from ..storage import WriteStream
from ..transport import HANDSHAKE_TIMEOUT_S, secure_client
from . import layout
from .bulk import PLAIN_USER, BulkSession, seal, sealed_ok
from .peer_protocol import IO_THREADS, MAX_FILE_BYTES, MAX_FRAME, PIECE_BYTES, QUEUE, WINDOW, WRITE_FRAMES, check_inventory, peer_secret

log = get_logger(__name__)

__all__ = ["PeerClient", "PeerWriteStream"]

_CTX_LOCK = threading.Lock()
_CTX: zmq.Context | None = None
_CTX_PID = -1
_MAX_IDLE = 8  # connections a client keeps for reuse


def _client_context() -> zmq.Context:
    """One context (one I/O thread) for every client of this process: a restart talks to every rank.

    A forked child gets its own (a context's I/O thread does not survive a fork; the parent's is left alone).
    """
    global _CTX, _CTX_PID
    with _CTX_LOCK:
        if _CTX is None or _CTX.closed or _CTX_PID != os.getpid():
            _CTX, _CTX_PID = zmq.Context(io_threads=IO_THREADS), os.getpid()
        return _CTX


def _in_thread(fn: Callable[[], _Conn], name: str) -> Future[_Conn]:
    """Run ``fn`` in a thread of its own (it ends with ``fn``); its result or exception on the future."""
    fut: Future[_Conn] = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # delivered on the future (and logged by its done callback)
            fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


# Connection events that lose every request in flight: the waiting side fails at once instead of at its timeout.
_LOST: dict[zmq.Event, str] = {
    zmq.EVENT_DISCONNECTED: "the connection to the peer was lost (its process died or closed it)",
    zmq.EVENT_CONNECT_RETRIED: "the peer refused the connection (no service listens there: its process is gone?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the peer refused this rank's key (another job, a rank outside its world, or a spent bulk token)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the CURVE handshake with the peer failed (not a peer of this job, or another secret)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CURVE handshake with the peer failed (not a peer of this job, or another secret)",
}
_HEARTBEAT_MS, _HEARTBEAT_TIMEOUT_MS = 2000, 10000  # a silent host (powered off, cut off) drops the connection in ~10 s


class _Conn:
    """One DEALER connection to a peer service, used by one thread at a time.

    Its monitor socket reports the connection's fate: a disconnect, a refused
    connect or a failed handshake fails the request being waited for at once
    (the request is lost: libzmq reconnects, but never resends). ZMTP
    heartbeats make a silent host count as disconnected.

    With ``bulk`` it is a PLAIN connection to the service's bulk socket (the
    token as password, spent on the first handshake): every request is sealed
    (sequence number + Poly1305 tag under a per-message key, :func:`~dist_ckpt.tier.bulk.seal`) and every reply's
    seal is checked before its bytes are used.
    """

    def __init__(self, address: str, key: bytes, rank: int, timeout_s: float, error: Callable[[str, str], PeerError], bulk: BulkSession | None = None) -> None:
        self._error, self._bulk = error, bulk
        self._seq_out = self._seq_in = 0
        self.sock = _client_context().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for opt in (zmq.RCVHWM, zmq.SNDHWM):
            self.sock.setsockopt(opt, QUEUE)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        # A send waits for room (libzmq may count replies already read as queued for a moment; see QUEUE).
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if bulk is None:
            secure_client(self.sock, key, rank, MAX_FRAME)
        else:
            self.sock.plain_username, self.sock.plain_password = PLAIN_USER, bulk.token.encode()
            self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
            self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        self.monitor = self.sock.get_monitor_socket(functools.reduce(operator.or_, _LOST))
        self.sock.connect(address if bulk is None else bulk.address)
        self._ids = iter(range(1 << 62))
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)

    def forget_events(self) -> None:
        """Drop connection events queued while idle (a pooled connection that since reconnected is fine)."""
        while True:
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _lost(self) -> str | None:
        """What a queued connection event says happened, or None."""
        try:
            event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return None
        return _LOST.get(zmq.Event(event["event"]))

    def send(self, header: dict[str, Any], data: Any = None) -> int:
        """Queue one request with its data frame (or a list of them); returns its id (never blocks: the window keeps the queue short)."""
        header["id"] = rid = next(self._ids)
        frames: list[Any] = [msgpack.packb(header)]
        if data is not None:
            frames.extend(data if isinstance(data, list) else [data])
        if self._bulk is not None:
            frames.insert(0, seal(self._bulk.key, b"req", self._seq_out, frames))
            self._seq_out += 1
        try:
            # Not copied (a data frame goes out of the caller's buffer: a staging arena, maybe shared memory; the
            # small frames are copied anyway, under pyzmq's copy threshold): the caller keeps the bytes unchanged
            # until the request's reply (PeerWriteStream: until sync). A change meanwhile fails the seal (bulk path).
            self.sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:  # no room within timeout_s (SNDTIMEO), or a closed context
            raise self._error(str(header.get("name", "")), f"{header['op']}: cannot send ({e})") from e
        return rid

    def recv(self, rid: int, timeout_s: float) -> tuple[dict[str, Any], memoryview | None] | None:
        """The reply to request ``rid`` (replies to older ids are skipped), or None after ``timeout_s``.

        Raises:
            ValueError: the reply is malformed.
            ConnectionAbortedError: the connection was lost (the text says how); the request is gone.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            ready = dict(self._poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if not ready:
                return None
            if self.sock not in ready:
                lost = self._lost()
                if lost is not None:
                    raise ConnectionAbortedError(lost)
                continue
            frames = self.sock.recv_multipart(copy=False)
            if self._bulk is not None:
                if not 2 <= len(frames) <= 3 or not sealed_ok(self._bulk.key, b"rep", self._seq_in, frames[0].buffer, frames[1:]):
                    raise ConnectionAbortedError("a reply failed its seal (out of sequence or a bad MAC: changed on the wire?)")
                self._seq_in += 1
                frames = frames[1:]
            header = msgpack.unpackb(frames[0].bytes, raw=False, strict_map_key=False)
            if not isinstance(header, dict) or type(header.get("id")) is not int or type(header.get("ok")) is not bool or len(frames) > 2:
                raise ValueError("malformed reply")
            if header["id"] == rid:
                return header, frames[1].buffer if len(frames) == 2 else None

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class PeerClient:
    """Requests to one peer's :class:`PeerService`; safe to use from several threads (one connection each).

    Nothing connects until the first request. A lost connection (the peer's
    process died), a refused connect or a failed handshake fail the request
    waited for at once; any wait for a reply lasts at most ``timeout_s``
    (a silent peer). Either raises :class:`PeerError`, never hangs. The
    connection a request failed on is dropped (its state is unknown), so a
    later request starts clean.

    Args:
        address: the peer's :attr:`PeerService.address`.
        secret: the session secret.
        rank: this (the calling) rank: its keys authenticate the requests.
        timeout_s: longest wait for one reply.
        peer: the peer's rank, named in errors (-1: unknown, the address is named).
        encryption: keep every request on CURVE (``Config.peer_encryption``); otherwise each
            connection asks the service for a bulk session and uses its sealed plaintext
            socket (the service may say it has none: then CURVE).
    """

    def __init__(self, address: str, secret: bytes, rank: int, timeout_s: float, peer: int = -1, encryption: bool = False) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.address, self.rank, self.peer, self.timeout_s, self.encryption = address, rank, peer, timeout_s, encryption
        self._key = peer_secret(secret)
        self._idle: list[_Conn] = []
        self._warming: list[Future[_Conn]] = []  # connections being opened ahead (warm), taken before a new one is made
        self._pid = os.getpid()  # a forked child never reuses the parent's connections
        self._lock = threading.Lock()
        self._closed = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled into the checkpoint subprocess (process mode) inside a LocalTierStorage: the address,
        # the derived peer-plane key (never the session secret) and the settings; connections are made anew.
        return _client_with_key, (self.address, self._key, self.rank, self.timeout_s, self.peer, self.encryption)

    # -- connections ------------------------------------------------------------

    def _take(self, op: str, file: str) -> _Conn:
        """A connection (pooled, else new); ``op`` and ``file`` name what it is for in errors."""
        with self._lock:
            if self._closed:
                raise PeerError(self.peer, "", f"the client of {self.address} is closed")
            if self._pid != os.getpid():
                self._idle, self._warming, self._pid = [], [], os.getpid()  # the parent's sockets: left alone, never used here
            conn = self._idle.pop() if self._idle else None
            ahead = self._warming.pop(0) if conn is None and self._warming else None
        if ahead is not None:
            try:
                conn = ahead.result()  # being opened already: waiting for it is sooner than starting another
            except Exception:  # noqa: BLE001 (logged by _warmed when it failed; this request connects anew and raises its own error)
                conn = None
        if conn is None:
            return self._connect(op, file)
        conn.forget_events()
        return conn

    def warm(self, n: int) -> None:
        """Start opening connections ahead, in parallel, so that ``n`` concurrent requests find one (at most the pool's size).

        Returns at once. A connection costs two handshakes and a round trip (CURVE, the bulk
        session, PLAIN): opened one after another by the threads that need them, a restore's
        first reads waited for each in turn. A failure is logged; the request that would have
        used that connection makes its own (and raises its own error).
        """
        with self._lock:
            if self._closed or self._pid != os.getpid():
                return
            need = min(n, _MAX_IDLE) - len(self._idle) - len(self._warming)
            futs = [_in_thread(functools.partial(self._connect, "connect", ""), f"dist_ckpt-peer-connect-{self.peer}") for _ in range(max(0, need))]
            self._warming.extend(futs)
        for f in futs:
            f.add_done_callback(self._warmed)

    def _warmed(self, fut: Future[_Conn]) -> None:
        """(a connection opened ahead is done) Log a failure; close it if the client was closed meanwhile."""
        e = fut.exception()
        if e is not None:
            log.warning("[rank %d] connecting ahead to rank %d (%s) failed: %s", self.rank, self.peer, self.address, e)
            return
        with self._lock:
            orphan = self._closed and fut in self._warming
            if orphan:
                self._warming.remove(fut)
        if orphan:
            fut.result().close()

    def _connect(self, op: str, file: str) -> _Conn:
        """A new connection: CURVE, or (unless ``encryption``) a bulk one whose session a CURVE request asks for."""
        control = _Conn(self.address, self._key, self.rank, self.timeout_s, self.error)
        if self.encryption:
            return control
        try:
            header = self.reply(control, control.send({"op": "bulk"}), op, file)[0]
        except BaseException:
            control.close()
            raise
        address, token, key = header.get("address"), header.get("token"), header.get("key")
        if address is None:
            self.encryption = True  # the service keeps everything on CURVE (its peer_encryption): so does this client
            return control
        control.close()
        if not (isinstance(address, str) and address.startswith("tcp://") and isinstance(token, str) and isinstance(key, bytes) and len(key) == 32):
            raise self.error(file, f"{op}: malformed bulk session ({bounded_repr(header)})")
        return _Conn(self.address, self._key, self.rank, self.timeout_s, self.error, BulkSession(address, token, key))

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if self._closed or len(self._idle) >= _MAX_IDLE:
                conn.close()
            else:
                self._idle.append(conn)

    @contextlib.contextmanager
    def _conn(self, op: str, file: str) -> Iterator[_Conn]:
        conn = self._take(op, file)
        try:
            yield conn
        except BaseException:
            conn.close()  # a request may still be in flight on it: never reuse
            raise
        self._give_back(conn)

    def error(self, file: str, what: str) -> PeerError:
        """A :class:`PeerError` naming this peer (by rank, else by address) and ``file``."""
        return PeerError(self.peer, file, what if self.peer >= 0 else f"{self.address}: {what}")

    def reply(self, conn: _Conn, rid: int, op: str, file: str) -> tuple[dict[str, Any], memoryview | None]:
        """Wait for the reply to ``rid``; an error reply, a malformed one or none in time raise PeerError."""
        try:
            got = conn.recv(rid, self.timeout_s)
        except ConnectionAbortedError as e:
            raise self.error(file, f"{op}: {e}") from None
        except (ValueError, msgpack.UnpackException) as e:
            raise self.error(file, f"{op}: malformed reply ({e})") from e
        if got is None:
            raise self.error(file, f"{op}: no reply within {self.timeout_s:.1f} s (is the peer alive?)")
        if not got[0]["ok"]:
            raise self.error(file, f"{op} refused: {bounded_repr(got[0].get('err'), 500)}")
        return got

    def _call(self, header: dict[str, Any], file: str = "") -> dict[str, Any]:
        with self._conn(header["op"], file) as conn:
            return self.reply(conn, conn.send(header), header["op"], file)[0]

    # -- requests ----------------------------------------------------------------

    def replica(self, step: int, save_id: str, name: str) -> PeerWriteStream:
        """Open data file ``name`` of save ``save_id`` of ``step`` on the peer (in its node's tmp directory).

        Raises:
            PeerError: the peer refused or did not answer.
        """
        return PeerWriteStream(self, step, save_id, name)

    def publish(self, step: int, save_id: str, manifest: bytes) -> None:
        """(coordinator, to each node's leader) Commit the peer node's copy of ``step``: ``MANIFEST``, then the rename.

        Raises:
            PeerError: the peer refused (e.g. its tmp directory is missing) or did not answer.
        """
        stream = self.replica(step, save_id, MANIFEST)
        try:
            stream.write_pieces(memoryview(manifest), 0)
            stream.sync()
        finally:
            stream.close()
        self._call({"op": "publish", "step": step, "save": save_id}, f"step {step}")

    def abort(self, step: int, save_id: str) -> None:
        """Remove the peer node's tmp directory of save ``save_id`` (missing is fine).

        Raises:
            PeerError: the peer failed or did not answer.
        """
        self._call({"op": "abort", "step": step, "save": save_id}, f"step {step}")

    def sweep(self, keep: str) -> None:
        """(coordinator, preparing save ``keep``) Remove the peer node's tmp directories of every other save.

        Raises:
            PeerError: the peer failed or did not answer.
        """
        self._call({"op": "sweep", "save": keep})

    def remove(self, step: int) -> None:
        """Remove the peer node's committed copy of ``step`` (retention; missing is fine).

        Raises:
            PeerError: the peer failed or did not answer.
        """
        self._call({"op": "remove", "step": step}, f"step {step}")

    def inventory(self) -> dict[int, dict[str, int]]:
        """The peer node's committed steps: ``{step: {data file name: size}}`` (checked).

        Raises:
            PeerError: the peer failed, did not answer, or sent a malformed inventory.
        """
        steps = self._call({"op": "inventory"}).get("steps")
        try:
            return check_inventory(steps)
        except ValueError as e:
            raise self.error("inventory", f"malformed inventory: {e}") from None

    def size(self, step: int, name: str) -> int:
        """The size of file ``name`` of committed ``step`` on the peer's node.

        Raises:
            PeerError: the peer refused (no such step or file), failed or did not answer.
        """
        size = self._call({"op": "size", "step": step, "name": layout.check_name(name)}, name).get("size")
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise self.error(name, f"size: malformed reply ({bounded_repr(size)})")
        return size

    def read(self, step: int, name: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes of file ``name`` of committed ``step`` from ``offset`` into ``out``.

        Up to :data:`WINDOW` pieces are asked for at once.

        Returns:
            Bytes read (short at the end of the file).

        Raises:
            PeerError: the peer refused (no such step or file), failed or did not answer.
        """
        view = memoryview(out).cast("B")
        layout.check_name(name)
        if offset < 0 or offset + len(view) > MAX_FILE_BYTES:
            raise ValueError(f"read of {name} at {offset} (+{len(view)} B) is out of range")
        with self._conn("read", name) as conn:
            return self._read(conn, step, name, offset, view)

    def _read(self, conn: _Conn, step: int, name: str, offset: int, view: memoryview) -> int:
        pending: collections.deque[tuple[int, int, int]] = collections.deque()  # (id, position in view, length)
        pos, got, eof = 0, 0, False
        while pending or (pos < len(view) and not eof):
            while len(pending) < WINDOW and pos < len(view) and not eof:
                length = min(PIECE_BYTES, len(view) - pos)
                pending.append((self.ask_read(conn, step, name, offset + pos, length), pos, length))
                pos += length
            rid, at, length = pending.popleft()
            data = self.read_reply(conn, rid, name, length)
            if not eof and data:
                view[at : at + len(data)] = data
                got = at + len(data)
            eof = eof or len(data) < length
        return got

    def ask_read(self, conn: _Conn, step: int, name: str, offset: int, length: int) -> int:
        """Send one ``read`` of ``length`` (at most PIECE_BYTES) bytes at ``offset`` on ``conn``; returns its request id."""
        return conn.send({"op": "read", "step": step, "name": name, "offset": offset, "length": length})

    def read_reply(self, conn: _Conn, rid: int, name: str, length: int) -> memoryview:
        """The bytes answering read ``rid`` of ``length`` bytes (fewer: the file ends there), a view of the received frame.

        Raises:
            PeerError: an error reply, a malformed one, none in time, or the connection lost.
        """
        header, data = self.reply(conn, rid, "read", name)
        n = header.get("n")
        if type(n) is not int or not 0 <= n <= length or len(data or b"") != n:
            raise self.error(name, f"read: malformed reply ({bounded_repr(n)} bytes for a {length}-byte piece)")
        return data if data is not None else memoryview(b"")

    def close(self) -> None:
        """Close every idle connection; idempotent (streams still open close their own)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            ahead, self._warming = self._warming, []
        for conn in idle:
            conn.close()
        for f in ahead:  # closed here once opened (a failed one has nothing to close)
            f.add_done_callback(_close_opened)


def _close_opened(fut: Future[_Conn]) -> None:
    if fut.exception() is None:
        fut.result().close()


def _client_with_key(address: str, key: bytes, rank: int, timeout_s: float, peer: int, encryption: bool = False) -> PeerClient:
    """A :class:`PeerClient` from a pickled one (``key`` is already the peer-plane key)."""
    client = PeerClient(address, b"", rank, timeout_s, peer, encryption)
    client._key = key
    return client


class PeerWriteStream(WriteStream):
    """A replica file being written on a peer: pieces sent with a credit window of :data:`WINDOW`.

    :meth:`append` queues the data without copying it (zero-copy frames):
    the caller keeps those bytes unchanged until :meth:`sync` returns (the
    writer's chunks are in the staging arena or the live state, unchanged
    until the save ends). On the bulk path a piece changed meanwhile fails
    its seal at the peer, which drops the connection: a :class:`PeerError`,
    never a wrong replica. Once a request failed the stream is broken:
    every later call raises the same :class:`PeerError`.
    """

    def __init__(self, client: PeerClient, step: int, save_id: str, name: str) -> None:
        super().__init__(name)
        layout.check_name(name)
        self._client, self._where = client, {"step": step, "save": save_id, "name": name}
        self._pending: collections.deque[tuple[int, str]] = collections.deque()  # (request id, op)
        self._run: list[memoryview] = []  # appended, not sent yet: contiguous in the file from _run_at, sent as one write
        self._run_at = self._run_bytes = 0
        self._failed: PeerError | None = None
        self._conn: _Conn | None = client._take("replica open", name)
        try:
            self._request("open")
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _request(self, op: str) -> None:
        """Send ``op`` and wait for its reply (and every write before it)."""
        self._flush()
        self._wait(0)
        self._pending.append((self._send({"op": op, **self._where}), op))
        self._wait(0)

    def _send(self, header: dict[str, Any], data: Any = None) -> int:
        if self._failed is not None:
            raise self._failed
        assert self._conn is not None, "request on a closed stream"
        return self._conn.send(header, data)

    def _wait(self, most: int) -> None:
        """Wait until at most ``most`` requests are unanswered."""
        while len(self._pending) > most:
            rid, op = self._pending.popleft()
            try:
                assert self._conn is not None
                self._client.reply(self._conn, rid, f"replica {op}", self.name)
            except PeerError as e:
                self._failed = e
                raise

    def _write(self, data: memoryview, offset: int) -> None:
        """Add ``data`` to the run being gathered; a run is sent once it holds PIECE_BYTES or WRITE_FRAMES pieces.

        The writer appends 1 MiB blocks: one request (seal, reply, service
        wake-up) per block cost more than its bytes; a run of them is one
        request of up to 16 frames, still sent out of the caller's buffers.
        """
        for start in range(0, len(data), PIECE_BYTES):
            piece, at = data[start : start + PIECE_BYTES], offset + start
            if self._run and (at != self._run_at + self._run_bytes or self._run_bytes + len(piece) > PIECE_BYTES):
                self._flush()
            if not self._run:
                self._run_at = at
            self._run.append(piece)
            self._run_bytes += len(piece)
            if self._run_bytes >= PIECE_BYTES or len(self._run) >= WRITE_FRAMES:
                self._flush()

    def _flush(self) -> None:
        """Send the run gathered so far as one ``write`` (within the credit window)."""
        if not self._run:
            return
        run, at = self._run, self._run_at
        self._run, self._run_bytes = [], 0
        self._wait(WINDOW - 1)
        self._pending.append((self._send({"op": "write", **self._where, "offset": at}, run), "write"))

    def sync(self) -> None:
        """Return once the peer has every byte appended so far on its storage (fsync'd).

        Raises:
            PeerError: the peer refused, failed or did not answer in time.
        """
        self._request("sync")

    def close(self) -> None:
        """Close the peer's file (it stays in the save's tmp directory); idempotent; never raises."""
        conn = self._conn
        if conn is None:
            return
        healthy = self._failed is None
        if healthy:
            try:
                self._request("close")
            except PeerError:
                healthy = False
        self._conn = None
        if healthy:
            self._client._give_back(conn)
        else:
            conn.close()  # state unknown: the peer closes the file when the save is published or aborted
