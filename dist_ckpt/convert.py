"""Converters between dist_ckpt and DCP, ``torch.save`` and safetensors.

Everything runs in one process without a process group. A *source* turns the
input into a tree of plain containers whose tensor leaves are
:class:`LazyTensor` (read only when a sink asks) or tensors already mapped in
memory; a *sink* writes that tree. Every source feeds every sink:

=============  ==========================================================
source         how it is read
=============  ==========================================================
``dist_ckpt``  the manifest, then one tensor at a time with ``read_tensors``
               on a single :class:`~dist_ckpt.reader.ReadTask`; rank-local
               values are those of ``rank`` (default 0)
``dcp``        ``.metadata`` (a pickle), then one tensor at a time through
               DCP's own load planner and ``FileSystemReader``
``torch``      ``torch.load(mmap=True)``: tensors stay file-backed pages
=============  ==========================================================

=================  =====================================================================
sink               output and memory
=================  =====================================================================
``dist_ckpt``      a committed checkpoint (``world_size`` 1) loadable by
                   :func:`dist_ckpt.load` on any world size; tensors are written in
                   batches of ~:data:`BATCH_BYTES` (one data file per batch), cut
                   into dim-0 chunks of at most :data:`CHUNK_BYTES` so that sharded
                   loads read and verify whole chunks. Memory: one batch.
``dcp``            ``torch.distributed.checkpoint.save`` with ``FileSystemWriter``
                   and one file per tensor: DCP's writer keeps every tensor of a file
                   alive until the file is closed, so per-tensor files bound memory by
                   the largest tensor. Loadable by ``torch.distributed.checkpoint.load``.
``torch``          one ``torch.save`` file, loadable with ``torch.load(weights_only=True)``.
                   **Not bounded**: ``torch.save`` needs the whole tree in memory.
``safetensors``    tensors only, named by joining key paths with ``"."`` (ambiguous
                   names are refused); plain objects go in the header metadata as
                   JSON, others are skipped and reported. Written tensor by tensor.
=================  =====================================================================

Trust: a DCP directory and a ``torch.save`` file are pickles, so reading them
can execute code; they are only read with ``trust_pickle=True``. Values a
dist_ckpt checkpoint holds pickled are never unpickled without it either
(dist_ckpt → dist_ckpt copies them as bytes; safetensors skips them).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import uuid
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .buffers import tensor_memoryview
from .commit import MANIFEST, prepare_tmp_dir
from .describe import check_object
from .dtypes import dtype_from_name, dtype_name
from .errors import CheckpointNotFound, DistCkptError, ManifestError, PickleNotAllowed
from .flatten import KeyPath, expand_stateful, flatten, format_path, leaf_paths, unflatten
from .loader import entry_for, find_committed, read_manifest
from .manifest import ChunkTable, Manifest, Pickled, TensorEntry
from .reader import ReadTask, read_tensors
from .storage import Storage, get_storage
from .writer import WriteItem, write_items

FORMATS = ("dist_ckpt", "dcp", "torch", "safetensors")
BATCH_BYTES = 256 << 20
CHUNK_BYTES = 64 << 20

_TRUST = {  # format -> (display name, why reading it unpickles)
    "dcp": ("DCP", "its .metadata file and its non-tensor values are pickles"),
    "torch": ("torch.save", "a torch.save file is a pickle"),
}
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
_WEIGHTS_ONLY_LEAVES = (type(None), bool, int, float, complex, str, bytes)

Progress = Callable[[int, int], None]
"""``progress(tensor_bytes_done, tensor_bytes_total)``."""


class ConvertError(DistCkptError, ValueError):
    """The source cannot be expressed in the target format (names the key and why)."""


@dataclass(frozen=True)
class LazyTensor:
    """A source tensor known by dtype and shape, read by ``read()`` only when needed."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ConvertResult:
    """What :func:`convert` wrote; ``skipped`` names values the target could not hold."""

    src_format: str
    to: str
    dst: str
    tensors: int
    objects: int
    nbytes: int
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    src_format: str
    trust_pickle: bool
    pickle_objects: bool


class _Meter:
    """Counts tensor bytes handed to a sink and reports them to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._cb = total, 0, progress
        self.add(0)

    def add(self, n: int) -> None:
        self.done += n
        if self._cb is not None:
            self._cb(self.done, self.total)


# -- sources --------------------------------------------------------------------


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def detect_format(path: str) -> str:
    """``"dist_ckpt"``, ``"dcp"`` or ``"torch"`` for the input at ``path``.

    Raises:
        CheckpointNotFound: nothing usable is there (an incomplete dist_ckpt
            checkpoint is named as such).
        ConvertError: the path exists but is none of the readable formats.
    """
    local = _local(path)
    if os.path.isfile(local):
        if local.endswith(".safetensors"):
            raise ConvertError(f"{path}: safetensors is an output format only; read it with safetensors.torch.load_file")
        return "torch"
    if os.path.isfile(os.path.join(local, MANIFEST)):
        return "dist_ckpt"
    if os.path.isfile(os.path.join(local, ".metadata")):
        return "dcp"
    storage, p = get_storage(path)
    try:
        find_committed(storage, p)  # an interrupted overwrite leaves the checkpoint under <path>.old-*
        return "dist_ckpt"
    except CheckpointNotFound:
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
                raise ConvertError(f"DCP keys conflict: {format_path(path[: depth + 1])} is both a value and a container")
        if path[-1] in node:
            raise ConvertError(f"DCP keys conflict: {format_path(path)} appears twice")
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

    reader = FileSystemReader(_local(path))
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


def _torch_tree(path: str) -> Any:
    local = _local(path)
    try:
        try:
            obj = torch.load(local, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(local, map_location="cpu", weights_only=False)  # legacy (non-zip) format
    except Exception as e:
        raise ConvertError(f"{path}: cannot read it as a torch.save file: {type(e).__name__}: {e}") from e
    return expand_stateful(obj)[0]


_SOURCES: dict[str, Callable[[str, int], Any]] = {
    "dist_ckpt": _dist_ckpt_tree,
    "dcp": lambda path, rank: _dcp_tree(path),
    "torch": lambda path, rank: _torch_tree(path),
}


# -- leaves ---------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (LazyTensor, torch.Tensor))


def _meta(value: Any) -> tuple[torch.dtype, tuple[int, ...], int]:
    if isinstance(value, LazyTensor):
        return value.dtype, value.shape, value.nbytes
    return value.dtype, tuple(value.shape), value.numel() * value.element_size()


def _load(value: Any, key: KeyPath) -> torch.Tensor:
    """The leaf as a plain, contiguous CPU tensor."""
    from torch.distributed.tensor import DTensor

    t = value.read() if isinstance(value, LazyTensor) else value
    if isinstance(t, DTensor):
        raise ConvertError(f"{format_path(key)} is a DTensor; converting one needs its process group (save it with dist_ckpt instead)")
    return t.detach().to("cpu").contiguous()


def _object(value: Any, key: KeyPath, opts: _Options, target: str) -> Any:
    if isinstance(value, Pickled):
        if not opts.trust_pickle:
            raise PickleNotAllowed(
                f"{format_path(key)} is stored pickled; writing it as {target} means unpickling it, which can execute code: "
                "pass --trust-pickle (trust_pickle=True) only for a checkpoint you trust"
            )
        return pickle.loads(value.data)
    return value


# -- sinks ----------------------------------------------------------------------


def _pieces(t: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    """``(offsets, sizes, view)`` of dim-0 slices of at most CHUNK_BYTES (one piece when it cannot split)."""
    shape = tuple(t.shape)
    row = math.prod(shape[1:]) * t.element_size()
    if t.numel() == 0:
        return []  # an empty tensor has no chunks, as a normal save writes it
    if not shape or shape[0] * row <= CHUNK_BYTES:
        return [((0,) * len(shape), shape, t)]
    step = max(1, CHUNK_BYTES // row)
    rest = (0,) * (len(shape) - 1)
    return [((i,) + rest, (min(step, shape[0] - i),) + shape[1:], t[i : i + step]) for i in range(0, shape[0], step)]


def _table(rows: list[tuple], ndim: int) -> ChunkTable:
    """A chunk table from ``(offsets, sizes, file, offset, nbytes, xxh3)`` rows."""
    n = len(rows)
    return ChunkTable(
        np.array([r[0] for r in rows], np.int64).reshape(n, ndim),
        np.array([r[1] for r in rows], np.int64).reshape(n, ndim),
        np.array([r[2] for r in rows], np.int32),
        np.array([r[3] for r in rows], np.int64),
        np.array([r[4] for r in rows], np.int64),
        np.array([r[5] for r in rows], np.uint64),
    )


class _BatchWriter:
    """Writes tensors into a temporary dist_ckpt directory, one data file per batch."""

    def __init__(self, storage: Storage, tmp: str) -> None:
        self.storage, self.tmp = storage, tmp
        self.files: list[str] = []
        self.entries: dict[KeyPath, TensorEntry] = {}
        self._pending: list[tuple[KeyPath, str, torch.Tensor]] = []
        self._bytes = 0
        self._batches = 0

    def add(self, key: KeyPath, t: torch.Tensor) -> None:
        self._pending.append((key, dtype_name(t.dtype, format_path(key)), t))
        self._bytes += t.numel() * t.element_size()
        if self._bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        boxes, items = [], []
        for key, _, t in self._pending:
            for offsets, sizes, piece in _pieces(t):
                boxes.append((key, offsets, sizes))
                items.append(WriteItem(len(items), tensor_memoryview(piece)))
        # write_items names its file after the "rank": the batch number keeps files apart.
        records = write_items(self.storage, self.tmp, self._batches, items, threads=2)
        rows: dict[KeyPath, list[tuple]] = {}
        for (key, offsets, sizes), rec in zip(boxes, records):
            if rec.file not in self.files:
                self.files.append(rec.file)
            rows.setdefault(key, []).append((offsets, sizes, self.files.index(rec.file), rec.offset, rec.nbytes, rec.xxh3))
        for key, dtype, t in self._pending:
            self.entries[key] = TensorEntry(dtype, tuple(t.shape), _table(rows.get(key, []), t.dim()))
        self._pending, self._bytes = [], 0
        self._batches += 1


def _write_dist_ckpt(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: _Meter, opts: _Options) -> list[str]:
    storage, path = get_storage(dst)
    path = path.rstrip("/")
    tmp = prepare_tmp_dir(storage, path, "convert-" + uuid.uuid4().hex[:12], overwrite=False)
    try:
        batch = _BatchWriter(storage, tmp)
        objects: dict[KeyPath, Any] = {}
        for key, value in leaves.items():
            if _is_tensor(value):
                t = _load(value, key)
                batch.add(key, t)
                meter.add(t.numel() * t.element_size())
            elif isinstance(value, Pickled):
                objects[key] = value  # copied as bytes, never unpickled
            else:
                try:
                    objects[key] = check_object(value, key, opts.pickle_objects)
                except PickleNotAllowed as e:
                    raise PickleNotAllowed(f"{e} (command line: --pickle-objects)") from e
        batch.flush()
        manifest = Manifest(1, tuple(batch.files), batch.entries, objects, structure, user_meta={"converted_from": opts.src_format})
        data = manifest.to_msgpack()
        Manifest.from_msgpack(data)  # the same validation a load applies, before anything is published
        storage.write_atomic(f"{tmp}/{MANIFEST}", data)
        storage.rename_dir(tmp, path)
    except BaseException:
        storage.remove_tree(tmp)
        raise
    return []


def _lazy_save_planner(lazy: dict[int, tuple[KeyPath, Any]], meter: _Meter) -> Any:
    from torch.distributed.checkpoint import DefaultSavePlanner

    class LazySavePlanner(DefaultSavePlanner):
        """Plans on meta placeholders; reads each tensor only when DCP's writer asks for it."""

        def lookup_object(self, index: Any) -> Any:
            return self._materialize(super().lookup_object(index))

        def _materialize(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor) and id(obj) in lazy:
                key, value = lazy[id(obj)]
                t = _load(value, key)
                meter.add(t.numel() * t.element_size())
                return t
            if type(obj) in (list, tuple):  # a container DCP stores whole (pickled) may hold placeholders
                return type(obj)(self._materialize(x) for x in obj)
            if type(obj) is dict:
                return {k: self._materialize(v) for k, v in obj.items()}
            return obj

    return LazySavePlanner()


def _write_dcp(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: _Meter, opts: _Options) -> list[str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    lazy: dict[int, tuple[KeyPath, Any]] = {}
    values: dict[KeyPath, Any] = {}
    for key, value in leaves.items():
        if _is_tensor(value):
            dtype, shape, _ = _meta(value)
            values[key] = torch.empty(shape, dtype=dtype, device="meta")
            lazy[id(values[key])] = (key, value)
        else:
            values[key] = _object(value, key, opts, "DCP")
    tree = unflatten(values, structure)
    if not isinstance(tree, dict):
        raise ConvertError(f"DCP needs a dict at the top of the state dict; this checkpoint holds a {type(tree).__name__}")
    tmp = f"{_local(dst).rstrip('/')}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False)
            dcp.save(tree, storage_writer=writer, planner=_lazy_save_planner(lazy, meter), no_dist=True)
        os.rename(tmp, _local(dst))
    except CheckpointException as e:  # DCP wraps every failure (a BaseException): unwrap the cause
        shutil.rmtree(tmp, ignore_errors=True)
        cause = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(cause, DistCkptError):  # ours, raised while reading the source
            raise cause from e
        raise ConvertError(f"DCP refused this state dict: {type(cause).__name__}: {cause}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return []


def _check_weights_only(value: Any, key: KeyPath) -> None:
    """Refuse a value that ``torch.load(weights_only=True)`` would reject."""
    if type(value) in _WEIGHTS_ONLY_LEAVES or type(value) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_weights_only(v, key + (i,))
        return
    if type(value) is dict:
        for k, v in value.items():
            _check_weights_only(v, key + (k,))
        return
    raise ConvertError(f"{format_path(key)}: a {type(value).__name__} cannot be loaded with torch.load(weights_only=True); convert it to plain types first")


def _write_torch(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: _Meter, opts: _Options) -> list[str]:
    values: dict[KeyPath, Any] = {}
    for key, value in leaves.items():
        if _is_tensor(value):
            values[key] = _load(value, key)
            meter.add(values[key].numel() * values[key].element_size())
        else:
            values[key] = _object(value, key, opts, "a torch.save file")
            _check_weights_only(values[key], key)
    _atomic_file(_local(dst), lambda f: torch.save(unflatten(values, structure), f))
    return []


def _json_value(value: Any) -> str | None:
    """``value`` as JSON text, or None when JSON cannot hold it (bytes, pickled, non-finite floats)."""
    if isinstance(value, (bytes, Pickled)):
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _safetensors_names(leaves: dict[KeyPath, Any]) -> dict[str, KeyPath]:
    names: dict[str, KeyPath] = {}
    for key in leaves:
        name = ".".join(str(k) for k in key)
        if not name:
            raise ConvertError("the checkpoint is a single unnamed value; safetensors needs named tensors")
        if name in names or name == "__metadata__":
            other = format_path(names[name]) if name in names else "safetensors' own __metadata__"
            raise ConvertError(f"safetensors name {name!r} is ambiguous: {format_path(key)} and {other} both flatten to it; rename one of the keys")
        names[name] = key
    return names


def _write_safetensors(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: _Meter, opts: _Options) -> list[str]:
    header: dict[str, Any] = {}
    metadata = {"format": "pt"}
    order: list[tuple[KeyPath, Any]] = []
    skipped: list[str] = []
    pos = 0
    for name, key in _safetensors_names(leaves).items():
        value = leaves[key]
        if _is_tensor(value):
            dtype, shape, nbytes = _meta(value)
            st = _ST_DTYPES.get(dtype_name(dtype, format_path(key)))
            if st is None:
                raise ConvertError(f"{format_path(key)}: dtype {dtype} has no safetensors equivalent")
            header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            order.append((key, value))
            pos += nbytes
        elif name in metadata:
            raise ConvertError(f"object {format_path(key)} would overwrite the safetensors metadata entry {name!r}; rename the key")
        elif (text := _json_value(value)) is None:
            skipped.append(format_path(key))
        else:
            metadata[name] = text
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, value in order:
            t = _load(value, key)
            f.write(tensor_memoryview(t))
            meter.add(t.numel() * t.element_size())

    _atomic_file(_local(dst), write)
    return skipped


def _atomic_file(path: str, write: Callable[[Any], None]) -> None:
    """Write through ``<path>.tmp-*``, fsync and rename, so no partial output is ever at ``path``."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_SINKS: dict[str, Callable[[dict[KeyPath, Any], Any, str, _Meter, _Options], list[str]]] = {
    "dist_ckpt": _write_dist_ckpt,
    "dcp": _write_dcp,
    "torch": _write_torch,
    "safetensors": _write_safetensors,
}


def trust_message(fmt: str) -> str:
    """Why reading ``fmt`` needs ``trust_pickle`` (for errors and the CLI help)."""
    name, why = _TRUST[fmt]
    return (
        f"reading a {name} checkpoint unpickles it ({why}), and unpickling can execute arbitrary code; "
        "pass --trust-pickle (trust_pickle=True) only for a checkpoint from a source you trust"
    )


def convert(
    src: str, dst: str, to: str, *, trust_pickle: bool = False, pickle_objects: bool = False, rank: int = 0, progress: Progress | None = None
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into a new ``to``-format checkpoint at ``dst``.

    Args:
        src: a dist_ckpt checkpoint, a DCP directory or a ``torch.save`` file (detected).
        dst: output path; must not exist.
        to: one of :data:`FORMATS`.
        trust_pickle: allow unpickling: needed to read DCP and ``torch.save`` input,
            and to write dist_ckpt values stored pickled to DCP or ``torch.save``.
        pickle_objects: (to dist_ckpt) store values that are neither tensors nor
            msgpack-native pickled, instead of refusing them.
        rank: (dist_ckpt input) whose rank-local values to take.
        progress: called with ``(tensor_bytes_done, tensor_bytes_total)``.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        PickleNotAllowed: the conversion needs unpickling and ``trust_pickle`` is false.
        ConvertError: the target format cannot hold the source (ambiguous names,
            dtype, non-dict root, a value ``weights_only`` rejects); ``dst`` exists.
        CheckpointNotFound, ManifestError, ChecksumError, DataFileError: bad input.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(src)
    if fmt in _TRUST and not trust_pickle:
        raise PickleNotAllowed(trust_message(fmt))
    if os.path.lexists(_local(dst)):
        raise ConvertError(f"{dst} already exists; refusing to overwrite it")
    opts = _Options(fmt, trust_pickle, pickle_objects)
    leaves, structure = flatten(_SOURCES[fmt](src, rank))
    total = sum(_meta(v)[2] for v in leaves.values() if _is_tensor(v))
    skipped = _SINKS[to](leaves, structure, dst, _Meter(total, progress), opts)
    n_tensors = sum(1 for v in leaves.values() if _is_tensor(v))
    return ConvertResult(fmt, to, dst, n_tensors, len(leaves) - n_tensors, total, skipped)
