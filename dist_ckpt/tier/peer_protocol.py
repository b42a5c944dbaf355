"""The peer plane's wire protocol: sizes, the ops and their fields, the checks of requests and inventories.

Shared by the service (:mod:`dist_ckpt.tier.peer`), its client
(:mod:`dist_ckpt.tier.peer_client`) and the bulk path (:mod:`dist_ckpt.tier.bulk`).
A request is ``[header, (data)]``, the header a msgpack map ``{"op", "id",
<fields>}``; the reply ``[header, (data)]`` with ``{"id", "ok", "err" |
<fields>}``. Every field is checked here before the service uses it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ..errors import bounded_repr
from ..layout_names import DATA_FILE_RE, MANIFEST
from ..storage import WRITE_PIECE
from . import layout

__all__ = [
    "PIECE_BYTES",
    "WRITE_FRAMES",
    "WINDOW",
    "QUEUE",
    "REPLY_WAIT_S",
    "MAX_HEADER",
    "MAX_FILE_BYTES",
    "MAX_FRAME",
    "IO_THREADS",
    "OPS",
    "peer_secret",
    "Refused",
]

PIECE_BYTES = WRITE_PIECE
"""Largest data frame on a peer connection (a read piece), and most bytes of one replica write (a run of appends, :data:`WRITE_FRAMES`)."""
WRITE_FRAMES = 16
"""Data frames one ``write`` may carry (a run of the writer's 1 MiB blocks, contiguous in the file), at most PIECE_BYTES in all:
one request, seal and reply per run instead of per block."""
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
MAX_FRAME = PIECE_BYTES + MAX_HEADER
"""Largest frame either side accepts (``ZMQ_MAXMSGSIZE``)."""
IO_THREADS = 1
"""libzmq I/O threads of the service's and of the clients' context: CURVE runs there, each connection on one of them
(more would spread concurrent connections over cores; not measured on the 2-core test machine, so left at libzmq's default)."""

# op -> (fields, frames after the header)
OPS: dict[str, tuple[tuple[str, ...], int]] = {
    "open": (("step", "save", "name"), 0),
    "write": (("step", "save", "name", "offset"), 1),  # 1 to WRITE_FRAMES data frames
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


class Refused(ValueError):
    """A request that is malformed or not allowed; its text goes back in the error reply."""


def _int_field(header: dict, key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise Refused(f"{key} must be an int in [{low}, {high}], got {bounded_repr(value)}")
    return value


def check_request(header: object, frames: int, sender: int) -> dict[str, Any]:
    """The checked fields of a request (``op``, ``id`` and the op's own), or raise :class:`Refused`."""
    if not isinstance(header, dict):
        raise Refused(f"the header is a {type(header).__name__}, not a map")
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise Refused(f"unknown op {bounded_repr(op)}")
    fields, extra = OPS[op]
    if op == "write" and not 2 <= frames <= 1 + WRITE_FRAMES:
        raise Refused(f"write takes 2 to {1 + WRITE_FRAMES} frames (the header and its data), got {frames}")
    if op != "write" and frames != 1 + extra:
        raise Refused(f"{op} takes {1 + extra} frame(s), got {frames}")
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
                raise Refused(str(e)) from None
    if op in ("open", "write", "sync", "close") and out["name"] != MANIFEST:
        origin = int(DATA_FILE_RE.match(out["name"]).group(1))  # type: ignore[union-attr]  # check_name matched it
        if origin != sender:
            raise Refused(f"rank {sender} may only write its own files, not {out['name']}")
    return out


def check_inventory(steps: object) -> dict[int, dict[str, int]]:
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
