"""Pure load planning: the saved chunks that overlap a target box → byte runs to read.

Every rank runs this on its own, with no communication: the target box comes
from the local tensor or DTensor, the chunk table from the manifest. The
runs of one chunk are coalesced (a box that spans whole trailing dimensions
is one run) and ordered by file and offset, so the reader walks each file
front to back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ReadOp", "plan_reads", "required_bytes"]


@dataclass(frozen=True, eq=False)  # eq on an ndarray field would be ambiguous: compare by identity
class ReadOp:
    """Bytes to read from one saved chunk for one target box.

    Concatenating the runs (``run_nbytes`` each, starting at ``run_offsets``
    in file ``file``) gives the row-major bytes of the box ``dst_offsets`` /
    ``dst_sizes`` of the target local tensor. ``whole_chunk`` says the runs are
    exactly the whole chunk, so its checksum can be verified. Runs are in
    file order and never touch (touching runs are merged into one).
    """

    chunk: int
    file: int
    run_offsets: np.ndarray
    run_nbytes: int
    whole_chunk: bool
    dst_offsets: tuple[int, ...]
    dst_sizes: tuple[int, ...]


def plan_reads(
    target_offsets: Sequence[int],
    target_sizes: Sequence[int],
    itemsize: int,
    chunk_offsets: np.ndarray,
    chunk_sizes: np.ndarray,
    chunk_files: np.ndarray,
    chunk_file_offsets: np.ndarray,
) -> list[ReadOp]:
    """Read requests that fill the target box from the saved chunks.

    Args:
        target_offsets, target_sizes: the target local box in the global tensor.
        itemsize: bytes per element.
        chunk_offsets, chunk_sizes: ``(n, ndim)`` boxes of the saved chunks.
        chunk_files: ``(n,)`` file index of each chunk.
        chunk_file_offsets: ``(n,)`` byte offset of each chunk in its file.

    Returns:
        One :class:`ReadOp` per saved chunk that intersects the target, ordered
        by file and offset. Empty for an empty target.
    """
    t_off = np.asarray(target_offsets, dtype=np.int64).reshape(-1)
    t_siz = np.asarray(target_sizes, dtype=np.int64).reshape(-1)
    ndim = len(t_off)
    n = len(chunk_files)
    c_off = np.asarray(chunk_offsets, dtype=np.int64).reshape(n, ndim)  # explicit n: -1 is ambiguous for 0-d
    c_siz = np.asarray(chunk_sizes, dtype=np.int64).reshape(n, ndim)
    if len(t_siz) != ndim or len(chunk_file_offsets) != n:
        raise ValueError("target and chunk boxes do not agree in rank or count")
    if (t_siz == 0).any():
        return []
    lo = np.maximum(c_off, t_off)
    hi = np.minimum(c_off + c_siz, t_off + t_siz)
    hits = np.flatnonzero((hi > lo).all(axis=1))  # an empty chunk never satisfies this
    ops = [_read_op(int(c), int(chunk_files[c]), int(chunk_file_offsets[c]), itemsize, c_siz[c], lo[c] - c_off[c], hi[c] - lo[c], lo[c] - t_off) for c in hits]
    ops.sort(key=lambda op: (op.file, int(op.run_offsets[0])))
    return ops


def _read_op(chunk: int, file: int, base: int, isz: int, csize: np.ndarray, sub_off: np.ndarray, sub_size: np.ndarray, dst_off: np.ndarray) -> ReadOp:
    """Byte runs of the sub-box ``sub_off``/``sub_size`` of a row-major chunk."""
    ndim = len(csize)
    strides = np.ones(ndim, dtype=np.int64)  # in elements
    if ndim > 1:
        strides[:-1] = np.cumprod(csize[::-1])[-2::-1]
    # Dims inside the innermost partially spanned one are whole; together with
    # it they form one contiguous run. The dims outside it enumerate the runs,
    # which never touch (the partial dim leaves a gap between them).
    partial = np.flatnonzero(sub_size != csize)
    k = int(partial[-1]) if len(partial) else 0
    run_elems = int(sub_size[k] * strides[k]) if ndim else 1
    starts = np.array([int((sub_off * strides).sum())], dtype=np.int64)
    for d in range(k):
        if sub_size[d] > 1:
            starts = (starts[:, None] + np.arange(sub_size[d], dtype=np.int64) * strides[d]).reshape(-1)
    return ReadOp(
        chunk=chunk,
        file=file,
        run_offsets=base + starts * isz,
        run_nbytes=run_elems * isz,
        whole_chunk=not len(partial),
        dst_offsets=tuple(dst_off.tolist()),
        dst_sizes=tuple(sub_size.tolist()),
    )


def required_bytes(ops: Iterable[ReadOp]) -> int:
    """Total bytes the read ops fetch."""
    return sum(len(op.run_offsets) * op.run_nbytes for op in ops)
