"""Writing format version 2: the cells each rank writes (from the plan), its fragment, and the coordinator's index.

Three steps, each on its side of the wire:

1. (coordinator, once per plan) :func:`plan_cells`: per manifest entry the
   :class:`~dist_ckpt.split.Split` of the boxes the plan assigns, and per group the
   spec its ranks derive their (entry, cell)s from (:mod:`dist_ckpt.reply_v2`; nothing
   per chunk travels or is kept, but the cells of splits no rank can derive).
2. (each rank, after its data is written) :func:`write_fragment`: its records as
   a fragment through the same storage stream as its data (fsync'd), and the
   Done payload naming it (:func:`encode_fragment_report`, checked by
   :func:`decode_fragment_report`): name, size, xxh3 and the rank's data file names.
3. (coordinator, at commit) :func:`build_index`: the index from the plan's
   splits and the reports; no chunk table is built or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, cast

import msgpack
import numpy as np
import xxhash

from .errors import CheckpointError, WireError
from .layout_names import DATA_FILE_RE, FRAGMENT_RE, fragment_name
from .manifest import BLOCK_BYTES
from .manifest_v2 import MAX_FRAGMENT_BYTES, Fragment, FragmentRef, Index, IndexEntry
from .plan import PlanGroup, SavePlan, blocks
from .reply_v2 import GroupSpec, group_spec, spec_kind
from .split import ColumnMemo, Split, detect_columns, detect_split
from .storage import SaveTarget, Storage
from .writer import WriteRecord

__all__ = ["FragmentReport", "PlanCells", "build_index", "decode_fragment_report", "encode_fragment_report", "plan_cells", "write_fragment"]


@dataclass(frozen=True, eq=False)
class PlanCells:
    """Per manifest entry its split; per plan group the spec its ranks derive their (entry, cell)s from.

    Nothing per chunk: a rank finds its cells from its own boxes and its group's
    :class:`~dist_ckpt.reply_v2.GroupSpec` (packed once per group, the same bytes
    in every reply of the group); only the cells of splits a rank cannot derive
    (kind 1: uneven boundaries, explicit boxes, owners that are no formula) are
    kept here, one int per written chunk of those.
    """

    splits: list[Split]
    specs: tuple[GroupSpec, ...]  # per group
    blobs: tuple[bytes, ...]  # per group: its spec's wire form
    explicit_cols: tuple[np.ndarray, ...]  # per group: its kind-1 columns, ascending
    explicit: tuple[np.ndarray, ...]  # per group: (R, len(explicit_cols)) int64, the cell of each written kind-1 box (-1 elsewhere)

    def for_rank(self, plan: SavePlan, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(entries, cells)`` of the tensors ``rank`` writes, ascending tensor order (empty if it took no part).

        What the rank derives from its reply (:func:`dist_ckpt.reply_v2.derive_cells`), computed here from the
        owners' formula instead of the rank's boxes.
        """
        where = plan.where(rank)
        if where is None:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        gi, row = where
        g, spec = plan.groups[gi], self.specs[gi]
        cols = np.flatnonzero(g.writes[row])
        code, kind, a, b = spec.code[cols], spec.kind[cols], spec.a[cols], spec.b[cols]
        entries = np.where(code >= 0, code, self.local_first(g, row) - 1 - code).astype(np.int32)
        cells = np.where((code >= 0) & (b != 0), (rank - a) // np.where(b != 0, b, 1), 0)
        cells[kind == 1] = self._explicit(gi, row, g)
        return entries, cells.astype(np.int64)

    @staticmethod
    def local_first(g: PlanGroup, row: int) -> int:
        """The entry of row ``row``'s first rank-local tensor."""
        return g.local_base + row * len(g.local_keys)

    def _explicit(self, gi: int, row: int, g: PlanGroup) -> np.ndarray:
        return self.explicit[gi][row, g.writes[row, self.explicit_cols[gi]]]

    def reply_key(self, plan: SavePlan, rank: int) -> tuple[int, bytes, int, bytes] | None:
        """What :meth:`reply` ``(plan, rank)`` depends on: ranks with equal keys get the same bytes (an FSDP
        group's ranks, whose bitmaps agree and who have no rank-local or explicit cells). ``None``: no part."""
        where, base = plan.where(rank), plan.reply_key(rank)
        if where is None or base is None:
            return None
        gi, row = where
        g = plan.groups[gi]
        explicit = self._explicit(gi, row, g).tobytes() if len(self.explicit_cols[gi]) else b""
        return gi, base[1], self.local_first(g, row) if g.local_keys else 0, explicit

    def reply(self, plan: SavePlan, rank: int) -> bytes:
        """The PlanReply payload of ``rank``: :meth:`SavePlan.to_msgpack_for` with its group's spec."""
        where = plan.where(rank)
        if where is None:
            return plan.to_msgpack_for(rank, spec=(0, b"", b""))
        gi, row = where
        g = plan.groups[gi]
        return plan.to_msgpack_for(rank, spec=(self.local_first(g, row), self._explicit(gi, row, g).astype("<i8").tobytes(), self.blobs[gi]))


def plan_cells(plan: SavePlan) -> PlanCells:
    """Split every entry of ``plan`` from its groups' boxes (one :func:`~dist_ckpt.split.detect_split` per distinct split).

    No :class:`~dist_ckpt.plan.ChunkLayout` is built: an entry's boxes are gathered
    from the boxes matrix of each group that writes it (group, then row order, as the
    layout orders them), and the plan's boxes are released afterwards, as building
    the layout does (format version 2 needs neither again). Per group, the spec of
    its replies (:func:`~dist_ckpt.reply_v2.group_spec`).
    """
    from .commit import entry_names  # commit imports this module for the commit itself

    assert plan.boxes is not None, "a plan's splits need the boxes it was made from"
    parts = _entry_parts(plan)
    col_split: list[list[Split | None]] = [[None] * g.writes.shape[1] for g in plan.groups]
    mixed: set[tuple[int, int]] = set()  # rank-local columns whose entries' splits are not all one kind-0 grid
    explicit: list[dict[int, np.ndarray]] = [{} for _ in plan.groups]
    found: list[Split | None] = [None] * len(parts)
    for gi in range(len(plan.groups)):
        _fast_splits(plan, gi, parts, found, col_split, explicit)
    seen: dict[tuple, tuple[Split, np.ndarray]] = {}
    for e, ((owner, _, _, shape), where) in enumerate(zip(entry_names(plan), parts)):
        if found[e] is not None:
            continue
        off, siz, own = _entry_boxes(plan, plan.boxes, where, len(shape))
        key = (tuple(shape), xxhash.xxh3_128_intdigest(off.tobytes() + siz.tobytes() + own.tobytes()))
        if key not in seen:  # tensors of one shape in one schema share their boxes and writers: split them once
            seen[key] = detect_split(shape, off, siz, own)
        split, cells = seen[key]
        found[e] = split
        _note_columns(plan, where, split, cells, owner is not None, col_split, mixed, explicit)
    plan.boxes = None
    splits = cast(list[Split], found)  # every entry has its split now
    specs, blobs, ecols, edense = [], [], [], []
    for gi, g in enumerate(plan.groups):
        code = np.where(g.col_entry >= 0, g.col_entry, -1 - g.local_pos)
        per_col = [None if (gi, c) in mixed else sp for c, sp in enumerate(col_split[gi])]
        spec = group_spec(code, per_col, g.schema.start, g.schema.ndim, g.schema.width)
        cols = np.flatnonzero(spec.kind == 1)
        dense = np.full((len(g.ranks), len(cols)), -1, np.int64)
        for j, c in enumerate(cols.tolist()):
            if c in explicit[gi]:
                dense[:, j] = explicit[gi][c]
        specs.append(spec)
        blobs.append(spec.to_bytes())
        ecols.append(cols)
        edense.append(dense)
    return PlanCells(splits, tuple(specs), tuple(blobs), tuple(ecols), tuple(edense))


def _fast_splits(
    plan: SavePlan,
    gi: int,
    parts: list[list[tuple[int, int, np.ndarray]]],
    found: list[Split | None],
    col_split: list[list[Split | None]],
    explicit: list[dict[int, np.ndarray]],
) -> None:
    """The splits of group ``gi``'s global columns that only it writes, in the common layouts, a block of
    columns at a time (:func:`~dist_ckpt.split.detect_columns`); the others are left to :func:`detect_split`."""
    assert plan.boxes is not None
    g, sch = plan.groups[gi], plan.groups[gi].schema
    ent = g.col_entry.tolist()
    cand = np.array([c for c, e in enumerate(ent) if e >= 0 and len(parts[e]) == 1 and sch.numel[c] > 0 and sch.ndim[c] > 0], np.int64)
    memo = ColumnMemo()  # one group's rows: equal columns of later blocks are split once too
    for blk in blocks(len(cand)):
        cols = cand[blk]
        got = detect_columns([sch.shapes[c] for c in cols.tolist()], sch.start[cols], sch.width, plan.boxes[gi], g.writes[:, cols], g.ranks, memo)
        for c, split in zip(cols.tolist(), got):
            if split is None:
                continue
            found[ent[c]] = col_split[gi][c] = split
            if spec_kind(split):  # the writers, in row order, are the cells
                rows = parts[ent[c]][0][2]
                explicit[gi].setdefault(c, np.full(len(g.ranks), -1, np.int64))[rows] = np.arange(len(rows))


def _note_columns(
    plan: SavePlan,
    where: list[tuple[int, int, np.ndarray]],
    split: Split,
    cells: np.ndarray,
    local: bool,
    col_split: list[list[Split | None]],
    mixed: set[tuple[int, int]],
    explicit: list[dict[int, np.ndarray]],
) -> None:
    """Record an entry's split for each group column that writes it, and the cells its ranks cannot derive.

    A rank-local column has one entry per rank: their cells are kept too (one per rank), in case
    the column's entries turn out not to share one kind-0 grid (the spec then sends them explicitly).
    """
    a = 0
    for gi, col, rows in where:
        first = col_split[gi][col]
        if first is None:
            col_split[gi][col] = first = split
        elif spec_kind(split) or first.dims is None or split.dims is None or not _same_dims(first.dims, split.dims):
            mixed.add((gi, col))
        if spec_kind(split) or local:
            explicit[gi].setdefault(col, np.full(len(plan.groups[gi].ranks), -1, np.int64))[rows] = cells[a : a + len(rows)]
        a += len(rows)


def _same_dims(x: tuple, y: tuple) -> bool:
    return len(x) == len(y) and all(isinstance(p, int) and isinstance(q, int) and p == q for p, q in zip(x, y))


def _entry_parts(plan: SavePlan) -> list[list[tuple[int, int, np.ndarray]]]:
    """Per manifest entry, the ``(group, column, rows)`` that write it, in group order (rows ascending)."""
    n_entries = len(plan.keys) + sum(len(g.ranks) * len(g.local_keys) for g in plan.groups)
    parts: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(n_entries)]
    for gi, g in enumerate(plan.groups):
        for col in range(g.writes.shape[1]):
            rows = np.flatnonzero(g.writes[:, col])
            if g.col_entry[col] >= 0:
                parts[int(g.col_entry[col])].append((gi, col, rows))
                continue
            for row in rows.tolist():  # a rank-local tensor: an entry per rank
                parts[g.local_base + row * len(g.local_keys) + int(g.local_pos[col])].append((gi, col, np.array([row])))
    return parts


def _entry_boxes(plan: SavePlan, boxes: list[np.ndarray], where: list[tuple[int, int, np.ndarray]], nd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, sizes (``(n, nd)`` each) and writers of one entry's chunks, from its groups' boxes matrices."""
    if not where:
        return np.zeros((0, nd), np.int64), np.zeros((0, nd), np.int64), np.zeros(0, np.int64)
    offs, sizs, owns = [], [], []
    for gi, col, rows in where:
        g = plan.groups[gi]
        s, w = int(g.schema.start[col]), g.schema.width
        offs.append(boxes[gi][rows, s : s + nd])
        sizs.append(boxes[gi][rows, w + s : w + s + nd])
        owns.append(g.ranks[rows].astype(np.int64))
    return (np.ascontiguousarray(np.concatenate(offs), np.int64), np.ascontiguousarray(np.concatenate(sizs), np.int64), np.concatenate(owns))


# -- the rank's side ---------------------------------------------------------------


@dataclass(frozen=True)
class FragmentReport:
    """What a rank's Done says about its writes in a v2 save: its fragment and its data files (plain names)."""

    fragment: FragmentRef
    files: tuple[str, ...]


def write_fragment(storage: Storage, target: SaveTarget, rank: int, records: Sequence[WriteRecord], entries: np.ndarray, cells: np.ndarray) -> bytes:
    """Write this rank's fragment beside its data (a storage stream, fsync'd) and return the Done payload.

    Args:
        records: what the writer wrote, ``tag`` = index into the rank's assigned tensors' description.
        entries, cells: per record, in order, its (entry, cell) from the plan reply (cell -1: an empty box, not recorded).
    """
    keep = [i for i, c in enumerate(cells.tolist()) if c >= 0]
    recs = [records[i] for i in keep]
    files = sorted({r.file for r in recs})
    fidx = {f: i for i, f in enumerate(files)}
    with_blocks = bool(recs) and all(r.blocks is not None for r in recs)
    frag = Fragment(
        rank,
        entries[keep].astype(np.int32),
        cells[keep].astype(np.int64),
        np.array([fidx[r.file] for r in recs], np.int32),
        np.array([r.offset for r in recs], np.int64),
        np.array([r.nbytes for r in recs], np.int64),
        np.array([r.xxh3 for r in recs], np.uint64),
        np.concatenate([r.blocks for r in recs]) if with_blocks else None,  # type: ignore[misc]
        BLOCK_BYTES if with_blocks else 0,
        tuple(files),
    )
    data = frag.to_msgpack()
    name = fragment_name(rank)
    stream = storage.open_stream(target, name)
    try:
        stream.append(memoryview(data), 0)
        stream.sync()
    finally:
        stream.close()
    return encode_fragment_report(FragmentReport(FragmentRef(name, len(data), xxhash.xxh3_64_intdigest(data)), tuple(sorted({r.file for r in records}))))


def encode_fragment_report(report: FragmentReport) -> bytes:
    """The Done ``records`` payload of a v2 save."""
    f = report.fragment
    return msgpack.packb({"fragment": [f.name, f.nbytes, f.xxh3], "files": list(report.files)})


def is_fragment_report(data: bytes | bytearray | memoryview) -> bool:
    """Whether a Done ``records`` payload is a v2 report (a map with ``fragment``) rather than v1 records."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=0, max_str_len=64, max_array_len=1024, max_map_len=2)
    except Exception:
        return False
    return isinstance(obj, dict) and "fragment" in obj


def decode_fragment_report(data: bytes | bytearray | memoryview, rank: int) -> FragmentReport:
    """Check one rank's v2 Done payload (bounded unpack: names of its own rank only).

    Raises:
        WireError: anything else: the fragment not ``data/r<rank>.frag``, a data file not the rank's,
            a size or hash out of range; names the rank.
    """
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=0, max_str_len=64, max_array_len=1024, max_map_len=2)
        frag, files = obj["fragment"], obj["files"]
        name, nbytes, digest = frag
    except Exception as e:
        raise WireError(f"rank {rank}: malformed fragment report: {type(e).__name__}: {e}") from e
    m = FRAGMENT_RE.match(name) if isinstance(name, str) else None
    if not m or int(m.group(1)) != rank:
        raise WireError(f"rank {rank} reports fragment {name!r:.80}, not its own data/r{rank:05d}.frag")
    if type(nbytes) is not int or not 0 < nbytes <= MAX_FRAGMENT_BYTES or type(digest) is not int or not 0 <= digest < 1 << 64:
        raise WireError(f"rank {rank}: fragment size or xxh3 out of range")
    if not isinstance(files, list) or len(set(map(str, files))) != len(files):
        raise WireError(f"rank {rank}: files must be an array of distinct names")
    for f in files:
        fm = DATA_FILE_RE.match(f) if isinstance(f, str) else None
        if not fm or int(fm.group(1)) != rank or not f.endswith(".bin"):
            raise WireError(f"rank {rank} reports data file {f!r:.80}, which is not one of its own")
    return FragmentReport(FragmentRef(name, nbytes, digest), tuple(files))


# -- the coordinator's commit ---------------------------------------------------------------


def build_index(
    storage: Storage,
    target: SaveTarget,
    plan: SavePlan,
    cells: PlanCells,
    reports: Mapping[int, FragmentReport],
    objects: Mapping[int, dict[str, Any]],
    world_size: int,
    user_meta: Mapping[str, Any] | None,
) -> Index:
    """The index of a v2 save whose every rank has reported (names as the storage stored them).

    Raises:
        CheckpointError: a rank of the plan has not reported.
    """
    from .commit import entry_names

    missing = [r for r in range(world_size) if r not in reports]
    if missing:
        raise CheckpointError(f"commit refused: ranks {missing[:16]} have not reported their fragments")
    files = tuple(storage.stored_name(target, f) for r in range(world_size) for f in reports[r].files)
    refs = tuple(_stored_ref(storage, target, reports[r].fragment) for r in range(world_size))
    tensors: dict[tuple, IndexEntry] = {}
    local: dict[int, tuple[dict, Any]] = {}
    for (owner, key, dtype, shape), split in zip(entry_names(plan), cells.splits):
        entry = IndexEntry(dtype, tuple(shape), split)
        if owner is None:
            tensors[key] = entry
        else:
            local.setdefault(owner, ({}, objects[owner]["local"]))[0][key] = entry
    for r in range(world_size):
        if r not in local and objects[r]["local"]:
            local[r] = ({}, objects[r]["local"])
    meta = dict(user_meta if user_meta is not None else objects[0].get("user_meta") or {})
    return Index(world_size, files, refs, tensors, objects[0]["objects"], objects[0].get("structure"), local, meta)


def _stored_ref(storage: Storage, target: SaveTarget, ref: FragmentRef) -> FragmentRef:
    return FragmentRef(storage.stored_name(target, ref.name), ref.nbytes, ref.xxh3)
