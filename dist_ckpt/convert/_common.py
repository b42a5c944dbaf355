"""Types and settings shared by the converter's sources, sinks and entry point."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConvertError  # noqa: F401 - re-exported: its home is errors.py

FORMATS = ("dist_ckpt", "dcp", "torch", "safetensors")

_TRUST = {  # format -> (display name, why reading it unpickles); torch.save input asks only when weights_only refuses it
    "dcp": ("DCP", "its .metadata file and its non-tensor values are pickles"),
    "torch": ("torch.save", "a torch.save file is a pickle"),
}
_ASK_FIRST = ("dcp",)  # formats refused up front without trust_pickle
_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "complex64": "C64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
_WEIGHTS_ONLY_LEAVES = (type(None), bool, int, float, complex, str, bytes)

Progress = Callable[[int, int], None]
"""``progress(tensor_bytes_done, tensor_bytes_total)``."""


@dataclass(frozen=True)
class LazyTensor:
    """A source tensor known by dtype and shape, read by ``read()`` only when needed."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ConvertResult:
    """What :func:`convert` wrote; ``skipped`` names values the target could not hold."""

    src_format: str
    to: str
    dst: str
    tensors: int
    objects: int
    nbytes: int
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    src_format: str
    trust_pickle: bool
    pickle_objects: bool
    format_version: int = 1  # (to dist_ckpt) the format the sink writes: 1, or 2 (index + fragments)


class Meter:
    """Counts tensor bytes handed to a sink and reports them to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._cb = total, 0, progress
        self.add(0)

    def add(self, n: int) -> None:
        self.done += n
        if self._cb is not None:
            self._cb(self.done, self.total)


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path
