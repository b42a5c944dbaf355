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
import time

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .errors import TransportError

log = logging.getLogger(__name__)

__all__ = [
    "ZAP_DOMAIN", "HANDSHAKE_TIMEOUT_S", "curve_keys", "require_curve", "secure_server",
    "secure_client", "ZapGate", "ConnectionGate", "raise_fd_limit", "pending_cap",
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

    Args:
        ctx: the context of the ROUTER it guards (ZAP is per context).
        secret: the job secret.
        world_size: ranks ``0 .. world_size-1`` are admitted.
    """

    def __init__(self, ctx: zmq.Context, secret: bytes, world_size: int) -> None:
        # Derived once: 16k ranks cost ~1 s of key derivation, not one per handshake.
        self._ranks = {z85.decode(curve_keys(secret, f"rank {r}")[0]): r for r in range(world_size)}
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
        rank = None
        if len(request) == 7 and version == b"1.0" and request[2] == ZAP_DOMAIN and request[5] == b"CURVE":
            rank = self._ranks.get(request[6])
        if rank is None:
            self.refused += 1
            return [b"1.0", request_id, b"400", b"not a rank of this job", b"", b""]
        self.admitted.add(rank)
        return [b"1.0", request_id, b"200", b"OK", str(rank).encode(), b""]

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


class ConnectionGate:
    """Bounds connections that have not (yet) passed the CURVE handshake.

    Watches the ROUTER's monitor events. Connections accepted but not
    authenticated are *pending*; when more than ``cap`` are pending the
    oldest are shut down (an honest rank's handshake takes milliseconds, an
    idle connection waits for ``HANDSHAKE_TIMEOUT_S``), so a flood of idle
    or half-open connections cannot take more than ``cap`` descriptors.
    Handshake failures are counted in ``counter["handshake"]``.

    Args:
        sock: the bound ROUTER socket.
        port: its TCP port (a descriptor is only shut down if it is a
            connection to this port: descriptors are reused).
        cap: most pending connections.
        counter: where refusals are counted (the coordinator's ``dropped``).
    """

    _EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH

    def __init__(self, sock: zmq.Socket, port: int, cap: int, counter: collections.Counter[str]) -> None:
        self.socket = sock.get_monitor_socket(self._EVENTS)
        self._port, self._cap, self._counter = port, cap, counter
        self._pending: collections.OrderedDict[int, float] = collections.OrderedDict()  # fd -> accepted at
        self.shed = 0
        self._warned: set[str] = set()

    @property
    def pending(self) -> int:
        """Connections accepted and not yet authenticated (as of the last event read)."""
        return len(self._pending)

    def handle(self) -> None:
        """Read every queued event, then shed the oldest pending connections over the cap."""
        while True:
            try:
                event = parse_monitor_message(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self._on_event(event["event"], event["value"])
        while len(self._pending) > self._cap:
            fd, _ = self._pending.popitem(last=False)
            self._shut(fd)

    def _on_event(self, kind: int, fd: int) -> None:
        if kind == zmq.EVENT_ACCEPTED:
            self._pending[fd] = time.monotonic()
        elif kind in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED):
            self._pending.pop(fd, None)
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self._warn("accept", f"accepting a connection failed ({zmq.strerror(fd)})")
        else:  # a handshake failed: wrong mechanism, bad key, not a rank of this job, timeout
            self._counter["handshake"] += 1
            self._warn("handshake", "a peer failed the CURVE handshake (no key of this job)")

    def _shut(self, fd: int) -> None:
        """Shut down (not close: libzmq owns it) connection ``fd`` if it is still ours."""
        try:
            s = pysocket.socket(fileno=fd)
        except OSError:  # already closed, or no longer a socket
            return
        try:
            if s.getsockname()[1] == self._port:
                s.shutdown(pysocket.SHUT_RDWR)  # libzmq sees the end and closes it
                self.shed += 1
                self._counter["pending-cap"] += 1
                self._warn("cap", f"more than {self._cap} unauthenticated connections; shedding the oldest")
        except OSError:
            pass  # closed meanwhile: nothing left to shed
        finally:
            s.detach()  # never close a descriptor libzmq owns

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._warned:  # once per kind: a flood must not flood the log
            self._warned.add(kind)
            log.warning("[rank 0] coordinator: %s; further ones are only counted", text)

    def close(self) -> None:
        """Close the monitor socket."""
        self.socket.close(linger=0)


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
