"""The peer service: every rank's authenticated data connection for the node-local tier.

Every rank runs one :class:`PeerService` for the job's lifetime (a thread
with its own ``zmq.Context``, a CURVE ROUTER behind a ZAP gate like the
coordinator's). It serves, for its node's local tree
(:mod:`dist_ckpt.tier.layout`):

* replica writes: ``open`` → ``write`` pieces → ``sync`` → ``close`` of a
  data file in ``step-N.tmp-<save_id>/``; only the file's origin rank may
  write it (a rank's file is named after it);
* the commit of the node's copy: the manifest is written as a file named
  ``MANIFEST`` of the save, then ``publish`` renames the tmp directory to
  ``step-N``; ``abort`` removes it; ``sweep`` removes every other save's
  (what a failed save's late writers left);
* byte-range ``read`` of a committed step's files, ``inventory`` (the node's
  committed steps), ``remove`` (retention).

Protocol: a request is ``[header, (data)]``, the header a msgpack map
``{"op", "id", <fields>}``; the reply ``[header, (data)]`` with ``{"id",
"ok", "err" | <fields>}``. Every field is checked (names must be
``MANIFEST`` or ``data/rNNNNN[-tK].bin``, steps and offsets bounded ints,
save ids plain tokens), so no request reaches a path outside the local
root; a bad request gets an error reply and is counted in
:attr:`PeerService.refused`, never a crash.

Memory is bounded: a frame is at most :data:`PIECE_BYTES` (+ header), set
as ``ZMQ_MAXMSGSIZE``; a client keeps at most :data:`WINDOW` pieces
unacknowledged (credit window), and the server's receive and send queues
hold at most a few messages per connection (``ZMQ_RCVHWM``/``SNDHWM``), so
a client ignoring the window only stalls its own TCP connection.

Keys: the peer plane derives its own secret from the session secret
(:func:`peer_secret`), so its keys never open the coordinator and vice versa.
Any rank may talk to any rank's service; a holder of the secret is a rank
(the same trust boundary as the control plane).

The bulk socket (unless ``encryption``): the same requests, unencrypted,
on a second ROUTER with ZeroMQ's PLAIN mechanism. A client asks for a
session over CURVE (``bulk``: a one-time token, its PLAIN password, and a
MAC key, bound to the asking rank); every message then carries a seal
(:func:`seal`: sequence number + Poly1305 tag under a per-message key), checked
before the service touches the request (a bad one drops the connection,
nothing written) and by the client before it uses a reply.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import hmac
import operator
import os
import resource
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import msgpack
import zmq
from cryptography.hazmat.primitives.poly1305 import Poly1305
from zmq.utils.monitor import parse_monitor_message

from ..errors import PeerError, bounded_repr
from ..layout_names import DATA_DIR, DATA_FILE_RE, MANIFEST
from ..logs import get_logger
from ..storage import STREAM_ALIGN, WRITE_PIECE, ReadHandle, WriteStream
from ..storage.local import LocalStorage
from ..transport import (
    HANDSHAKE_TIMEOUT_S,
    PLAIN_ADMITTED_SENT,
    ConnectionGate,
    ZapGate,
    pending_cap,
    require_curve,
    secure_client,
    secure_server,
    shut_connection,
)
from . import layout

log = get_logger(__name__)

__all__ = ["PIECE_BYTES", "WINDOW", "peer_secret", "PeerService", "PeerClient", "PeerWriteStream"]

PIECE_BYTES = WRITE_PIECE
"""Largest data frame on a peer connection (a read piece; a replica write is one per append, and the writer appends 1 MiB blocks)."""
WINDOW = 4
"""Pieces a client sends (or asks for) before it waits for the oldest one's reply: the credit window."""
QUEUE = 2 * WINDOW
"""Messages a connection's queues (``ZMQ_SNDHWM``/``RCVHWM``) hold, each way.

Above the window with room to spare: a libzmq pipe's writer learns of reads
in batches (every ``(HWM + 1) // 2`` messages, and only when its socket
processes commands), so it may count replies already read as queued. A
ROUTER would then drop an honest reply silently: the service sets
``ROUTER_MANDATORY`` and waits up to :data:`REPLY_WAIT_S` for room, clients
wait up to their timeout; only a client ignoring the window loses replies."""
REPLY_WAIT_S = 0.1
"""Longest the service waits to queue one reply (a client that does not read stalls it this long per request)."""
MAX_HEADER = 1 << 20
"""Largest request header; a reply header (an inventory) is bounded by :data:`PIECE_BYTES`."""
MAX_FILE_BYTES = 1 << 44
"""No request writes or reads past this offset in a file (16 TiB)."""
MAX_OPEN = 256
"""Replica files one service keeps open at once; an ``open`` beyond is refused."""
MAX_FRAME = PIECE_BYTES + MAX_HEADER
MAX_SESSIONS = 1024
"""Bulk sessions a service keeps (the oldest is forgotten beyond: its connection's next frame is refused)."""
MAC_BYTES = 16
SEAL_BYTES = 8 + MAC_BYTES
"""A bulk message's first frame: its sequence number (8 bytes, little-endian) and Poly1305 tag."""
_PLAIN_USER = b"dist_ckpt"
IO_THREADS = 1
"""libzmq I/O threads of the service's and of the clients' context: CURVE runs there, each connection on one of them
(more would spread concurrent connections over cores; not measured on the 2-core test machine, so left at libzmq's default)."""
_POLL_S = 0.1

# op -> (fields, frames after the header)
_OPS: dict[str, tuple[tuple[str, ...], int]] = {
    "open": (("step", "save", "name"), 0),
    "write": (("step", "save", "name", "offset"), 1),
    "sync": (("step", "save", "name"), 0),
    "close": (("step", "save", "name"), 0),
    "publish": (("step", "save"), 0),
    "abort": (("step", "save"), 0),
    "sweep": (("save",), 0),
    "read": (("step", "name", "offset", "length"), 0),
    "size": (("step", "name"), 0),
    "inventory": ((), 0),
    "remove": (("step",), 0),
    "bulk": ((), 0),
}


def peer_secret(secret: bytes) -> bytes:
    """The peer plane's secret, derived from the session secret (domain-separated from the coordinator's keys)."""
    return hmac.new(secret, b"dist_ckpt/tier-peer", hashlib.sha256).digest()


class _Refused(ValueError):
    """A request that is malformed or not allowed; its text goes back in the error reply."""


def _int_field(header: dict, key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise _Refused(f"{key} must be an int in [{low}, {high}], got {bounded_repr(value)}")
    return value


def _check_request(header: object, frames: int, sender: int) -> dict[str, Any]:
    """The checked fields of a request (``op``, ``id`` and the op's own), or raise :class:`_Refused`."""
    if not isinstance(header, dict):
        raise _Refused(f"the header is a {type(header).__name__}, not a map")
    op = header.get("op")
    if not isinstance(op, str) or op not in _OPS:
        raise _Refused(f"unknown op {bounded_repr(op)}")
    fields, extra = _OPS[op]
    if frames != 1 + extra:
        raise _Refused(f"{op} takes {1 + extra} frame(s), got {frames}")
    out: dict[str, Any] = {"op": op, "id": _int_field(header, "id", 0, (1 << 63) - 1), "sender": sender}
    for f in fields:
        if f == "step":
            out[f] = _int_field(header, f, 0, layout.MAX_STEP)
        elif f == "offset":
            out[f] = _int_field(header, f, 0, MAX_FILE_BYTES)
        elif f == "length":
            out[f] = _int_field(header, f, 1, PIECE_BYTES)
        else:
            try:
                out[f] = layout.check_save_id(header.get(f)) if f == "save" else layout.check_name(header.get(f))
            except ValueError as e:
                raise _Refused(str(e)) from None
    if op in ("open", "write", "sync", "close") and out["name"] != MANIFEST:
        origin = int(DATA_FILE_RE.match(out["name"]).group(1))  # type: ignore[union-attr]  # check_name matched it
        if origin != sender:
            raise _Refused(f"rank {sender} may only write its own files, not {out['name']}")
    return out


@dataclass
class _OpenFile:
    fd: int
    owner: bytes  # the connection that opened it: b"c" + its routing id, or b"b" + its bulk session's token
    tmp: str  # the save's tmp directory


@dataclass
class _Session:
    """A bulk connection's MAC key and sequence numbers, handed out over CURVE and bound to the rank that asked."""

    rank: int
    key: bytes
    admitted: bool = False  # its one-time token was spent on a PLAIN handshake
    seq_in: int = 0  # the next request's sequence number
    seq_out: int = 0  # the next reply's


def _mac(key: bytes, direction: bytes, seq: int, frames: list[Any]) -> bytes:
    """The Poly1305 tag of a bulk message: each frame with its length (the framing is authenticated too).

    Poly1305 is a one-time authenticator: its key is HMAC-SHA256(session key,
    direction + sequence number), a fresh key per message (as NaCl's
    secretbox derives one per nonce), so a tag is bound to its session,
    direction and place in the stream. Measured here: 6 GB/s, 4x HMAC-SHA256
    over the data; that difference is what makes the bulk path cheaper than CURVE.
    """
    m = Poly1305(hmac.digest(key, direction + seq.to_bytes(8, "little"), "sha256"))
    for f in frames:
        view = f.buffer if isinstance(f, zmq.Frame) else memoryview(f)
        m.update(view.nbytes.to_bytes(8, "little"))
        m.update(view)
    return m.finalize()


def seal(key: bytes, direction: bytes, seq: int, frames: list[Any]) -> bytes:
    """The first frame of bulk message ``seq`` carrying ``frames``: ``seq`` (8 bytes LE) + its MAC."""
    return seq.to_bytes(8, "little") + _mac(key, direction, seq, frames)


def sealed_ok(key: bytes, direction: bytes, seq: int, first: memoryview, frames: list[Any]) -> bool:
    """Whether ``first`` seals ``frames`` as bulk message ``seq`` (constant-time MAC compare)."""
    if first.nbytes != SEAL_BYTES or int.from_bytes(first[:8], "little") != seq:
        return False
    return hmac.compare_digest(bytes(first[8:]), _mac(key, direction, seq, frames))


class PeerService:
    """Serve this rank's node-local tree to the job's other ranks (see the module docstring).

    Args:
        local_root: this node's tree for the job (:func:`layout.local_root`); created (0700) if missing.
        secret: the session secret (``Session.secret``).
        rank: this rank (named in logs).
        world: ranks ``0 .. world-1`` are admitted.
        host: interface to bind (the job's network, as the coordinator's).
        encryption: keep every byte on CURVE (``Config.peer_encryption``); otherwise
            replica writes and reads may use the bulk socket (:attr:`bulk_address`):
            unencrypted, every frame MACed (see docs/architecture.md, "Node-local tier: data plane").

    Raises:
        TransportError: libzmq lacks CURVE.
        UnsafeFileError: ``local_root`` or its parent could be changed by another user (:func:`layout.ensure_local_root`).
        zmq.ZMQError: the socket cannot be bound.
    """

    def __init__(self, local_root: str, secret: bytes, rank: int, world: int, host: str, encryption: bool = False) -> None:
        require_curve()
        layout.ensure_local_root(local_root)
        self.local_root, self.rank = local_root, rank
        self.refused: collections.Counter[str] = collections.Counter()  # refused requests, by op ("handshake" etc. from the gate)
        self.served: collections.Counter[str] = collections.Counter()  # requests answered ok, by op
        self.bulk_requests = 0  # requests that came over the bulk socket (their seal checked)
        self.error: BaseException | None = None  # what ended the service thread, if anything did
        self._files: dict[str, _OpenFile] = {}
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()  # token -> session
        self._local = LocalStorage()
        self._stop = threading.Event()
        key = peer_secret(secret)
        self._ctx = zmq.Context(io_threads=IO_THREADS)
        try:
            # bound before the ROUTERs: no handshake precedes it; PLAIN (the bulk socket) admits one-time tokens only
            self._zap = ZapGate(self._ctx, key, world, plain=None if encryption else self._admit)
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.setsockopt(zmq.LINGER, 0)
            for opt in (zmq.RCVHWM, zmq.SNDHWM):
                self._sock.setsockopt(opt, QUEUE)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply that does not fit raises, never vanishes
            self._sock.setsockopt(zmq.SNDTIMEO, int(REPLY_WAIT_S * 1000))
            secure_server(self._sock, key, MAX_FRAME)
            port = self._sock.bind_to_random_port(f"tcp://{host}")
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self._gate = ConnectionGate(self._sock, port, pending_cap(soft), self.refused, who=f"[rank {rank}] peer service")
            self._bulk: zmq.Socket | None = None
            self.bulk_address: str | None = None  # None: everything stays on CURVE
            if not encryption:
                self._bulk, self._bulk_port = self._bulk_socket(host)
                self._bulk_gate = ConnectionGate(
                    self._bulk, self._bulk_port, pending_cap(soft), self.refused, who=f"[rank {rank}] peer bulk socket", admitted_sent=PLAIN_ADMITTED_SENT
                )
                self.bulk_address = f"tcp://{host}:{self._bulk_port}"
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self.address = f"tcp://{host}:{port}"
        self._thread = threading.Thread(target=self._run, name=f"dist_ckpt-peer-{rank}", daemon=True)
        self._thread.start()

    def _bulk_socket(self, host: str) -> tuple[zmq.Socket, int]:
        """The bulk ROUTER: PLAIN (a one-time token per connection, checked by the ZAP gate), the control socket's limits."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        for opt in (zmq.RCVHWM, zmq.SNDHWM):
            sock.setsockopt(opt, QUEUE)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDTIMEO, int(REPLY_WAIT_S * 1000))
        sock.plain_server = True
        sock.zap_domain = b"dist_ckpt"
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        return sock, sock.bind_to_random_port(f"tcp://{host}")

    # -- the service thread ---------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        gates = [self._gate] if self._bulk is None else [self._gate, self._bulk_gate]
        sockets = [self._sock] if self._bulk is None else [self._sock, self._bulk]
        for s in (*sockets, self._zap.socket, *(g.socket for g in gates)):
            poller.register(s, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(10 if any(g.pending for g in gates) else int(_POLL_S * 1000)))
                if self._zap.socket in ready:
                    self._zap.handle()
                for g in gates:
                    g.handle()
                if self._sock in ready:
                    self._drain(self._sock, self._serve_control)
                if self._bulk is not None and self._bulk in ready:
                    self._drain(self._bulk, self._serve_bulk)
        except BaseException as e:  # the service is gone: say so (clients see their connections refused)
            self.error = e
            log.exception("[rank %d] peer service stopped", self.rank)
        finally:
            self._close_files(lambda f: True)
            self._zap.close()
            for g in gates:
                g.close()
            for s in sockets:
                s.close()
            self._ctx.term()

    def _drain(self, sock: zmq.Socket, serve: Callable[[list[zmq.Frame]], list[Any] | None]) -> None:
        for _ in range(64):  # then look at the ZAP gate again
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = serve(frames)
            if reply is None:  # refused without a reply (a bulk frame that failed its MAC)
                continue
            try:  # waits at most REPLY_WAIT_S for room (ROUTER_MANDATORY: never a silent drop)
                sock.send_multipart([frames[0], *reply], copy=False)
            except zmq.Again:  # still full: a client ignoring its window loses this reply
                self._count("reply", "dropped: the client's queue stayed full (it does not read its replies)")
            except zmq.ZMQError:  # EHOSTUNREACH: the client is gone
                pass

    def _serve_control(self, frames: list[zmq.Frame]) -> list[Any]:
        """A CURVE request ``[routing id, header, (data)]``: its sender is the connection's ZAP user id (a rank)."""
        sender = _user_id(frames[1]) if len(frames) > 1 else -1
        return self._serve(frames[1:], sender, b"c" + frames[0].bytes, bulk=False)

    def _serve_bulk(self, frames: list[zmq.Frame]) -> list[Any] | None:
        """A bulk request ``[routing id, seal, header, (data)]``, or None when its seal fails.

        The seal (sequence number + MAC with the connection's session key) is
        checked before anything else reads the frames; a failure is counted,
        logged once, the connection shut down and its session forgotten, and
        nothing is written or answered.
        """
        user = frames[1].get("User-Id") if len(frames) > 1 else None
        token = user if isinstance(user, str) else ""
        session = self._sessions.get(token)
        body = frames[2:]
        if session is None or not 1 <= len(body) <= 2 or not sealed_ok(session.key, b"req", session.seq_in, frames[1].buffer, body):
            self._count("bulk-seal", "refused a bulk frame (unknown session, out of sequence, or a bad MAC); its connection is dropped")
            self._sessions.pop(token, None)
            with contextlib.suppress(zmq.ZMQError, TypeError):
                shut_connection(frames[-1].get(zmq.SRCFD), self._bulk_port)
            return None
        session.seq_in += 1
        self.bulk_requests += 1
        reply = self._serve(body, session.rank, b"b" + token.encode(), bulk=True)
        first = seal(session.key, b"rep", session.seq_out, reply)
        session.seq_out += 1
        return [first, *reply]

    def _admit(self, user: bytes, token: bytes) -> str | None:
        """(ZAP, PLAIN) The session a bulk connection's one-time token opens, as its user id; None refuses it."""
        name = token.decode("ascii", "replace")
        session = self._sessions.get(name) if user == _PLAIN_USER else None
        if session is None or session.admitted:
            return None
        session.admitted = True
        return name

    def _serve(self, frames: list[zmq.Frame], sender: int, owner: bytes, bulk: bool) -> list[Any]:
        """The reply frames for one request ``[header, (data)]`` of rank ``sender`` over connection ``owner``; never raises."""
        rid, op = -1, "?"
        try:
            if not frames or frames[0].buffer.nbytes > MAX_HEADER:
                raise _Refused("no header, or a header over 1 MiB")
            header = msgpack.unpackb(frames[0].buffer, raw=False, strict_map_key=True)  # <= MAX_HEADER: checked above
            if isinstance(header, dict):
                rid = header["id"] if type(header.get("id")) is int else -1
                op = header["op"] if isinstance(header.get("op"), str) and header["op"] in _OPS else "?"
            req = _check_request(header, len(frames), sender)
            op = req["op"]
            if op == "bulk" and bulk:
                raise _Refused("a bulk session is asked for over CURVE only")
            extra, data = getattr(self, f"_op_{op}")(req, owner, frames[1] if len(frames) > 1 else None)
            self.served[op] += 1
            return [msgpack.packb({"id": rid, "ok": True, **extra}), *([data] if data is not None else [])]
        except _Refused as e:
            self._count(op, f"refused: {e}")
            return [msgpack.packb({"id": rid, "ok": False, "err": str(e)})]
        except Exception as e:  # an OSError of this node's files, or a bug: the client hears it, the service lives
            self._count(op, f"failed: {type(e).__name__}: {e}")
            return [msgpack.packb({"id": rid, "ok": False, "err": f"{type(e).__name__}: {e}"})]

    def _count(self, op: str, text: str) -> None:
        self.refused[op] += 1
        if self.refused[op] == 1:
            log.warning("[rank %d] peer service: %s %s; further ones of this op are only counted", self.rank, op, text)

    # -- ops: each returns (reply fields, data frame or None) --------------------

    def _op_open(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        tmp = layout.tmp_dir(self.local_root, req["step"], req["save"])
        path = f"{tmp}/{req['name']}"
        old = self._files.pop(path, None)
        if old is not None:
            os.close(old.fd)
        live = {t for t in {f.tmp for f in self._files.values()} if os.path.isdir(t)}
        self._close_files(lambda f: f.tmp not in live)
        if len(self._files) >= MAX_OPEN:
            raise _Refused(f"{MAX_OPEN} replica files are open already")
        os.makedirs(f"{tmp}/{DATA_DIR}", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        self._files[path] = _OpenFile(fd, owner, tmp)
        return {}, None

    def _open_file(self, req: dict, owner: bytes) -> _OpenFile:
        path = f"{layout.tmp_dir(self.local_root, req['step'], req['save'])}/{req['name']}"
        f = self._files.get(path)
        if f is None or f.owner != owner:
            raise _Refused(f"{req['name']} of save {req['save']} is not open on this connection")
        return f

    def _op_write(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        f = self._open_file(req, owner)
        assert data is not None  # the op's frame count was checked
        view, offset = data.buffer, req["offset"]
        if offset % STREAM_ALIGN or offset + len(view) > MAX_FILE_BYTES:
            raise _Refused(f"write at {offset} (+{len(view)} B) is not {STREAM_ALIGN}-aligned or past {MAX_FILE_BYTES}")
        while len(view):
            n = os.pwrite(f.fd, view, offset)
            view, offset = view[n:], offset + n
        return {}, None

    def _op_sync(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        os.fsync(self._open_file(req, owner).fd)
        return {}, None

    def _op_close(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        f = self._open_file(req, owner)
        del self._files[f"{f.tmp}/{req['name']}"]
        os.close(f.fd)
        return {}, None

    def _op_publish(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        tmp = layout.tmp_dir(self.local_root, req["step"], req["save"])
        self._close_files(lambda f: f.tmp == tmp)
        layout.commit_step(self.local_root, req["step"], req["save"])
        return {}, None

    def _op_abort(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        tmp = layout.tmp_dir(self.local_root, req["step"], req["save"])
        self._close_files(lambda f: f.tmp == tmp)
        self._local.abort(self._local.save_target(layout.step_dir(self.local_root, req["step"]), req["save"], True))
        return {}, None

    def _committed(self, req: dict) -> ReadHandle:
        """An open handle on file ``name`` of committed step ``step`` of this node."""
        root = layout.step_dir(self.local_root, req["step"])
        if not os.path.isfile(f"{root}/{MANIFEST}"):
            raise FileNotFoundError(f"step {req['step']} is not committed on this node")
        return self._local.open_in(root, req["name"])  # no link followed below the step

    def _op_size(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        handle = self._committed(req)
        try:
            return {"size": handle.size()}, None
        finally:
            handle.close()

    def _op_sweep(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        removed = layout.clear_incomplete(self.local_root, keep=req["save"])
        return {"removed": len(removed)}, None

    def _op_read(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        handle = self._committed(req)
        try:
            buf = bytearray(req["length"])
            n = handle.preadv([memoryview(buf)], req["offset"])
        finally:
            handle.close()
        return {"n": n}, memoryview(buf)[:n]

    def _op_inventory(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        return {"steps": layout.committed_steps(self.local_root)}, None

    def _op_remove(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        layout.remove_step(self.local_root, req["step"])
        return {}, None

    def _op_bulk(self, req: dict, owner: bytes, data: zmq.Frame | None) -> tuple[dict, Any]:
        """A bulk session for the asking rank: a one-time token (its PLAIN password) and a MAC key, sent over CURVE."""
        if self._bulk is None:
            return {"address": None}, None  # peer_encryption: everything stays on CURVE
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        token = secrets.token_hex(16)
        self._sessions[token] = _Session(req["sender"], secrets.token_bytes(32))
        return {"address": self.bulk_address, "token": token, "key": self._sessions[token].key}, None

    def _close_files(self, which: Any) -> None:
        """Close the open replica files ``which(file)`` selects.

        Also run on each ``open`` for the files whose save directory is gone:
        a writer that failed never sent ``close``, and the commit or abort of
        its save went to the node's leader (another rank's service), not here.
        """
        for path, f in list(self._files.items()):
            if which(f):
                del self._files[path]
                os.close(f.fd)

    @property
    def open_files(self) -> int:
        """Replica files open now (at most :data:`MAX_OPEN`)."""
        return len(self._files)

    def close(self) -> None:
        """Stop serving (files of saves in flight are closed, not removed); idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


def _user_id(frame: zmq.Frame) -> int:
    """The rank the ZAP gate admitted ``frame``'s connection as (-1 if none)."""
    try:
        return int(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


# -- the client side ----------------------------------------------------------------

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


# Connection events that lose every request in flight: the waiting side fails at once instead of at its timeout.
_LOST: dict[zmq.Event, str] = {
    zmq.EVENT_DISCONNECTED: "the connection to the peer was lost (its process died or closed it)",
    zmq.EVENT_CONNECT_RETRIED: "the peer refused the connection (no service listens there: its process is gone?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the peer refused this rank's key (another job, a rank outside its world, or a spent bulk token)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the CURVE handshake with the peer failed (not a peer of this job, or another secret)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CURVE handshake with the peer failed (not a peer of this job, or another secret)",
}
_HEARTBEAT_MS, _HEARTBEAT_TIMEOUT_MS = 2000, 10000  # a silent host (powered off, cut off) drops the connection in ~10 s


@dataclass(frozen=True)
class _BulkSession:
    """What a service's ``bulk`` reply hands out (over CURVE): where to connect, the one-time token, the MAC key."""

    address: str
    token: str
    key: bytes


class _Conn:
    """One DEALER connection to a peer service, used by one thread at a time.

    Its monitor socket reports the connection's fate: a disconnect, a refused
    connect or a failed handshake fails the request being waited for at once
    (the request is lost: libzmq reconnects, but never resends). ZMTP
    heartbeats make a silent host count as disconnected.

    With ``bulk`` it is a PLAIN connection to the service's bulk socket (the
    token as password, spent on the first handshake): every request is sealed
    (sequence number + HMAC-SHA256 with the session key) and every reply's
    seal is checked before its bytes are used.
    """

    def __init__(self, address: str, key: bytes, rank: int, timeout_s: float, error: Callable[[str, str], PeerError], bulk: _BulkSession | None = None) -> None:
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
            self.sock.plain_username, self.sock.plain_password = _PLAIN_USER, bulk.token.encode()
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
        """Queue one request; returns its id (never blocks: the window keeps the queue short)."""
        header["id"] = rid = next(self._ids)
        frames: list[Any] = [msgpack.packb(header)]
        if data is not None:
            frames.append(data)
        if self._bulk is not None:
            frames.insert(0, seal(self._bulk.key, b"req", self._seq_out, frames))
            self._seq_out += 1
        try:
            # Copied (a memcpy at a fraction of CURVE's cost): the caller's buffer (a staging arena, maybe shared
            # memory) is free again when append returns, whatever happens to the connection afterwards.
            self.sock.send_multipart(frames, copy=True)
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
                self._idle, self._pid = [], os.getpid()  # the parent's sockets: left alone, never used here
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._connect(op, file)
        conn.forget_events()
        return conn

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
        return _Conn(self.address, self._key, self.rank, self.timeout_s, self.error, _BulkSession(address, token, key))

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
            return _check_inventory(steps)
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
                rid = conn.send({"op": "read", "step": step, "name": name, "offset": offset + pos, "length": length})
                pending.append((rid, pos, length))
                pos += length
            rid, at, length = pending.popleft()
            header, data = self.reply(conn, rid, "read", name)
            n = header.get("n")
            if type(n) is not int or not 0 <= n <= length or len(data or b"") != n:
                raise self.error(name, f"read: malformed reply ({bounded_repr(n)} bytes for a {length}-byte piece)")
            if not eof and n:
                assert data is not None  # n > 0: a view of n bytes
                view[at : at + n] = data
                got = at + n
            eof = eof or n < length
        return got

    def close(self) -> None:
        """Close every idle connection; idempotent (streams still open close their own)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _client_with_key(address: str, key: bytes, rank: int, timeout_s: float, peer: int, encryption: bool = False) -> PeerClient:
    """A :class:`PeerClient` from a pickled one (``key`` is already the peer-plane key)."""
    client = PeerClient(address, b"", rank, timeout_s, peer, encryption)
    client._key = key
    return client


def _check_inventory(steps: object) -> dict[int, dict[str, int]]:
    """An inventory reply, checked: ``{step int: {data file name: size int}}``.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(steps, dict):
        raise ValueError("not a map of steps")
    out: dict[int, dict[str, int]] = {}
    for step, files in steps.items():
        if type(step) is not int or not 0 <= step <= layout.MAX_STEP or not isinstance(files, dict):
            raise ValueError(f"step {bounded_repr(step)} is not a step number with a map of files")
        for name, size in files.items():
            if not isinstance(name, str) or not DATA_FILE_RE.match(name) or type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
                raise ValueError(f"step {step}: {bounded_repr(name)} -> {bounded_repr(size)} is not a data file and its size")
        out[step] = dict(files)
    return out


class PeerWriteStream(WriteStream):
    """A replica file being written on a peer: pieces sent with a credit window of :data:`WINDOW`.

    :meth:`append` copies the data into the message it queues, so the
    caller's buffer is free when it returns. Once a request failed the
    stream is broken: every later call raises the same :class:`PeerError`.
    """

    def __init__(self, client: PeerClient, step: int, save_id: str, name: str) -> None:
        super().__init__(name)
        layout.check_name(name)
        self._client, self._where = client, {"step": step, "save": save_id, "name": name}
        self._pending: collections.deque[tuple[int, str]] = collections.deque()  # (request id, op)
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
        for start in range(0, len(data), PIECE_BYTES):
            self._wait(WINDOW - 1)
            piece = data[start : start + PIECE_BYTES]
            self._pending.append((self._send({"op": "write", **self._where, "offset": offset + start}, piece), "write"))

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
