"""Converter sources: a dist_ckpt, DCP, ``torch.save`` or safetensors input as a tree with lazy tensor leaves."""

from __future__ import annotations

import os
import pickle
from functools import partial
from typing import Any, Callable

import torch

from ..dtypes import dtype_from_name
from ..errors import CheckpointNotFound, ManifestError, PickleNotAllowed
from ..flatten import KeyPath, expand_stateful, format_path, leaf_paths, unflatten
from ..layout_names import MANIFEST
from ..loader import check_bytes_on_disk, entry_for, find_committed, read_manifest
from ..manifest import TensorEntry
from ..reader import ReadTask, read_tensors
from ..storage import Storage, get_storage
from ._common import _ST_DTYPES, ConvertError, LazyTensor, local_path


def detect_format(path: str) -> str:
    """``"dist_ckpt"``, ``"dcp"``, ``"torch"`` or ``"safetensors"`` for the input at ``path``.

    Raises:
        CheckpointNotFound: nothing usable is there (an incomplete dist_ckpt
            checkpoint is named as such).
        ConvertError: the path exists but is none of the readable formats.
    """
    local = local_path(path)
    if os.path.isfile(local):
        return "safetensors" if local.endswith(".safetensors") else "torch"
    if os.path.isfile(os.path.join(local, MANIFEST)):
        return "dist_ckpt"
    if os.path.isfile(os.path.join(local, ".metadata")):
        return "dcp"
    storage, p = get_storage(path)
    try:
        find_committed(storage, p)  # an interrupted overwrite leaves the checkpoint under <path>.old-*
        return "dist_ckpt"
    except CheckpointNotFound:
        if "://" in local and storage.exists(f"{p.rstrip('/')}/.metadata"):
            raise ConvertError(f"{path} is a DCP checkpoint; convert reads DCP checkpoints from local directories only: copy it here first") from None
        if os.path.isdir(local) and not os.path.isdir(os.path.join(local, "data")):
            raise ConvertError(f"{path} is a directory but neither a dist_ckpt checkpoint (no {MANIFEST}) nor a DCP one (no .metadata)") from None
        raise


def _read_dist_ckpt(storage: Storage, root: str, files: tuple[str, ...], key: KeyPath, entry: TensorEntry) -> torch.Tensor:
    t = torch.empty(entry.shape, dtype=dtype_from_name(entry.dtype))
    read_tensors(storage, root, files, [ReadTask(key, entry, t, (0,) * len(entry.shape), entry.shape)])
    return t


def _dist_ckpt_tree(path: str, rank: int) -> Any:
    manifest, root, storage = read_manifest(path)
    if not 0 <= rank < manifest.world_size:
        raise ConvertError(f"rank {rank} is outside the checkpoint's world size {manifest.world_size}")
    sec = manifest.local.get(rank)
    check_bytes_on_disk(storage, root, manifest.files, list(manifest.tensors.items()) + (list(sec.tensors.items()) if sec else []))
    leaves: dict[KeyPath, Any] = {}
    for key in leaf_paths(manifest.structure):
        entry, obj, found = entry_for(manifest, rank, key)
        if not found:
            raise ManifestError(f"{root}/{MANIFEST}: structure names {format_path(key)}, which rank {rank} does not hold")
        if entry is None:
            leaves[key] = obj
        else:
            leaves[key] = LazyTensor(dtype_from_name(entry.dtype), entry.shape, partial(_read_dist_ckpt, storage, root, manifest.files, key, entry))
    return unflatten(leaves, manifest.structure)


def _dcp_read(reader: Any, metadata: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Fill the flat ``{fqn: tensor or None}`` in place through DCP's planner and reader.

    The same step order as ``torch.distributed.checkpoint.load`` for one process,
    without re-reading ``.metadata`` for every call.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner

    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
    planner.set_up_planner(state_dict, metadata, True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    plan = planner.finish_plan(reader.prepare_global_plan(planner.create_global_plan([plan]))[0])
    reader.read_data(plan, planner).wait()
    return state_dict


def _read_dcp(reader: Any, metadata: Any, fqn: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return _dcp_read(reader, metadata, {fqn: torch.empty(shape, dtype=dtype)})[fqn]


class _Node(dict):
    """A container made while nesting DCP paths (told apart from dict values read from the file)."""


def _nest(items: list[tuple[KeyPath, Any]]) -> Any:
    """Nest ``(path, value)`` pairs; nodes keyed exactly 0..n-1 by ints (DCP list indices) become lists."""
    root = _Node()
    for path, value in items:
        node = root
        for depth, k in enumerate(path[:-1]):
            node = node.setdefault(k, _Node())
            if not isinstance(node, _Node):
                raise ConvertError(f"keys conflict: {format_path(path[: depth + 1])} is both a value and a container")
        if path[-1] in node:
            raise ConvertError(f"keys conflict: {format_path(path)} appears twice")
        node[path[-1]] = value

    def finish(node: Any) -> Any:
        if not isinstance(node, _Node):
            return node
        out = {k: finish(v) for k, v in node.items()}
        if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
            return [out[i] for i in range(len(out))]
        return out

    return finish(root)


def _dcp_tree(path: str) -> Any:
    """The DCP checkpoint's nesting, rebuilt from the key paths DCP's planner recorded.

    DCP records dict keys as str (``{0: ...}`` comes back as ``{"0": ...}``);
    without recorded paths each FQN becomes a top-level key.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(local_path(path))
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise ConvertError(f"{path}: cannot read the DCP .metadata file: {type(e).__name__}: {e}") from e
    reader.set_up_storage_reader(metadata, True)
    entries = metadata.state_dict_metadata
    mapping = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    objects = _dcp_read(reader, metadata, {fqn: None for fqn, md in entries.items() if not isinstance(md, TensorStorageMetadata)})
    items = []
    for fqn, md in entries.items():
        p = mapping.get(fqn)
        key = tuple(p) if isinstance(p, (tuple, list)) and p and all(type(k) in (str, int) for k in p) else (fqn,)
        if isinstance(md, TensorStorageMetadata):
            shape = tuple(int(s) for s in md.size)
            items.append((key, LazyTensor(md.properties.dtype, shape, partial(_read_dcp, reader, metadata, fqn, md.properties.dtype, shape))))
        else:
            items.append((key, objects[fqn]))
    return _nest(items)


def _torch_load(local: str, weights_only: bool) -> Any:
    try:
        return torch.load(local, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(local, map_location="cpu", weights_only=weights_only)  # legacy (non-zip) format


def _torch_tree(path: str, trust_pickle: bool) -> Any:
    """The file's tree: ``torch.load(weights_only=True)`` first (it executes no code), full
    unpickling only when that refuses the file and ``trust_pickle`` is set."""
    local = local_path(path)
    try:
        try:
            obj = _torch_load(local, weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only met a type it does not allow
            if not trust_pickle:
                lines = [line for line in str(e).splitlines() if "unsupported" in line.lower()] or [type(e).__name__]
                raise PickleNotAllowed(
                    f"{path}: torch.load(weights_only=True) refused this torch.save file ({lines[0].strip()[:200]}); reading it fully unpickles it, "
                    "which can execute arbitrary code: pass --trust-pickle (trust_pickle=True) only for a file from a source you trust"
                ) from None
            obj = _torch_load(local, weights_only=False)
    except PickleNotAllowed:
        raise
    except Exception as e:
        raise ConvertError(f"{path}: cannot read it as a torch.save file: {type(e).__name__}: {e}") from e
    return expand_stateful(obj)[0]


_FROM_ST = {st: name for name, st in _ST_DTYPES.items()}


def _safetensors_tree(path: str) -> dict[str, Any]:
    """``{tensor name: LazyTensor}``, flat as the file names them (like a module's state_dict).

    The header's ``__metadata__`` strings are not converted. The safetensors
    library checks the header (size, offsets against the file) before anything is read.
    """
    from safetensors import safe_open

    try:
        f = safe_open(local_path(path), framework="pt")
        out: dict[str, Any] = {}
        for name in f.keys():
            sl = f.get_slice(name)
            st, shape = sl.get_dtype(), tuple(int(s) for s in sl.get_shape())
            if st not in _FROM_ST:
                raise ConvertError(f"{path}: tensor {name!r} has safetensors dtype {st}, which dist_ckpt has no name for")
            out[name] = LazyTensor(dtype_from_name(_FROM_ST[st]), shape, partial(f.get_tensor, name))
    except ConvertError:
        raise
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise ConvertError(f"{path}: cannot read it as a safetensors file: {type(e).__name__}: {e}") from e
    return out


SOURCES: dict[str, Callable[[str, int, bool], Any]] = {
    "dist_ckpt": lambda path, rank, trust: _dist_ckpt_tree(path, rank),
    "dcp": lambda path, rank, trust: _dcp_tree(path),
    "torch": lambda path, rank, trust: _torch_tree(path, trust),
    "safetensors": lambda path, rank, trust: _safetensors_tree(path),
}
