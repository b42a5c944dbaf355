"""Commit: turn every rank's Done report into the global manifest, atomically.

The sequence is visible in :func:`commit_checkpoint`:
all ranks written → records checked against the plan → MANIFEST written
(tmp file + fsync + rename) → temporary directory renamed to the final path →
parent fsync'd. Until the last rename nothing at ``path`` changes.

This module also defines the Done payloads (chunk records and objects) that
ranks send, so the sender and the coordinator share one definition.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

import msgpack
import numpy as np

from . import wire
from .dtypes import itemsize
from .errors import CheckpointError, DistCkptError, WireError
from .manifest import ALIGN, ChunkTable, LocalSection, Manifest, Pickled, TensorEntry, _ext_hook, _pack_default
from .planner import RankDescription, SavePlan
from .storage import Storage
from .writer import WriteRecord

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST"
_FILE_RE = re.compile(r"^data/r(\d{5})(?:-t\d{1,3})?\.bin$")


class CheckpointExists(DistCkptError, FileExistsError):
    """A committed checkpoint is already at the path and ``overwrite`` was not given."""


# -- Done payloads ------------------------------------------------------------


def encode_records(records: list[WriteRecord]) -> bytes:
    """Chunk records of one rank, columnar; ``tag`` is the index in its description."""
    files = sorted({r.file for r in records})
    fidx = {f: i for i, f in enumerate(files)}
    return msgpack.packb({
        "files": files,
        "tag": np.array([r.tag for r in records], "<i8").tobytes(),
        "file": np.array([fidx[r.file] for r in records], "<i4").tobytes(),
        "offset": np.array([r.offset for r in records], "<i8").tobytes(),
        "nbytes": np.array([r.nbytes for r in records], "<i8").tobytes(),
        "xxh3": np.array([r.xxh3 for r in records], "<u8").tobytes(),
    })


def decode_records(data: bytes, rank: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """Decode and check one rank's records; raises WireError on anything malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False)
        files = obj["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files must be a list of str")
        cols = {name: np.frombuffer(obj[name], dt).astype(dt[1:]) for name, dt in (("tag", "<i8"), ("file", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("xxh3", "<u8"))}
    except Exception as e:
        raise WireError(f"rank {rank}: malformed chunk records: {e}") from e
    n = len(cols["tag"])
    if any(len(c) != n for c in cols.values()):
        raise WireError(f"rank {rank}: record columns differ in length")
    for f in files:
        m = _FILE_RE.match(f)
        if not m or int(m.group(1)) != rank:
            raise WireError(f"rank {rank} reports data file {f!r}, which is not one of its own")
    if n and ((cols["file"] < 0).any() or (cols["file"] >= len(files)).any() or (cols["offset"] < 0).any() or (cols["offset"] % ALIGN).any()):
        raise WireError(f"rank {rank}: record file index or offset out of range or unaligned")
    return files, cols


def encode_objects(objects: Mapping[tuple, Any], local: Mapping[tuple, Any], structure: Any) -> bytes:
    """Objects of one rank: global ones (kept from rank 0), rank-local ones, and the structure."""
    return msgpack.packb({"objects": dict(objects), "local": dict(local), "structure": structure}, default=_pack_default, use_bin_type=True)


def decode_objects(data: bytes, rank: int) -> dict[str, Any]:
    """Decode one rank's objects payload; pickled values stay bytes (never unpickled here)."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook,
                              object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})
        if not isinstance(obj, dict) or not isinstance(obj.get("objects"), dict) or not isinstance(obj.get("local"), dict):
            raise ValueError("expected a map with objects and local")
    except Exception as e:
        raise WireError(f"rank {rank}: malformed objects payload: {e}") from e
    return obj


# -- directories ----------------------------------------------------------------


def prepare_tmp_dir(storage: Storage, path: str, save_id: str, overwrite: bool) -> str:
    """(coordinator) Create ``<path>.tmp-<save_id>/data`` and return the temporary path.

    Raises:
        CheckpointExists: ``path`` exists and ``overwrite`` is false.
    """
    path = path.rstrip("/")
    if storage.exists(path) and not overwrite:
        raise CheckpointExists(f"checkpoint {path} already exists; pass overwrite=True to replace it (the new one is written beside it and swapped in)")
    tmp = f"{path}.tmp-{save_id}"
    storage.remove_tree(tmp)
    storage.makedirs(f"{tmp}/data")
    return tmp


@dataclass(frozen=True)
class CommitRequest:
    path: str
    tmp_path: str
    overwrite: bool
    world_size: int
    descs: Mapping[int, RankDescription]
    plan: SavePlan
    done: Mapping[int, wire.Done]
    user_meta: Mapping[str, Any] | None = None


def build_manifest(req: CommitRequest) -> Manifest:
    """Merge every rank's records into the manifest, checking them against the plan.

    Raises:
        CheckpointError: a rank reported chunks other than those assigned to it,
            or a size that does not match its box; names the rank and key.
    """
    all_files: list[str] = []
    parts: dict[tuple, list[tuple[np.ndarray, ...]]] = {}
    entries: dict[tuple, tuple[str, tuple[int, ...]]] = {}
    for rank in range(req.world_size):
        desc = req.descs[rank]
        for t in desc.tensors:
            entries.setdefault((t.owner, t.key), (t.dtype, t.shape))
        files, cols = decode_records(req.done[rank].records, rank)
        base = len(all_files)
        all_files.extend(files)
        tags = cols["tag"]
        if sorted(tags.tolist()) != sorted(req.plan.writes.get(rank, ())):
            raise CheckpointError("commit refused: a rank's records differ from its plan", {rank: f"wrote chunks {sorted(tags.tolist())[:8]}… but was assigned {sorted(req.plan.writes.get(rank, ()))[:8]}…"})
        for i, tag in enumerate(tags.tolist()):
            t = desc.tensors[tag]
            want = int(np.prod(t.sizes, dtype=np.int64)) * itemsize(t.dtype)
            if int(cols["nbytes"][i]) != want:
                raise CheckpointError("commit refused: chunk size mismatch", {rank: f"key {list(t.key)}: wrote {int(cols['nbytes'][i])} bytes, box needs {want}"})
            parts.setdefault((t.owner, t.key), []).append((np.asarray(t.offsets, np.int64), np.asarray(t.sizes, np.int64), base + int(cols["file"][i]), int(cols["offset"][i]), want, int(cols["xxh3"][i])))
    tensors: dict[tuple, TensorEntry] = {}
    local: dict[int, dict[tuple, TensorEntry]] = {}
    for (owner, key), (dtype, shape) in entries.items():
        rows = parts.get((owner, key), [])
        nd = len(shape)
        table = ChunkTable(
            np.array([r[0] for r in rows], np.int64).reshape(len(rows), nd),
            np.array([r[1] for r in rows], np.int64).reshape(len(rows), nd),
            np.array([r[2] for r in rows], np.int32),
            np.array([r[3] for r in rows], np.int64),
            np.array([r[4] for r in rows], np.int64),
            np.array([r[5] for r in rows], np.uint64),
        )
        entry = TensorEntry(dtype, tuple(shape), table)
        if owner is None:
            tensors[key] = entry
        else:
            local.setdefault(owner, {})[key] = entry
    payloads = {r: decode_objects(req.done[r].objects, r) for r in range(req.world_size)}
    sections = {}
    for r in range(req.world_size):
        if local.get(r) or payloads[r]["local"]:
            sections[r] = LocalSection(local.get(r, {}), payloads[r]["local"])
    return Manifest(
        world_size=req.world_size,
        files=tuple(all_files),
        tensors=tensors,
        objects=payloads[0]["objects"],
        structure=payloads[0].get("structure"),
        local=sections,
        user_meta=dict(req.user_meta or {}),
    )


def commit_checkpoint(storage: Storage, req: CommitRequest) -> Manifest:
    """(coordinator) Build, write and atomically publish the manifest.

    Returns:
        The manifest as committed.
    """
    t0 = time.perf_counter()
    manifest = build_manifest(req)
    data = manifest.to_msgpack()
    storage.write_atomic(f"{req.tmp_path}/{MANIFEST}", data)
    final = req.path.rstrip("/")
    if storage.exists(final):
        if not req.overwrite:
            raise CheckpointExists(f"checkpoint {final} appeared during the save; not replacing it")
        # Swap: old aside, new in, old removed. A crash between the renames
        # leaves the old one complete under <path>.old-*, which load falls back to.
        old = f"{final}.old-{os.path.basename(req.tmp_path).rsplit('.tmp-', 1)[-1]}"
        storage.rename_dir(final, old)
        storage.rename_dir(req.tmp_path, final)
        storage.remove_tree(old)
    else:
        storage.rename_dir(req.tmp_path, final)
    log.info("[rank 0] committed %s: %d tensors, %d files, manifest %.1f KB in %.3f s", final, len(manifest.tensors), len(manifest.files), len(data) / 1e3, time.perf_counter() - t0)
    return manifest
