"""How a tensor of a version-2 checkpoint is cut into cells, and which rank wrote each cell.

A :class:`Split` replaces the v1 chunk table's ``offsets``/``sizes`` columns
and adds the writer of every piece. A layout that is a grid (every
``torch.chunk``, ``DTensor`` ``Shard`` and FSDP split, a 2-D mesh, a
replicated tensor: one cell) is stored per dimension (an even step, or its
boundaries) with the owners as a formula ``a + b * cell`` or one int32 per
cell; a regular FSDP split over 16,384 ranks is then a few ints. Anything
else falls back to explicit boxes. See docs/format.md "Version 2".

Cells are numbered row-major over the grid (box order for explicit boxes).
A zero-element tensor has no cells; cells are never empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xxhash

from . import boxes
from .boxes import columns_t
from .errors import ManifestError

__all__ = ["ColumnMemo", "Split", "cells_for_box", "detect_columns", "detect_split", "split_from_obj"]

_MAX_INT = 1 << 62
_I8, _I4 = np.dtype("<i8"), np.dtype("<i4")


@dataclass(frozen=True, eq=False)
class Split:
    """The cells of one tensor and their owners.

    Exactly one of ``dims`` (a grid) and ``offsets``/``sizes`` (explicit boxes)
    is set. ``dims[d]`` is an int ``s`` (even split: cell ``k`` spans
    ``[k*s, min((k+1)*s, L))``) or an int64 array of boundaries ``0 = b0 < … < bm = L``.
    Owners are ``affine = (a, b)`` (cell ``c``: rank ``a + b*c``) or ``owners``, one per cell.
    """

    shape: tuple[int, ...]
    dims: tuple[int | np.ndarray, ...] | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    affine: tuple[int, int] | None = None
    owners: np.ndarray | None = None

    @property
    def counts(self) -> tuple[int, ...]:
        """Cells along each dim of a grid."""
        assert self.dims is not None
        return tuple(_dim_count(s, L) for s, L in zip(self.dims, self.shape))

    @property
    def ncells(self) -> int:
        if self.dims is None:
            assert self.offsets is not None
            return len(self.offsets)
        return math.prod(self.counts)

    def owner(self, cells: np.ndarray) -> np.ndarray:
        """int64 rank that wrote each of ``cells`` (each below :attr:`ncells`)."""
        if self.affine is not None:
            a, b = self.affine
            return a + b * np.asarray(cells, np.int64)
        assert self.owners is not None
        return self.owners[cells].astype(np.int64)

    def cell_boxes(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, sizes)``, ``(n, ndim)`` int64 each, of ``cells`` (each below :attr:`ncells`)."""
        cells = np.asarray(cells, np.int64)
        if self.dims is None:
            assert self.offsets is not None and self.sizes is not None
            return self.offsets[cells], self.sizes[cells]
        nd = len(self.shape)
        off, siz = np.empty((len(cells), nd), np.int64), np.empty((len(cells), nd), np.int64)
        if nd == 0:
            return off, siz
        ks = np.unravel_index(cells, self.counts)
        for d, (s, L, k) in enumerate(zip(self.dims, self.shape, ks)):
            if isinstance(s, int):
                off[:, d] = k * s
                siz[:, d] = np.minimum(off[:, d] + s, L) - off[:, d]
            else:
                off[:, d] = s[k]
                siz[:, d] = s[k + 1] - s[k]
        return off, siz

    def volumes(self, cells: np.ndarray) -> np.ndarray:
        """Elements of each of ``cells``."""
        return boxes.box_volume(self.cell_boxes(cells)[1])

    def to_obj(self) -> dict[str, Any]:
        """The msgpack form (docs/format.md "Version 2")."""
        owner: Any = list(self.affine) if self.affine is not None else _bin(self.owners, _I4)
        if self.dims is None:
            return {"boxes": {"n": self.ncells, "offsets": _bin(self.offsets, _I8), "sizes": _bin(self.sizes, _I8)}, "owners": owner}
        return {"grid": [s if isinstance(s, int) else _bin(s, _I8) for s in self.dims], "owner": owner}


def _bin(a: np.ndarray | None, dt: np.dtype) -> bytes:
    assert a is not None
    return np.ascontiguousarray(a, dt).tobytes()


def _dim_count(s: int | np.ndarray, L: int) -> int:
    return -(-L // s) if isinstance(s, int) else len(s) - 1


# -- detection ---------------------------------------------------------------------


def detect_split(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray, owners: np.ndarray) -> tuple[Split, np.ndarray]:
    """The most compact :class:`Split` of one tensor's boxes (which must tile it exactly once).

    Args:
        shape: the global shape.
        offsets, sizes: ``(n, ndim)`` boxes; empty ones are dropped (they hold nothing).
        owners: ``(n,)`` the rank that writes each box.

    Returns:
        ``(split, cell)``: the split and, per input box, its cell (-1 for an empty box).
    """
    shape = tuple(int(L) for L in shape)
    nd = len(shape)
    owners = np.asarray(owners, np.int64).reshape(-1)
    offsets = np.asarray(offsets, np.int64).reshape(len(owners), nd)
    sizes = np.asarray(sizes, np.int64).reshape(len(owners), nd)
    cell = np.full(len(offsets), -1, np.int64)
    keep = np.flatnonzero(boxes.box_volume(sizes) > 0)
    if math.prod(shape) == 0:
        return Split(shape, dims=tuple(max(L, 1) for L in shape), affine=(0, 0)), cell
    off, siz, own = offsets[keep], sizes[keep], owners[keep]
    found = _grid(shape, off, siz)
    if found is None:
        cell[keep] = np.arange(len(keep))
        return Split(shape, offsets=off, sizes=siz, **_owner_form(own)), cell
    dims, cells = found
    by_cell = np.empty(len(cells), np.int64)
    by_cell[cells] = own
    cell[keep] = cells
    return Split(shape, dims=dims, **_owner_form(by_cell)), cell


def _grid(shape: tuple[int, ...], off: np.ndarray, siz: np.ndarray) -> tuple[tuple[int | np.ndarray, ...], np.ndarray] | None:
    """``(dims, cell of each box)`` when the boxes are exactly the cells of a grid, else None."""
    nd = len(shape)
    if nd == 0:
        return ((), np.zeros(1, np.int64)) if len(off) == 1 else None
    ks, dims, counts = [], [], []
    for d in range(nd):
        u, inv = _distinct(off[:, d])
        b = np.append(u, shape[d])
        if u[0] != 0 or (siz[:, d] != b[inv + 1] - b[inv]).any():
            return None
        ks.append(inv)
        counts.append(len(u))
        dims.append(_compact_dim(b, shape[d]))
    if math.prod(counts) != len(off):
        return None
    cells = np.ravel_multi_index(ks, counts).astype(np.int64)
    if np.bincount(cells, minlength=len(cells)).max() != 1:  # cells < prod(counts) = len(cells)
        return None
    return tuple(dims), cells


def _distinct(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(col, return_inverse=True)``, without the sort for the two common columns: all zero
    (a dim no box splits) and strictly rising (boxes in split order)."""
    if not col.any():
        return np.zeros(1, np.int64), np.zeros(len(col), np.int64)
    if (col[1:] > col[:-1]).all():
        return col, np.arange(len(col), dtype=np.int64)
    u, inv = np.unique(col, return_inverse=True)
    return u, inv.reshape(-1)


def _compact_dim(b: np.ndarray, L: int) -> int | np.ndarray:
    """The even step ``s`` when boundaries ``b`` are ``[0, s, 2s, …, L]``, else ``b`` itself."""
    s = int(b[1] - b[0])
    m = len(b) - 1
    if -(-L // s) == m and np.array_equal(b[:-1], np.arange(m, dtype=np.int64) * s):
        return s
    return b.astype(np.int64)


def _owner_form(by_cell: np.ndarray) -> dict[str, Any]:
    n = len(by_cell)
    a = int(by_cell[0]) if n else 0
    b = int(by_cell[1] - by_cell[0]) if n > 1 else 0
    if np.array_equal(by_cell, a + b * np.arange(n, dtype=np.int64)):
        return {"affine": (a, b)}
    return {"owners": by_cell.astype(np.int32)}


# -- lookup ------------------------------------------------------------------------


def cells_for_box(split: Split, offsets: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """The cells (ascending int64) that box ``offsets``/``sizes`` overlaps.

    A grid finds them per dim (a division or a binary search) and touches no
    other cell; explicit boxes are tested all at once.
    """
    off = np.asarray(offsets, np.int64).reshape(-1)
    siz = np.asarray(sizes, np.int64).reshape(-1)
    if split.ncells == 0 or (siz == 0).any():
        return np.zeros(0, np.int64)
    if split.dims is None:
        assert split.offsets is not None and split.sizes is not None
        end = off + siz
        hit = ((split.offsets < end) & (off < split.offsets + split.sizes)).all(axis=1)
        return np.flatnonzero(hit).astype(np.int64)
    ranges = []
    for s, o, z, n in zip(split.dims, off.tolist(), siz.tolist(), split.counts):
        if isinstance(s, int):
            lo, hi = o // s, (o + z - 1) // s + 1
        else:
            lo, hi = int(np.searchsorted(s, o, "right")) - 1, int(np.searchsorted(s, o + z, "left"))
        ranges.append(np.arange(max(lo, 0), min(hi, n), dtype=np.int64))
    if not ranges:
        return np.zeros(1, np.int64)
    grids = np.meshgrid(*ranges, indexing="ij")
    return np.ravel_multi_index([g.reshape(-1) for g in grids], split.counts).astype(np.int64)


# -- decoding ----------------------------------------------------------------------


def split_from_obj(obj: Any, shape: tuple[int, ...], world_size: int, where: str) -> Split:
    """Decode and check an untrusted split (bounds before allocation: arrays are bounded by their bytes).

    Raises:
        ManifestError: naming ``where`` and the field.
    """
    if type(obj) is not dict:
        raise ManifestError(f"{where}.split must be a map, got {type(obj).__name__}")
    if "grid" in obj:
        split = _grid_from_obj(obj, shape, where)
        owner = obj.get("owner")
    elif "boxes" in obj:
        split = _boxes_from_obj(obj.get("boxes"), shape, where)
        owner = obj.get("owners")
    else:
        raise ManifestError(f"{where}.split has neither grid nor boxes")
    n = split.ncells
    if type(owner) is list:
        if len(owner) != 2 or not all(type(v) is int for v in owner):
            raise ManifestError(f"{where}.split owner must be [a, b] ints, got {owner!r:.60}")
        a, b = owner
        if n and not (0 <= a < world_size and 0 <= a + b * (n - 1) < world_size):
            raise ManifestError(f"{where}.split owner {owner} names ranks outside world_size {world_size}")
        return Split(shape, split.dims, split.offsets, split.sizes, affine=(a, b))
    if type(owner) is not bytes or len(owner) != 4 * n:
        raise ManifestError(f"{where}.split owners must be {n} x int32 bytes, got {type(owner).__name__}")
    owners = np.frombuffer(owner, _I4).astype(np.int32)
    if n and (int(owners.min()) < 0 or int(owners.max()) >= world_size):
        raise ManifestError(f"{where}.split owners name ranks outside world_size {world_size}")
    return Split(shape, split.dims, split.offsets, split.sizes, owners=owners)


def _grid_from_obj(obj: dict, shape: tuple[int, ...], where: str) -> Split:
    grid = obj["grid"]
    if type(grid) is not list or len(grid) != len(shape):
        raise ManifestError(f"{where}.split.grid must be an array of {len(shape)} dims")
    dims: list[int | np.ndarray] = []
    for d, (s, L) in enumerate(zip(grid, shape)):
        if type(s) is int:
            if not 0 < s < _MAX_INT:
                raise ManifestError(f"{where}.split.grid[{d}]: step must be a positive int, got {s!r:.40}")
            dims.append(s)
            continue
        if type(s) is not bytes or len(s) % 8 or not s:
            raise ManifestError(f"{where}.split.grid[{d}] must be a step or int64 boundaries, got {type(s).__name__}")
        b = np.frombuffer(s, _I8).astype(np.int64)
        if b[0] != 0 or b[-1] != L or (len(b) > 1 and (np.diff(b) <= 0).any()):
            raise ManifestError(f"{where}.split.grid[{d}]: boundaries must rise strictly from 0 to {L}")
        dims.append(b)
    return Split(shape, dims=tuple(dims))


def _boxes_from_obj(obj: Any, shape: tuple[int, ...], where: str) -> Split:
    nd = len(shape)
    if type(obj) is not dict or type(obj.get("n")) is not int or not 0 <= obj["n"] < _MAX_INT:
        raise ManifestError(f"{where}.split.boxes must be a map with a non-negative int n")
    n = obj["n"]
    cols = []
    for name in ("offsets", "sizes"):
        raw = obj.get(name)
        if type(raw) is not bytes or len(raw) != 8 * n * nd:
            raise ManifestError(f"{where}.split.boxes.{name} must be {n * nd} x int64 bytes")
        cols.append(np.frombuffer(raw, _I8).astype(np.int64).reshape(n, nd))
    off, siz = cols
    if n and (((off | siz) >> 62).any() or (boxes.box_volume(siz) == 0).any() or (nd == 0 and n != 1)):
        raise ManifestError(f"{where}.split.boxes: a box is negative, overflowing or empty")
    problem = boxes.cover_problem(shape, off, siz) if n or math.prod(shape) else None
    if problem:
        raise ManifestError(f"{where}.split.boxes: {problem}")
    return Split(shape, offsets=off, sizes=siz)


# -- detection over many tensors at once -------------------------------------------


class ColumnMemo:
    """Splits already found by :func:`detect_columns` for columns of one shape, writers and boxes, across calls (blocks).

    A digest of the column finds a candidate; the column's rows, kept here, make the match exact. At most
    ``limit`` columns are kept (the bench's FSDP model has 25 distinct ones; a job whose every tensor is
    laid out differently gains nothing from more, and each kept column is ``R * (1 + 16 * ndim)`` bytes).
    """

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._kept: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray, Split | None]] = {}

    def find(self, shape: tuple[int, ...], writer: np.ndarray, off: np.ndarray, siz: np.ndarray) -> tuple[tuple, tuple[Split | None] | None]:
        """``(key, (split,))`` of a column seen before (``split`` may be None: it did not qualify), else ``(key, None)``."""
        key = (shape, *(xxhash.xxh3_128_intdigest(a.data) for a in (writer, off, siz)))  # contiguous rows: no copy
        hit = self._kept.get(key)
        if hit is not None and np.array_equal(hit[0], writer) and np.array_equal(hit[1], off) and np.array_equal(hit[2], siz):
            return key, (hit[3],)
        return key, None

    def keep(self, key: tuple, writer: np.ndarray, off: np.ndarray, siz: np.ndarray, split: Split | None) -> None:
        if len(self._kept) < self.limit and key not in self._kept:
            self._kept[key] = (writer.copy(), off.copy(), siz.copy(), split)


def detect_columns(
    shapes: Sequence[tuple[int, ...]],
    start: np.ndarray,
    width: int,
    boxes: np.ndarray,
    writes: np.ndarray,
    ranks: np.ndarray,
    memo: ColumnMemo | None = None,
) -> list[Split | None]:
    """:func:`detect_split` of many tensors (columns) of one boxes matrix at once, for the common layouts.

    A column qualifies when its writers' boxes (rows ``writes[:, col]``) span every dim
    but at most one whole, and tile that one in row order (FSDP, ``Shard(d)`` on a 1-D
    mesh; a tensor written once). Its split is then what :func:`detect_split` finds for
    those boxes and writers, and its cells are the writers in row order. Column by column
    the boxes would be gathered one strided element at a time; here a block of columns is
    one pass over the rows. Columns with the same shape, writers and boxes (an FSDP model's
    layers) are split once and share the :class:`Split`.

    Args:
        shapes: per column, the tensor's shape (non-empty, at least one dim).
        start: per column, where its dims start in each half of ``boxes``'s rows (``width`` values each).
        boxes: ``(R, 2 * width)`` offsets then sizes, one row per rank.
        writes: ``(R, len(shapes))`` bool, the rows that write each column.
        ranks: ``(R,)`` the rank of each row.
        memo: the splits of earlier calls over the same ``boxes`` rows and ``ranks`` (one per group); default: this call's.

    Returns:
        Per column its split, or None where the column does not qualify (:func:`detect_split` decides).
    """
    nd = np.fromiter(map(len, shapes), np.int64, len(shapes))
    lo, hi = int(start.min()), int((start + nd).max())
    # The block's dims, one contiguous int64 row each (a BoxStore's matrix may be int32; ends are computed below).
    off_t = columns_t(boxes, np.arange(lo, hi))
    siz_t = columns_t(boxes, np.arange(width + lo, width + hi))
    writers = np.ascontiguousarray(writes.T)
    memo = memo if memo is not None else ColumnMemo()
    out: list[Split | None] = []
    for j, shape in enumerate(shapes):
        k = slice(int(start[j]) - lo, int(start[j]) - lo + len(shape))
        key, hit = memo.find(tuple(shape), writers[j], off_t[k], siz_t[k])
        if hit is None:
            hit = (_column_split(shape, writers[j], off_t[k], siz_t[k], ranks),)
            memo.keep(key, writers[j], off_t[k], siz_t[k], hit[0])
        out.append(hit[0])
    return out


def _column_split(shape: tuple[int, ...], writer: np.ndarray, off: np.ndarray, siz: np.ndarray, ranks: np.ndarray) -> Split | None:
    """:func:`detect_columns` for one column: ``writer`` ``(R,)`` bool, ``off``/``siz`` ``(nd, R)`` its dims' rows."""
    rows = np.flatnonzero(writer)
    at: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and rows[-1] - rows[0] + 1 == len(rows) else rows
    o, z = off[:, at], siz[:, at]  # FSDP's writers are a run of rows: views, no gather
    split_dims = np.flatnonzero(~((o == 0) & (z == np.array(shape, np.int64)[:, None])).all(axis=1))
    if len(split_dims) > 1 or not len(rows):
        return None
    d = int(split_dims[0]) if len(split_dims) else -1
    return _tiled_split(shape, rows, ranks, o[d] if d >= 0 else None, z[d] if d >= 0 else None, d)


def _tiled_split(shape: tuple[int, ...], rows: np.ndarray, ranks: np.ndarray, o: np.ndarray | None, z: np.ndarray | None, d: int) -> Split | None:
    """The split of writers ``rows`` (their boxes ``o``/``z`` along dim ``d``, whole along the others; ``d`` -1: whole
    along every dim), if they tile the tensor in row order."""
    if d < 0:  # every writer spans the tensor: a grid of one cell if there is one writer
        return Split(shape, dims=tuple(shape), **_owner_form(ranks[rows].astype(np.int64))) if len(rows) == 1 else None
    assert o is not None and z is not None
    L = shape[d]
    if not len(rows) or o[0] != 0 or (o[1:] != o[:-1] + z[:-1]).any() or o[-1] + z[-1] != L:
        return None
    dims: list[int | np.ndarray] = list(shape)
    dims[d] = _compact_dim(np.append(o, L), L)
    return Split(shape, dims=tuple(dims), **_owner_form(ranks[rows].astype(np.int64)))
