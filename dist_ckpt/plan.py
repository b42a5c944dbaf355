"""The save plan: who writes which chunk, and where each written chunk lands in the manifest.

:func:`dist_ckpt.save_planner.plan_save` makes a :class:`SavePlan`; the
coordinator keeps the last one in a :class:`PlanCache`, sends each rank its row
(:meth:`SavePlan.to_msgpack_for`, parsed by :meth:`SavePlan.parse_rank_plan`)
and places the written chunks in the manifest through :attr:`SavePlan.layout`.

The layout (:class:`ChunkLayout`, built once per plan) holds the manifest's
columns in their final order, so that at commit time the coordinator only
scatters each rank's records (file, offset, hash) into place as its Done
arrives (:class:`dist_ckpt.commit.RecordTable`), and the chunk tables are
views of these columns. Manifest order: chunks grouped by their tensor's
number of dims, then by manifest entry (global keys, then rank-local ones),
then by rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Iterator, Mapping

import msgpack
import numpy as np

from .description import RankColumns, Schema
from .errors import WireError
from .flatten import KeyPath
from .reply_v2 import GroupSpec, derive_cells

__all__ = ["BLOCK", "ChunkLayout", "PlanCache", "PlanGroup", "SavePlan", "blocks", "chunk_layout"]

BLOCK = 128  # tensors per vectorised pass: bounds the temporaries over thousands of ranks


def blocks(n: int, size: int = BLOCK) -> Iterator[slice]:
    """``slice``s of at most ``size`` covering ``range(n)``."""
    return (slice(a, min(a + size, n)) for a in range(0, n, size))


@dataclass(frozen=True, eq=False)
class PlanGroup:
    """The ranks that share one schema: their boxes and what each of them writes.

    Manifest entries are numbered: global tensors ``0 .. len(plan.keys)-1`` in
    order of first appearance (by rank, then schema order), then the rank-local
    tensors of each group, ``local_base + row * n_local + local_pos[column]``.
    """

    schema: Schema
    ranks: np.ndarray  # (R,) ascending
    writes: np.ndarray  # (R, T) bool: row r writes its tensor (column) t
    col_entry: np.ndarray  # (T,) entry of a global column; -1 for a rank-local one
    local_pos: np.ndarray  # (T,) a rank-local column's key among the schema's local keys; -1 otherwise
    local_keys: tuple[KeyPath, ...]  # distinct rank-local keys, in schema order
    local_base: int

    def entries(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Manifest entry of the chunk in column ``cols[i]`` of row ``rows[i]``."""
        ent = self.col_entry[cols]
        local = ent < 0
        if local.any():
            ent = ent.copy()
            ent[local] = self.local_base + rows[local] * len(self.local_keys) + self.local_pos[cols[local]]
        return ent


@dataclass(eq=False)
class SavePlan:
    """Who writes what, and where in the manifest each written chunk goes.

    The fields never change once the planner made the plan. What is derived
    from them (:attr:`writes`, each group's reply bitmap, :attr:`layout`) is
    computed on first use and then kept (``cached_property``); ``boxes``, the
    ``(R, 2S)`` offsets-then-sizes matrix of each group's ranks, is only
    needed for the layout (or, format version 2, the splits:
    :func:`dist_ckpt.index_build.plan_cells`) and is released once that is
    built (a 4096-rank plan's boxes are ~100 MB).
    """

    ranks: np.ndarray  # (W,) ascending
    loads: np.ndarray  # (W,) bytes each rank writes
    groups: tuple[PlanGroup, ...]
    keys: tuple[KeyPath, ...]  # global entries
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    boxes: list[np.ndarray] | None = field(default=None, repr=False)

    @cached_property
    def layout(self) -> ChunkLayout:
        """Where each written chunk lands in the manifest.

        Built on first use: the coordinator asks for it once the replies are
        out, while the ranks write.
        """
        assert self.boxes is not None, "a plan's layout needs the boxes it was made from"
        n_entries = len(self.keys) + sum(len(g.ranks) * len(g.local_keys) for g in self.groups)
        found = chunk_layout(list(self.groups), self.boxes, n_entries)
        self.boxes = None  # the one change after construction: the boxes are not needed any more
        return found

    def where(self, rank: int) -> tuple[int, int] | None:
        """``(group, row)`` of ``rank``, or ``None`` if it took no part."""
        return self._row_of.get(rank)

    @cached_property
    def _row_of(self) -> dict[int, tuple[int, int]]:
        return {r: (gi, row) for gi, g in enumerate(self.groups) for row, r in enumerate(g.ranks.tolist())}

    @cached_property
    def writes(self) -> dict[int, tuple[int, ...]]:
        """``{rank: indices of the tensors it writes}`` for every rank."""
        out: dict[int, tuple[int, ...]] = {}
        for g in self.groups:
            rows, cols = np.nonzero(g.writes)
            bounds = np.searchsorted(rows, np.arange(len(g.ranks) + 1)).tolist()
            out.update((r, tuple(cols[bounds[i] : bounds[i + 1]].tolist())) for i, r in enumerate(g.ranks.tolist()))
        return dict(sorted(out.items()))

    @cached_property
    def _bits(self) -> tuple[np.ndarray, ...]:
        """Per group, each row's write bitmap: one packbits per group, not per rank."""
        return tuple(np.packbits(g.writes, axis=1, bitorder="little") for g in self.groups)

    @property
    def bytes_per_rank(self) -> dict[int, int]:
        return dict(zip(self.ranks.tolist(), self.loads.tolist()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavePlan) and self.writes == other.writes and self.bytes_per_rank == other.bytes_per_rank

    def to_msgpack_for(self, rank: int, entry: np.ndarray | None = None, cell: np.ndarray | None = None, spec: tuple[int, bytes, bytes] | None = None) -> bytes:
        """The plan of one rank, as sent in the coordinator's reply: ``[n_tensors, bitmap]``.

        Format version 2 appends what the rank needs to name its records: ``spec``
        (``local_first, explicit cells, group spec``, from :meth:`dist_ckpt.index_build.PlanCells.reply`)
        gives ``[n, bitmap, local_first, explicit int64, group spec]``, from which the rank derives
        them (:func:`dist_ckpt.reply_v2.derive_cells`); ``entry``/``cell`` (this rank's, in ascending
        tensor order) give the explicit form ``[n, bitmap, entries int32, cells int64]`` (tests, tools).
        """
        where = self._row_of.get(rank)
        tail: list = []
        if spec is not None:
            tail = list(spec)
        elif entry is not None and cell is not None:
            tail = [entry.astype("<i4").tobytes(), cell.astype("<i8").tobytes()]
        if where is None:
            return msgpack.packb([0, b"", *tail], use_bin_type=True)
        gi, row = where
        return msgpack.packb([self.groups[gi].writes.shape[1], self._bits[gi][row].tobytes(), *tail], use_bin_type=True)

    def reply_key(self, rank: int) -> tuple[int, bytes] | None:
        """What :meth:`to_msgpack_for` ``(rank)`` depends on: ranks with equal keys get the same bytes
        (one reply packed for a whole FSDP group). ``None``: the rank took no part."""
        where = self._row_of.get(rank)
        if where is None:
            return None
        gi, row = where
        return gi, self._bits[gi][row].tobytes()

    @staticmethod
    def parse_rank_plan(data: bytes, n_tensors: int) -> tuple[int, ...]:
        """Decode one rank's plan: the indices (below ``n_tensors``) it writes, ascending.

        Raises:
            WireError: on anything that is not a plan for ``n_tensors`` tensors.
        """
        return SavePlan.parse_rank_plan_v2(data, n_tensors)[0]

    @staticmethod
    def parse_rank_plan_v2(data: bytes, n_tensors: int, cols: RankColumns | None = None) -> tuple[tuple[int, ...], tuple[np.ndarray, np.ndarray] | None]:
        """:meth:`parse_rank_plan`, and for format version 2 the (entries, cells) of the tensors written (else None).

        Args:
            cols: this rank's description (its own boxes): a reply with a group spec needs it to derive its cells.

        Raises:
            WireError: on anything that is not a plan for ``n_tensors`` tensors, or cells not one per tensor written,
                or (group spec) cells that do not fit this rank's boxes; names the rank.
        """
        try:
            obj = msgpack.unpackb(data, raw=False, use_list=True, max_str_len=0, max_array_len=5, max_map_len=0, max_ext_len=0)
        except Exception as e:
            raise WireError(f"save plan is not valid msgpack ({type(e).__name__}: {e})") from e
        if type(obj) is not list or len(obj) not in (2, 4, 5) or type(obj[0]) is not int:
            raise WireError("save plan must be [n_tensors, bitmap], [n_tensors, bitmap, entries, cells] or [n_tensors, bitmap, local_first, cells, spec]")
        if len(obj) == 5:
            return SavePlan._parse_spec_form(obj, n_tensors, cols)
        if not all(type(b) is bytes for b in obj[1:]):
            raise WireError("save plan's bitmap, entries and cells must be binary")
        assigned = SavePlan._assigned(obj[0], obj[1], n_tensors)
        if len(obj) == 2:
            return assigned, None
        if len(obj[2]) != 4 * len(assigned) or len(obj[3]) != 8 * len(assigned):
            raise WireError(f"save plan's cells are not one per tensor written ({len(assigned)})")
        return assigned, (np.frombuffer(obj[2], "<i4").astype(np.int32), np.frombuffer(obj[3], "<i8").astype(np.int64))

    @staticmethod
    def _parse_spec_form(obj: list, n_tensors: int, cols: RankColumns | None) -> tuple[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
        """``[n, bitmap, local_first, explicit cells, group spec]``: the rank's (entries, cells) derived from its own boxes."""
        n, bits, local_first, explicit, blob = obj
        if type(bits) is not bytes or type(local_first) is not int or type(explicit) is not bytes or type(blob) is not bytes or len(explicit) % 8:
            raise WireError("save plan [n, bitmap, local_first, cells, spec]: bitmap, cells and spec binary, local_first an int")
        assigned = SavePlan._assigned(n, bits, n_tensors)
        if cols is None:
            raise WireError("save plan carries a group spec: its cells are derived from this rank's boxes, which were not given")
        if not assigned:
            return assigned, (np.zeros(0, np.int32), np.zeros(0, np.int64))
        if not 0 <= local_first < 1 << 31:
            raise WireError(f"rank {cols.rank}: save plan's local_first {local_first} is outside [0, 2**31)")
        spec = GroupSpec.from_bytes(blob, len(cols.schema), cols.schema.width, cols.rank)
        return assigned, derive_cells(spec, cols, np.asarray(assigned, np.int64), local_first, np.frombuffer(explicit, "<i8").astype(np.int64))

    @staticmethod
    def _assigned(n: int, bits: bytes, n_tensors: int) -> tuple[int, ...]:
        if n != n_tensors or len(bits) != -(-n // 8):
            raise WireError(f"save plan is for {n} tensors in {len(bits)} bytes; this rank described {n_tensors}")
        mask = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
        if mask[n:].any():
            raise WireError("save plan sets bits past its last tensor")
        return tuple(np.flatnonzero(mask).tolist())


class PlanCache:
    """Remembers the last plan, keyed by every rank's ``(rank, digest)``."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] | None = None
        self._plan: SavePlan | None = None

    @staticmethod
    def _norm(digests: Mapping[int, int] | Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        items = digests.items() if isinstance(digests, Mapping) else digests
        return tuple(sorted((int(r), int(d)) for r, d in items))

    def lookup(self, digests: Mapping[int, int] | Iterable[tuple[int, int]]) -> SavePlan | None:
        """The cached plan if every rank's digest (and the set of ranks) is unchanged."""
        return self._plan if self._key is not None and self._norm(digests) == self._key else None

    def store(self, digests: Mapping[int, int] | Iterable[tuple[int, int]], plan: SavePlan) -> None:
        self._key, self._plan = self._norm(digests), plan

    def clear(self) -> None:
        """Forget the plan (a big one is worth freeing before its successor is built)."""
        self._key, self._plan = None, None


# -- the layout: where each written chunk lands in the manifest -----------------


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
        return _Class(
            np.empty(n, _index(n_entries)),
            np.empty((n, nd), np.int64),
            np.empty((n, nd), np.int64),
            nbytes,
            np.empty(n, _index(n)),
            np.empty(n, np.int32) if groups else None,
        )

    def sorted_by_entry(self) -> _Class:
        """Chunks of each entry together, in their order (already so unless a key spans schemas or is rank-local)."""
        if (self.entry[1:] >= self.entry[:-1]).all():
            return self
        order = np.argsort(self.entry, kind="stable")
        self.nbytes[:] = self.nbytes[order]
        group = None if self.group is None else self.group[order]
        return _Class(self.entry[order], self.offsets[order], self.sizes[order], self.nbytes, self.where[order], group)


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
    position: list[np.ndarray] = [np.empty(int(g.writes.sum()), _index(n)) for g in groups]
    counts = np.zeros(n_entries, np.int64)
    for nd in sorted(classes):
        cls = classes[nd] = classes[nd].sorted_by_entry()
        flat = np.arange(base[nd], base[nd] + len(cls.entry))
        for gi in range(len(groups)):
            sel = cls.group == gi if cls.group is not None else slice(None)
            position[gi][cls.where[sel]] = flat[sel]
        counts += np.bincount(cls.entry, minlength=n_entries)
    row_start = tuple(np.concatenate([[0], np.cumsum(g.writes.sum(axis=1))]) for g in groups)
    return ChunkLayout(
        counts, base, {nd: c.offsets for nd, c in classes.items()}, {nd: c.sizes for nd, c in classes.items()}, nbytes, tuple(position), row_start
    )


def _fill(classes: dict[int, _Class], filled: dict[int, int], gi: int, g: PlanGroup, boxes: np.ndarray) -> None:
    """Append group ``g``'s written chunks to their classes: by tensor, then rank order."""
    sch, n_cols = g.schema, g.writes.shape[1]
    flat = boxes.reshape(-1)
    # row-major index of each written cell: the order a rank's records arrive in
    rank_of: np.ndarray = np.cumsum(g.writes.reshape(-1), dtype=_index(g.writes.size)) - 1
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
