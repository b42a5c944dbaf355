"""Transport security of the coordinator link: CURVE, the ZAP gate, connection caps.

Every socket between a rank and the coordinator runs ZeroMQ CURVE. All keys
are derived from the job secret, so nothing secret or trusted needs to travel
through the launcher's store (see :mod:`dist_ckpt.trust` for where the
secret comes from):

* the coordinator's key pair: a rank only talks to a server that proves it
  holds the secret (a fake endpoint written into the store gets nowhere);
* one key pair per rank: the coordinator's ZAP handler (:class:`ZapGate`)
  admits exactly the job's ``world_size`` rank keys and tells the ROUTER,
  through the ZAP user id, which rank a connection belongs to.

A peer without the secret never completes a handshake, so none of its bytes
reach a message buffer: libzmq buffers a multipart message whole before the
application sees it, which is why size checks in :mod:`dist_ckpt.wire` alone
cannot bound memory. ``ZMQ_MAXMSGSIZE`` still bounds each frame of an
authenticated peer, and :class:`ConnectionGate` bounds what connections that
have not finished their handshake can hold (descriptors, time).

Call order (coordinator, one thread): :func:`require_curve`,
``ZapGate(ctx, ...)`` *before* the ROUTER binds, :func:`secure_server`, bind,
``ConnectionGate(sock, ...)``; then poll ``gate.socket``/``zap.socket`` in
the event loop and call their ``handle()``. Ranks: :func:`secure_client`
before ``connect``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import resource
import socket as pysocket
import struct
import time
from typing import Callable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .errors import TransportError

log = logging.getLogger(__name__)

__all__ = [
    "ZAP_DOMAIN",
    "HANDSHAKE_TIMEOUT_S",
    "curve_keys",
    "require_curve",
    "secure_server",
    "secure_client",
    "ZapGate",
    "ConnectionGate",
    "MAX_HANDSHAKE_BYTES",
    "raise_fd_limit",
    "pending_cap",
    "PLAIN_ADMITTED_SENT",
    "shut_connection",
]

ZAP_DOMAIN = b"dist_ckpt"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
#: An honest handshake takes milliseconds; this bounds how long an idle or
#: half-open connection holds a descriptor (libzmq's default is 30 s).
HANDSHAKE_TIMEOUT_S = 10.0


def curve_keys(secret: bytes, who: str) -> tuple[bytes, bytes]:
    """The CURVE key pair of ``who`` ("server" or "rank <n>") in this job.

    Args:
        secret: the job secret (at least 16 bytes).
        who: whose keys.

    Returns:
        ``(public, secret)`` keys, Z85-encoded (40 bytes each).
    """
    # HMAC as a PRF with a label that cannot parse as a wire MAC input (whose
    # first 8 bytes are a small little-endian length): domain separated.
    raw = hmac.new(secret, b"dist_ckpt/curve-key/" + who.encode(), hashlib.sha256).digest()
    private = z85.encode(raw)
    return zmq.curve_public(private), private


def require_curve() -> None:
    """Raises TransportError when this libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise TransportError(f"libzmq {zmq.zmq_version()} lacks CURVE; dist_ckpt needs it to authenticate ranks (install a pyzmq wheel, which bundles it)")


def secure_server(sock: zmq.Socket, secret: bytes, max_frame: int) -> None:
    """Make ``sock`` (the ROUTER, not yet bound) a CURVE server behind the ZAP gate.

    Args:
        sock: the coordinator's ROUTER socket.
        secret: the job secret.
        max_frame: largest frame an authenticated peer may send (``ZMQ_MAXMSGSIZE``, per frame).
    """
    public, private = curve_keys(secret, "server")
    sock.curve_secretkey, sock.curve_publickey = private, public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler bound: refuse, never admit everyone
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)


def secure_client(sock: zmq.Socket, secret: bytes, rank: int, max_frame: int) -> None:
    """Give ``sock`` (a rank's DEALER, not yet connected) rank ``rank``'s CURVE keys.

    Args:
        sock: the rank's socket.
        secret: the job secret.
        rank: whose keys to present.
        max_frame: largest frame accepted from the coordinator.
    """
    public, private = curve_keys(secret, f"rank {rank}")
    sock.curve_serverkey = curve_keys(secret, "server")[0]
    sock.curve_secretkey, sock.curve_publickey = private, public
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)


class ZapGate:
    """The ZAP handler of the coordinator's context: admits the job's rank keys only.

    A connection is admitted with user id ``str(rank)``, which every message
    received on it carries (``frame.get("User-Id")``), so the coordinator
    can check that a message claiming rank r came over rank r's key.

    A PLAIN handshake (the peer plane's bulk socket) is admitted only when
    ``plain(username, password)`` returns a user id; without ``plain`` every
    PLAIN handshake is refused.

    Args:
        ctx: the context of the ROUTER it guards (ZAP is per context).
        secret: the job secret.
        world_size: ranks ``0 .. world_size-1`` are admitted.
        plain: the user id for PLAIN credentials, or None to refuse them (a one-time token check).
    """

    def __init__(self, ctx: zmq.Context, secret: bytes, world_size: int, plain: Callable[[bytes, bytes], str | None] | None = None) -> None:
        # Derived once: 16k ranks cost ~1 s of key derivation, not one per handshake.
        self._ranks = {z85.decode(curve_keys(secret, f"rank {r}")[0]): r for r in range(world_size)}
        self._plain = plain
        self.admitted: set[int] = set()
        self.refused = 0
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def handle(self) -> None:
        """Answer every pending ZAP request (non-blocking)."""
        while True:
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # RFC 27: version, request id, domain, address, identity, mechanism, credentials...
        version, request_id = (request + [b"", b""])[:2]
        user = None
        if len(request) >= 6 and version == b"1.0" and request[2] == ZAP_DOMAIN:
            if len(request) == 7 and request[5] == b"CURVE":
                rank = self._ranks.get(request[6])
                if rank is not None:
                    self.admitted.add(rank)
                    user = str(rank)
            elif len(request) == 8 and request[5] == b"PLAIN" and self._plain is not None:
                user = self._plain(request[6], request[7])
        if user is None:
            self.refused += 1
            return [b"1.0", request_id, b"400", b"not a rank of this job", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", user.encode(), b""]

    def close(self) -> None:
        """Close the ZAP socket."""
        self.socket.close(linger=0)


def pending_cap(soft_limit: int) -> int:
    """How many connections may sit unauthenticated at once, given the descriptor limit.

    An eighth of the descriptors at most (plus the listen backlog libzmq drains
    before the gate sees the events), so a flood of idle connections
    leaves the rest to the ranks' authenticated connections and to the
    training process's own files.
    """
    return max(8, min(1024, soft_limit // 8))


# A CURVE server has sent greeting (64) + WELCOME (2 + 168) before it admits a
# client, and READY (>= 2 + 30) once it has: more than this many bytes acked on a
# connection means the ZAP gate admitted it. An honest client's whole handshake
# (greeting, HELLO, INITIATE with its metadata) is well under 1 KiB.
_ADMITTED_SENT = 64 + 170 + 16
#: The same for a PLAIN server (the peer plane's bulk socket): greeting (64)
#: before the ZAP answer; WELCOME (10) + READY (~43) once admitted (117 B
#: measured), an ERROR (~12) and a close when refused.
PLAIN_ADMITTED_SENT = 64 + 36
MAX_HANDSHAKE_BYTES = 4096


class ConnectionGate:
    """Bounds what connections that have not passed the CURVE handshake can hold.

    Watches the ROUTER's monitor events and, while any connection is
    *pending* (accepted, not yet admitted), its TCP counters (``TCP_INFO``:
    libzmq's success event does not say which connection succeeded, and
    libzmq buffers a handshake frame of up to ``ZMQ_MAXMSGSIZE`` before
    CURVE can refuse it). On each :meth:`handle` it shuts down (``shutdown``,
    not close: libzmq owns the descriptor and closes it itself):

    * a pending connection that has sent more than :data:`MAX_HANDSHAKE_BYTES`
      (no honest handshake does; it is filling a frame buffer);
    * the oldest pending connections beyond ``cap`` (an honest handshake takes
      milliseconds, an idle connection waits for ``HANDSHAKE_TIMEOUT_S``).

    Refused handshakes are counted in ``counter["handshake"]``, shed
    connections in ``counter["pending-cap"]`` and ``counter["handshake-size"]``.

    Args:
        sock: the bound ROUTER socket.
        port: its TCP port (a descriptor is only touched while it is a TCP
            connection to this port: descriptors are reused).
        cap: most pending connections.
        counter: where refusals are counted (the coordinator's ``dropped``).
        who: names the server in its log lines.
        admitted_sent: bytes the server has sent (acked) once it admitted a connection
            (CURVE's default; :data:`PLAIN_ADMITTED_SENT` for a PLAIN server).
    """

    _EVENTS = (
        zmq.EVENT_ACCEPTED
        | zmq.EVENT_ACCEPT_FAILED
        | zmq.EVENT_DISCONNECTED
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )

    def __init__(
        self, sock: zmq.Socket, port: int, cap: int, counter: collections.Counter[str], who: str = "[rank 0] coordinator", admitted_sent: int = _ADMITTED_SENT
    ) -> None:
        self._who, self._admitted_sent = who, admitted_sent
        self.socket = sock.get_monitor_socket(self._EVENTS)
        self._port, self._cap, self._counter = port, cap, counter
        self._pending: collections.OrderedDict[int, float] = collections.OrderedDict()  # fd -> accepted at
        self.shed = 0
        self.disconnects = 0  # connections closed so far (admitted or not): a service tied to connections checks its own then
        self._warned: set[str] = set()

    @property
    def pending(self) -> int:
        """Connections accepted and not yet seen admitted (as of the last :meth:`handle`)."""
        return len(self._pending)

    def handle(self) -> None:
        """Read queued events, then sort pending connections: admitted, hogging, or over the cap."""
        while True:
            try:
                event = parse_monitor_message(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self._on_event(event["event"], event["value"])
        for fd in list(self._pending):
            state = self._inspect(fd, shut_if_hog=True)
            if state != "pending":
                del self._pending[fd]
        while len(self._pending) > self._cap:
            fd, _ = self._pending.popitem(last=False)
            if self._inspect(fd, shut_if_hog=True, shut=True) == "shut":
                self._count("pending-cap", f"more than {self._cap} unauthenticated connections; shedding the oldest")

    def _on_event(self, kind: int, fd: int) -> None:
        if kind == zmq.EVENT_ACCEPTED:
            self._pending[fd] = time.monotonic()
        elif kind == zmq.EVENT_DISCONNECTED:
            self._pending.pop(fd, None)
            self.disconnects += 1
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self._warn("accept", f"accepting a connection failed ({zmq.strerror(fd)})")
        else:  # a handshake failed: wrong mechanism, bad key, not a rank of this job, timeout
            self._counter["handshake"] += 1
            self._warn("handshake", "a peer failed the handshake (no key or token of this job)")

    def _inspect(self, fd: int, shut_if_hog: bool = False, shut: bool = False) -> str:
        """ "admitted", "pending", "gone" or "shut" (connection ``fd`` was shut down now)."""
        try:
            s = pysocket.socket(fileno=fd)
        except OSError:  # closed, or no longer a socket
            return "gone"
        try:
            if s.family not in (pysocket.AF_INET, pysocket.AF_INET6) or s.getsockname()[1] != self._port:
                return "gone"  # the descriptor now belongs to something else
            sent, received = _tcp_counters(s)
            if sent > self._admitted_sent:
                return "admitted"
            hog = shut_if_hog and received > MAX_HANDSHAKE_BYTES
            if hog or shut:
                s.shutdown(pysocket.SHUT_RDWR)  # libzmq sees the end and closes it
                self.shed += 1
                if hog:
                    self._count("handshake-size", f"a peer sent more than {MAX_HANDSHAKE_BYTES} B without authenticating")
                return "shut"
            return "pending"
        except OSError:
            return "gone"  # closed meanwhile
        finally:
            s.detach()  # never close a descriptor libzmq owns

    def _count(self, reason: str, text: str) -> None:
        self._counter[reason] += 1
        self._warn(reason, text)

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._warned:  # once per kind: a flood must not flood the log
            self._warned.add(kind)
            log.warning("%s: %s; further ones are only counted", self._who, text)

    def close(self) -> None:
        """Close the monitor socket."""
        self.socket.close(linger=0)


def shut_connection(fd: int, port: int) -> bool:
    """Shut down the TCP connection ``fd`` of a socket bound to ``port`` (libzmq sees the end and closes it).

    ``shutdown``, never ``close``: libzmq owns the descriptor. Nothing is done
    unless ``fd`` is still a TCP connection to ``port`` (descriptors are reused).

    Returns:
        Whether it was shut down.
    """
    try:
        s = pysocket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if s.family not in (pysocket.AF_INET, pysocket.AF_INET6) or s.getsockname()[1] != port:
            return False
        s.shutdown(pysocket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        s.detach()


def _tcp_counters(s: pysocket.socket) -> tuple[int, int]:
    """``(bytes sent and acked, bytes received)`` of a TCP connection (Linux ``TCP_INFO``).

    Raises:
        OSError: not available (then the connection is treated as gone: never shed).
    """
    info = s.getsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_INFO, 136)
    if len(info) < 136:
        raise OSError("TCP_INFO without byte counters")
    return struct.unpack_from("=QQ", info, 120)  # tcpi_bytes_acked, tcpi_bytes_received


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard limit (logged once changed).

    Returns:
        ``(soft, hard)`` after the change.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("[rank 0] raised the soft descriptor limit (RLIMIT_NOFILE) from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:  # e.g. an infinite hard limit the kernel caps
            log.warning("[rank 0] could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
    return soft, hard
