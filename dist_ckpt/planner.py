"""Pure planning: who writes which chunk on save, which bytes to read on load.

Data in, plans out: no I/O, no torch.distributed, no sockets, so resharding
is unit-tested in one process.

Call order and who runs each step:

1. (all ranks) describe the local tensors as a :class:`RankDescription` and
   send ``to_msgpack()`` (with its ``digest()``) to the coordinator;
2. (coordinator) parse each with :meth:`RankDescription.from_msgpack`, then
   :func:`plan_save` (or reuse a plan from :class:`PlanCache` when no digest
   changed) and send every rank ``SavePlan.to_msgpack_for(rank)``;
3. (all ranks) :meth:`SavePlan.parse_rank_plan` gives the indices to stage
   and write;
4. (every rank, on load, no communication) :func:`plan_reads` per target
   tensor turns the manifest's chunk table into byte runs to read.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import msgpack
import numpy as np
import xxhash

from .boxes import KeyPath, box_volume, cover_problem
from .dtypes import is_dtype_name, itemsize
from .errors import CheckpointError, WireError
from .flatten import format_path

_WIRE_VERSION = 1
_MAX_NDIM = 64
_MAX_INT = 2**62  # dims, offsets and byte counts stay far from int64 overflow


class PlanError(CheckpointError):
    """The ranks' descriptions cannot form one checkpoint (coordinator side).

    ``key`` is the offending key path and ``ranks`` the ranks involved.
    """

    def __init__(self, message: str, key: KeyPath | None = None, ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.ranks = tuple(ranks)


def _fmt_ranks(ranks: Iterable[int], limit: int = 16) -> str:
    rs = sorted(set(int(r) for r in ranks))
    shown = ", ".join(map(str, rs[:limit]))
    return f"rank{'s' if len(rs) != 1 else ''} {shown}" + (f" (+{len(rs) - limit} more)" if len(rs) > limit else "")


# --------------------------------------------------------------------------- save side


@dataclass(frozen=True, slots=True)
class TensorDesc:
    """One tensor (or one chunk of it) as one rank holds it.

    ``offsets``/``sizes`` place this rank's box in the global tensor of shape
    ``shape``; a size of 0 makes an empty shard. ``owner`` is set for
    rank-local tensors (stored per rank, never deduplicated across ranks).
    """

    key: KeyPath
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    owner: int | None = None


@dataclass(frozen=True, slots=True)
class RankDescription:
    """Everything the coordinator needs from one rank to plan a save."""

    rank: int
    tensors: tuple[TensorDesc, ...]

    def to_msgpack(self) -> bytes:
        """Compact, deterministic encoding (the rank travels in the message header)."""
        rows = [[t.key, t.dtype, t.shape, t.offsets, t.sizes, t.owner] for t in self.tensors]
        return msgpack.packb([_WIRE_VERSION, rows], use_bin_type=True)

    def digest(self) -> int:
        """xxh3-64 of :meth:`to_msgpack`; equal digests mean an unchanged description."""
        return xxhash.xxh3_64_intdigest(self.to_msgpack())

    @classmethod
    def from_msgpack(cls, data: bytes, rank: int) -> RankDescription:
        """Decode and validate a description received from ``rank``.

        Raises:
            WireError: on anything malformed, naming the tensor row and field;
                never any other exception type.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f"rank {rank}: description must be bytes, got {type(data).__name__}")
        with _gc_paused():
            try:
                obj = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
            except Exception as e:  # msgpack raises a zoo of types on garbage
                raise WireError(f"rank {rank}: description is not valid msgpack ({type(e).__name__}: {e})") from e
            if not (type(obj) is tuple and len(obj) == 2 and type(obj[1]) is tuple):
                raise WireError(f"rank {rank}: description must be [version, rows]")
            if type(obj[0]) is not int or obj[0] != _WIRE_VERSION:
                raise WireError(f"rank {rank}: unsupported description version {obj[0]!r}")
            tensors = _parse_rows_fast(obj[1], rank)
            if tensors is None:  # something is off: the row-by-row parser names it
                tensors = tuple(_parse_row(row, i, rank) for i, row in enumerate(obj[1]))
            return cls(rank, tensors)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while millions of small acyclic objects are built.

    Otherwise it rescans every live object again and again (msgpack gives the
    same advice for big messages): decoding measured 10x slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _only(values: Iterable[Any], *types: type) -> bool:
    """Every value's exact type is one of ``types`` (``bool`` is not ``int``)."""
    return set(map(type, values)) <= set(types)


def _parse_rows_fast(rows: list, rank: int) -> tuple[TensorDesc, ...] | None:
    """Column-wise validation of the rows; ``None`` when any row may be invalid.

    Accepts only what :func:`_parse_row` accepts (that one decides and
    explains every doubtful case) and is several times faster: the
    coordinator decodes one description per rank.
    """
    if not rows:
        return ()
    if not _only(rows, tuple) or set(map(len, rows)) != {6}:
        return None
    keys, dtypes, shapes, offs, sizs, owners = zip(*rows)
    if not (_only(keys, tuple) and _only(chain.from_iterable(keys), str, int) and _only(dtypes, str) and _only(owners, type(None), int)):
        return None
    if not (all(map(is_dtype_name, set(dtypes))) and set(owners) <= {None, rank} and _only(chain(shapes, offs, sizs), tuple)):
        return None
    lens = np.fromiter(map(len, shapes), np.int64, len(rows))
    if (lens > _MAX_NDIM).any() or list(map(len, offs)) != lens.tolist() or list(map(len, sizs)) != lens.tolist():
        return None
    flat = [list(chain.from_iterable(c)) for c in (shapes, offs, sizs)]
    if not _only(chain.from_iterable(flat), int):
        return None
    try:
        shp, off, siz = (np.array(f, dtype=np.int64) for f in flat)
    except OverflowError:
        return None
    if any(((a < 0) | (a >= _MAX_INT)).any() for a in (shp, off, siz)) or (off + siz > shp).any():
        return None
    rows_of = np.repeat(np.arange(len(rows)), lens)
    numel = np.ones(len(rows))
    np.multiply.at(numel, rows_of, shp.astype(np.float64))
    if (numel * 16 >= _MAX_INT / 4).any():  # near the limit: let the exact check decide
        return None
    return tuple(map(TensorDesc, keys, dtypes, shapes, offs, sizs, owners))


def _ints(v: Any, what: str, where: str) -> tuple[int, ...]:
    if type(v) is not tuple or len(v) > _MAX_NDIM:
        raise WireError(f"{where}: {what} must be a list of at most {_MAX_NDIM} ints")
    for x in v:
        if type(x) is not int or not 0 <= x < _MAX_INT:
            raise WireError(f"{where}: {what} must hold non-negative ints below 2**62, got {x!r}")
    return v


def _parse_row(row: Any, i: int, rank: int) -> TensorDesc:
    where = f"rank {rank}: tensor #{i}"
    if type(row) is not tuple or len(row) != 6:
        raise WireError(f"{where}: must be [key, dtype, shape, offsets, sizes, owner]")
    key, dtype, shape, offsets, sizes, owner = row
    if type(key) is not tuple or not _only(key, str, int):
        raise WireError(f"{where}: key path must be a list of str and int")
    where = f"rank {rank}: tensor {format_path(key)}"
    if not is_dtype_name(dtype):
        raise WireError(f"{where}: unknown dtype {dtype!r}")
    shape_t, off_t, siz_t = (_ints(v, n, where) for v, n in ((shape, "shape"), (offsets, "offsets"), (sizes, "sizes")))
    if not len(shape_t) == len(off_t) == len(siz_t):
        raise WireError(f"{where}: shape {list(shape_t)}, offsets {list(off_t)} and sizes {list(siz_t)} differ in length")
    if any(o + s > d for o, s, d in zip(off_t, siz_t, shape_t)):
        raise WireError(f"{where}: box at offsets {list(off_t)} sizes {list(siz_t)} lies outside shape {list(shape_t)}")
    if math.prod(shape_t) * 16 >= _MAX_INT:
        raise WireError(f"{where}: shape {list(shape_t)} is too large")
    if owner is not None and (type(owner) is not int or owner != rank):
        raise WireError(f"{where}: owner must be None or this rank ({rank}), got {owner!r}")
    return TensorDesc(key, dtype, shape_t, off_t, siz_t, owner)


@dataclass(frozen=True)
class SavePlan:
    """Who writes what: ``writes[rank]`` indexes that rank's ``description.tensors``."""

    writes: dict[int, tuple[int, ...]]
    bytes_per_rank: dict[int, int]

    def to_msgpack_for(self, rank: int) -> bytes:
        """The plan of one rank, as sent in the coordinator's reply."""
        return msgpack.packb(list(self.writes.get(rank, ())), use_bin_type=True)

    @staticmethod
    def parse_rank_plan(data: bytes, n_tensors: int) -> tuple[int, ...]:
        """Decode one rank's plan: strictly increasing indices below ``n_tensors``.

        Raises:
            WireError: on anything else.
        """
        try:
            obj = msgpack.unpackb(data, raw=False, use_list=True, max_bin_len=0, max_ext_len=0, max_map_len=0)
        except Exception as e:
            raise WireError(f"save plan is not valid msgpack ({type(e).__name__}: {e})") from e
        if type(obj) is not list or not _only(obj, int):
            raise WireError("save plan must be a list of tensor indices")
        if obj and (obj[0] < 0 or obj[-1] >= n_tensors or any(a >= b for a, b in zip(obj, obj[1:]))):
            raise WireError(f"save plan indices must be strictly increasing within [0, {n_tensors}), got {obj[:8]}{'...' if len(obj) > 8 else ''}")
        return tuple(obj)


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


class _Table:
    """Every described tensor of every rank as flat columns (one row per TensorDesc).

    Groups are global keys, or ``(key, owner)`` pairs for rank-local tensors;
    metas are distinct ``(dtype, shape)`` pairs, both numbered in order of
    first appearance. Built with C-level ``map`` calls: the coordinator may
    gather millions of descriptions.
    """

    def __init__(self, descs: Sequence[RankDescription]) -> None:
        self.descs = descs
        self.groups: dict[tuple[KeyPath, int | None], int] = {}
        self.metas: dict[tuple[str, tuple[int, ...]], int] = {}
        self.group_first: list[int] = []  # first row of each group
        cols: list[list[np.ndarray]] = [[], [], [], []]  # gid, meta, rank, index
        self.offsets: list[tuple[int, ...]] = []
        self.sizes: list[tuple[int, ...]] = []
        for d in descs:
            ts = d.tensors
            cols[0].append(self._ids(self.groups, list(map(_KEY_OWNER, ts)), len(self.offsets), self.group_first))
            cols[1].append(self._ids(self.metas, list(map(_DTYPE_SHAPE, ts)), len(self.offsets), []))
            cols[2].append(np.full(len(ts), d.rank, dtype=np.int64))
            cols[3].append(np.arange(len(ts), dtype=np.int64))
            self.offsets.extend(map(_OFFSETS, ts))
            self.sizes.extend(map(_SIZES, ts))
        self.gid, self.meta, self.rank, self.idx = (np.concatenate(c) if c else np.zeros(0, np.int64) for c in cols)
        self.meta_ndim = np.fromiter((len(s) for _, s in self.metas), np.int64, len(self.metas))
        self.group_meta = self.meta[self.group_first]

    @staticmethod
    def _ids(table: dict, items: list, base: int, firsts: list[int]) -> np.ndarray:
        ids = list(map(table.get, items))
        if None in ids:  # first sight of some item: number it and remember its row
            for j, k in enumerate(items):
                if k not in table:
                    table[k] = len(table)
                    firsts.append(base + j)
            ids = list(map(table.__getitem__, items))
        return np.array(ids, dtype=np.int64)

    def member(self, row: int) -> tuple[int, TensorDesc]:
        """``(rank, desc)`` of one row (error paths)."""
        d = self.descs[int(np.searchsorted([d.rank for d in self.descs], self.rank[row]))]
        return d.rank, d.tensors[int(self.idx[row])]

    def boxes(self, rows: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, sizes)`` of ``rows``, all of ``ndim`` dims, as ``(n, ndim)`` arrays."""
        sel = rows.tolist()
        off = np.fromiter(chain.from_iterable(map(self.offsets.__getitem__, sel)), np.int64, len(sel) * ndim)
        siz = np.fromiter(chain.from_iterable(map(self.sizes.__getitem__, sel)), np.int64, len(sel) * ndim)
        return off.reshape(len(sel), ndim), siz.reshape(len(sel), ndim)


_KEY_OWNER = attrgetter("key", "owner")
_DTYPE_SHAPE = attrgetter("dtype", "shape")
_OFFSETS = attrgetter("offsets")
_SIZES = attrgetter("sizes")


def plan_save(descs: Sequence[RankDescription]) -> SavePlan:
    """Deduplicate identical boxes, check coverage and assign every box a writer.

    Each non-empty box of a global tensor is written once, by one of its
    holders: boxes held by one rank go to it, replicated boxes are assigned
    greedily (biggest first, to the least-loaded holder, lowest rank on ties)
    to balance bytes. Rank-local tensors are written by their owner.

    Raises:
        PlanError: duplicate ranks; a key that disagrees on dtype or shape
            across ranks, is both global and rank-local, or whose boxes do
            not tile its shape exactly once.
    """
    with _gc_paused():
        return _plan_save(sorted(descs, key=lambda d: d.rank))


def _plan_save(descs: list[RankDescription]) -> SavePlan:
    ranks = np.array([d.rank for d in descs], dtype=np.int64)
    if len(np.unique(ranks)) != len(ranks):
        raise PlanError(f"duplicate rank descriptions: {_fmt_ranks(ranks[1:][ranks[1:] == ranks[:-1]])}")
    tab = _Table(descs)
    _check_table(tab)
    parts = [_unique_boxes(tab, ndim) for ndim in np.unique(tab.meta_ndim).tolist()]
    u_gid, u_nbytes, u_count, h_rank, h_idx = (np.concatenate([p[i] for p in parts] + [np.zeros(0, np.int64)]) for i in range(5))
    u_start = np.cumsum(u_count) - u_count  # holders of box u: rows u_start[u] : u_start[u] + u_count[u]
    choice = u_start.copy()
    shared = u_count > 1
    load = np.zeros(len(ranks), dtype=np.int64)
    np.add.at(load, np.searchsorted(ranks, h_rank[choice[~shared]]), u_nbytes[~shared])
    loads, h_pos = load.tolist(), np.searchsorted(ranks, h_rank).tolist()
    order = np.lexsort((u_gid, -u_nbytes))  # biggest first; ties in key order, then box order
    for u in order[shared[order]].tolist():
        s = int(u_start[u])
        _, k = min(zip(map(loads.__getitem__, h_pos[s : s + u_count[u]]), range(s, s + u_count[u])))  # ties: lowest rank
        loads[h_pos[k]] += int(u_nbytes[u])
        choice[u] = k
    w_rank, w_idx = h_rank[choice], h_idx[choice]
    order = np.lexsort((w_idx, w_rank))
    w_rank, w_idx = w_rank[order], w_idx[order]
    bounds = np.searchsorted(w_rank, ranks).tolist() + [len(w_rank)]
    writes = {r: tuple(w_idx[bounds[p] : bounds[p + 1]].tolist()) for p, r in enumerate(ranks.tolist())}
    return SavePlan(writes, dict(zip(ranks.tolist(), loads)))


def _check_table(tab: _Table) -> None:
    """Per key: one dtype and shape, boxes of its rank, owner the describing rank, known dtype."""
    bad = np.flatnonzero(tab.meta != tab.group_meta[tab.gid])
    if len(bad):
        _raise_disagreement(tab, int(tab.gid[bad[0]]))
    lens = np.fromiter(chain(map(len, tab.offsets), map(len, tab.sizes)), np.int64, 2 * len(tab.gid)).reshape(2, -1)
    bad = np.flatnonzero((lens != tab.meta_ndim[tab.meta]).any(axis=0))
    if len(bad):
        r, t = tab.member(int(bad[0]))
        raise PlanError(f"tensor {format_path(t.key)} on rank {r}: box offsets {list(t.offsets)} sizes {list(t.sizes)} do not match shape {list(t.shape)}", t.key, [r])
    local = np.array([o is not None for _, o in tab.groups], dtype=bool)
    owner = np.array([o or 0 for _, o in tab.groups], dtype=np.int64)
    bad = np.flatnonzero(local[tab.gid] & (owner[tab.gid] != tab.rank))
    if len(bad):
        r, t = tab.member(int(bad[0]))
        raise PlanError(f"tensor {format_path(t.key)} described by rank {r} is owned by rank {t.owner}", t.key, [r, t.owner])
    global_keys = {k for k, o in tab.groups if o is None}
    for key, owner_ in tab.groups:
        if owner_ is not None and key in global_keys:
            rows = tab.gid == tab.groups[(key, None)]
            raise PlanError(f"tensor {format_path(key)} is rank-local on rank {owner_} but global on {_fmt_ranks(tab.rank[rows])}", key, [owner_])
    for (dtype, _), m in tab.metas.items():
        if not is_dtype_name(dtype):
            rows = np.flatnonzero(tab.meta == m)
            key = tab.member(int(rows[0]))[1].key
            raise PlanError(f"tensor {format_path(key)} has unknown dtype {dtype!r} on {_fmt_ranks(tab.rank[rows])}", key, np.unique(tab.rank[rows]).tolist())


def _raise_disagreement(tab: _Table, gid: int) -> None:
    rows = np.flatnonzero(tab.gid == gid)
    metas = list(tab.metas)
    by_meta: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for row in rows.tolist():
        by_meta.setdefault(metas[int(tab.meta[row])], []).append(int(tab.rank[row]))
    key = list(tab.groups)[gid][0]
    parts = [f"{_fmt_ranks(rs)} hold{'s' if len(set(rs)) == 1 else ''} dtype {dt} shape {list(sh)}" for (dt, sh), rs in by_meta.items()]
    raise PlanError(f"tensor {format_path(key)} disagrees across ranks: " + "; ".join(parts), key, np.unique(tab.rank[rows]).tolist())


def _unique_boxes(tab: _Table, ndim: int) -> tuple[np.ndarray, ...]:
    """Dedup the non-empty boxes of every tensor with ``ndim`` dims; check each tensor is tiled.

    Returns per unique box ``(gid, nbytes, holder count)``, ordered by key
    then box, and per holder ``(rank, index)``, grouped by box, by rank.
    """
    rows = np.flatnonzero(tab.meta_ndim[tab.meta] == ndim)
    off, siz = tab.boxes(rows, ndim)
    keep = (siz != 0).all(axis=1)  # empty boxes cover nothing; negative ones stay for the cover check
    gid, rank, idx, off, siz = tab.gid[rows[keep]], tab.rank[rows[keep]], tab.idx[rows[keep]], off[keep], siz[keep]
    order = np.lexsort((*siz.T[::-1], *off.T[::-1], gid))  # stable: ties stay in (rank, index) order
    gid, rank, idx, off, siz = gid[order], rank[order], idx[order], off[order], siz[order]
    new_box = np.ones(len(gid), dtype=bool)
    new_box[1:] = (gid[1:] != gid[:-1]) | (off[1:] != off[:-1]).any(axis=1) | (siz[1:] != siz[:-1]).any(axis=1)
    keep = new_box.copy()
    keep[1:] |= rank[1:] != rank[:-1]  # a rank holding one box twice writes it once
    gid, rank, idx, off, siz, new_box = gid[keep], rank[keep], idx[keep], off[keep], siz[keep], new_box[keep]
    start = np.flatnonzero(new_box)
    count = np.diff(np.append(start, len(gid)))
    groups = np.flatnonzero(tab.meta_ndim[tab.group_meta] == ndim)
    _check_cover(tab, groups, gid[start], off[start], siz[start], lambda u: rank[start[u] : start[u] + count[u]])
    isz = np.array([itemsize(dtype) for dtype, _ in tab.metas], dtype=np.int64)[tab.group_meta]
    return gid[start], box_volume(siz[start]) * isz[gid[start]], count, rank, idx


def _check_cover(tab: _Table, groups: np.ndarray, u_gid: np.ndarray, u_off: np.ndarray, u_siz: np.ndarray, holders: Callable[[int], np.ndarray]) -> None:
    """The unique boxes of each group tile its shape exactly once; ``holders(u)`` are the ranks of box ``u``."""
    metas, keys = list(tab.metas), list(tab.groups)
    los, his = np.searchsorted(u_gid, groups, side="left").tolist(), np.searchsorted(u_gid, groups, side="right").tolist()
    for g, lo, hi in zip(groups.tolist(), los, his):
        shape = metas[int(tab.group_meta[g])][1]
        if hi - lo == 1 and u_siz[lo].tolist() == list(shape) and not u_off[lo].any():  # one full box: the common case
            continue
        problem = cover_problem(shape, u_off[lo:hi], u_siz[lo:hi])
        if problem is not None:
            overlap = _overlapping_ranks(u_off[lo:hi], u_siz[lo:hi], [holders(u) for u in range(lo, hi)]) if "overlap" in problem else None
            involved = overlap if overlap is not None else tab.rank[tab.gid == g]
            key = keys[g][0]
            raise PlanError(f"tensor {format_path(key)} (shape {list(shape)}): {problem}; boxes from {_fmt_ranks(involved)}", key, np.unique(involved).tolist())


def _overlapping_ranks(off: np.ndarray, siz: np.ndarray, holders: list[np.ndarray]) -> np.ndarray | None:
    """Holders of the first pair of distinct boxes that overlap (error path only)."""
    hi = off + siz
    for a in range(len(off)):
        hit = (np.minimum(hi[a], hi[a + 1 :]) > np.maximum(off[a], off[a + 1 :])).all(axis=1)
        if hit.any():
            return np.concatenate([holders[a], holders[a + 1 + int(np.flatnonzero(hit)[0])]])
    return None


# --------------------------------------------------------------------------- load side


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
    hits = np.flatnonzero((hi > lo).all(axis=1) & (c_siz > 0).all(axis=1))
    ops = [
        _read_op(int(c), int(chunk_files[c]), int(chunk_file_offsets[c]), itemsize, c_siz[c], lo[c] - c_off[c], hi[c] - lo[c], lo[c] - t_off)
        for c in hits
    ]
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
