"""Format version 2 seen as version 1: an index and its fragments as a :class:`~dist_ckpt.manifest.Manifest`, and back.

:func:`materialize` builds the v1-equivalent manifest (chunk tables per
tensor) from an index and the fragments read, whole or for the cells a load
needs; :func:`skeleton` is the same without chunk rows (a load fills them
once its targets are known); :func:`from_manifest` turns a v1 manifest into
an index and per-rank fragment bytes (``convert --format-version 2``).
The decoding and checks they rely on are in :mod:`dist_ckpt.manifest_v2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn

import numpy as np
import xxhash

from .errors import FragmentError, ManifestError
from .layout_names import MANIFEST, fragment_name
from .manifest import ChunkTable, LocalSection, Manifest, TensorEntry, block_counts
from .manifest_v2 import _COLS, VERSION, Fragment, FragmentRef, Index, IndexEntry, _entry_name, _rank_or, plain_name
from .split import Split, detect_split

__all__ = ["from_manifest", "materialize", "segment_index", "skeleton"]


# -- materialising a v1-equivalent Manifest ---------------------------------------------------


def segment_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    counts = np.asarray(counts, np.int64)
    if not len(counts):
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts) + np.arange(int(ends[-1]), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class _Records:
    """Every record of the fragments read, sorted by (entry, cell)."""

    entry: np.ndarray
    cell: np.ndarray
    file: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    xxh3: np.ndarray
    blocks: np.ndarray | None
    block_start: np.ndarray | None  # per record, where its block sums start in ``blocks``
    block_bytes: int

    @staticmethod
    def of(fragments: Mapping[int, Fragment]) -> "_Records":
        frags = [f for _, f in sorted(fragments.items())]
        cols = {name: np.concatenate([np.zeros(0, dt[1:])] + [getattr(f, name) for f in frags]) for name, dt in _COLS}
        sizes = {f.block_bytes for f in frags if f.blocks is not None}
        blocks = start = None
        if frags and len(sizes) == 1 and all(f.blocks is not None for f in frags):  # else: no block sums (as a v1 table without them)
            bases = np.cumsum([0] + [len(f.blocks) for f in frags[:-1] if f.blocks is not None])
            start = np.concatenate([f.block_starts[:-1] + b for f, b in zip(frags, bases)])
            blocks = np.concatenate([f.blocks for f in frags])  # type: ignore[misc]
        order = np.lexsort((cols["cell"], cols["entry"]))
        cols = {k: v[order] for k, v in cols.items()}
        return _Records(**cols, blocks=blocks, block_start=None if start is None else start[order], block_bytes=sizes.pop() if blocks is not None else 0)

    def tables(self, index: Index, rows: np.ndarray, seg: np.ndarray) -> list[ChunkTable]:
        """Every entry's chunk table: entry ``e``'s are records ``rows[seg[e]:seg[e + 1]]`` (ascending cell).

        The boxes are computed once per split class and the columns gathered once, then sliced per
        entry: the per-tensor work is a few slices, not a few numpy calls.
        """
        classes, splits = index.split_classes
        cls = classes[self.entry[rows]]
        pos = np.empty(len(rows), np.int64)  # each row's place among its class's rows
        boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        by_class = np.argsort(cls, kind="stable")
        bounds = np.flatnonzero(np.concatenate([[True], cls[by_class][1:] != cls[by_class][:-1], [True]])) if len(rows) else np.zeros(1, np.int64)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            k = by_class[a:b]
            pos[k] = np.arange(b - a)
            boxes[int(cls[k[0]])] = splits[int(cls[k[0]])].cell_boxes(self.cell[rows[k]])
        file, offset, nbytes, xxh3 = self.file[rows], self.offset[rows], self.nbytes[rows], self.xxh3[rows]
        blocks = bcum = None
        if self.blocks is not None and self.block_start is not None:
            counts = block_counts(nbytes, self.block_bytes)
            blocks, bcum = self.blocks[segment_index(self.block_start[rows], counts)], np.concatenate([[0], np.cumsum(counts)]).tolist()
        seg_l, first = seg.tolist(), pos[np.minimum(seg[:-1], max(len(rows) - 1, 0))].tolist() if len(rows) else [0] * (len(seg) - 1)
        out = []
        for e, (_, _, entry) in enumerate(index.entries):
            a, b = seg_l[e], seg_l[e + 1]
            if a == b:
                out.append(ChunkTable.empty(len(entry.shape)))
                continue
            off, siz = boxes[int(classes[e])]
            p, q = first[e], first[e] + b - a
            extra: tuple[Any, int] = (None, 0) if blocks is None or bcum is None else (blocks[bcum[a] : bcum[b]], self.block_bytes)
            out.append(ChunkTable(off[p:q], siz[p:q], file[a:b], offset[a:b], nbytes[a:b], xxh3[a:b], *extra))
        return out


def materialize(index: Index, fragments: Mapping[int, Fragment], cells: Mapping[int, np.ndarray] | None = None) -> Manifest:
    """The v1-equivalent :class:`Manifest` of an index and its (decoded, checked) fragments.

    Args:
        cells: None: every entry, whose every cell must be in ``fragments``. Otherwise
            ``{entry number: ascending cells}``: only those rows are built (every other
            entry gets an empty table), for a load that reads only what its targets touch.

    Raises:
        FragmentError: a needed cell is in none of the fragments (names its owner's fragment and the key).
    """
    rec = _Records.of(fragments)
    starts = np.searchsorted(rec.entry, np.arange(len(index.entries) + 1))
    if cells is None:  # every cell: the records' cells are sorted, unique and below ncells, so all iff as many
        bounds = starts.tolist()
        for e, (_, _, entry) in enumerate(index.entries):
            a, b, split = bounds[e], bounds[e + 1], entry.split
            if b - a != split.ncells:  # (never allocates per cell: a crafted split may claim 2**40 of them)
                gap = np.flatnonzero(rec.cell[a:b] != np.arange(b - a))
                _missing(index, e, split, np.array([gap[0] if len(gap) else b - a]))
        return _assemble(index, rec.tables(index, np.arange(len(rec.entry)), starts))
    ents = np.array(sorted(e for e, c in cells.items() if len(c)), np.int64)
    want_e = np.repeat(ents, [len(cells[e]) for e in ents.tolist()])
    want = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(cells[e], np.int64) for e in ents.tolist()])
    at = _lower_bound(rec.cell, starts[want_e], starts[want_e + 1], want)
    found = at < starts[want_e + 1]
    found[found] &= rec.cell[at[found]] == want[found]
    if not found.all():  # the lowest entry with a missing cell, as the first entry its loop would meet
        e = int(want_e[int(np.argmin(found))])
        _missing(index, e, index.entries[e][2].split, want[(want_e == e) & ~found])
    return _assemble(index, rec.tables(index, at, np.searchsorted(want_e, np.arange(len(index.entries) + 1))))


def _lower_bound(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per query ``i``, the first position in ``values[lo[i]:hi[i]]`` (ascending) not below ``x[i]``: all queries at once."""
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    last = max(len(values) - 1, 0)
    while True:
        live = lo < hi
        if not live.any():
            return lo
        mid = (lo + hi) // 2
        below = live & (values[np.minimum(mid, last)] < x) if len(values) else np.zeros(len(lo), bool)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(live & ~below, mid, hi)


def _missing(index: Index, e: int, split: Split, cells: np.ndarray) -> NoReturn:
    c = int(cells[0]) if len(cells) else 0
    owner = int(split.owner(np.array([c]))[0]) if split.ncells else 0
    ref = index.fragments[owner] if owner < len(index.fragments) else None
    name = ref.name if ref is not None else f"{fragment_name(owner)} (none listed in {MANIFEST})"
    raise FragmentError(f"cell {c} of {_entry_name(index, e)} is missing: its writer rank {owner}'s fragment {name} does not hold it")


def _assemble(index: Index, tables: list[ChunkTable]) -> Manifest:
    entries = [TensorEntry(e.dtype, e.shape, t) for (_, _, e), t in zip(index.entries, tables)]
    n_global = len(index.tensors)
    tensors = dict(zip(index.tensors, entries[:n_global]))
    local, at = {}, n_global
    for r, (lt, objs) in index.local.items():
        local[r] = LocalSection(dict(zip(lt, entries[at : at + len(lt)])), objs)
        at += len(lt)
    return Manifest(
        world_size=index.world_size,
        files=index.files,
        tensors=tensors,
        objects=index.objects,
        structure=index.structure,
        local=local,
        user_meta=index.user_meta,
        created=index.created,
        version=VERSION,
        fragments=index.fragments,
    )


def skeleton(index: Index) -> Manifest:
    """The index as a :class:`Manifest` whose tables are all empty: dtypes, shapes, keys and objects only."""
    return _assemble(index, [ChunkTable.empty(len(e.shape)) for _, _, e in index.entries])


# -- v1 -> v2 --------------------------------------------------------------------------


def from_manifest(m: Manifest, name: Callable[[str], str] = lambda n: n) -> tuple[Index, dict[int, bytes]]:
    """A v1 :class:`Manifest` as an index and its encoded fragments (conversion, tests).

    Each chunk's writer is the rank its data file's name carries; ``world_size``
    grows to cover every such rank (a conversion's writer batches). ``name``
    maps a fragment's plain name to the stored one (``Storage.stored_name``).

    Returns:
        ``(index, {rank: fragment bytes})``; the index's fragment refs match the bytes.

    Raises:
        ManifestError: a data file's name does not say which rank wrote it.
    """
    ranks = np.array([_rank_or(f, -1) for f in m.files], np.int64)
    if (ranks < 0).any():
        raise ManifestError(f"data file {m.files[int(np.flatnonzero(ranks < 0)[0])]!r} does not name the rank that wrote it; v2 needs one")
    ws = max([m.world_size] + [int(ranks.max()) + 1 if len(ranks) else 0])
    sources = [(None, k, e) for k, e in m.tensors.items()] + [(r, k, e) for r, s in m.local.items() for k, e in s.tensors.items()]
    cols: dict[int, list[tuple]] = {}
    splits = []
    for number, (_, _, e) in enumerate(sources):
        c = e.chunks
        split, cell = detect_split(e.shape, c.offsets, c.sizes, ranks[c.file] if len(c) else np.zeros(0, np.int64))
        splits.append(split)
        keep = np.flatnonzero(cell >= 0)
        counts = block_counts(c.nbytes[keep], c.block_bytes) if c.blocks is not None else None
        blk = c.blocks[segment_index(c.block_starts[keep], counts)] if c.blocks is not None and counts is not None else None
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts is not None else None
        owner = ranks[c.file[keep]]
        for r in np.unique(owner).tolist():
            sel = owner == r
            rb = blk[segment_index(first[sel], counts[sel])] if blk is not None else None  # type: ignore[index]
            cols.setdefault(r, []).append(
                (number, cell[keep][sel], c.file[keep][sel], c.offset[keep][sel], c.nbytes[keep][sel], c.xxh3[keep][sel], rb, c.block_bytes)
            )
    frags = {r: _fragment(r, rows, m.files) for r, rows in cols.items()}
    data = {r: f.to_msgpack() for r, f in frags.items()}
    refs = tuple(FragmentRef(name(fragment_name(r)), len(data[r]), xxhash.xxh3_64_intdigest(data[r])) if r in data else None for r in range(ws))
    entries = iter(IndexEntry(e.dtype, e.shape, s) for (_, _, e), s in zip(sources, splits))
    tensors = {k: next(entries) for k in m.tensors}
    local = {r: ({k: next(entries) for k in s.tensors}, s.objects) for r, s in m.local.items()}
    return Index(ws, m.files, refs, tensors, m.objects, m.structure, local, m.user_meta, m.created), data


def _fragment(rank: int, rows: list[tuple], files: tuple[str, ...]) -> Fragment:
    """Rank ``rank``'s fragment from its rows; record file indices (into ``files``) become indices into its own file list."""
    with_blocks = all(r[6] is not None for r in rows) and len({r[7] for r in rows}) == 1
    entry, cell, file, offset, nbytes, xxh3 = (np.concatenate([np.full(len(r[1]), r[0], np.int32) for r in rows]),) + tuple(
        np.concatenate([r[i] for r in rows]) for i in range(1, 6)
    )
    used, local = np.unique(file, return_inverse=True)
    blocks = np.concatenate([r[6] for r in rows]) if with_blocks else None
    own = tuple(plain_name(files[i]) for i in used.tolist())
    return Fragment(rank, entry, cell, local.astype(np.int32), offset, nbytes, xxh3, blocks=blocks, block_bytes=rows[0][7] if with_blocks else 0, files=own)
