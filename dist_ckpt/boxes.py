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

KeyPath = tuple  # tuple[str | int, ...]; kept loose for msgpack round trips

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


def intersect(a_off: Sequence[int], a_size: Sequence[int], b_off: Sequence[int], b_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Intersection of two boxes, or ``None`` when it is empty."""
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


def cover_problem(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray, bounds_checked: bool = False) -> str | None:
    """Check that non-empty boxes tile ``shape`` exactly once.

    Returns ``None`` when they do, else a sentence naming the first problem
    (negative extent, out of bounds, overlap, gap). Empty boxes (any size 0)
    are ignored: they cover nothing. ``bounds_checked`` skips the checks for
    negative and out-of-bounds boxes (the caller made them).

    Boxes whole in every dim but one (``Shard(d)``, every FSDP checkpoint)
    are checked by one sort along that dim. Otherwise it runs in O(n log n)
    for grid-like tilings (every box one cell of the grid of all box
    boundaries), which is what every DTensor placement produces; other
    tilings fall back to rasterising the boxes spanning several cells.
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
    total = int(box_volume(siz).sum())
    bounds = []
    start_idx = np.empty_like(off)
    end_idx = np.empty_like(off)
    for d in range(ndim):
        b = np.unique(np.concatenate([off[:, d], off[:, d] + siz[:, d]]))
        if b[0] != 0 or b[-1] != shape[d]:
            return f"chunks leave a gap along dim {d} (they span [{b[0]}, {b[-1]}) of {shape[d]})"
        bounds.append(b)
        start_idx[:, d] = np.searchsorted(b, off[:, d])
        end_idx[:, d] = np.searchsorted(b, off[:, d] + siz[:, d])
    grid = tuple(len(b) - 1 for b in bounds)
    ncells = math.prod(grid)
    span = end_idx - start_idx
    single = (span == 1).all(axis=1)
    if ncells > 50_000_000:
        return None if total == numel and _pairwise_disjoint(off, siz) else "chunks overlap or leave a gap"
    counts = np.zeros(ncells, dtype=np.int64)
    if single.any():
        lin = np.ravel_multi_index(tuple(start_idx[single].T), grid)
        np.add.at(counts, lin, 1)
    view = counts.reshape(grid)
    for i in np.nonzero(~single)[0]:
        view[tuple(slice(int(a), int(b)) for a, b in zip(start_idx[i], end_idx[i]))] += 1
    if (counts > 1).any():
        return "chunks overlap: " + _describe_cell(np.nonzero(counts > 1)[0][0], grid, bounds)
    if (counts == 0).any():
        return "chunks leave a gap: " + _describe_cell(np.nonzero(counts == 0)[0][0], grid, bounds)
    return None


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


def _describe_cell(lin: int, grid: tuple[int, ...], bounds: list[np.ndarray]) -> str:
    idx = np.unravel_index(int(lin), grid)
    lo = [int(bounds[d][i]) for d, i in enumerate(idx)]
    hi = [int(bounds[d][i + 1]) for d, i in enumerate(idx)]
    return f"region from {lo} to {hi} (exclusive)"


def _pairwise_disjoint(off: np.ndarray, siz: np.ndarray) -> bool:
    hi = off + siz
    for i in range(len(off)):
        lo_max = np.maximum(off[i], off[i + 1 :])
        hi_min = np.minimum(hi[i], hi[i + 1 :])
        if ((hi_min > lo_max).all(axis=1)).any():
            return False
    return True
