"""``user_meta``: the caller's own metadata, stored in the MANIFEST as given.

A save takes ``user_meta={...}`` (a training step, a config hash, a git
revision). Only msgpack-native values are accepted, so reading it back never
needs pickle and comes back equal: a map with str keys whose values are None,
bool, int (64-bit), float, str, bytes, lists and maps with str keys. Tuples are
refused (they would come back as lists). Every rank checks its own value;
rank 0's is stored (like the other replicated values of a save).
"""

from __future__ import annotations

from typing import Any, Mapping

import msgpack

from .errors import StateDictError

#: Largest packed ``user_meta``: it travels in a Done message and every load reads it.
MAX_USER_META_BYTES = 1 << 20
_MAX_DEPTH = 32
_SCALARS = (type(None), bool, float, str, bytes)


def check_user_meta(user_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``user_meta`` and return it as a plain dict (``{}`` for None).

    Raises:
        StateDictError: not a map with str keys, a value that is not
            msgpack-native (names its path), nesting deeper than 32, or more
            than :data:`MAX_USER_META_BYTES` once packed.
    """
    if user_meta is None:
        return {}
    if not isinstance(user_meta, Mapping):
        raise StateDictError(f"user_meta must be a dict with str keys, got {type(user_meta).__name__}")
    meta = dict(user_meta)
    _check(meta, "user_meta", 0)
    size = len(msgpack.packb(meta, use_bin_type=True))
    if size > MAX_USER_META_BYTES:
        raise StateDictError(f"user_meta is {size} bytes packed, more than {MAX_USER_META_BYTES}; store large values in the state dict")
    return meta


def _check(value: Any, where: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise StateDictError(f"{where}: user_meta nests deeper than {_MAX_DEPTH} levels")
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 64:
            raise StateDictError(f"{where}: int {value} does not fit in 64 bits")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise StateDictError(f"{where}: user_meta keys must be str, got {type(k).__name__} {k!r}")
            _check(v, f"{where}[{k!r}]", depth + 1)
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise StateDictError(
        f"{where}: {type(value).__name__} is not a msgpack-native value{hint}; user_meta takes None, bool, int, float, str, bytes, lists and dicts"
    )
