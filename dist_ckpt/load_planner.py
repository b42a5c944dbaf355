"""Pure load planning: the saved chunks that overlap a target box → byte runs to read.

Every rank runs this on its own, with no communication: the target box comes
from the local tensor or DTensor, the chunk table from the manifest. The
runs of one chunk are coalesced (a box that spans whole trailing dimensions
is one run) and ordered by file and offset, so the reader walks each file
front to back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ReadOp", "plan_reads", "required_bytes"]

_FEW_CHUNKS = 16  # up to this many chunks, the intersections are found in plain Python ints


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
    t_off, t_siz = _ints(target_offsets), _ints(target_sizes)
    ndim = len(t_off)
    n = len(chunk_files)
    if len(t_siz) != ndim or len(chunk_file_offsets) != n or np.size(chunk_offsets) != n * ndim or np.size(chunk_sizes) != n * ndim:
        raise ValueError("target and chunk boxes do not agree in rank or count")
    if 0 in t_siz:
        return []
    c_off = np.asarray(chunk_offsets, dtype=np.int64).reshape(n, ndim)  # explicit n: -1 is ambiguous for 0-d
    c_siz = np.asarray(chunk_sizes, dtype=np.int64).reshape(n, ndim)
    if n <= _FEW_CHUNKS:  # plain ints: a handful of chunks per tensor costs less than numpy's per-call overhead
        offs, sizs = c_off.tolist(), c_siz.tolist()
        hits = [c for c in range(n) if all(min(o + s, t + u) > max(o, t) for o, s, t, u in zip(offs[c], sizs[c], t_off, t_siz))]
        all_files, all_bases = np.asarray(chunk_files).tolist(), np.asarray(chunk_file_offsets).tolist()
        files, bases = [all_files[c] for c in hits], [all_bases[c] for c in hits]
        offs, sizs = [offs[c] for c in hits], [sizs[c] for c in hits]
    else:
        t_lo = np.asarray(t_off, dtype=np.int64)
        hits = np.flatnonzero((np.minimum(c_off + c_siz, t_lo + t_siz) > np.maximum(c_off, t_lo)).all(axis=1)).tolist()
        offs, sizs = c_off[hits].tolist(), c_siz[hits].tolist()
        files, bases = np.asarray(chunk_files)[hits].tolist(), np.asarray(chunk_file_offsets)[hits].tolist()
    ops = [_read_op(c, f, b, itemsize, cs, co, t_off, t_siz) for c, f, b, co, cs in zip(hits, files, bases, offs, sizs)]
    if len(ops) > 1:
        ops.sort(key=lambda op: (op.file, int(op.run_offsets[0])))
    return ops


def _ints(values: Sequence[int]) -> list[int]:
    """``values`` as plain ints (a tuple of ints, the usual box, without a numpy round trip)."""
    if isinstance(values, (tuple, list)) and all(type(x) is int for x in values):
        return list(values)
    return [int(x) for x in np.asarray(values, dtype=np.int64).reshape(-1)]


def _read_op(chunk: int, file: int, base: int, isz: int, csize: list[int], coff: list[int], t_off: list[int], t_siz: list[int]) -> ReadOp:
    """Byte runs of the chunk ``coff``/``csize``'s part inside the target box, in plain ints (a few per tensor)."""
    ndim = len(csize)
    if coff == t_off and csize == t_siz:  # the chunk is the target box (a tensor saved and loaded whole): one run, all of it
        return ReadOp(chunk, file, np.array([base], dtype=np.int64), math.prod(csize) * isz, True, (0,) * ndim, tuple(csize))
    lo = [max(c, t) for c, t in zip(coff, t_off)]
    sub_size = [min(c + s, t + u) - a for c, s, t, u, a in zip(coff, csize, t_off, t_siz, lo)]
    sub_off = [a - c for a, c in zip(lo, coff)]
    strides = [1] * ndim  # in elements, row-major
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * csize[d + 1]
    # Dims inside the innermost partially spanned one are whole; together with
    # it they form one contiguous run. The dims outside it enumerate the runs,
    # which never touch (the partial dim leaves a gap between them).
    partial = [d for d in range(ndim) if sub_size[d] != csize[d]]
    k = partial[-1] if partial else 0
    run_elems = sub_size[k] * strides[k] if ndim else 1
    first = base + sum(o * s for o, s in zip(sub_off, strides)) * isz
    starts = np.array([first], dtype=np.int64)
    for d in range(k):
        if sub_size[d] > 1:
            starts = (starts[:, None] + np.arange(sub_size[d], dtype=np.int64) * (strides[d] * isz)).reshape(-1)
    return ReadOp(
        chunk=chunk,
        file=file,
        run_offsets=starts,
        run_nbytes=run_elems * isz,
        whole_chunk=not partial,
        dst_offsets=tuple(a - t for a, t in zip(lo, t_off)),
        dst_sizes=tuple(sub_size),
    )


def required_bytes(ops: Iterable[ReadOp]) -> int:
    """Total bytes the read ops fetch."""
    return sum(len(op.run_offsets) * op.run_nbytes for op in ops)
