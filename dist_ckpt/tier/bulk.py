"""The peer plane's bulk path: sessions, their seals, and the PLAIN socket they run on.

Unless ``Config.peer_encryption``, a peer service binds a second ROUTER
(:func:`bind_bulk_socket`) with ZeroMQ's PLAIN mechanism. A client asks for
a session over CURVE (the ``bulk`` op): a one-time token, its PLAIN
password, and a MAC key, bound to the asking rank (:class:`SessionTable`).
Every message then carries a seal (:func:`seal`: sequence number + Poly1305
tag under a per-message key), checked before the service touches the request
and by the client before it uses a reply.

A session lives as long as its connection: it is bound to the connection's
descriptor and remote address on its first request, and forgotten once that
connection is closed (:meth:`SessionTable.prune`, run on the bulk socket's
disconnect events), once a session issued later turns up on the same
descriptor, or when its token was not spent within :data:`BIND_S`.
"""

from __future__ import annotations

import collections
import hmac
import secrets
import socket as pysocket
import time
from dataclasses import dataclass
from typing import Any

import zmq
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ..transport import HANDSHAKE_TIMEOUT_S, ZAP_DOMAIN
from .peer_protocol import MAX_FRAME, QUEUE, REPLY_WAIT_S

__all__ = ["MAX_SESSIONS", "BIND_S", "SEAL_BYTES", "PLAIN_USER", "seal", "sealed_ok", "Session", "SessionTable", "BulkSession", "bind_bulk_socket"]

MAX_SESSIONS = 1024
"""Bulk sessions a service keeps (beyond, the oldest is forgotten: its connection's next frame is refused)."""
BIND_S = 6 * HANDSHAKE_TIMEOUT_S
"""A session whose token no handshake spent this long after it was issued is forgotten (its client never came)."""
MAC_BYTES = 16
SEAL_BYTES = 8 + MAC_BYTES
"""A bulk message's first frame: its sequence number (8 bytes, little-endian) and Poly1305 tag."""
PLAIN_USER = b"dist_ckpt"
_TCP_ESTABLISHED = 1  # tcpi_state (linux/tcp_states.h)


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


@dataclass
class Session:
    """A bulk connection's MAC key and sequence numbers, handed out over CURVE and bound to the rank that asked."""

    rank: int
    key: bytes
    issued: float  # time.monotonic() when handed out
    admitted: bool = False  # its one-time token was spent on a PLAIN handshake
    seq_in: int = 0  # the next request's sequence number
    seq_out: int = 0  # the next reply's
    fd: int = -1  # its connection's descriptor (from its first request; -1: none yet)
    peer: Any = None  # that connection's remote address: a reused descriptor is another connection


@dataclass(frozen=True)
class BulkSession:
    """(client side) What a service's ``bulk`` reply hands out over CURVE: where to connect, the one-time token, the MAC key."""

    address: str
    token: str
    key: bytes


class SessionTable:
    """A service's bulk sessions by token (service thread only).

    Args:
        bind_s: a session whose token no handshake spent this long after it was issued is forgotten (:data:`BIND_S`).
    """

    def __init__(self, bind_s: float = BIND_S) -> None:
        self._bind_s = bind_s
        self.port = -1  # the bulk socket's TCP port, once bound: a descriptor is only looked at while it is a connection to it
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()  # token -> session, oldest first
        self._by_fd: dict[int, str] = {}  # descriptor -> token of the session bound to it

    def __len__(self) -> int:
        return len(self._sessions)

    def issue(self, rank: int) -> tuple[str, bytes]:
        """A new session for ``rank``: ``(token, key)``; at :data:`MAX_SESSIONS` the dead ones, then the oldest, are forgotten."""
        if len(self._sessions) >= MAX_SESSIONS:
            self.prune()
        while len(self._sessions) >= MAX_SESSIONS:
            self.forget(next(iter(self._sessions)))
        token = secrets.token_hex(16)
        self._sessions[token] = Session(rank, secrets.token_bytes(32), time.monotonic())
        return token, self._sessions[token].key

    def admit(self, user: bytes, token: bytes) -> str | None:
        """(ZAP, PLAIN) The session a bulk connection's one-time token opens, as its user id; None refuses it."""
        name = token.decode("ascii", "replace")
        session = self._sessions.get(name) if user == PLAIN_USER else None
        if session is None or session.admitted:
            return None
        session.admitted = True
        return name

    def get(self, token: str) -> Session | None:
        """The session of ``token``, or None (never issued, or forgotten)."""
        return self._sessions.get(token)

    def bind(self, token: str, fd: int) -> None:
        """Tie session ``token`` to connection ``fd`` (a request of it, its seal checked, came from there); idempotent.

        A session bound to ``fd`` before is forgotten: two open connections
        never share a descriptor, so that one's connection is closed (its
        disconnect event may not have been read yet).
        """
        session = self._sessions.get(token)
        if session is None or session.fd >= 0:
            return
        old = self._by_fd.get(fd)
        if old is not None and old != token:
            self.forget(old)
        try:
            session.peer = _remote(fd, self.port)
        except OSError:
            return  # closed already (its reply goes nowhere): left unbound, it goes at the cap
        session.fd, self._by_fd[fd] = fd, token

    def forget(self, token: str) -> None:
        """Drop session ``token`` (missing is fine): its token and key open nothing any more."""
        session = self._sessions.pop(token, None)
        if session is not None and self._by_fd.get(session.fd) == token:
            del self._by_fd[session.fd]

    def prune(self) -> int:
        """Forget the sessions whose connection is closed, and those whose token was not spent within ``bind_s``.

        A session admitted but not yet bound stays (its first request is on its way).

        Returns:
            How many were forgotten.
        """
        now = time.monotonic()
        dead = [t for t, s in self._sessions.items() if (not s.admitted and now - s.issued >= self._bind_s) or (s.fd >= 0 and not self._alive(s))]
        for token in dead:
            self.forget(token)
        return len(dead)

    def _alive(self, session: Session) -> bool:
        try:
            return _remote(session.fd, self.port) == session.peer and _tcp_state(session.fd) == _TCP_ESTABLISHED
        except OSError:
            return False


def _remote(fd: int, port: int) -> Any:
    """The remote address of TCP connection ``fd`` to local ``port``, never closing it (libzmq owns it).

    Raises:
        OSError: ``fd`` is not (any more) a TCP connection to ``port``.
    """
    s = pysocket.socket(fileno=fd)
    try:
        if s.family not in (pysocket.AF_INET, pysocket.AF_INET6) or s.getsockname()[1] != port:
            raise OSError(f"descriptor {fd} is not a connection to port {port}")
        return s.getpeername()
    finally:
        s.detach()


def _tcp_state(fd: int) -> int:
    """``tcpi_state`` of TCP connection ``fd`` (Linux ``TCP_INFO``)."""
    s = pysocket.socket(fileno=fd)
    try:
        return s.getsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_INFO, 1)[0]
    finally:
        s.detach()


def bind_bulk_socket(ctx: zmq.Context, host: str) -> tuple[zmq.Socket, int]:
    """The bulk ROUTER, bound on ``host``: PLAIN (a one-time token per connection, checked by the ZAP gate), the control socket's limits.

    Returns:
        ``(socket, port)``.

    Raises:
        zmq.ZMQError: it cannot be bound.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    for opt in (zmq.RCVHWM, zmq.SNDHWM):
        sock.setsockopt(opt, QUEUE)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDTIMEO, int(REPLY_WAIT_S * 1000))
    sock.plain_server = True
    sock.zap_domain = ZAP_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    try:
        return sock, sock.bind_to_random_port(f"tcp://{host}")
    except BaseException:
        sock.close(linger=0)
        raise
