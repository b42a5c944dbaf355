"""Host memory views of tensors, without copies.

Writers hash and write tensor memory directly and readers fill it in place, so
both need a ``memoryview`` over a contiguous CPU tensor's bytes. The view does
not own the memory: the caller keeps the tensor alive while it is used.
"""

from __future__ import annotations

import ctypes

import torch


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, 0-d included).

    Raises:
        ValueError: the tensor is not on the CPU or not contiguous.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"need a contiguous CPU tensor, got device={t.device} contiguous={t.is_contiguous()}")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")
