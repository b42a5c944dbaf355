"""The table of tensor dtypes a checkpoint can hold, by their on-disk name.

Names are stable strings written into the manifest; never ``str(torch.dtype)``
(which could change between releases) and never pickled dtype objects.
"""

from __future__ import annotations

import torch

from .errors import ManifestError, StateDictError
from .flatten import KeyPath, format_path

_TABLE: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex128": torch.complex128,
    "complex64": torch.complex64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _TABLE[_name] = getattr(torch, _name)

_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in _TABLE.items()}


def dtype_name(dtype: torch.dtype, key: KeyPath | None = None) -> str:
    """On-disk name of ``dtype``; raises :class:`StateDictError` (naming ``key``) if unsupported."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        where = f" (at {format_path(key)})" if key is not None else ""  # formatted only on error: this is on the save path
        raise StateDictError(f"dtype {dtype} is not supported in a checkpoint{where}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for an on-disk name; raises :class:`ManifestError` if unknown."""
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ManifestError(f"unknown dtype {name!r} in manifest") from None


def itemsize(name: str) -> int:
    """Bytes per element of the dtype named ``name``."""
    return dtype_from_name(name).itemsize


def is_dtype_name(name: object) -> bool:
    return isinstance(name, str) and name in _TABLE
