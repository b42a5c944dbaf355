"""Commit: turn every rank's Done report into the global manifest, atomically.

The sequence is visible in :func:`commit_checkpoint`:
all ranks written → records checked against the plan → manifest built and
encoded → :meth:`Storage.publish <dist_ckpt.storage.Storage.publish>`, the
backend's atomic commit (the local one: MANIFEST written with tmp file +
fsync + rename, then the temporary directory renamed to the final path and
the parent fsync'd). Until the publish nothing at ``path`` changes.

This module also defines the Done payloads (chunk records and objects) that
ranks send, so the sender and the coordinator share one definition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping

import msgpack
import numpy as np

from .errors import CheckpointError, WireError
from .errors import CheckpointExists as CheckpointExists  # re-exported for its importers
from .index_build import FragmentReport, PlanCells, build_index
from .layout_names import DATA_FILE_RE
from .layout_names import MANIFEST as MANIFEST  # re-exported for its importers
from .logs import RankStats
from .manifest import ALIGN, BLOCK_BYTES, ChunkTable, LocalSection, Manifest, TensorEntry, _ext_hook, _pack_default, block_counts
from .manifest_v2 import Index
from .materialize import segment_index
from .plan import ChunkLayout, SavePlan
from .storage import SaveTarget, Storage
from .writer import WriteRecord

log = logging.getLogger(__name__)


# -- Done payloads ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Records:
    """One rank's chunk records, column by column; ``tag`` indexes its description."""

    files: list[str]
    tag: np.ndarray  # int64
    file: np.ndarray  # int32, index into ``files``
    offset: np.ndarray  # int64
    nbytes: np.ndarray  # int64
    xxh3: np.ndarray  # uint64
    blocks: np.ndarray | None = None  # uint64 block sums of every chunk, in record order (BLOCK_BYTES each)

    def __len__(self) -> int:
        return len(self.tag)


_RECORD_COLUMNS = (("tag", "<i8"), ("file", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("xxh3", "<u8"))


def encode_records(records: list[WriteRecord]) -> bytes:
    """Chunk records of one rank, columnar; ``tag`` is the index in its description."""
    files = sorted({r.file for r in records})
    fidx = {f: i for i, f in enumerate(files)}
    blocks = None if any(r.blocks is None for r in records) else np.concatenate([np.zeros(0, np.uint64)] + [r.blocks for r in records])  # type: ignore[misc]
    return encode_record_columns(
        files,
        [r.tag for r in records],
        [fidx[r.file] for r in records],
        [r.offset for r in records],
        [r.nbytes for r in records],
        [r.xxh3 for r in records],
        blocks,
    )


def encode_record_columns(files: list[str], tag: Any, file: Any, offset: Any, nbytes: Any, xxh3: Any, blocks: Any = None) -> bytes:
    """The Done ``records`` payload from its columns (array-likes of equal length).

    ``blocks``: every chunk's :data:`~dist_ckpt.manifest.BLOCK_BYTES` block sums,
    chunk after chunk; None sends none (the manifest then has none either).
    """
    cols = dict(zip((n for n, _ in _RECORD_COLUMNS), (tag, file, offset, nbytes, xxh3)))
    obj = {"files": list(files), **{n: np.asarray(cols[n], dt).tobytes() for n, dt in _RECORD_COLUMNS}}
    if blocks is not None:
        obj["blocks"] = np.asarray(blocks, "<u8").tobytes()
    return msgpack.packb(obj)


def decode_records(data: bytes | bytearray | memoryview, rank: int) -> Records:
    """Decode and check one rank's records; raises WireError on anything malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False)
        files = obj["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files must be a list of str")
        cols = {name: np.frombuffer(obj[name], dt).astype(dt[1:]) for name, dt in _RECORD_COLUMNS}
        blocks = np.frombuffer(obj["blocks"], "<u8").astype(np.uint64) if "blocks" in obj else None
    except Exception as e:
        raise WireError(f"rank {rank}: malformed chunk records: {e}") from e
    n = len(cols["tag"])
    if any(len(c) != n for c in cols.values()):
        raise WireError(f"rank {rank}: record columns differ in length")
    if n and ((cols["nbytes"] < 0).any() or (cols["nbytes"] >= 1 << 62).any()):
        raise WireError(f"rank {rank}: record byte count out of range")
    if blocks is not None and len(blocks) != int(block_counts(cols["nbytes"], BLOCK_BYTES).sum()):
        raise WireError(f"rank {rank}: {len(blocks)} block sums for chunks of {int(block_counts(cols['nbytes'], BLOCK_BYTES).sum())} blocks")
    for f in files:
        m = DATA_FILE_RE.match(f)
        if not m or int(m.group(1)) != rank:
            raise WireError(f"rank {rank} reports data file {f!r}, which is not one of its own")
    if n and ((cols["file"] < 0).any() or (cols["file"] >= len(files)).any() or (cols["offset"] < 0).any() or (cols["offset"] % ALIGN).any()):
        raise WireError(f"rank {rank}: record file index or offset out of range or unaligned")
    return Records(files, **cols, blocks=blocks)


def encode_objects(
    objects: Mapping[tuple, Any], local: Mapping[tuple, Any], structure: Any, user_meta: Mapping[str, Any] | None = None, stats: RankStats | None = None
) -> bytes:
    """Objects of one rank: global ones (kept from rank 0), rank-local ones, and the structure.

    ``user_meta`` (rank 0's is stored; checked by the caller) and ``stats``
    (this rank's phase timings, for the coordinator's summary line) ride along.
    """
    payload: dict[str, Any] = {"objects": dict(objects), "local": dict(local), "structure": structure}
    if user_meta:
        payload["user_meta"] = dict(user_meta)
    if stats is not None:
        payload["stats"] = stats.to_msgpack()
    return msgpack.packb(payload, default=_pack_default, use_bin_type=True)


def decode_objects(data: bytes | bytearray | memoryview, rank: int) -> dict[str, Any]:
    """Decode one rank's objects payload; pickled values stay bytes (never unpickled here).

    Returns:
        The map with ``objects``, ``local``, ``structure``, ``user_meta`` (a dict,
        ``{}`` when absent) and ``stats`` (a :class:`RankStats` or None).
    """
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=False, ext_hook=_ext_hook, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p}
        )
        if not isinstance(obj, dict) or not isinstance(obj.get("objects"), dict) or not isinstance(obj.get("local"), dict):
            raise ValueError("expected a map with objects and local")
        obj["user_meta"] = obj.get("user_meta", {})
        if not isinstance(obj["user_meta"], dict) or not all(isinstance(k, str) for k in obj["user_meta"]):
            raise ValueError("user_meta must be a map with str keys")
        obj["stats"] = RankStats.from_msgpack(obj["stats"]) if "stats" in obj else None
    except Exception as e:
        raise WireError(f"rank {rank}: malformed objects payload: {e}") from e
    return obj


class RecordTable:
    """Every rank's chunk records of one save, put in manifest order as each Done arrives.

    (coordinator) One per save, built from its plan; :meth:`add` per Done
    checks the rank reported exactly its planned chunks, with the planned
    sizes, and scatters file, offset and hash into the plan's
    :class:`~dist_ckpt.plan.ChunkLayout` positions. Merging is then done
    by the time the last rank reports.
    """

    def __init__(self, plan: SavePlan) -> None:
        n = len(plan.layout.nbytes)
        self.plan = plan
        self.file = np.zeros(n, np.int32)  # index into the rank's own file list until files() rebases it
        self.offset = np.zeros(n, np.int64)
        self.xxh3 = np.zeros(n, np.uint64)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] | None = {}  # rank -> (positions, block sums); None once a rank sent none
        self._files: dict[int, list[str]] = {}
        self._all_files: list[str] | None = None

    def add(self, rank: int, rec: Records) -> None:
        """Take one rank's records.

        Raises:
            WireError: the rank is not in the plan, reported chunks other than
                those assigned to it, or a size that does not match its box;
                names the rank and key.
        """
        where = self.plan.where(rank)
        if where is None or rank in self._files:
            raise WireError(f"rank {rank} is not expected to report chunks")
        gi, row = where
        group = self.plan.groups[gi]
        assigned = np.flatnonzero(group.writes[row])
        if not np.array_equal(rec.tag, assigned):  # writers report in plan order; anything else is sorted first
            order = np.argsort(rec.tag, kind="stable")
            blocks = None
            if rec.blocks is not None:
                counts = block_counts(rec.nbytes, BLOCK_BYTES)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
                blocks = rec.blocks[segment_index(starts[order], counts[order])]
            rec = Records(rec.files, rec.tag[order], rec.file[order], rec.offset[order], rec.nbytes[order], rec.xxh3[order], blocks)
            if not np.array_equal(rec.tag, assigned):
                wrote = rec.tag.tolist()
                raise WireError(
                    f"rank {rank}: wrote chunks {wrote[:8]}{'…' if len(wrote) > 8 else ''} but was assigned {assigned[:8].tolist()}{'…' if len(assigned) > 8 else ''}"
                )
        pos = self.plan.layout.positions(gi, row)
        want = self.plan.layout.nbytes[pos]
        if not np.array_equal(rec.nbytes, want):
            i = int(np.flatnonzero(rec.nbytes != want)[0])
            key = group.schema.keys[int(assigned[i])]
            raise WireError(f"rank {rank}: key {list(key)}: wrote {int(rec.nbytes[i])} bytes, its box needs {int(want[i])}")
        self.file[pos] = rec.file
        self.offset[pos] = rec.offset
        self.xxh3[pos] = rec.xxh3
        if self._blocks is not None:
            if rec.blocks is None:
                self._blocks = None
            else:
                self._blocks[rank] = (pos, rec.blocks)
        self._files[rank] = rec.files

    def block_column(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(starts, blocks)``: every chunk's block sums in manifest order, chunk ``i``'s at
        ``blocks[starts[i]:starts[i + 1]]``; None when a rank sent none."""
        if self._blocks is None:
            return None
        counts = block_counts(self.plan.layout.nbytes, BLOCK_BYTES)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out = np.zeros(int(starts[-1]), np.uint64)
        for pos, blocks in self._blocks.values():
            out[segment_index(starts[pos], counts[pos])] = blocks
        return starts, out

    def missing(self) -> list[int]:
        """Ranks of the plan that have not reported."""
        return [r for r in self.plan.ranks.tolist() if r not in self._files]

    def files(self) -> list[str]:
        """Every data file, by rank; the first call rebases each chunk's file index onto this list."""
        if self._all_files is None:
            if self.missing():
                raise CheckpointError(f"commit refused: ranks {self.missing()[:16]} have not reported their chunks")
            base = {}
            out: list[str] = []
            for rank in self.plan.ranks.tolist():
                base[rank] = len(out)
                out.extend(self._files[rank])
            for gi, g in enumerate(self.plan.groups):
                for row, rank in enumerate(g.ranks.tolist()):
                    if base[rank]:
                        self.file[self.plan.layout.positions(gi, row)] += base[rank]
            self._all_files = out
        return self._all_files


@dataclass(frozen=True)
class CommitRequest:
    """Everything the coordinator commits: the plan, every rank's records (v1) or fragment reports (v2), and objects."""

    target: SaveTarget  # where the ranks wrote, and the final path
    world_size: int
    plan: SavePlan
    records: RecordTable | None
    objects: Mapping[int, dict[str, Any]]  # by rank, from decode_objects
    user_meta: Mapping[str, Any] | None = None
    cells: "PlanCells | None" = None  # format version 2: the plan's splits (index_build.plan_cells)
    reports: "Mapping[int, FragmentReport] | None" = None  # format version 2: by rank


def build_manifest(req: CommitRequest) -> Manifest:
    """The manifest of a save whose every rank has reported (the records are already merged).

    Raises:
        CheckpointError: a rank of the plan has not reported.
    """
    plan, table = req.plan, req.records
    assert table is not None, "a version-1 commit needs the records"
    files = table.files()
    names = entry_names(plan)
    tensors: dict[tuple, TensorEntry] = {}
    local: dict[int, dict[tuple, TensorEntry]] = {}
    for (owner, key, dtype, shape), chunks in zip(names, _tables(plan.layout, table, [len(n[3]) for n in names])):
        entry = TensorEntry(dtype, tuple(shape), chunks)
        if owner is None:
            tensors[key] = entry
        else:
            local.setdefault(owner, {})[key] = entry
    payloads = req.objects
    sections = {}
    for r in range(req.world_size):
        if local.get(r) or payloads[r]["local"]:
            sections[r] = LocalSection(local.get(r, {}), payloads[r]["local"])
    return Manifest(
        world_size=req.world_size,
        files=tuple(files),
        tensors=tensors,
        objects=payloads[0]["objects"],
        structure=payloads[0].get("structure"),
        local=sections,
        user_meta=dict(req.user_meta if req.user_meta is not None else payloads[0].get("user_meta") or {}),
    )


def entry_names(plan: SavePlan) -> list[tuple[int | None, tuple, str, tuple[int, ...]]]:
    """``(owner, key, dtype, shape)`` of every manifest entry, in entry order (see PlanGroup)."""
    names: list[tuple[int | None, tuple, str, tuple[int, ...]]] = [(None, k, d, s) for k, d, s in zip(plan.keys, plan.dtypes, plan.shapes)]
    for g in plan.groups:
        if g.local_keys:
            first = {k: j for j, k in reversed(list(enumerate(g.schema.keys))) if g.schema.local[j]}
            metas = [(k, g.schema.dtypes[first[k]], g.schema.shapes[first[k]]) for k in g.local_keys]
            names.extend((rank, k, d, s) for rank in g.ranks.tolist() for k, d, s in metas)
    return names


def _tables(layout: ChunkLayout, table: RecordTable, ndims: list[int]) -> list[ChunkTable]:
    """One chunk table per entry: views into the layout's boxes and the merged record columns."""
    column = table.block_column()
    next_in = dict(layout.base)  # ndim -> flat position of its next entry's first chunk
    out = []
    for nd, n in zip(ndims, layout.counts.tolist()):
        if not n:
            out.append(ChunkTable.empty(nd))
            continue
        a = next_in[nd]
        next_in[nd] = a + n
        rows, boxes = slice(a, a + n), slice(a - layout.base[nd], a - layout.base[nd] + n)
        blocks = (column[1][column[0][a] : column[0][a + n]], BLOCK_BYTES) if column is not None else (None, 0)
        out.append(
            ChunkTable(layout.offsets[nd][boxes], layout.sizes[nd][boxes], table.file[rows], table.offset[rows], layout.nbytes[rows], table.xxh3[rows], *blocks)
        )
    return out


def commit_checkpoint(storage: Storage, req: CommitRequest) -> Manifest | Index:
    """(coordinator's I/O thread) Build the manifest (v2: the index) and have the storage publish it atomically.

    Returns:
        The manifest (v2: the index) as committed.

    Raises:
        CheckpointExists: a checkpoint appeared at the path and ``overwrite`` is false.
        CheckpointError: another save replaced the checkpoint at the same moment (overwrite).
        OSError: the manifest write or the commit failed.
    """
    t0 = time.perf_counter()
    if req.cells is not None:
        assert req.reports is not None
        index = build_index(storage, req.target, req.plan, req.cells, req.reports, req.objects, req.world_size, req.user_meta)
        data = index.to_msgpack()
        storage.publish(req.target, data)
        log.debug(
            "[rank 0] committed %s (format 2): %d tensors, index %.1f KB in %.3f s",
            req.target.path,
            len(index.tensors),
            len(data) / 1e3,
            time.perf_counter() - t0,
        )
        return index
    manifest = build_manifest(req)
    # The ranks reported logical names (checked against their rank); the MANIFEST names what the storage stored.
    manifest = replace(manifest, files=tuple(storage.stored_name(req.target, f) for f in manifest.files))
    data = manifest.to_msgpack()
    storage.publish(req.target, data)
    log.debug(
        "[rank 0] committed %s: %d tensors, %d files, manifest %.1f KB in %.3f s",
        req.target.path,
        len(manifest.tensors),
        len(manifest.files),
        len(data) / 1e3,
        time.perf_counter() - t0,
    )
    return manifest
