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

import errno
import functools
import inspect
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from . import manifest_v2 as v2
from .config import Config
from .describe import RankLocal, is_numpy, local_box, numpy_scalar
from .dtypes import dtype_from_name, dtype_name
from .errors import (
    CheckpointChanged,
    CheckpointNotFound,
    DataFileError,
    LoadMismatchError,
    ManifestError,
)
from .flatten import (
    NUMPY_DTYPES,
    KeyPath,
    expand_stateful,
    flatten,
    format_path,
    get_path,
    numpy_leaves,
    place_values,
    unflatten,
)
from .fragments import needed_cells, needed_manifest, read_metadata, whole_manifest
from .layout_names import MANIFEST, OLD, TMP, is_sibling_of
from .logs import get_logger
from .manifest import Manifest, TensorEntry, unpickle_if_allowed
from .materialize import skeleton
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
        pending = [n for n in siblings if is_sibling_of(n, base, TMP)]
        hint = f"; {len(pending)} unfinished save(s) beside it ({', '.join(pending[:3])})" if pending else ""
        raise CheckpointNotFound(f"no checkpoint at {path}{hint}")
    raise CheckpointNotFound(f"checkpoint {path} is incomplete: it has no {MANIFEST} (the save did not commit)")


def _newest_old(storage: Storage, parent: str, base: str, siblings: list[str]) -> str | None:
    """The complete ``<base>.old-*`` under ``parent`` whose MANIFEST was written last (name breaks ties)."""
    found = []
    for name in siblings:
        manifest = f"{parent}/{name}/{MANIFEST}"
        if not is_sibling_of(name, base, OLD):
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
    raise CheckpointChanged(
        f"checkpoint {path} was replaced while it was being loaded, {attempts} times in a row"
        + (f"; last error: {type(last).__name__}: {last}" if last else "")
    ) from last


def _retry_if_changed(load: Callable[..., _T]) -> Callable[..., _T]:
    """Wrap a load taking ``path`` and ``storage`` arguments in :func:`load_whole`."""
    signature = inspect.signature(load)

    @functools.wraps(load)
    def run(*args: Any, **kwargs: Any) -> _T:
        bound = signature.bind(*args, **kwargs)
        storage, path = get_storage(bound.arguments["path"], bound.arguments.get("storage"))  # an injected one too gets the path without its scheme
        bound.arguments.update(storage=storage, path=path)
        return load_whole(storage, path, lambda: load(*bound.args, **bound.kwargs))

    return run


@_retry_if_changed
def read_manifest(path: str, storage: Storage | None = None) -> tuple[Manifest, str, Storage]:
    """Read and validate the manifest of the committed checkpoint at ``path`` (format version 1 or 2).

    A version-2 checkpoint's every fragment is read and checked, and the whole
    v1-equivalent manifest materialised (``manifest.version`` says 2).

    Returns:
        ``(manifest, directory it was read from, storage)``.

    Raises:
        ManifestError: the MANIFEST is malformed; FragmentError (a subclass) for a missing or bad fragment.
    """
    meta, root, storage = read_metadata_at(path, storage)
    if isinstance(meta, v2.Index):
        return whole_manifest(storage, root, meta), root, storage
    return meta, root, storage


def read_metadata_at(path: str, storage: Storage | None = None) -> tuple[Manifest | v2.Index, str, Storage]:
    """The committed checkpoint's MANIFEST as it is: a v1 :class:`Manifest` or a v2 index (no fragment read).

    Returns:
        ``(manifest or index, directory it was read from, storage)``.
    """
    if storage is None:
        storage, path = get_storage(path)
    root = find_committed(storage, path)
    try:
        data = storage.read_bytes(f"{root}/{MANIFEST}")
    except OSError as e:  # IsADirectoryError, or the storage's UnsafeFileError for a directory
        if e.errno != errno.EISDIR:
            raise
        raise ManifestError(f"{root}/{MANIFEST} is a directory, not a manifest file") from None
    return read_metadata(data, f"{root}/{MANIFEST}"), root, storage


def _object_value(value: Any, key: KeyPath, allow_pickle: bool) -> Any:
    why = f"{format_path(key)} was saved pickled; loading it can execute code, so pass allow_pickle=True only for a checkpoint you trust"
    return unpickle_if_allowed(value, allow_pickle, why)


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


def _rank_local_keys(manifest: Manifest) -> set[KeyPath]:
    """Keys some rank saved rank-local (a rank without a value for one is a scale-up, not a mismatch)."""
    keys: set[KeyPath] = set()
    for sec in manifest.local.values():
        keys |= set(sec.tensors) | set(sec.objects)
    return keys


@dataclass
class LoadInfo:
    """What one load did besides filling the target: pass ``info=LoadInfo()`` to :func:`dist_ckpt.load` to see it.

    Attributes:
        path: The directory loaded from.
        saved_world_size: Ranks that saved the checkpoint.
        missing: Target keys the checkpoint lacks, left as they were (only with ``strict=False``).
        unexpected: Checkpoint keys the target lacks, not loaded (only with ``strict=False``).
        kept_rank_local: Keys other ranks saved rank-local but this rank did not (e.g. a job saved
            on 2 ranks resumed on 4: ranks 2-3 here); this rank kept the target's value.
        converted: Tensors converted from the saved floating dtype to the target's (``strict=False``).
        fragments_read: (a format-version-2 checkpoint) fragments of chunk records this load read:
            only those of the ranks that wrote cells the target's boxes touch.
    """

    path: str = ""
    saved_world_size: int = 0
    missing: list[KeyPath] = field(default_factory=list)
    unexpected: list[KeyPath] = field(default_factory=list)
    kept_rank_local: list[KeyPath] = field(default_factory=list)
    converted: list[KeyPath] = field(default_factory=list)
    fragments_read: int = 0

    @property
    def not_restored(self) -> list[KeyPath]:
        """Target keys that still hold the caller's value: ``missing`` then ``kept_rank_local``."""
        return self.missing + self.kept_rank_local


@dataclass
class _Match:
    """The target's leaves matched against the manifest: what to read, place, report, refuse."""

    info: LoadInfo
    tasks: list[ReadTask] = field(default_factory=list)
    copy_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    objects: dict[KeyPath, Any] = field(default_factory=dict)
    arrays: list[tuple[KeyPath, torch.Tensor, bool]] = field(default_factory=list)  # read as tensor, placed as numpy
    problems: list[str] = field(default_factory=list)
    strict_dtypes: bool = False  # a problem strict=False would have converted
    conversions: Counter = field(default_factory=Counter)
    filled: set[int] = field(default_factory=set)  # ids of target tensors already read (tied weights)


def _convertible(saved: torch.dtype, target: torch.dtype) -> bool:
    """Whether a load may convert ``saved`` to ``target``: floating to floating, complex to complex.

    Anything else (float <-> int, bool, real <-> complex) changes what the
    values mean, so it is refused whatever ``strict`` says.
    """
    return (saved.is_floating_point and target.is_floating_point) or (saved.is_complex and target.is_complex)


def _match_tensor(m: _Match, key: KeyPath, target: torch.Tensor, entry: TensorEntry, strict: bool) -> None:
    have = dtype_name(target.dtype)
    if tuple(target.shape) != entry.shape or (have != entry.dtype and strict):
        convertible = tuple(target.shape) == entry.shape and _convertible(dtype_from_name(entry.dtype), target.dtype)
        m.strict_dtypes |= convertible
        why = " (strict=False converts between floating dtypes)" if convertible else ""
        m.problems.append(f"{format_path(key)}: checkpoint has {entry.dtype} {list(entry.shape)}, target is {have} {list(target.shape)}{why}")
        return
    saved = dtype_from_name(entry.dtype)
    if saved != target.dtype:
        if not _convertible(saved, target.dtype):
            m.problems.append(f"{format_path(key)}: checkpoint has {entry.dtype}, target is {have}: converting would change what the values mean")
            return
        m.info.converted.append(key)
        m.conversions[(entry.dtype, have)] += 1
    if id(target) in m.filled:  # one tensor at several places (tied weights): read it once, from its first place
        return
    m.filled.add(id(target))
    local, offsets, sizes = local_box(target, key)
    direct = local.device.type == "cpu" and local.is_contiguous() and saved == local.dtype
    dst = local if direct else torch.empty(sizes, dtype=saved)
    if not direct:
        m.copy_back.append((local, dst))  # copy_ also converts the dtype
    m.tasks.append(ReadTask(key, entry, dst, offsets, sizes))


@dataclass(frozen=True)
class _Context:
    """What matching a leaf needs besides the leaf: settings and the manifest's key sets."""

    strict: bool
    allow_pickle: bool
    rank_local: set[KeyPath]
    numpy: dict[KeyPath, str]


def _match_leaf(m: _Match, key: KeyPath, value: Any, manifest: Manifest, rank: int, ctx: _Context) -> None:
    wrap = isinstance(value, RankLocal)
    target = value.value if wrap else value
    entry, obj, found = entry_for(manifest, rank, key)
    if not found:
        (m.info.kept_rank_local if key in ctx.rank_local else m.info.missing).append(key)
    elif isinstance(target, torch.Tensor):
        if entry is None:
            m.problems.append(f"{format_path(key)}: the target is a tensor but the checkpoint holds a {type(obj).__name__}")
        else:
            _match_tensor(m, key, target, entry, ctx.strict)
    elif entry is not None:
        if key not in ctx.numpy and not is_numpy(target):
            m.problems.append(f"{format_path(key)}: the checkpoint holds a tensor but the target is a {type(target).__name__}")
        elif entry.dtype not in NUMPY_DTYPES:
            m.problems.append(f"{format_path(key)}: the checkpoint holds a {entry.dtype} tensor, which numpy has no dtype for")
        else:
            t = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype))
            m.tasks.append(ReadTask(key, entry, t, (0,) * len(entry.shape), entry.shape))
            m.arrays.append((key, t, wrap))
    else:
        v = _object_value(obj, key, ctx.allow_pickle)
        if key in ctx.numpy:
            v = numpy_scalar(v, ctx.numpy[key], key)
        m.objects[key] = RankLocal(v) if wrap else v


def _mismatch_error(root: str, m: _Match, strict: bool) -> LoadMismatchError | None:
    """One error listing every problem (and, strict, every missing and unexpected key), hint last."""
    info, lines = m.info, []
    keyed = []
    if strict and info.missing:
        keyed.append(f"missing from the checkpoint: {_key_list(info.missing)}")
    if strict and info.unexpected:
        keyed.append(f"in the checkpoint but not the target: {_key_list(info.unexpected)}")
    if keyed:
        lines.append("; ".join(keyed))
    if m.problems:
        lines.append(f"{len(m.problems)} value(s) do not fit the target:")
        lines.extend("  " + p for p in m.problems[:_MAX_LISTED])
        if len(m.problems) > _MAX_LISTED:
            lines.append(f"  … and {len(m.problems) - _MAX_LISTED} more")
    if not lines:
        return None
    if keyed or m.strict_dtypes:
        lines.append("pass strict=False to load the keys that match and leave the rest of the target as it is")
    return LoadMismatchError(f"state dict does not match checkpoint {root}{' (strict=True)' if strict else ''}: " + "\n".join(lines))


_MAX_LISTED = 2000  # keys named in one error; a message must stay bounded whatever the checkpoint holds


def _key_list(keys: list[KeyPath]) -> str:
    shown = ", ".join(format_path(k) for k in keys[:_MAX_LISTED])
    return shown + (f" … and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _log_outcome(m: _Match, rank: int) -> None:
    info = m.info
    if info.kept_rank_local:
        log.warning(
            "[rank %d] %s was saved by %d rank(s) and holds no rank-local value for rank %d at %s: this rank keeps the target's values",
            rank,
            info.path,
            info.saved_world_size,
            rank,
            _key_list(info.kept_rank_local),
        )
    if m.conversions:
        kinds = ", ".join(f"{a} -> {b}: {n}" for (a, b), n in sorted(m.conversions.items()))
        log.info(
            "[rank %d] converted %d tensor(s) to the target's dtype on load (%s), e.g. %s", rank, len(info.converted), kinds, format_path(info.converted[0])
        )


def init_fresh_optimizers(expanded: Any, stateful: dict[KeyPath, Any], manifest: Manifest, rank: int, saved_keys: set[KeyPath]) -> None:
    """Give each optimizer without state for a parameter the saved state's shapes, so it loads.

    A fresh ``torch.optim`` optimizer has an empty ``state`` until its first
    step, so its ``state_dict()`` names none of the saved ``state.<i>.*``
    keys. For each saved parameter index ``i`` the target lacks, this adds
    ``state[i]`` to the expanded copy: per saved tensor one shaped like
    parameter ``i`` (``empty_like``: a DTensor parameter gets a DTensor with
    its placement, so only this rank's shard is read) or a 0-d CPU tensor
    (``step``), per saved object a placeholder. ``load_state_dict`` then gets
    the saved state, as after a step; no step is taken.

    Raises:
        LoadMismatchError: a saved state tensor is neither 0-d nor shaped like
            its parameter (the parameters differ from the saved ones).
    """
    for spath, obj in stateful.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        state = get_path(expanded, spath).get("state") if isinstance(get_path(expanded, spath), dict) else None
        if not isinstance(state, dict):
            continue
        params = [p for group in obj.param_groups for p in group["params"]]
        n = len(spath) + 1
        for key in sorted((k for k in saved_keys if len(k) == n + 2 and k[:n] == spath + ("state",)), key=repr):
            index = key[n]
            if type(index) is int and 0 <= index < len(params) and (index not in state or key[-1] not in state[index]):
                state.setdefault(index, {})[key[-1]] = _state_template(key, params[index], *entry_for(manifest, rank, key)[:2])


def _state_template(key: KeyPath, param: torch.Tensor, entry: TensorEntry | None, obj: Any) -> Any:
    if entry is None:
        return obj  # a plain value: replaced by the loaded one
    dtype = dtype_from_name(entry.dtype)
    if entry.shape == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype, requires_grad=False)
    if entry.shape == ():
        return torch.empty((), dtype=dtype)
    raise LoadMismatchError(
        f"{format_path(key)}: saved optimizer state has shape {list(entry.shape)} but its parameter has {list(param.shape)}; "
        "the optimizer's parameters differ from the saved ones. For sharded or re-ordered parameters load through "
        "torch.distributed.checkpoint.state_dict.get_state_dict / set_state_dict (see the README)"
    )


@_retry_if_changed
@torch.no_grad()
def load_into(state_dict: Any, path: str, rank: int, config: Config, strict: bool = True, storage: Storage | None = None, info: LoadInfo | None = None) -> Any:
    """Load the checkpoint at ``path`` into ``state_dict`` in place (see :func:`dist_ckpt.load`).

    Args:
        info: Filled with what the load did (missing, unexpected, kept rank-local and converted keys).

    Returns:
        The state dict (a new root only if the root itself was a tuple or a plain value).

    Raises:
        LoadMismatchError: Every key whose value does not fit, listed in one error (and, strict,
            every missing and unexpected key).
    """
    meta, root, storage = read_metadata_at(path, storage)
    manifest = skeleton(meta) if isinstance(meta, v2.Index) else meta  # v2: chunk rows come once the targets are known
    info = info if info is not None else LoadInfo()
    info.path, info.saved_world_size = root, manifest.world_size
    expanded, stateful = expand_stateful(state_dict)
    saved_keys = _saved_keys(manifest, rank)
    init_fresh_optimizers(expanded, stateful, manifest, rank, saved_keys)
    leaves, _ = flatten(expanded)
    ctx = _Context(strict, config.allow_pickle, _rank_local_keys(manifest), numpy_leaves(manifest.structure) if manifest.structure is not None else {})
    m = _Match(info)
    for key, value in leaves.items():
        _match_leaf(m, key, value, manifest, rank, ctx)
    info.unexpected = sorted(saved_keys - set(leaves), key=repr)
    error = _mismatch_error(root, m, strict)
    if error is not None:
        raise error
    if isinstance(meta, v2.Index):
        m.tasks = _with_needed_chunks(storage, root, meta, manifest, m.tasks, info)
    read_tensors(storage, root, manifest.files, m.tasks, config.reader_threads, config.verify_checksums, rank)
    for local, dst in m.copy_back:
        local.copy_(dst)
    for key, t, wrap in m.arrays:
        m.objects[key] = RankLocal(t.numpy()) if wrap else t.numpy()
    _log_outcome(m, rank)
    return _apply(state_dict, expanded, stateful, m.objects)


def _with_needed_chunks(storage: Storage, root: str, index: v2.Index, skeleton: Manifest, tasks: list[ReadTask], info: LoadInfo) -> list[ReadTask]:
    """The tasks with their entries' chunk rows: only the cells their boxes touch, read from only their owners' fragments."""
    number = {id(e): i for i, e in enumerate(_entries(skeleton))}
    cells = needed_cells(index, [(number[id(t.entry)], t.offsets, t.sizes) for t in tasks])
    full, info.fragments_read = needed_manifest(storage, root, index, cells)
    entries = _entries(full)
    return [replace(t, entry=entries[number[id(t.entry)]]) for t in tasks]


def _entries(m: Manifest) -> list[TensorEntry]:
    """A manifest's tensor entries in v2 entry order (global, then each local section)."""
    return list(m.tensors.values()) + [e for sec in m.local.values() for e in sec.tensors.values()]


def _apply(state_dict: Any, expanded: Any, stateful: dict[KeyPath, Any], objects: dict[KeyPath, Any]) -> Any:
    """Put loaded values at their places and feed Stateful objects their state.

    Values outside every Stateful go into the caller's own containers (see
    :func:`~dist_ckpt.flatten.place_values`: aliased containers are never
    mutated); values inside one go into the expanded copy its
    ``load_state_dict`` receives.
    """
    outside: dict[KeyPath, Any] = {}
    inside: dict[KeyPath, Any] = {}
    for key, value in objects.items():
        owned = any(key[: len(s)] == s for s in stateful)
        (inside if owned else outside)[key] = value
    state_dict = place_values(state_dict, outside)
    expanded = place_values(expanded, inside)
    for spath in sorted(stateful, key=len, reverse=True):
        stateful[spath].load_state_dict(get_path(expanded, spath))
    return state_dict


def _restore_numpy(leaves: dict[KeyPath, Any], marks: dict[KeyPath, str]) -> None:
    """Turn the leaves saved as numpy (``marks``) back into numpy arrays and scalars, in place."""
    for key, name in marks.items():
        value = leaves.get(key)
        if isinstance(value, torch.Tensor):
            if dtype_name(value.dtype) != name:  # a marker must agree with the tensor it marks
                raise ManifestError(f"{format_path(key)}: marked numpy {name} but stored as a {dtype_name(value.dtype)} tensor")
            leaves[key] = value.cpu().numpy()
        elif key in leaves:
            leaves[key] = numpy_scalar(value, name, key)


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
            raise DataFileError(
                f"data file {name} has {size} bytes but its chunks (e.g. of {format_path(key)}) need {max(total, end)}; refusing to allocate them"
            )


@_retry_if_changed
@torch.no_grad()
def load_full(path: str, rank: int, config: Config, map_location: Any = None, storage: Storage | None = None) -> Any:
    """Load a whole checkpoint as plain full tensors and objects in its saved nesting."""
    manifest, root, storage = read_manifest(path, storage)
    leaves: dict[KeyPath, Any] = {}
    tasks = []
    sec = manifest.local.get(rank)
    check_bytes_on_disk(storage, root, manifest.files, list(manifest.tensors.items()) + (list(sec.tensors.items()) if sec else []))
    for key in (
        list(manifest.tensors)
        + list(manifest.objects)
        + (list(manifest.local[rank].tensors) + list(manifest.local[rank].objects) if rank in manifest.local else [])
    ):
        entry, obj, _ = entry_for(manifest, rank, key)
        if entry is None:
            leaves[key] = _object_value(obj, key, config.allow_pickle)
            continue
        t = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype))
        leaves[key] = t
        tasks.append(ReadTask(key, entry, t, (0,) * len(entry.shape), entry.shape))
    read_tensors(storage, root, manifest.files, tasks, config.reader_threads, config.verify_checksums, rank)
    if manifest.structure is not None:
        _restore_numpy(leaves, numpy_leaves(manifest.structure))
    if map_location is not None:
        leaves = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v for k, v in leaves.items()}
    if manifest.structure is None:
        return leaves
    try:
        return unflatten(leaves, manifest.structure)
    except KeyError as e:
        raise ManifestError(f"{root}/{MANIFEST}: structure names a value the checkpoint does not hold: {e}") from e
