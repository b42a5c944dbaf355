"""Pure save planning: who writes which chunk (loads: :mod:`dist_ckpt.load_planner`).

Data in, plans out: no I/O, no torch.distributed, no sockets, so resharding
is unit-tested in one process.

Call order and who runs each step:

1. (all ranks) describe the local tensors as a :class:`RankDescription` and
   send ``to_msgpack()`` (with its ``digest()``) to the coordinator;
2. (coordinator) decode each with :func:`~dist_ckpt.description.decode_description`
   (each distinct schema once), then :func:`plan_save` over all ranks at once
   (or reuse a plan from :class:`~dist_ckpt.plan.PlanCache` when no digest changed) and send
   every rank ``SavePlan.to_msgpack_for(rank)`` (:mod:`dist_ckpt.plan`);
3. (all ranks) :meth:`SavePlan.parse_rank_plan` gives the indices of the
   described tensors this rank writes (it has staged all of them already);
4. (every rank, on load, no communication)
   :func:`~dist_ckpt.load_planner.plan_reads` per target tensor turns the
   manifest's chunk table into byte runs to read.

Planning is vectorised over every rank's boxes: ranks that share a schema are
one ``(ranks, boxes)`` matrix (int32 when every dim of the schema fits, see
:class:`~dist_ckpt.description.BoxStore`; widened before any sum or product), and the common layouts are recognised
per tensor column without sorting — a tensor every rank holds whole
(replicated), and a tensor split along one dimension in rank order (FSDP's
``Shard(0)``: rank order is offset order). Anything else (HSDP replicas,
2-D meshes, a key in several schemas, uneven or broken tilings) goes through
the general path that sorts its boxes, deduplicates and checks the cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Iterable, Sequence

import numpy as np

from .boxes import box_volume, columns_t, cover_problem
from .description import (
    PlanError,
    RankColumns,
    RankDescription,
    Schema,
    TensorDescription,
    box_problem,
    gc_paused,
)
from .dtypes import is_dtype_name
from .flatten import KeyPath, format_path
from .plan import BLOCK, PlanGroup, SavePlan, blocks

__all__ = ["PlanError", "RankDescription", "TensorDescription", "plan_save"]


def _fmt_ranks(ranks: Iterable[int], limit: int = 16) -> str:
    rs = sorted(set(int(r) for r in ranks))
    shown = ", ".join(map(str, rs[:limit]))
    return f"rank{'s' if len(rs) != 1 else ''} {shown}" + (f" (+{len(rs) - limit} more)" if len(rs) > limit else "")


# --------------------------------------------------------------------------- planning


def plan_save(descs: Sequence[RankDescription | RankColumns]) -> SavePlan:
    """Deduplicate identical boxes, check coverage and assign every box a writer.

    Each non-empty box of a global tensor is written once, by one of its
    holders: boxes held by one rank go to it, replicated boxes are assigned
    greedily (biggest first, to the least-loaded holder, lowest rank on ties)
    to balance bytes. Rank-local tensors are written by their owner.

    Args:
        descs: one description per rank, per-tensor or columnar (the
            coordinator's, decoded from the wire); any order.

    Raises:
        PlanError: duplicate ranks; a box outside its tensor; a key that
            disagrees on dtype or shape across ranks, is both global and
            rank-local, or whose boxes do not tile its shape exactly once.
            The error names the key and the ranks.
    """
    with gc_paused():
        cols = sorted((d if isinstance(d, RankColumns) else d.columns() for d in descs), key=attrgetter("rank"))
        return _Planner(cols).plan()


@dataclass
class _Shared:
    """Boxes held by several ranks, waiting for the greedy assignment, in batches of arrays.

    Batch ``k`` holds ``B`` boxes: ``nbytes``, ``entry`` and ``ordinal`` (box
    order within its entry) of shape ``(B,)``, and the holders of box ``u`` at
    ``pos[ptr[u] : ptr[u + 1]]`` (rank positions, ascending) with their tensor
    indices in ``idx`` alongside.
    """

    batches: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add(self, nbytes: np.ndarray, entry: np.ndarray, ordinal: np.ndarray, ptr: np.ndarray, pos: np.ndarray, idx: np.ndarray) -> None:
        if len(nbytes):
            self.batches.append((nbytes, entry, ordinal, ptr, pos, idx))

    def merged(self) -> tuple[np.ndarray, ...]:
        """All batches as one: ``(nbytes, entry, ordinal, ptr, pos, idx)``."""
        nbytes, entry, ordinal, ptrs, pos, idx = zip(*self.batches)
        shift = np.cumsum([0] + [int(p[-1]) for p in ptrs[:-1]])
        ptr = np.concatenate([[0]] + [p[1:] + k for p, k in zip(ptrs, shift)])
        return (*(np.concatenate(c) for c in (nbytes, entry, ordinal)), ptr, np.concatenate(pos), np.concatenate(idx))


@dataclass
class _Rows:
    """Rows (rank, tensor) of the columns that take the general path, by ndim."""

    entry: list[np.ndarray] = field(default_factory=list)
    pos: list[np.ndarray] = field(default_factory=list)
    idx: list[np.ndarray] = field(default_factory=list)
    off: list[np.ndarray] = field(default_factory=list)
    siz: list[np.ndarray] = field(default_factory=list)
    isz: list[np.ndarray] = field(default_factory=list)


class _Planner:
    """One run of :func:`plan_save` over rank-sorted columnar descriptions."""

    def __init__(self, cols: list[RankColumns]) -> None:
        self.cols = cols
        self.ranks = np.array([c.rank for c in cols], dtype=np.int64)
        if len(self.ranks) and (self.ranks[1:] == self.ranks[:-1]).any():
            raise PlanError(f"duplicate rank descriptions: {_fmt_ranks(self.ranks[1:][self.ranks[1:] == self.ranks[:-1]])}")
        self.loads = np.zeros(len(cols), dtype=np.int64)
        self.shared = _Shared()
        self.rows: dict[int, _Rows] = {}
        self.keys: dict[KeyPath, int] = {}
        self.metas: list[tuple[str, tuple[int, ...]]] = []

    def plan(self) -> SavePlan:
        by_schema: dict[Schema, list[int]] = {}
        for p, c in enumerate(self.cols):
            by_schema.setdefault(c.schema, []).append(p)
        members = list(by_schema.items())
        for schema, pos in members:
            _check_dtypes(schema, self.ranks[pos])
        boxes = self.boxes = [_stacked([self.cols[p] for p in pos]) for _, pos in members]
        for (schema, pos), b in zip(members, boxes):
            problem = box_problem(schema, b)
            if problem is not None:
                row, i, why = problem
                key, rank = schema.keys[i], int(self.ranks[pos[row]])
                raise PlanError(f"tensor {format_path(key)} on rank {rank}: {why}", key, [rank])
        self.groups = self._number_entries(members)
        self.key_list = tuple(self.keys)
        # columns per global key in the whole job (+1 so that -1, "local", indexes safely)
        self.refs = np.bincount(np.concatenate([g.col_entry[g.col_entry >= 0] for g in self.groups] + [np.zeros(0, np.int64)]), minlength=len(self.keys) + 1)
        self.pos_group = np.zeros(len(self.ranks), np.int64)
        self.pos_row = np.zeros(len(self.ranks), np.int64)
        for gi, ((_, pos), g) in enumerate(zip(members, self.groups)):
            self.pos_group[pos], self.pos_row[pos] = gi, np.arange(len(pos))
        self.group_pos = [np.asarray(pos, np.int64) for _, pos in members]
        for gi in range(len(self.groups)):
            self._fast_columns(gi)
        for nd in sorted(self.rows):
            self._general(nd)
        self._assign_shared()
        dtypes, shapes = (tuple(c) for c in zip(*self.metas)) if self.metas else ((), ())
        return SavePlan(self.ranks, self.loads, tuple(self.groups), self.key_list, dtypes, shapes, boxes=self.boxes)

    # -- entries ------------------------------------------------------------

    def _number_entries(self, members: list[tuple[Schema, list[int]]]) -> list[PlanGroup]:
        """Number global keys by first appearance; check they agree across schemas."""
        groups: list[PlanGroup] = []
        local_where: dict[KeyPath, int] = {}
        for schema, pos in members:
            col_entry = np.full(len(schema), -1, dtype=np.int64)
            local_pos = np.full(len(schema), -1, dtype=np.int64)
            local_keys: dict[KeyPath, int] = {}
            local_meta: dict[KeyPath, tuple[str, tuple[int, ...]]] = {}
            for j, (key, dtype, shape, local) in enumerate(zip(schema.keys, schema.dtypes, schema.shapes, schema.local)):
                if local:
                    local_pos[j] = local_keys.setdefault(key, len(local_keys))
                    if local_meta.setdefault(key, (dtype, shape)) != (dtype, shape):
                        raise PlanError(
                            f"rank-local tensor {format_path(key)} is described twice with different dtype or shape on {_fmt_ranks(self.ranks[pos])}",
                            key,
                            self.ranks[pos].tolist(),
                        )
                    local_where.setdefault(key, int(self.ranks[pos[0]]))
                    continue
                gid = self.keys.setdefault(key, len(self.keys))
                if gid == len(self.metas):
                    self.metas.append((dtype, shape))
                elif self.metas[gid] != (dtype, shape):
                    self._raise_disagreement(key, members)
                col_entry[j] = gid
            groups.append(PlanGroup(schema, self.ranks[pos], np.zeros((len(pos), len(schema)), bool), col_entry, local_pos, tuple(local_keys), 0))
        for key, rank in local_where.items():
            if key in self.keys:
                holders = [r for (s, pos) in members if key in s.keys and not s.local[s.keys.index(key)] for r in self.ranks[pos].tolist()]
                raise PlanError(f"tensor {format_path(key)} is rank-local on rank {rank} but global on {_fmt_ranks(holders)}", key, [rank])
        base = len(self.keys)
        out = []
        for g in groups:
            out.append(PlanGroup(g.schema, g.ranks, g.writes, g.col_entry, g.local_pos, g.local_keys, base))
            base += len(g.ranks) * len(g.local_keys)
        return out

    def _raise_disagreement(self, key: KeyPath, members: list[tuple[Schema, list[int]]]) -> None:
        by_meta: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for schema, pos in members:
            for k, dtype, shape, local in zip(schema.keys, schema.dtypes, schema.shapes, schema.local):
                if k == key and not local:
                    by_meta.setdefault((dtype, shape), []).extend(self.ranks[pos].tolist())
        parts = [f"{_fmt_ranks(rs)} hold{'s' if len(set(rs)) == 1 else ''} dtype {dt} shape {list(sh)}" for (dt, sh), rs in by_meta.items()]
        involved = sorted(set(chain.from_iterable(by_meta.values())))
        raise PlanError(f"tensor {format_path(key)} disagrees across ranks: " + "; ".join(parts), key, involved)

    def _entry_info(self, entry: int) -> tuple[KeyPath, tuple[int, ...], list[int]]:
        """``(key, shape, [owner])`` of a manifest entry (error paths); no owner for global ones."""
        if entry < len(self.keys):
            return self.key_list[entry], self.metas[entry][1], []
        g = next(g for g in reversed(self.groups) if g.local_base <= entry)
        row, lp = divmod(entry - g.local_base, len(g.local_keys))
        key = g.local_keys[lp]
        return key, g.schema.shapes[g.schema.keys.index(key)], [int(g.ranks[row])]

    # -- the common layouts, one vectorised pass per schema ----------------------

    def _fast_columns(self, gi: int) -> None:
        """Plan replicated, ``Shard``-in-rank-order and rank-local columns; queue the rest."""
        g, pos, boxes = self.groups[gi], self.group_pos[gi], self.boxes[gi]
        sch, n_rows = g.schema, len(g.ranks)
        t = len(sch)
        full_dim = _full_dims(boxes, sch)
        nonfull = np.bincount(sch.dim_tensor[~full_dim], minlength=t)
        nbytes = sch.numel * sch.itemsize
        empty = sch.numel == 0  # nothing to write, nothing to cover
        glob = g.col_entry >= 0
        alone = glob & (self.refs[np.maximum(g.col_entry, 0)] == 1)  # the key's only column in the job
        dup_local = ~glob & (np.bincount(np.maximum(g.local_pos, 0), weights=~glob, minlength=len(g.local_keys))[np.maximum(g.local_pos, 0)] > 1)
        replicated = alone & ~empty & (nonfull == 0)
        local = ~glob & ~dup_local & ~empty & (nonfull == 0)
        handled = empty | replicated | local
        g.writes[:, local] = True
        self.loads[pos] += int(nbytes[local].sum())
        rep = np.flatnonzero(replicated)
        if n_rows == 1:
            g.writes[0, rep] = True
            self.loads[pos[0]] += int(nbytes[rep].sum())
        else:  # one box, every rank of the group holds it
            self.shared.add(
                nbytes[rep], g.col_entry[rep], np.zeros(len(rep), np.int64), np.arange(len(rep) + 1) * n_rows, np.tile(pos, len(rep)), np.repeat(rep, n_rows)
            )
        slab = np.flatnonzero(alone & ~empty & (nonfull == 1))
        if len(slab):
            dim_of = np.full(len(sch), -1, dtype=np.int64)
            split = np.flatnonzero(~full_dim)
            dim_of[sch.dim_tensor[split]] = split
            for blk in blocks(len(slab), BLOCK):
                cols = slab[blk]
                done = self._tiled(g, pos, boxes, cols, dim_of[cols])
                done[~done] = self._tiled_sorted(g, pos, boxes, cols[~done], dim_of[cols[~done]])
                handled[cols[done]] = True
        rest = np.flatnonzero(~handled)
        if len(rest):
            self._queue_rows(g, pos, boxes, rest)

    def _tiled(self, g: PlanGroup, pos: np.ndarray, boxes: np.ndarray, cols: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Plan the columns split along one dim (``d``: its column in the boxes) whose boxes
        tile it in rank order; return which did.

        In rank order each non-empty box must start where the previous ones
        end, the first at 0 and the last ending at the dim's extent: then the
        boxes are distinct and tile the tensor, and each is written by its
        rank. (``Shard(d)`` on a 1-D mesh, FSDP.)
        """
        sch, s = g.schema, g.schema.width
        o, z = columns_t(boxes, d), columns_t(boxes, s + d)  # (column, row): each column contiguous
        held = z > 0  # the other dims are whole and non-zero
        # The furthest end so far, in one buffer (in place: each (column, row) temporary is 16 MB at 16,384 ranks,
        # and fresh pages are what a first plan pays for most); an empty box (size 0) reaches nothing.
        reach = np.add(o, z)
        np.multiply(reach, held, out=reach)
        np.maximum.accumulate(reach, axis=1, out=reach)
        starts_ok = np.empty_like(held)
        starts_ok[:, 0] = o[:, 0] == 0
        starts_ok[:, 1:] = o[:, 1:] == reach[:, :-1]
        tiled = (starts_ok | ~held).all(axis=1) & (reach[:, -1] == sch.shape_flat[d])
        c = cols[tiled]
        g.writes[:, c] = held[tiled].T
        row_bytes = sch.itemsize[c] * (sch.numel[c] // sch.shape_flat[d[tiled]])
        self.loads[pos] += row_bytes @ z[tiled]
        return tiled

    def _tiled_sorted(self, g: PlanGroup, pos: np.ndarray, boxes: np.ndarray, cols: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Like :meth:`_tiled` after sorting each column's boxes by offset, so that equal
        boxes (replicas: HSDP) are adjacent: the distinct boxes must tile the dim.
        """
        sch, s = g.schema, g.schema.width
        o, z = columns_t(boxes, d), columns_t(boxes, s + d)
        order = np.argsort(np.where(z > 0, o, np.iinfo(np.int64).max), axis=1, kind="stable")  # empty boxes last; ties in rank order
        o, z = np.take_along_axis(o, order, 1), np.take_along_axis(z, order, 1)
        held = z > 0
        same = np.zeros_like(held)
        same[:, 1:] = held[:, 1:] & (o[:, 1:] == o[:, :-1]) & (z[:, 1:] == z[:, :-1])  # the previous row's box again
        new = held & ~same
        reach = np.maximum.accumulate(np.where(held, o + z, 0), axis=1)
        starts_ok = np.empty_like(held)
        starts_ok[:, 0] = o[:, 0] == 0
        starts_ok[:, 1:] = o[:, 1:] == reach[:, :-1]
        ok = (starts_ok | ~new).all(axis=1) & held[:, 0] & (reach[:, -1] == sch.shape_flat[d])
        if ok.any():
            self._plan_sorted(g, pos, cols[ok], d[ok], order[ok], z[ok], new[ok], held[ok])
        return ok

    def _plan_sorted(
        self, g: PlanGroup, pos: np.ndarray, cols: np.ndarray, d: np.ndarray, order: np.ndarray, z: np.ndarray, new: np.ndarray, held: np.ndarray
    ) -> None:
        """Writers of sorted, valid columns (``(column, sorted row)`` arrays): a box held once is its rank's; the others are shared."""
        sch = g.schema
        # Column by column, runs of equal boxes are consecutive, holders in rank order.
        new_t, held_t, order_t, z_t = (a.reshape(-1) for a in (new, held, order, z))
        rows = np.flatnonzero(held_t)  # every held box, as a flat (column, sorted row)
        first = np.flatnonzero(new_t[rows])  # where each distinct box's holders start in ``rows``
        count = np.diff(np.append(first, len(rows)))
        col = rows[first] // len(g.ranks)
        nbytes = z_t[rows[first]] * (sch.itemsize[cols] * (sch.numel[cols] // sch.shape_flat[d]))[col]
        holder_row = order_t[rows]
        single = count == 1
        g.writes[holder_row[first[single]], cols[col[single]]] = True
        np.add.at(self.loads, pos[holder_row[first[single]]], nbytes[single])
        multi = np.flatnonzero(~single)
        members = _runs(first[multi], count[multi])
        ordinal = np.arange(len(first)) - np.searchsorted(col, col)  # box order within its column
        ptr = np.concatenate([[0], np.cumsum(count[multi])])
        self.shared.add(nbytes[multi], g.col_entry[cols[col[multi]]], ordinal[multi], ptr, pos[holder_row[members]], np.repeat(cols[col[multi]], count[multi]))

    def _queue_rows(self, g: PlanGroup, pos: np.ndarray, boxes: np.ndarray, cols: np.ndarray) -> None:
        sch, s, n_rows = g.schema, g.schema.width, len(g.ranks)
        for nd in np.unique(sch.ndim[cols]).tolist():
            cs = cols[sch.ndim[cols] == nd]
            dims = (sch.start[cs][:, None] + np.arange(nd)).reshape(-1)
            rows = self.rows.setdefault(nd, _Rows())
            rr = np.repeat(np.arange(n_rows), len(cs))
            cc = np.tile(cs, n_rows)
            rows.entry.append(g.entries(cc, rr))
            rows.pos.append(pos[rr])
            rows.idx.append(cc)
            rows.off.append(_widened(boxes, dims).reshape(len(rr), nd))  # volumes and ends of int32 boxes would wrap
            rows.siz.append(_widened(boxes, s + dims).reshape(len(rr), nd))
            rows.isz.append(sch.itemsize[cc])

    # -- the general path ------------------------------------------------------

    def _general(self, nd: int) -> None:
        """Dedup the queued boxes with ``nd`` dims, check each entry's cover, plan them."""
        q = self.rows.pop(nd)
        entry, pos, idx, isz = (np.concatenate(c) for c in (q.entry, q.pos, q.idx, q.isz))
        off, siz = np.concatenate(q.off), np.concatenate(q.siz)
        order = np.lexsort((idx, pos, *siz.T[::-1], *off.T[::-1], entry))  # by entry, box, then holder rank
        entry, pos, idx, isz, off, siz = entry[order], pos[order], idx[order], isz[order], off[order], siz[order]
        keep = (siz != 0).all(axis=1)  # empty boxes cover nothing
        k_entry, k_pos, k_idx, k_isz, k_off, k_siz = entry[keep], pos[keep], idx[keep], isz[keep], off[keep], siz[keep]
        n = len(k_entry)
        new_box = np.ones(n, dtype=bool)
        new_box[1:] = (k_entry[1:] != k_entry[:-1]) | (k_off[1:] != k_off[:-1]).any(axis=1) | (k_siz[1:] != k_siz[:-1]).any(axis=1)
        first = new_box.copy()
        first[1:] |= k_pos[1:] != k_pos[:-1]  # a rank holding one box twice writes it once
        k_entry, k_pos, k_idx, k_isz, k_off, k_siz, new_box = (a[first] for a in (k_entry, k_pos, k_idx, k_isz, k_off, k_siz, new_box))
        start = np.flatnonzero(new_box)
        count = np.diff(np.append(start, len(k_entry)))
        u_entry, u_off, u_siz = k_entry[start], k_off[start], k_siz[start]
        self._check_cover(
            entry[np.append(True, entry[1:] != entry[:-1])], entry, pos, u_entry, u_off, u_siz, lambda u: self.ranks[k_pos[start[u] : start[u] + count[u]]]
        )
        u_nbytes = box_volume(u_siz) * k_isz[start]
        single = count == 1
        w_pos, w_idx = k_pos[start[single]], k_idx[start[single]]
        np.add.at(self.loads, w_pos, u_nbytes[single])
        self._mark(w_pos, w_idx)
        multi = np.flatnonzero(~single)
        members = _runs(start[multi], count[multi])
        ordinal = np.arange(len(u_entry)) - np.searchsorted(u_entry, u_entry)  # box order within its entry
        self.shared.add(u_nbytes[multi], u_entry[multi], ordinal[multi], np.concatenate([[0], np.cumsum(count[multi])]), k_pos[members], k_idx[members])

    def _check_cover(
        self, entries: np.ndarray, row_entry: np.ndarray, row_pos: np.ndarray, u_entry: np.ndarray, u_off: np.ndarray, u_siz: np.ndarray, holders
    ) -> None:
        """The unique boxes of each entry tile its shape exactly once; ``holders(u)`` are the ranks of box ``u``."""
        los, his = np.searchsorted(u_entry, entries, side="left").tolist(), np.searchsorted(u_entry, entries, side="right").tolist()
        for e, lo, hi in zip(entries.tolist(), los, his):
            key, shape, owner = self._entry_info(e)
            if hi - lo == 1 and u_siz[lo].tolist() == list(shape) and not u_off[lo].any():  # one full box
                continue
            problem = cover_problem(shape, u_off[lo:hi], u_siz[lo:hi])
            if problem is not None:
                overlap = _overlapping_ranks(u_off[lo:hi], u_siz[lo:hi], [holders(u) for u in range(lo, hi)]) if "overlap" in problem else None
                involved = overlap if overlap is not None else self.ranks[row_pos[row_entry == e]]
                raise PlanError(
                    f"tensor {format_path(key)} (shape {list(shape)}): {problem}; boxes from {_fmt_ranks(involved)}", key, np.unique(involved).tolist()
                )

    def _mark(self, w_pos: np.ndarray, w_idx: np.ndarray) -> None:
        """Record that the rank at position ``w_pos[i]`` writes its tensor ``w_idx[i]``."""
        gid = self.pos_group[w_pos]
        for gi in np.unique(gid).tolist():
            sel = gid == gi
            self.groups[gi].writes[self.pos_row[w_pos[sel]], w_idx[sel]] = True

    def _assign_shared(self) -> None:
        """Greedy: biggest box first, to its least-loaded holder (lowest rank on ties).

        Exactly the sequential greedy, but boxes whose holders no earlier box
        touches in between are assigned together (see :func:`_independent_prefix`):
        with HSDP every replica group is its own little greedy, run in lock step.
        """
        if not self.shared.batches:
            return
        nbytes, entry, ordinal, ptr, hpos, hidx = self.shared.merged()
        order = np.lexsort((ordinal, entry, -nbytes))  # ties in key order, then box order
        chosen = np.empty(len(nbytes), np.int64)  # index into hpos of each box's writer
        split = _independent_prefix(order, ptr, hpos, len(self.loads))
        _assign_in_levels(order[:split], ptr, hpos, nbytes, self.loads, chosen)
        if split < len(order):  # the rest one box at a time
            loads, hpos_l, ptr_l, size = self.loads.tolist(), hpos.tolist(), ptr.tolist(), nbytes.tolist()
            for u in order[split:].tolist():
                a, b = ptr_l[u], ptr_l[u + 1]
                held = [loads[h] for h in hpos_l[a:b]]
                k = a + held.index(min(held))
                loads[hpos_l[k]] += size[u]
                chosen[u] = k
            self.loads[:] = loads
        self._mark(hpos[chosen], hidx[chosen])


def _independent_prefix(order: np.ndarray, ptr: np.ndarray, hpos: np.ndarray, n_ranks: int) -> int:
    """Length of the longest prefix of ``order`` whose boxes fall into independent groups.

    A box's group is its first holder. In the prefix every rank only ever
    holds boxes of one group, so groups share no rank and their greedy runs
    cannot influence each other.
    """
    n = len(order)
    count = np.diff(ptr)
    at = np.empty(n, np.int64)
    at[order] = np.arange(n)  # position of each box in the greedy order
    pair_at = np.repeat(at, count)  # (box, holder) pairs
    first = np.full(n_ranks, n, np.int64)
    np.minimum.at(first, hpos, pair_at)  # each rank's first box in the order
    group = hpos[ptr[:-1]]
    conflict = group[np.repeat(np.arange(n), count)] != group[order[first[hpos]]]
    return int(pair_at[conflict].min()) if conflict.any() else n


def _assign_in_levels(boxes: np.ndarray, ptr: np.ndarray, hpos: np.ndarray, nbytes: np.ndarray, loads: np.ndarray, chosen: np.ndarray) -> None:
    """The greedy over ``boxes`` (in order, independent groups), one level at a time.

    Level ``t`` holds the ``t``-th box of every group: no two share a holder,
    and everything they depend on is in earlier levels.
    """
    if not len(boxes):
        return
    group = hpos[ptr[boxes]]
    by_group = np.argsort(group, kind="stable")
    g = group[by_group]
    run_start = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], np.arange(len(g)), 0))
    level = np.empty(len(boxes), np.int64)
    level[by_group] = np.arange(len(g)) - run_start
    by_level = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[by_level], np.arange(int(level.max()) + 2))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        u = boxes[by_level[a:b]]
        count = ptr[u + 1] - ptr[u]
        pairs = _runs(ptr[u], count)
        held = loads[hpos[pairs]]
        seg = np.cumsum(count) - count
        low = np.repeat(np.minimum.reduceat(held, seg), count)
        hit = np.flatnonzero(held == low)
        first_hit = hit[np.r_[True, np.diff(np.searchsorted(seg, hit, side="right")) != 0]]  # first least-loaded holder of each box
        chosen[u] = pairs[first_hit]
        loads[hpos[pairs[first_hit]]] += nbytes[u]


def _runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])``."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def _widened(boxes: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Columns ``cols`` of a boxes matrix as int64 (a :class:`~dist_ckpt.description.BoxStore`'s may be int32,
    whose ends, volumes and byte counts would wrap past 2**31)."""
    return np.take(boxes, cols, axis=1).astype(np.int64, copy=False)


def _full_dims(boxes: np.ndarray, sch: Schema, rows_per_pass: int = 1024) -> np.ndarray:
    """``(S,)`` bool: every row of ``boxes`` spans the whole of that dim (offset 0, size its extent).

    A pass of rows at a time: the whole matrix's comparisons would be three ``(R, S)`` temporaries
    (55 MB each at 16,384 ranks x 3400 dims), fresh pages a first plan pays for one by one.
    """
    s = sch.width
    full = np.ones(s, bool)
    for a in range(0, len(boxes), rows_per_pass):
        blk = boxes[a : a + rows_per_pass]
        full &= ((blk[:, :s] == 0) & (blk[:, s:] == sch.shape_flat)).all(axis=0)
    return full


def _stacked(cols: list[RankColumns]) -> np.ndarray:
    """The ``(ranks, 2S)`` boxes of ranks sharing a schema (ascending ranks): a view of their
    :class:`~dist_ckpt.description.BoxStore` matrix when they fill consecutive rows of it."""
    store, first = cols[0].store, cols[0].rank
    if store is not None and all(c.store is store for c in cols) and cols[-1].rank - first == len(cols) - 1:
        return store.matrix(cols[0].schema)[first : first + len(cols)]
    return np.stack([c.boxes for c in cols])


def _check_dtypes(schema: Schema, ranks: np.ndarray) -> None:
    for i, dtype in enumerate(schema.dtypes):
        if not is_dtype_name(dtype):
            key = schema.keys[i]
            raise PlanError(f"tensor {format_path(key)} has unknown dtype {dtype!r} on {_fmt_ranks(ranks)}", key, ranks.tolist())


def _overlapping_ranks(off: np.ndarray, siz: np.ndarray, holders: list[np.ndarray]) -> np.ndarray | None:
    """Holders of the first pair of distinct boxes that overlap (error path only)."""
    hi = off + siz
    for a in range(len(off)):
        hit = (np.minimum(hi[a], hi[a + 1 :]) > np.maximum(off[a], off[a + 1 :])).all(axis=1)
        if hit.any():
            return np.concatenate([holders[a], holders[a + 1 + int(np.flatnonzero(hit)[0])]])
    return None
