"""Describe: what this rank holds, as metadata, without touching tensor bytes.

Turns a state dict into a :class:`~dist_ckpt.description.RankDescription` (one box
per tensor: a DTensor's local chunk from ``__create_chunk_list__()``, a plain
tensor as one full box, replicated by default as in DCP), the local tensors in
the same order, and the non-tensor values, checked to be msgpack-native.
numpy arrays are stored as tensors and numpy scalars as numbers, each leaf
marked ``["n", dtype]`` in the structure so that a load returns numpy again.
"""

from __future__ import annotations

import math
import pickle
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .description import RankDescription, TensorDescription
from .dtypes import dtype_name
from .errors import ManifestError, PickleNotAllowed, StateDictError
from .flatten import NUMPY_DTYPES, KeyPath, flatten, format_path, mark_leaves
from .manifest import Pickled

_NATIVE = (int, float, str, bytes, bool, type(None))


@dataclass(frozen=True)
class RankLocal:
    """Wrap a value to store it for this rank only (e.g. RNG state, a data loader position).

    On load, rank ``r`` gets back what rank ``r`` saved, by one rule: the
    wrapper stays at its place and ``.value`` is the loaded value (a tensor
    filled in place, any other value in a new ``RankLocal``). A rank the
    saving job did not have (a scale-up) keeps the target's wrapper as it was
    and the key is reported in :attr:`dist_ckpt.LoadInfo.kept_rank_local`.
    """

    value: Any


def rank_local(value: Any) -> RankLocal:
    """Mark ``value`` (tensor or plain value) as rank-local in a state dict."""
    return RankLocal(value)


@dataclass
class LocalState:
    """This rank's state split for saving: the result of :func:`describe`.

    ``desc`` is its *description* (the metadata the coordinator plans from;
    the library's one noun for it), ``tensors`` the local tensors aligned with
    ``desc.tensors``, then the values and the nested structure that rank 0 (or
    this rank, for rank-local values) stores.
    """

    desc: RankDescription
    tensors: list[torch.Tensor]
    objects: dict[KeyPath, Any]
    local_objects: dict[KeyPath, Any]
    structure: Any

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


# DTensor sharding spec and this process's mesh coordinate -> its local box. The
# box is a pure function of the two; computing it (``__create_chunk_list__``)
# costs ~75 us per tensor, a large part of an async save's blocked time.
_BOXES: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = {}
_MAX_BOXES = 1 << 16


def _dtensor_box(t: Any, key: KeyPath) -> tuple[tuple[int, ...], tuple[int, ...]]:
    coordinate = t.device_mesh.get_coordinate()
    cache_key = (t._spec, tuple(coordinate) if coordinate is not None else None)
    box = _BOXES.get(cache_key)
    if box is None:
        chunks = t.__create_chunk_list__()
        if len(chunks) != 1:
            raise StateDictError(f"{format_path(key)}: DTensor with {len(chunks)} local chunks is not supported")
        box = tuple(int(x) for x in chunks[0].offsets), tuple(int(x) for x in chunks[0].sizes)
        if len(_BOXES) >= _MAX_BOXES:
            _BOXES.clear()
        _BOXES[cache_key] = box
    return box


def local_box(t: torch.Tensor, key: KeyPath) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local data, offsets, sizes)`` of a plain tensor or DTensor in its global tensor."""
    # A DTensor can only exist once its module is imported: no need to import it (~0.8 s) otherwise.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is not None and isinstance(t, dtensor_module.DTensor):
        offsets, sizes = _dtensor_box(t, key)
        local = t.to_local()
        if math.prod(sizes) != local.numel():
            raise StateDictError(f"{format_path(key)}: DTensor local shard has {local.numel()} elements but its chunk box {list(sizes)} has {math.prod(sizes)}")
        return local.reshape(sizes) if local.numel() else local.new_empty(sizes), offsets, sizes
    return t, (0,) * t.dim(), tuple(t.shape)


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a numpy array or scalar (numpy is not imported to find out)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.ndarray, np.generic))


def _from_numpy(value: Any, key: KeyPath) -> tuple[Any, str]:
    """``(tensor or number to store, numpy dtype name)`` for a numpy array or scalar.

    Raises:
        StateDictError: its dtype is not one a checkpoint holds (object, str, datetime, ...).
    """
    import numpy as np

    name = value.dtype.name
    if name not in NUMPY_DTYPES or (isinstance(value, np.generic) and value.dtype.kind == "c"):
        raise StateDictError(
            f"{format_path(key)}: numpy {type(value).__name__} of dtype {name} cannot be stored; "
            f"arrays of {', '.join(sorted(NUMPY_DTYPES))} and non-complex scalars can"
        )
    if isinstance(value, np.generic):
        return value.item(), name
    # torch.from_numpy needs C order (ascontiguousarray would turn 0-d into 1-d) and warns on read-only arrays
    array = value if value.flags.c_contiguous and value.flags.writeable else value.copy(order="C")
    if not array.dtype.isnative:  # a big-endian array: the data files hold native (little-endian) bytes
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array), name


def numpy_scalar(value: Any, name: str, key: KeyPath) -> Any:
    """The numpy scalar of dtype ``name`` (from :data:`NUMPY_DTYPES`) holding a loaded number.

    Raises:
        ManifestError: the stored value is not a number of that kind (a crafted file).
    """
    import numpy as np

    kind = {"b": bool, "i": int, "u": int, "f": (int, float)}.get(np.dtype(name).kind, ())
    if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManifestError(f"{format_path(key)}: marked numpy {name} but the checkpoint holds a {type(value).__name__}")
    try:
        return np.dtype(name).type(value)
    except (OverflowError, ValueError) as e:
        raise ManifestError(f"{format_path(key)}: {value!r:.40} does not fit numpy {name}") from e


def check_object(value: Any, key: KeyPath, allow_pickle: bool) -> Any:
    """Return ``value`` if msgpack-native, its :class:`Pickled` form if allowed, else raise."""
    if type(value) in _NATIVE and not (type(value) is int and not -(1 << 63) <= value < (1 << 64)):
        return value
    if not allow_pickle:
        raise PickleNotAllowed(
            f"{format_path(key)}: value of type {type(value).__name__} is neither a tensor nor msgpack-native "
            "(int, float, str, bytes, bool, None, lists/tuples/dicts of them); convert it, or pass allow_pickle=True "
            "to store it pickled (loading it then needs allow_pickle=True too)"
        )
    try:
        return Pickled(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as e:
        raise StateDictError(f"{format_path(key)}: cannot pickle {type(value).__name__}: {e}") from e


def describe(state_dict: Any, rank: int, allow_pickle: bool = False) -> LocalState:
    """Describe this rank's (already Stateful-expanded) state dict.

    Raises:
        StateDictError: a key or value cannot be checkpointed; names its key path.
    """
    # Without autograd, DTensor.to_local() is the local tensor itself: with it, each call built a
    # graph node and a view (~100 us a tensor, the larger part of describing an FSDP state).
    with torch.no_grad():
        return _describe(state_dict, rank, allow_pickle)


def _describe(state_dict: Any, rank: int, allow_pickle: bool) -> LocalState:
    leaves, structure = flatten(state_dict)
    descs: list[TensorDescription] = []
    tensors: list[torch.Tensor] = []
    objects: dict[KeyPath, Any] = {}
    local_objects: dict[KeyPath, Any] = {}
    marks: dict[KeyPath, str] = {}
    for key, value in leaves.items():
        owner = None
        if isinstance(value, RankLocal):
            owner, value = rank, value.value
        if not isinstance(value, torch.Tensor) and is_numpy(value):
            value, marks[key] = _from_numpy(value, key)
        if isinstance(value, torch.Tensor):
            data, offsets, sizes = local_box(value, key)
            shape = tuple(int(s) for s in value.shape)
            descs.append(TensorDescription(key, dtype_name(value.dtype, key), shape, offsets, sizes, owner))
            tensors.append(data)
        elif owner is not None:
            local_objects[key] = check_object(value, key, allow_pickle)
        else:
            objects[key] = check_object(value, key, allow_pickle)
    return LocalState(RankDescription(rank, tuple(descs)), tensors, objects, local_objects, mark_leaves(structure, marks))
