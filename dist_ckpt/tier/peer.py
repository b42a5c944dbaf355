"""The peer service: every rank's authenticated data connection for the node-local tier.

Every rank runs one :class:`PeerService` for the job's lifetime (a thread
with its own ``zmq.Context``, a CURVE ROUTER behind a ZAP gate like the
coordinator's). It serves, for its node's local tree
(:mod:`dist_ckpt.tier.layout`):

* replica writes: ``open`` → ``write`` runs (1 to :data:`WRITE_FRAMES` data frames) → ``sync`` → ``close`` of a
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

The wire protocol (sizes, ops, field checks) is :mod:`dist_ckpt.tier.peer_protocol`,
the bulk path's sessions and seals :mod:`dist_ckpt.tier.bulk`, the client
:mod:`dist_ckpt.tier.peer_client`; their public names are importable from here too.

Keys: the peer plane derives its own secret from the session secret
(:func:`~dist_ckpt.tier.peer_protocol.peer_secret`), so its keys never open the coordinator and vice versa.
Any rank may talk to any rank's service; a holder of the secret is a rank
(the same trust boundary as the control plane).

The bulk socket (unless ``encryption``): the same requests, unencrypted,
on a second ROUTER with ZeroMQ's PLAIN mechanism. A client asks for a
session over CURVE (``bulk``: a one-time token, its PLAIN password, and a
MAC key, bound to the asking rank); every message then carries a seal
(:func:`~dist_ckpt.tier.bulk.seal`: sequence number + Poly1305 tag under a per-message key), checked
before the service touches the request (a bad one drops the connection,
nothing written) and by the client before it uses a reply. A session is
forgotten once its connection closes (:class:`~dist_ckpt.tier.bulk.SessionTable`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import threading
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from ..layout_names import DATA_DIR, MANIFEST
from ..logs import get_logger
from ..storage import STREAM_ALIGN, ReadHandle
from ..storage.local import LocalStorage
from ..transport import PLAIN_ADMITTED_SENT, ConnectionGate, ZapGate, pending_cap, require_curve, secure_server, shut_connection
from . import layout
from .bulk import MAX_SESSIONS, SessionTable, bind_bulk_socket, seal, sealed_ok
from .peer_client import PeerClient, PeerWriteStream
from .peer_protocol import (
    IO_THREADS,
    MAX_FILE_BYTES,
    MAX_FRAME,
    MAX_HEADER,
    OPS,
    PIECE_BYTES,
    QUEUE,
    REPLY_WAIT_S,
    WINDOW,
    WRITE_FRAMES,
    Refused,
    check_request,
    peer_secret,
)

log = get_logger(__name__)

# the names other modules and tests import from here, wherever they live now
__all__ = [
    "PIECE_BYTES",
    "WRITE_FRAMES",
    "WINDOW",
    "MAX_FRAME",
    "MAX_FILE_BYTES",
    "MAX_SESSIONS",
    "peer_secret",
    "seal",
    "sealed_ok",
    "PeerService",
    "PeerClient",
    "PeerWriteStream",
]

MAX_OPEN = 256
"""Replica files one service keeps open at once; an ``open`` beyond is refused."""
_POLL_S = 0.1
_IOV_MAX = 1024


@dataclass
class _OpenFile:
    fd: int
    owner: bytes  # the connection that opened it: b"c" + its routing id, or b"b" + its bulk session's token
    tmp: str  # the save's tmp directory
    old: int = 0  # reused (a recycled step's file): its old size, whose bytes in a gap are zeroed and past the end cut at sync
    end: int = 0  # bytes written so far (the end of the highest write)


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
        self._sessions = SessionTable()
        self._local = LocalStorage()
        self._stop = threading.Event()
        key = peer_secret(secret)
        self._ctx = zmq.Context(io_threads=IO_THREADS)
        try:
            # bound before the ROUTERs: no handshake precedes it; PLAIN (the bulk socket) admits one-time tokens only
            self._zap = ZapGate(self._ctx, key, world, plain=None if encryption else self._sessions.admit)
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
                self._bulk, self._bulk_port = bind_bulk_socket(self._ctx, host)
                self._sessions.port = self._bulk_port
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

    # -- the service thread ---------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        gates = [self._gate] if self._bulk is None else [self._gate, self._bulk_gate]
        sockets = [self._sock] if self._bulk is None else [self._sock, self._bulk]
        for s in (*sockets, self._zap.socket, *(g.socket for g in gates)):
            poller.register(s, zmq.POLLIN)
        closed = 0  # the bulk gate's disconnects seen so far
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(10 if any(g.pending for g in gates) else int(_POLL_S * 1000)))
                if self._zap.socket in ready:
                    self._zap.handle()
                for g in gates:
                    g.handle()
                if self._bulk is not None and self._bulk_gate.disconnects != closed:
                    closed = self._bulk_gate.disconnects
                    self._sessions.prune()  # a bulk connection closed: its session goes with it
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
        if session is None or not 1 <= len(body) <= 1 + WRITE_FRAMES or not sealed_ok(session.key, b"req", session.seq_in, frames[1].buffer, body):
            self._count("bulk-seal", "refused a bulk frame (unknown session, out of sequence, or a bad MAC); its connection is dropped")
            self._sessions.forget(token)
            with contextlib.suppress(zmq.ZMQError, TypeError):
                shut_connection(frames[-1].get(zmq.SRCFD), self._bulk_port)
            return None
        session.seq_in += 1
        self.bulk_requests += 1
        if session.fd < 0:  # its first request: tie the session to this connection, forgotten when it closes
            with contextlib.suppress(zmq.ZMQError, TypeError):
                self._sessions.bind(token, frames[-1].get(zmq.SRCFD))
        reply = self._serve(body, session.rank, b"b" + token.encode(), bulk=True)
        first = seal(session.key, b"rep", session.seq_out, reply)
        session.seq_out += 1
        return [first, *reply]

    def _serve(self, frames: list[zmq.Frame], sender: int, owner: bytes, bulk: bool) -> list[Any]:
        """The reply frames for one request ``[header, (data)]`` of rank ``sender`` over connection ``owner``; never raises."""
        rid, op = -1, "?"
        try:
            if not frames or frames[0].buffer.nbytes > MAX_HEADER:
                raise Refused("no header, or a header over 1 MiB")
            header = msgpack.unpackb(frames[0].buffer, raw=False, strict_map_key=True)  # <= MAX_HEADER: checked above
            if isinstance(header, dict):
                rid = header["id"] if type(header.get("id")) is int else -1
                op = header["op"] if isinstance(header.get("op"), str) and header["op"] in OPS else "?"
            req = check_request(header, len(frames), sender)
            op = req["op"]
            if op == "bulk" and bulk:
                raise Refused("a bulk session is asked for over CURVE only")
            extra, data = getattr(self, f"_op_{op}")(req, owner, frames[1:])
            self.served[op] += 1
            return [msgpack.packb({"id": rid, "ok": True, **extra}), *([data] if data is not None else [])]
        except Refused as e:
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

    def _op_open(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        tmp = layout.tmp_dir(self.local_root, req["step"], req["save"])
        path = f"{tmp}/{req['name']}"
        old = self._files.pop(path, None)
        if old is not None:
            os.close(old.fd)
        live = {t for t in {f.tmp for f in self._files.values()} if os.path.isdir(t)}
        self._close_files(lambda f: f.tmp not in live)
        if len(self._files) >= MAX_OPEN:
            raise Refused(f"{MAX_OPEN} replica files are open already")
        os.makedirs(f"{tmp}/{DATA_DIR}", exist_ok=True)
        reused = layout.reuse_file(tmp, req["name"])  # the recycled step's file of that name: written over in place
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if reused else os.O_TRUNC) | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        self._files[path] = _OpenFile(fd, owner, tmp, os.fstat(fd).st_size if reused else 0)
        return {}, None

    def _open_file(self, req: dict, owner: bytes) -> _OpenFile:
        path = f"{layout.tmp_dir(self.local_root, req['step'], req['save'])}/{req['name']}"
        f = self._files.get(path)
        if f is None or f.owner != owner:
            raise Refused(f"{req['name']} of save {req['save']} is not open on this connection")
        return f

    def _op_write(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        """Bytes at ``offset``: the data frames one after the other (a run of the writer's blocks, contiguous in the file)."""
        f = self._open_file(req, owner)
        views, offset = [d.buffer for d in data], req["offset"]  # 1..WRITE_FRAMES frames: the op's frame count was checked
        total = sum(v.nbytes for v in views)
        if offset % STREAM_ALIGN or total > PIECE_BYTES or offset + total > MAX_FILE_BYTES:
            raise Refused(f"write at {offset} (+{total} B) is not {STREAM_ALIGN}-aligned, over {PIECE_BYTES} B or past {MAX_FILE_BYTES}")
        layout.zero_stale(f.fd, f.end, offset, f.old)
        f.end = max(f.end, offset + total)
        _pwrite_all(f.fd, views, offset)
        return {}, None

    def _op_sync(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        f = self._open_file(req, owner)
        f.old = layout.cut_stale(f.fd, f.end, f.old)
        os.fsync(f.fd)
        return {}, None

    def _op_close(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        f = self._open_file(req, owner)
        del self._files[f"{f.tmp}/{req['name']}"]
        os.close(f.fd)
        return {}, None

    def _op_publish(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        tmp = layout.tmp_dir(self.local_root, req["step"], req["save"])
        self._close_files(lambda f: f.tmp == tmp)
        layout.commit_step(self.local_root, req["step"], req["save"])
        return {}, None

    def _op_abort(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
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

    def _op_size(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        handle = self._committed(req)
        try:
            return {"size": handle.size()}, None
        finally:
            handle.close()

    def _op_sweep(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        removed = layout.clear_incomplete(self.local_root, keep=req["save"])
        return {"removed": len(removed)}, None

    def _op_read(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        handle = self._committed(req)
        try:
            buf = np.empty(req["length"], np.uint8).data  # not zeroed (bytearray would write every page first): only the n bytes read are sent
            n = handle.preadv([buf], req["offset"])
        finally:
            handle.close()
        return {"n": n}, buf[:n]

    def _op_inventory(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        return {"steps": layout.committed_steps(self.local_root)}, None

    def _op_remove(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        layout.remove_step(self.local_root, req["step"])
        return {}, None

    def _op_bulk(self, req: dict, owner: bytes, data: list[zmq.Frame]) -> tuple[dict, Any]:
        """A bulk session for the asking rank: a one-time token (its PLAIN password) and a MAC key, sent over CURVE."""
        if self._bulk is None:
            return {"address": None}, None  # peer_encryption: everything stays on CURVE
        token, key = self._sessions.issue(req["sender"])
        return {"address": self.bulk_address, "token": token, "key": key}, None

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
    def bulk_sessions(self) -> int:
        """Bulk sessions kept now: those handed out and not yet spent, and those of open bulk connections."""
        return len(self._sessions)

    @property
    def open_files(self) -> int:
        """Replica files open now (at most :data:`MAX_OPEN`)."""
        return len(self._files)

    def close(self) -> None:
        """Stop serving (files of saves in flight are closed, not removed); idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write ``views`` one after the other at ``offset`` (``pwritev``, again after a short write)."""
    views = [v.cast("B") for v in views if v.nbytes]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _user_id(frame: zmq.Frame) -> int:
    """The rank the ZAP gate admitted ``frame``'s connection as (-1 if none)."""
    try:
        return int(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1
