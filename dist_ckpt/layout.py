"""Where each written chunk of a save lands in the manifest.

The plan decides who writes which chunk; this module turns it, once per plan,
into the manifest's columns in their final order, so that at commit time the
coordinator only scatters each rank's records (file, offset, hash) into place
as its Done arrives (:class:`dist_ckpt.commit.RecordTable`), and the chunk
tables are views of these columns.

Manifest order: chunks grouped by their tensor's number of dims, then by
manifest entry (global keys, then rank-local ones), then by rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from .plan import PlanGroup

BLOCK = 128  # tensors per vectorised pass: bounds the temporaries over thousands of ranks


def blocks(n: int, size: int = BLOCK) -> Iterator[slice]:
    """``slice``s of at most ``size`` covering ``range(n)``."""
    return (slice(a, min(a + size, n)) for a in range(0, n, size))


@dataclass(frozen=True, eq=False)
class ChunkLayout:
    """The manifest's per-chunk columns that the plan fixes, in manifest order.

    Chunks whose tensors have ``ndim`` dims occupy ``base[ndim] ..`` of the
    flat per-chunk columns (``nbytes`` here; file, offset and hash come from
    the ranks' records) and their boxes are ``offsets[ndim]`` and
    ``sizes[ndim]``, ``(n, ndim)`` each.
    """

    counts: np.ndarray  # (n_entries,) chunks of each manifest entry
    base: dict[int, int]
    offsets: dict[int, np.ndarray]
    sizes: dict[int, np.ndarray]
    nbytes: np.ndarray  # (N,)
    position: tuple[np.ndarray, ...]  # per plan group: flat position of each written (row, tensor), row-major
    row_start: tuple[np.ndarray, ...]  # per plan group: (R + 1,) where each row's chunks start in ``position``

    def positions(self, group: int, row: int) -> np.ndarray:
        """Flat positions of the chunks one rank writes, in ascending tensor order."""
        starts = self.row_start[group]
        return self.position[group][starts[row] : starts[row + 1]]


@dataclass
class _Class:
    """The chunks of one ndim while the layout is built."""

    entry: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    nbytes: np.ndarray  # a view of the layout's flat column
    where: np.ndarray  # row-major index within its group
    group: np.ndarray | None  # only when there are several groups

    @staticmethod
    def empty(nd: int, n: int, nbytes: np.ndarray, n_entries: int, groups: bool) -> _Class:
        # 32-bit indices where they fit: every byte here is fresh memory for each new plan
        return _Class(np.empty(n, _index(n_entries)), np.empty((n, nd), np.int64), np.empty((n, nd), np.int64), nbytes, np.empty(n, _index(n)), np.empty(n, np.int32) if groups else None)

    def sorted_by_entry(self) -> _Class:
        """Chunks of each entry together, in their order (already so unless a key spans schemas or is rank-local)."""
        if (self.entry[1:] >= self.entry[:-1]).all():
            return self
        order = np.argsort(self.entry, kind="stable")
        self.nbytes[:] = self.nbytes[order]
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return _Class(pick(self.entry), pick(self.offsets), pick(self.sizes), self.nbytes, pick(self.where), pick(self.group))


def _index(n: int) -> type:
    """The smallest of int32 and int64 that indexes ``n`` items."""
    return np.int32 if n < 2**31 else np.int64


def chunk_layout(groups: list[PlanGroup], boxes: list[np.ndarray], n_entries: int) -> ChunkLayout:
    """Place every chunk the plan writes (whole-array passes over blocks of tensors).

    Args:
        groups: the plan's groups, with their write matrices filled in.
        boxes: per group, the ``(R, 2S)`` offsets-then-sizes matrix of its ranks.
        n_entries: manifest entries (global and rank-local tensors).
    """
    totals: dict[int, int] = {}
    for g in groups:
        per_col = g.writes.sum(axis=0)
        for nd in np.unique(g.schema.ndim).tolist():
            totals[nd] = totals.get(nd, 0) + int(per_col[g.schema.ndim == nd].sum())
    nbytes = np.empty(sum(totals.values()), np.int64)
    base, n = {}, 0
    for nd in sorted(totals):
        base[nd], n = n, n + totals[nd]
    classes = {nd: _Class.empty(nd, totals[nd], nbytes[base[nd] : base[nd] + totals[nd]], n_entries, len(groups) > 1) for nd in totals}
    filled = dict.fromkeys(totals, 0)
    for gi, (g, b) in enumerate(zip(groups, boxes)):
        _fill(classes, filled, gi, g, b)
    position = [np.empty(int(g.writes.sum()), _index(n)) for g in groups]
    counts = np.zeros(n_entries, np.int64)
    for nd in sorted(classes):
        cls = classes[nd] = classes[nd].sorted_by_entry()
        flat = np.arange(base[nd], base[nd] + len(cls.entry))
        for gi in range(len(groups)):
            sel = cls.group == gi if cls.group is not None else slice(None)
            position[gi][cls.where[sel]] = flat[sel]
        counts += np.bincount(cls.entry, minlength=n_entries)
    row_start = tuple(np.concatenate([[0], np.cumsum(g.writes.sum(axis=1))]) for g in groups)
    return ChunkLayout(counts, base, {nd: c.offsets for nd, c in classes.items()}, {nd: c.sizes for nd, c in classes.items()}, nbytes, tuple(position), row_start)


def _fill(classes: dict[int, _Class], filled: dict[int, int], gi: int, g: PlanGroup, boxes: np.ndarray) -> None:
    """Append group ``g``'s written chunks to their classes: by tensor, then rank order."""
    sch, n_cols = g.schema, g.writes.shape[1]
    flat = boxes.reshape(-1)
    # row-major index of each written cell: the order a rank's records arrive in
    rank_of = np.cumsum(g.writes.reshape(-1), dtype=_index(g.writes.size)) - 1
    for nd in np.unique(sch.ndim).tolist():
        of_nd, dst = np.flatnonzero(sch.ndim == nd), classes[nd]
        for blk in blocks(len(of_nd)):
            c, rw = np.nonzero(g.writes[:, of_nd[blk]].T)
            col = of_nd[blk][c]
            at = (rw * (2 * sch.width) + sch.start[col])[:, None] + np.arange(nd)  # where the offsets are in ``flat``
            k = slice(filled[nd], filled[nd] + len(col))
            filled[nd] += len(col)
            dst.offsets[k] = np.take(flat, at)
            dst.sizes[k] = np.take(flat, at + sch.width)
            nbytes = sch.itemsize[col]
            for d in range(nd):  # one pass per dim: numpy reduces short rows slowly
                nbytes *= dst.sizes[k, d]
            dst.nbytes[k] = nbytes
            dst.entry[k] = g.entries(col, rw)
            dst.where[k] = rank_of[rw * n_cols + col]
            if dst.group is not None:
                dst.group[k] = gi
