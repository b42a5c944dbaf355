"""Every message between ranks and the coordinator, and its wire format.

A message travels as one ZeroMQ multipart message::

    frame 0   header   msgpack map: {"v": PROTOCOL_VERSION, "t": <tag>,
                       "job": str, "ckpt": str, "rank": int, <own fields>}
    frame 1   mac      32 bytes, HMAC-SHA256(secret, L(h) h L(p1) p1 ...)
                       where L(x) is len(x) as 8-byte little-endian, so
                       frame boundaries are authenticated too
    frame 2+  payload  raw bytes, one per ``Buffer`` field, in field order

``rank`` is the sender for rank -> coordinator messages and the destination
for coordinator -> rank messages; ``ckpt`` is "" when not about a save.

Large payloads (descriptors, plans, records) are never copied into the
header: they go out as their own frames (zero-copy for ``memoryview`` and
``zmq.Frame``-like buffers) and come back as ``bytes`` or ``memoryview``.

:func:`decode` is the coordinator's only door to untrusted bytes. It checks
sizes, then the MAC, and only then unpacks the header; whatever arrives it
raises nothing but :class:`BadMessage` (a :class:`~dist_ckpt.errors.WireError`)
whose ``reason`` lets the coordinator count drops by cause.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Callable, ClassVar, NewType, Sequence, TypeVar, Union, get_type_hints

import msgpack

from dist_ckpt.errors import WIRE_REASONS as REASONS
from dist_ckpt.errors import BadMessage, bounded_repr

__all__ = [
    "PROTOCOL_VERSION",
    "REASONS",
    "BadMessage",
    "Phase",
    "Limits",
    "Message",
    "Buffer",
    "PlanRequest",
    "PlanReply",
    "Heartbeat",
    "HeartbeatAck",
    "Done",
    "Failed",
    "CommitInProgress",
    "Committed",
    "Aborted",
    "encode",
    "RankFrames",
    "decode",
]

PROTOCOL_VERSION = 1
MAC_SIZE = 32
MIN_SECRET = 16


#: A payload field: sent as its own frame, never packed into the header.
Buffer = Union[bytes, bytearray, memoryview]
#: An ``int`` that must fit in 64 unsigned bits (digests).
UInt64 = NewType("UInt64", int)


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced before anything is unpacked (and on encode)."""

    max_header: int = 1 << 20
    max_frame: int = 1 << 30
    max_frames: int = 8  # header + mac + payload frames
    max_total: int = 1 << 31

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")
        if self.max_frames < 2:
            raise ValueError("Limits.max_frames must allow header and mac (>= 2)")


class Phase(str, enum.Enum):
    """The phases of one save, named alike by the saver (each rank's steps), the
    coordinator (where the save stands) and the ``Failed``/``Heartbeat`` messages.

    A ``str`` enum: on the wire a phase is its value, so messages stay plain
    msgpack strings (a peer sending any other string is still decoded).
    """

    DESCRIBE = "describe"  # (rank) state dict -> description, before anything is sent
    STAGE = "stage"  # (rank) copies off the device; (coordinator) never: it learns of a save at its PlanRequest
    PLAN = "plan"  # (rank) PlanRequest sent, waiting for the reply; (coordinator) waiting for every request
    PREPARE = "prepare"  # (coordinator) the tmp dir is being made
    WRITE = "write"  # ranks write their files and report Done
    COMMIT = "commit"  # (coordinator) manifest + renames; (rank) waiting for Committed
    COMMIT_FAILED = "commit-failed"  # (coordinator) the commit raised; the abort follows
    ABORT = "abort"  # (rank) reported a failure, waiting for the Aborted

    def __str__(self) -> str:  # "plan", not "Phase.PLAN", in messages and f-strings
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Header field checks, keyed by annotation. bool is rejected where int is
# expected: msgpack keeps them apart and so must we.
_CHECKS: dict[object, Callable[[object], bool]] = {
    str: lambda v: isinstance(v, str),
    int: _is_int,
    bool: lambda v: isinstance(v, bool),
    UInt64: lambda v: _is_int(v) and 0 <= v < 1 << 64,  # type: ignore[operator]
    dict[int, str]: lambda v: isinstance(v, dict) and all(_is_int(k) and isinstance(s, str) for k, s in v.items()),
}


@dataclass(frozen=True)
class Message:
    """Fields common to every message. Subclasses register a unique ``TAG``."""

    TAG: ClassVar[str] = ""
    # Derived once per class by _register: header field -> check, payload names.
    HEADER: ClassVar[dict[str, Callable[[object], bool]]] = {}
    PAYLOAD: ClassVar[tuple[str, ...]] = ()

    job: str
    ckpt: str
    rank: int


_REGISTRY: dict[str, type[Message]] = {}
_M = TypeVar("_M", bound=type[Message])


def _register(tag: str) -> Callable[[_M], _M]:
    """Class decorator: record ``tag`` and derive the field tables from hints."""

    def wrap(cls: _M) -> _M:
        assert tag not in _REGISTRY, tag
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        cls.TAG = tag
        cls.PAYLOAD = tuple(n for n in names if hints[n] == Buffer)
        cls.HEADER = {n: _CHECKS[hints[n]] for n in names if n not in cls.PAYLOAD}
        _REGISTRY[tag] = cls
        return cls

    return wrap


@_register("plan_req")
@dataclass(frozen=True)
class PlanRequest(Message):
    """rank -> coordinator: this rank's description (its tensors' metadata), asking for a plan."""

    path: str
    world_size: int
    desc_digest: UInt64
    desc: Buffer
    overwrite: bool


@_register("plan")
@dataclass(frozen=True)
class PlanReply(Message):
    """coordinator -> rank: this rank's row of the plan (always sent, see ``SavePlan.to_msgpack_for``).

    ``same``: the coordinator reused its cached plan (no rank's description
    changed); the rank names it in its log line.
    """

    tmp_path: str
    same: bool
    plan: Buffer


@_register("hb")
@dataclass(frozen=True)
class Heartbeat(Message):
    """rank -> coordinator: still alive, currently in ``phase`` (a :class:`Phase` value)."""

    phase: str


@_register("hb_ack")
@dataclass(frozen=True)
class HeartbeatAck(Message):
    """coordinator -> rank: heartbeat received."""


@_register("done")
@dataclass(frozen=True)
class Done(Message):
    """rank -> coordinator: all data written; its records and object blobs."""

    records: Buffer
    objects: Buffer


@_register("failed")
@dataclass(frozen=True)
class Failed(Message):
    """rank -> coordinator: this rank failed in ``phase`` (a :class:`Phase` value) with ``error`` saving to ``path``."""

    phase: str
    error: str
    path: str = ""  # known even when no PlanRequest came first (a failed describe or staging)


@_register("committing")
@dataclass(frozen=True)
class CommitInProgress(Message):
    """coordinator -> rank: every rank reported; the commit has started (its outcome may now be a commit)."""


@_register("committed")
@dataclass(frozen=True)
class Committed(Message):
    """coordinator -> rank: the checkpoint is committed at ``path``."""

    path: str


@_register("aborted")
@dataclass(frozen=True)
class Aborted(Message):
    """coordinator -> rank: the save was abandoned; cause per failed rank.

    ``error`` names the error every rank raises when the cause deserves its
    own type (a key of :data:`dist_ckpt.errors.ABORT_ERRORS`, e.g.
    ``"CheckpointExists"``); empty: a plain :class:`~dist_ckpt.errors.CheckpointError`.
    """

    reasons: dict[int, str]
    error: str = ""


# -- stopping the job at one step on every rank (preempt.py); ckpt is "" -----------


@_register("stop_sub")
@dataclass(frozen=True)
class StopSubscribe(Message):
    """rank -> coordinator: this rank takes part in stop agreement (sent once, at start)."""


@_register("stop_req")
@dataclass(frozen=True)
class StopRequest(Message):
    """rank -> coordinator: this rank was signalled (or is out of time) at ``step``."""

    step: int


@_register("stop_at")
@dataclass(frozen=True)
class StopAt(Message):
    """coordinator -> rank: every rank stops at ``stop_at`` (the first request's step + 1)."""

    stop_at: int


@_register("stop_ack")
@dataclass(frozen=True)
class StopAck(Message):
    """rank -> coordinator: this rank's agent knows ``stop_at``."""

    stop_at: int


@_register("stop_ready")
@dataclass(frozen=True)
class StopReady(Message):
    """coordinator -> rank: every rank has acknowledged ``stop_at``."""

    stop_at: int


__all__ += ["StopSubscribe", "StopRequest", "StopAt", "StopAck", "StopReady"]


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET:
        raise ValueError(f"secret must be bytes of at least {MIN_SECRET} bytes")


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    """The HMAC keyed with ``secret``, copied per message (keying it costs more than a short message's MAC)."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def _mac(secret: bytes, parts: Sequence[memoryview]) -> bytes:
    h = _keyed(secret).copy()
    for part in parts:
        h.update(struct.pack("<Q", part.nbytes))
        h.update(part)
    return h.digest()


def _as_view(frame: object, what: str, reason: str = "frames") -> memoryview:
    """A flat byte view of ``frame`` without copying; BadMessage if impossible."""
    try:
        view = memoryview(frame)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as e:
        raise BadMessage(reason, f"{what} is not a contiguous buffer") from e


def _check_sizes(views: Sequence[memoryview], limits: Limits) -> None:
    if views[0].nbytes > limits.max_header:
        raise BadMessage("size", f"header {views[0].nbytes} B > {limits.max_header} B")
    for i, v in enumerate(views[2:], start=2):
        if v.nbytes > limits.max_frame:
            raise BadMessage("size", f"frame {i} is {v.nbytes} B > {limits.max_frame} B")
    total = sum(v.nbytes for v in views)
    if total > limits.max_total:
        raise BadMessage("size", f"message {total} B > {limits.max_total} B")


def _check_fields(cls: type[Message], header: dict[object, object], max_rank: int | None) -> None:
    """Exact key set and per-field types; then the rank's range."""
    expected = set(cls.HEADER) | {"v", "t"}
    if missing := expected - header.keys():
        raise BadMessage("field", f"{cls.__name__} lacks {sorted(missing)}")
    if extra := header.keys() - expected:
        raise BadMessage("field", f"{cls.__name__} has unknown keys {[bounded_repr(k) for k in list(extra)[:8]]}")
    for name, ok in cls.HEADER.items():
        if not ok(header[name]):
            raise BadMessage("field", f"{cls.__name__}.{name} = {bounded_repr(header[name])}")
    rank = header["rank"]
    assert isinstance(rank, int)
    if rank < 0 or (max_rank is not None and rank >= max_rank):
        raise BadMessage("rank", f"rank {bounded_repr(rank)} outside [0, {max_rank})")


def encode(msg: Message, secret: bytes, limits: Limits = Limits()) -> list[bytes | memoryview]:
    """Turn ``msg`` into frames ready for ``Socket.send_multipart``.

    Every field and frame is checked before returning, so a message that
    :func:`decode` would refuse is never half-sent.

    Args:
        msg: an instance of a registered message class.
        secret: the per-job HMAC key (bytes, at least 16 of them).
        limits: the sizes the receiver will enforce.

    Returns:
        ``[header, mac, *payload]``; payload frames are the caller's objects
        (``bytes``) or zero-copy ``memoryview``s of them.

    Raises:
        BadMessage: a field has the wrong type, or a frame is too large.
        TypeError: ``msg`` is not a registered message.
        ValueError: ``secret`` is too short or not bytes.
    """
    _check_secret(secret)
    cls = type(msg)
    if _REGISTRY.get(cls.TAG) is not cls:
        raise TypeError(f"not a wire message: {cls.__name__}")
    header: dict[object, object] = {"v": PROTOCOL_VERSION, "t": cls.TAG}
    header.update((name, getattr(msg, name)) for name in cls.HEADER)
    _check_fields(cls, header, None)
    payload = [getattr(msg, name) for name in cls.PAYLOAD]
    views = [_as_view(p, f"{cls.__name__}.{n}", "field") for p, n in zip(payload, cls.PAYLOAD)]
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadMessage("field", f"{cls.__name__} header cannot be packed: {e}") from e
    # A stand-in for the MAC so frame count and total size are checked as sent.
    views = [memoryview(packed), memoryview(bytes(MAC_SIZE)), *views]
    if len(views) > limits.max_frames:
        raise BadMessage("frames", f"{len(views)} frames > {limits.max_frames}")
    _check_sizes(views, limits)
    mac = _mac(secret, [views[0], *views[2:]])
    frames = [p if isinstance(p, bytes) else v for p, v in zip(payload, views[2:])]
    return [packed, mac, *frames]


class RankFrames:
    """One message's frames for many ranks: :func:`encode` of ``msg`` with ``rank`` replaced, byte for byte.

    The coordinator sends the same message (a plan reply shared by a group,
    CommitInProgress, Committed, Aborted) to thousands of ranks; only the header's
    ``rank`` differs. Every field, frame and size is checked once, here (the rank's
    digits allowed for); :meth:`frames` packs the rank between the header's other
    bytes and signs each rank's message with its own HMAC, as :func:`encode` would.
    The payload frames are the same objects in every rank's frames.

    Args:
        msg: the message, for any rank (its own ``rank`` is checked, then replaced).
        secret: the per-job HMAC key.
        limits: the sizes the receivers enforce.

    Raises:
        BadMessage, TypeError, ValueError: as :func:`encode` for ``msg``; BadMessage also when
            the header would pass ``limits.max_header`` for some rank.
    """

    _RANK_BYTES = 9  # the longest msgpack int (uint64/int64)

    def __init__(self, msg: Message, secret: bytes, limits: Limits = Limits()) -> None:
        packed, _, *self._payload = encode(msg, secret, limits)  # every check, once
        fields = [("v", PROTOCOL_VERSION), ("t", msg.TAG), *((name, getattr(msg, name)) for name in msg.HEADER)]  # encode's order
        at = [k for k, _ in fields].index("rank")
        packer = msgpack.Packer(use_bin_type=True)  # a map packs as its header, then key and value in order
        self._prefix = packer.pack_map_header(len(fields)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in fields[:at]) + packer.pack("rank")
        self._suffix = b"".join(packer.pack(k) + packer.pack(v) for k, v in fields[at + 1 :])
        if self._prefix + msgpack.packb(msg.rank) + self._suffix != packed:  # the split is exact or nothing is sent
            raise AssertionError(f"{type(msg).__name__}: the header's pieces do not pack as encode packs it")
        worst = len(self._prefix) + self._RANK_BYTES + len(self._suffix)
        if worst > limits.max_header or worst + MAC_SIZE + sum(map(len, self._payload)) > limits.max_total:
            raise BadMessage("size", f"{type(msg).__name__} header of {worst} B for some ranks is over the limits")
        self._tail = b"".join(struct.pack("<Q", _as_view(p, "payload").nbytes) + p for p in self._payload)
        self._keyed = _keyed(secret)

    def frames(self, rank: int) -> list[bytes | memoryview]:
        """``encode(dataclasses.replace(msg, rank=rank), secret)``.

        Raises:
            BadMessage: ``rank`` is not a non-negative int.
        """
        if type(rank) is not int or rank < 0:
            raise BadMessage("field", f"rank {bounded_repr(rank)} is not a non-negative int")
        header = self._prefix + msgpack.packb(rank) + self._suffix
        h = self._keyed.copy()
        h.update(struct.pack("<Q", len(header)) + header)
        h.update(self._tail)
        return [header, h.digest(), *self._payload]


def decode(
    frames: Sequence[object],
    secret: bytes,
    limits: Limits = Limits(),
    max_rank: int | None = None,
) -> Message:
    """Authenticate and parse one received multipart message.

    Checks run cheapest first, and nothing is unpacked before the MAC holds:
    frame count and sizes, then the MAC, then the header's content.

    Args:
        frames: list or tuple ``[header, mac, *payload]`` as received (ROUTER
            identity stripped); bytes, memoryview or ``zmq.Frame``-like items.
        secret: the per-job HMAC key.
        limits: size bounds for this receiver.
        max_rank: when given, ``rank`` must lie in ``[0, max_rank)``.

    Returns:
        The message; payload fields are ``bytes`` where the frame was bytes,
        else a ``memoryview`` that keeps the received frame alive.

    Raises:
        BadMessage: for any input that is not a valid, authentic message.
        ValueError: ``secret`` is too short or not bytes (caller's bug).
    """
    _check_secret(secret)
    if not isinstance(frames, (list, tuple)):
        raise BadMessage("frames", f"frames is a {type(frames).__name__}, not a list")
    if not 2 <= len(frames) <= limits.max_frames:
        raise BadMessage("frames", f"{len(frames)} frames, need 2..{limits.max_frames}")
    views = [_as_view(f, f"frame {i}") for i, f in enumerate(frames)]
    _check_sizes(views, limits)
    mac = views[1]
    if mac.nbytes != MAC_SIZE or not hmac.compare_digest(_mac(secret, [views[0], *views[2:]]), mac.tobytes()):
        raise BadMessage("mac", "bad or missing HMAC")
    cls, header = _parse_header(views[0], limits, max_rank)
    if (got := len(views) - 2) != len(cls.PAYLOAD):
        raise BadMessage("frames", f"{cls.__name__} takes {len(cls.PAYLOAD)} payloads, got {got}")
    values = {name: header[name] for name in cls.HEADER}
    for name, frame, view in zip(cls.PAYLOAD, frames[2:], views[2:]):
        values[name] = frame if isinstance(frame, bytes) else view
    return cls(**values)  # type: ignore[arg-type]


def _parse_header(view: memoryview, limits: Limits, max_rank: int | None) -> tuple[type[Message], dict[object, object]]:
    """Unpack and validate an authenticated header."""
    n = limits.max_header
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    # msgpack may raise almost anything on hostile bytes (FormatError,
    # StackError, UnicodeDecodeError, TypeError for unhashable keys, ...);
    # none of it may escape as anything but BadMessage.
    except Exception as e:  # noqa: BLE001
        raise BadMessage("header", f"not msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise BadMessage("header", f"header is a {type(header).__name__}, not a map")
    version = header.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise BadMessage("version", f"protocol {bounded_repr(version)}, expected {PROTOCOL_VERSION}")
    tag = header.get("t")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise BadMessage("type", f"unknown message type {bounded_repr(tag)}")
    _check_fields(cls, header, max_rank)
    return cls, header
