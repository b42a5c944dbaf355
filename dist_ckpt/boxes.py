"""Geometry of chunk boxes: pure functions on ``(offsets, sizes)`` arrays.

A *box* places a chunk inside its global tensor: ``offsets[d]`` is the first
index along dimension ``d`` and ``sizes[d]`` the extent. Boxes of one tensor
are held as two ``int64`` arrays of shape ``(n, ndim)`` so that checks over
thousands of chunks stay vectorised (the coordinator validates one table per
tensor for every rank of the job).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# A 0-d tensor has one box with no dimensions; numpy needs a column, so 0-d
# boxes are handled as 1-element vectors internally.


def as_box_arrays(offsets: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(offsets, sizes)`` as ``int64`` arrays of shape ``(n, ndim)``."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, ndim)
    siz = np.asarray(sizes, dtype=np.int64).reshape(-1, ndim)
    return off, siz


def box_volume(sizes: np.ndarray) -> np.ndarray:
    """Number of elements of each box (``prod`` over dims; 1 for 0-d boxes)."""
    return np.prod(sizes, axis=1, dtype=np.int64) if sizes.shape[1] else np.ones(len(sizes), np.int64)


def columns_t(matrix: np.ndarray, cols: np.ndarray, rows_per_pass: int = 512) -> np.ndarray:
    """Columns ``cols`` of a row-major ``(R, W)`` boxes matrix (int32 or int64) as C-ordered int64 ``(len(cols), R)``.

    A plain ``matrix[:, cols]`` reads one strided value per (row, column) and leaves each
    column strided for the passes along the rows that follow; transposing it whole reads
    down columns of a matrix far bigger than the cache. Instead ``rows_per_pass`` rows at
    a time are gathered and transposed in cache. int64 because a boxes matrix may be int32
    (:class:`~dist_ckpt.description.BoxStore`) and ends, volumes and byte counts are computed
    from the result.
    """
    out = np.empty((len(cols), len(matrix)), np.int64)
    run = len(cols) > 0 and int(cols[-1]) - int(cols[0]) + 1 == len(cols) and bool((np.diff(cols) == 1).all())
    at: slice | np.ndarray = slice(int(cols[0]), int(cols[-1]) + 1) if run else cols  # a run of columns: a view, no gather
    for a in range(0, len(matrix), rows_per_pass):
        out[:, a : a + rows_per_pass] = matrix[a : a + rows_per_pass, at].T
    return out


CORNER_LIMIT = 1 << 22
"""Most box corners (chunks x 2**split dims) the exact-cover check examines before it refuses the table."""


def cover_problem(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray, bounds_checked: bool = False) -> str | None:
    """Check that non-empty boxes tile ``shape`` exactly once.

    Returns ``None`` when they do, else a sentence naming the first problem
    (negative extent, out of bounds, overlap, gap). Empty boxes (any size 0)
    are ignored: they cover nothing. ``bounds_checked`` skips the checks for
    negative and out-of-bounds boxes (the caller made them).

    Boxes whole in every dim but one (``Shard(d)``, every FSDP checkpoint)
    are checked by one sort along that dim. Any other table is checked by
    its signed corners (:func:`_corner_problem`) in O(n 2^k log n) for ``k``
    dims that some box splits, whatever the layout: crafted nested or
    staggered boxes cost the same as a grid.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if offsets.shape != sizes.shape or (offsets.ndim == 2 and offsets.shape[1] != ndim):
        return f"chunk boxes have {offsets.shape[-1] if offsets.ndim == 2 else '?'} dims, tensor has {ndim}"
    shp = np.asarray(shape, dtype=np.int64)
    if not bounds_checked:
        if (offsets < 0).any() or (sizes < 0).any():
            return "a chunk has a negative offset or size"
        if ndim and ((offsets + sizes) > shp).any():
            i = int(np.nonzero(((offsets + sizes) > shp).any(axis=1))[0][0])
            return f"chunk at offsets {offsets[i].tolist()} sizes {sizes[i].tolist()} lies outside shape {list(shape)}"
    numel = math.prod(shape)
    keep = box_volume(sizes) > 0
    off, siz = (offsets, sizes) if keep.all() else (offsets[keep], sizes[keep])
    if numel == 0:
        return None if len(off) == 0 else "a non-empty chunk in an empty tensor"
    if ndim == 0:
        return None if len(off) == 1 else f"a 0-d tensor needs exactly 1 chunk, got {len(off)}"
    if len(off) == 0:
        return "no chunk covers the tensor"
    if _tiles_along_one_dim(shp, off, siz):
        return None
    lo, hi = off.min(axis=0), (off + siz).max(axis=0)
    for d in range(ndim):
        if lo[d] != 0 or hi[d] != shape[d]:
            return f"chunks leave a gap along dim {d} (they span [{lo[d]}, {hi[d]}) of {shape[d]})"
    # A dim every box spans whole factors out of the cover (and out of the corners).
    split = np.flatnonzero(~((off == 0) & (siz == shp)).all(axis=0))
    return _corner_problem(shp, split, off[:, split], siz[:, split])


def _corner_problem(shape: np.ndarray, split: np.ndarray, off: np.ndarray, siz: np.ndarray) -> str | None:
    """Exact cover of the in-bounds boxes ``off``/``siz`` (dims ``split`` of ``shape``), by their corners.

    The coverage count of a box, ``1[lo, hi)(x) = prod_d (H(x_d - lo_d) - H(x_d - hi_d))``
    with ``H`` the step function, is a signed sum over its ``2^k`` corners
    (sign ``-1`` per ``hi`` coordinate), and such sums of distinct corners are
    linearly independent. So the boxes cover the tensor exactly once iff the
    signed corner weights of all boxes, summed per point, equal those of the
    whole tensor: one sort of ``n 2^k`` corners. No volume sum or overlap
    search is needed, and a mismatch also locates a bad element: at the
    lexicographically first mismatched corner ``c`` (no other mismatched
    corner is below it in every dim) the count is exactly ``1 + diff(c)``.
    """
    n, k = off.shape
    if k == 0:  # every box is the whole tensor
        return None if n == 1 else f"chunks overlap: element {[0] * len(shape)} is covered {n} times"
    if n * (1 << k) > CORNER_LIMIT:
        return f"chunk table too complex to check: {n} chunks split along {k} dims (limit {CORNER_LIMIT} corners)"
    masks = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).astype(bool)  # (2^k, k): which corner coords are hi
    sign = np.where(masks.sum(axis=1) % 2, -1, 1).astype(np.int64)
    corners = np.where(masks[:, None, :], (off + siz)[None], off[None]).reshape(-1, k)
    whole = np.where(masks, shape[split][None], 0)
    points = np.concatenate([corners, whole])
    weights = np.concatenate([np.repeat(sign, n), -sign])  # the tensor's own corners, subtracted
    order = np.lexsort(points.T[::-1])
    points, weights = points[order], weights[order]
    starts = np.flatnonzero(np.append(True, (points[1:] != points[:-1]).any(axis=1)))
    diff = np.add.reduceat(weights, starts)
    bad = np.flatnonzero(diff)
    if not len(bad):
        return None
    element = np.zeros(len(shape), np.int64)
    element[split] = points[starts[bad[0]]]
    count = 1 + int(diff[bad[0]])
    if count == 0:
        return f"chunks leave a gap: element {element.tolist()} is not covered"
    return f"chunks overlap: element {element.tolist()} is covered {count} times"


def _tiles_along_one_dim(shape: np.ndarray, off: np.ndarray, siz: np.ndarray) -> bool:
    """Fast path for the common layout: boxes whole in every dim but one, chained along it.

    (``Shard(d)`` on a 1-D mesh, and every FSDP checkpoint.) ``True`` means
    the non-empty boxes tile ``shape`` exactly once; ``False`` means "not
    shown here", and the general check decides and explains.
    """
    whole = ((off == 0) & (siz == shape)).all(axis=0)
    split = np.flatnonzero(~whole)
    if len(split) != 1:
        return len(split) == 0 and len(off) == 1
    d = int(split[0])
    start, end = off[:, d], off[:, d] + siz[:, d]
    if not (start[1:] >= start[:-1]).all():
        order = np.argsort(start, kind="stable")
        start, end = start[order], end[order]
    return bool(start[0] == 0 and end[-1] == shape[d] and (start[1:] == end[:-1]).all())


def chained_along_one_dim(shapes: np.ndarray, off: np.ndarray, siz: np.ndarray, owner: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`_tiles_along_one_dim` for many tables at once: one ``True``/``False`` per table.

    Args:
        shapes: ``(t, ndim)`` each table's tensor shape (``ndim`` >= 1).
        off, sizes: ``(n, ndim)`` the boxes of all tables, table after table.
        owner: ``(n,)`` the table of each box; starts, counts: ``(t,)`` where each table's boxes are.

    Returns:
        ``True`` for a table whose boxes are in bounds, non-empty (the caller
        checked both), whole in every dim but one and chained along it
        without gap or overlap (or one box that is the whole tensor): those
        tile their tensor exactly once. ``False`` means "not shown here".
    """
    n = len(owner)
    whole = np.logical_and.reduceat((off == 0) & (siz == shapes[owner]), starts, axis=0)  # (t, ndim): dims no box splits
    split = (~whole).sum(axis=1)
    d = np.argmin(whole, axis=1)  # the first split dim (0 when none is split)
    rows = np.arange(n)
    lo = off[rows, d[owner]]
    hi = lo + siz[rows, d[owner]]
    order = np.lexsort((lo, owner))  # by table, then by start: each table's boxes stay at starts[i]:starts[i] + counts[i]
    lo, hi = lo[order], hi[order]
    linked = np.ones(n, bool)
    linked[1:] = lo[1:] == hi[:-1]
    linked[starts] = True  # a table's first box follows nothing
    ends = starts + counts - 1
    chained = np.logical_and.reduceat(linked, starts) & (lo[starts] == 0) & (hi[ends] == shapes[np.arange(len(starts)), d])
    return ((split == 1) & chained) | ((split == 0) & (counts == 1))
