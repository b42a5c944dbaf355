"""Load: manifest → read requests → tensors filled in place, objects replaced.

Every rank reads the manifest itself and reads only the byte ranges that
overlap the boxes it needs; no collective, no coordinator, so ranks may load
at different times and the world size may differ from the one that saved.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any, Sequence

import numpy as np
import torch

from .commit import MANIFEST
from .config import Config
from .describe import RankLocal, local_box
from .dtypes import dtype_from_name, dtype_name
from .errors import CheckpointNotFound, DataFileError, LoadMismatchError, ManifestError, PickleNotAllowed
from .flatten import KeyPath, expand_stateful, flatten, format_path, get_path, set_path, unflatten
from .manifest import Manifest, Pickled, TensorEntry
from .reader import ReadTask, read_tensors
from .storage import Storage, get_storage

log = logging.getLogger(__name__)


def find_committed(storage: Storage, path: str) -> str:
    """The directory holding the committed checkpoint for ``path``.

    Falls back to ``<path>.old-*`` when a crash hit between the two renames of
    an overwrite (the old checkpoint is complete there).

    Raises:
        CheckpointNotFound: saying whether the path is absent or incomplete.
    """
    path = path.rstrip("/")
    if storage.exists(f"{path}/{MANIFEST}"):
        return path
    parent, _, base = path.rpartition("/")
    siblings = storage.listdir(parent or ".") if storage.exists(parent or ".") else []
    if not storage.exists(path):
        for name in siblings:
            if name.startswith(base + ".old-") and storage.exists(f"{parent or '.'}/{name}/{MANIFEST}"):
                log.warning("checkpoint %s is missing but %s/%s is complete (an overwrite was interrupted); loading that", path, parent, name)
                return f"{parent or '.'}/{name}"
        pending = [n for n in siblings if n.startswith(base + ".tmp-")]
        hint = f"; {len(pending)} unfinished save(s) beside it ({', '.join(pending[:3])})" if pending else ""
        raise CheckpointNotFound(f"no checkpoint at {path}{hint}")
    raise CheckpointNotFound(f"checkpoint {path} is incomplete: it has no {MANIFEST} (the save did not commit)")


def read_manifest(path: str, storage: Storage | None = None) -> tuple[Manifest, str, Storage]:
    """Read and validate the manifest of the committed checkpoint at ``path``.

    Returns:
        ``(manifest, directory it was read from, storage)``.
    """
    if storage is None:
        storage, path = get_storage(path)
    root = find_committed(storage, path)
    try:
        data = storage.read_bytes(f"{root}/{MANIFEST}")
    except IsADirectoryError:
        raise ManifestError(f"{root}/{MANIFEST} is a directory, not a manifest file") from None
    try:
        return Manifest.from_msgpack(data), root, storage
    except ManifestError as e:
        raise ManifestError(f"{root}/{MANIFEST}: {e}") from e


def _object_value(value: Any, key: KeyPath, allow_pickle: bool) -> Any:
    if isinstance(value, Pickled):
        if not allow_pickle:
            raise PickleNotAllowed(f"{format_path(key)} was saved pickled; loading it can execute code, so pass allow_pickle=True only for a checkpoint you trust")
        return pickle.loads(value.data)
    return value


def entry_for(manifest: Manifest, rank: int, key: KeyPath) -> tuple[TensorEntry | None, Any, bool]:
    """(tensor entry, object value, found) for ``key``, rank-local section first."""
    sec = manifest.local.get(rank)
    if sec is not None:
        if key in sec.tensors:
            return sec.tensors[key], None, True
        if key in sec.objects:
            return None, sec.objects[key], True
    if key in manifest.tensors:
        return manifest.tensors[key], None, True
    if key in manifest.objects:
        return None, manifest.objects[key], True
    return None, None, False


def _saved_keys(manifest: Manifest, rank: int) -> set[KeyPath]:
    keys = set(manifest.tensors) | set(manifest.objects)
    sec = manifest.local.get(rank)
    if sec is not None:
        keys |= set(sec.tensors) | set(sec.objects)
    return keys


@torch.no_grad()
def load_into(state_dict: Any, path: str, rank: int, config: Config, strict: bool = True, storage: Storage | None = None) -> Any:
    """Load the checkpoint at ``path`` into ``state_dict`` in place (see :func:`dist_ckpt.load`)."""
    manifest, root, storage = read_manifest(path, storage)
    expanded, stateful = expand_stateful(state_dict)
    leaves, _ = flatten(expanded)
    tasks: list[ReadTask] = []
    copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    objects: dict[KeyPath, Any] = {}
    missing = []
    for key, value in leaves.items():
        target = value.value if isinstance(value, RankLocal) else value
        entry, obj, found = entry_for(manifest, rank, key)
        if not found:
            missing.append(key)
        elif isinstance(target, torch.Tensor):
            if entry is None:
                raise LoadMismatchError(f"{format_path(key)}: the target is a tensor but the checkpoint holds a {type(obj).__name__}")
            if dtype_name(target.dtype) != entry.dtype or tuple(target.shape) != entry.shape:
                raise LoadMismatchError(f"{format_path(key)}: checkpoint has {entry.dtype} {list(entry.shape)}, target is {dtype_name(target.dtype)} {list(target.shape)}")
            local, offsets, sizes = local_box(target, key)
            dst = local if local.device.type == "cpu" and local.is_contiguous() else torch.empty(sizes, dtype=local.dtype)
            if dst is not local:
                copy_back.append((local, dst))
            tasks.append(ReadTask(key, entry, dst, offsets, sizes))
        else:
            if entry is not None:
                raise LoadMismatchError(f"{format_path(key)}: the checkpoint holds a tensor but the target is a {type(target).__name__}")
            objects[key] = _object_value(obj, key, config.allow_pickle)
    unexpected = sorted(_saved_keys(manifest, rank) - set(leaves), key=repr)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(format_path(k) for k in missing[:20])}{' …' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"in the checkpoint but not the target: {', '.join(format_path(k) for k in unexpected[:20])}{' …' if len(unexpected) > 20 else ''}")
        raise LoadMismatchError(f"state dict does not match checkpoint {root} (strict=True): " + "; ".join(parts))
    read_tensors(storage, root, manifest.files, tasks, config.reader_threads, config.verify_checksums, rank)
    for local, dst in copy_back:
        local.copy_(dst)
    return _apply(state_dict, expanded, stateful, objects)


def _apply(state_dict: Any, expanded: Any, stateful: dict[KeyPath, Any], objects: dict[KeyPath, Any]) -> Any:
    """Put loaded objects into the caller's containers and feed Stateful objects their state."""
    for key, value in objects.items():
        owner = next((s for s in stateful if key[: len(s)] == s), None)
        if owner is None:
            state_dict = set_path(state_dict, key, value)
        else:
            expanded = set_path(expanded, key, value)
    for spath in sorted(stateful, key=len, reverse=True):
        stateful[spath].load_state_dict(get_path(expanded, spath))
    return state_dict


def check_bytes_on_disk(storage: Storage, root: str, files: Sequence[str], entries: Sequence[tuple[KeyPath, TensorEntry]]) -> None:
    """Refuse, before allocating anything, tensors whose chunks claim more bytes than their data files hold.

    A load with no target allocates each tensor at the shape its entry states;
    the manifest's own checks bound shapes only by int64. Every chunk's bytes
    lie in its file, chunk after chunk, so a file must hold at least the sum
    of its chunks' ``nbytes`` and each chunk's end: a crafted 2**40-element
    shape over a small file is refused here (one ``size`` per file).

    Raises:
        DataFileError: a file is missing or shorter than its chunks (names the file and a key).
    """
    if not entries:
        return
    file = np.concatenate([e.chunks.file.astype(np.int64) for _, e in entries])
    nbytes = np.concatenate([e.chunks.nbytes for _, e in entries])
    owner = np.concatenate([np.full(len(e.chunks), i, np.int64) for i, (_, e) in enumerate(entries)])
    sums, ends, who = np.zeros(len(files), np.int64), np.zeros(len(files), np.int64), np.zeros(len(files), np.int64)
    np.add.at(sums, file, nbytes)  # each nbytes < 2**62 (decoder), and a file holds few chunks of a real checkpoint
    np.maximum.at(ends, file, np.concatenate([e.chunks.offset for _, e in entries]) + nbytes)
    who[file] = owner
    need = {int(f): (int(sums[f]), int(ends[f]), entries[int(who[f])][0]) for f in np.flatnonzero(np.maximum(sums, ends))}
    for f, (total, end, key) in sorted(need.items()):
        name = f"{root}/{files[f]}"
        try:
            handle = storage.open_read(name)
        except OSError as e:
            raise DataFileError(e.errno, f"data file {name} (of {format_path(key)}) cannot be opened: {e.strerror or e}") from e
        try:
            size = handle.size()
        finally:
            handle.close()
        if size < max(total, end):
            raise DataFileError(f"data file {name} has {size} bytes but its chunks (e.g. of {format_path(key)}) need {max(total, end)}; refusing to allocate them")


@torch.no_grad()
def load_full(path: str, rank: int, config: Config, map_location: Any = None, storage: Storage | None = None) -> Any:
    """Load a whole checkpoint as plain full tensors and objects in its saved nesting."""
    manifest, root, storage = read_manifest(path, storage)
    leaves: dict[KeyPath, Any] = {}
    tasks = []
    sec = manifest.local.get(rank)
    check_bytes_on_disk(storage, root, manifest.files, list(manifest.tensors.items()) + (list(sec.tensors.items()) if sec else []))
    for key in list(manifest.tensors) + list(manifest.objects) + (list(manifest.local[rank].tensors) + list(manifest.local[rank].objects) if rank in manifest.local else []):
        entry, obj, _ = entry_for(manifest, rank, key)
        if entry is None:
            leaves[key] = _object_value(obj, key, config.allow_pickle)
            continue
        t = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype))
        leaves[key] = t
        tasks.append(ReadTask(key, entry, t, (0,) * len(entry.shape), entry.shape))
    read_tensors(storage, root, manifest.files, tasks, config.reader_threads, config.verify_checksums, rank)
    if map_location is not None:
        leaves = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in leaves.items()}
    if manifest.structure is None:
        return leaves
    try:
        return unflatten(leaves, manifest.structure)
    except KeyError as e:
        raise ManifestError(f"{root}/{MANIFEST}: structure names a value the checkpoint does not hold: {e}") from e
