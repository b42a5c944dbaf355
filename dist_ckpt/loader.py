"""Load: manifest → read requests → tensors filled in place, objects replaced.

Every rank reads the manifest itself and reads only the byte ranges that
overlap the boxes it needs; no collective, no coordinator, so ranks may load
at different times and the world size may differ from the one that saved.

Another job may overwrite the checkpoint while it is read. Each load compares
the version of the ``MANIFEST`` it used before and after its reads
(:func:`load_whole`): if it changed, the load is retried, so a load returns one
checkpoint whole, or raises :class:`~dist_ckpt.errors.CheckpointChanged`.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import time
from typing import Any, Callable, TypeVar

import torch

from .commit import MANIFEST
from .config import Config
from .describe import RankLocal, local_box
from .dtypes import dtype_from_name, dtype_name
from .errors import CheckpointChanged, CheckpointNotFound, LoadMismatchError, ManifestError, PickleNotAllowed
from .flatten import KeyPath, expand_stateful, flatten, format_path, get_path, set_path, unflatten
from .logs import get_logger
from .manifest import Manifest, Pickled, TensorEntry
from .reader import ReadTask, read_tensors
from .storage import Storage, get_storage

log = get_logger(__name__)  # prefixes the rank to each line
LOAD_ATTEMPTS = 5  # loads of a checkpoint that keeps being overwritten, before CheckpointChanged
_T = TypeVar("_T")


def find_committed(storage: Storage, path: str) -> str:
    """The directory holding the committed checkpoint for ``path``.

    Falls back to the newest complete ``<path>.old-*`` (by its MANIFEST's
    write time) when a crash hit between the two renames of an overwrite.

    Raises:
        CheckpointNotFound: saying whether the path is absent or incomplete.
    """
    path = path.rstrip("/")
    if storage.exists(f"{path}/{MANIFEST}"):
        return path
    parent, _, base = path.rpartition("/")
    siblings = storage.listdir(parent or ".") if storage.exists(parent or ".") else []
    if not storage.exists(path):
        old = _newest_old(storage, parent or ".", base, siblings)
        if old is not None:
            log.warning("checkpoint %s is missing but %s is complete (an overwrite was interrupted); loading that", path, old)
            return old
        pending = [n for n in siblings if n.startswith(base + ".tmp-")]
        hint = f"; {len(pending)} unfinished save(s) beside it ({', '.join(pending[:3])})" if pending else ""
        raise CheckpointNotFound(f"no checkpoint at {path}{hint}")
    raise CheckpointNotFound(f"checkpoint {path} is incomplete: it has no {MANIFEST} (the save did not commit)")


def _newest_old(storage: Storage, parent: str, base: str, siblings: list[str]) -> str | None:
    """The complete ``<base>.old-*`` under ``parent`` whose MANIFEST was written last (name breaks ties)."""
    found = []
    for name in siblings:
        manifest = f"{parent}/{name}/{MANIFEST}"
        if not name.startswith(base + ".old-"):
            continue
        try:
            if storage.exists(manifest):
                found.append((storage.version(manifest) or (), name))
        except FileNotFoundError:  # removed while we looked
            continue
    return f"{parent}/{max(found)[1]}" if found else None


def _identity(storage: Storage, path: str) -> tuple[str, tuple[int, ...] | None] | None:
    """Which committed checkpoint ``path`` names now: (directory, MANIFEST version), None if none."""
    try:
        root = find_committed(storage, path)
        return root, storage.version(f"{root}/{MANIFEST}")
    except (CheckpointNotFound, FileNotFoundError):
        return None


def load_whole(storage: Storage, path: str, attempt: Callable[[], _T], attempts: int = LOAD_ATTEMPTS) -> _T:
    """Run ``attempt`` (a load of ``path``) until no overwrite of the checkpoint happened during it.

    An error raised while the checkpoint stayed the same is raised as is (it
    is about this checkpoint); one raised while it changed (files renamed or
    removed under the reader, a checksum of the other save's bytes) is a race,
    and the load is retried. With ``strict=False`` a retry of a checkpoint
    holding fewer keys leaves keys it does not hold as an earlier try set them.

    Raises:
        CheckpointChanged: the checkpoint changed during each of ``attempts`` tries.
    """
    last: BaseException | None = None
    for i in range(attempts):
        before = _identity(storage, path)
        try:
            result = attempt()
        except Exception as e:
            if _identity(storage, path) == before:
                raise
            last = e
        else:
            if _identity(storage, path) == before:
                return result
        log.info("checkpoint %s changed while it was loaded (try %d of %d); loading it again", path, i + 1, attempts)
        time.sleep(0.01 * (i + 1))  # let a swap in progress finish its second rename
    raise CheckpointChanged(f"checkpoint {path} was replaced while it was being loaded, {attempts} times in a row"
                            + (f"; last error: {type(last).__name__}: {last}" if last else "")) from last


def _retry_if_changed(load: Callable[..., _T]) -> Callable[..., _T]:
    """Wrap a load taking ``path`` and ``storage`` arguments in :func:`load_whole`."""
    signature = inspect.signature(load)

    @functools.wraps(load)
    def run(*args: Any, **kwargs: Any) -> _T:
        bound = signature.bind(*args, **kwargs)
        storage, path = bound.arguments.get("storage"), bound.arguments["path"]
        if storage is None:
            storage, path = get_storage(path)
            bound.arguments.update(storage=storage, path=path)
        return load_whole(storage, path, lambda: load(*bound.args, **bound.kwargs))

    return run


@_retry_if_changed
def read_manifest(path: str, storage: Storage | None = None) -> tuple[Manifest, str, Storage]:
    """Read and validate the manifest of the committed checkpoint at ``path``.

    Returns:
        ``(manifest, directory it was read from, storage)``.
    """
    if storage is None:
        storage, path = get_storage(path)
    root = find_committed(storage, path)
    data = storage.read_bytes(f"{root}/{MANIFEST}")
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


@_retry_if_changed
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


@_retry_if_changed
@torch.no_grad()
def load_full(path: str, rank: int, config: Config, map_location: Any = None, storage: Storage | None = None) -> Any:
    """Load a whole checkpoint as plain full tensors and objects in its saved nesting."""
    manifest, root, storage = read_manifest(path, storage)
    leaves: dict[KeyPath, Any] = {}
    tasks = []
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
