"""Converter sinks: write a flattened tree as dist_ckpt, DCP, ``torch.save`` or safetensors."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
import warnings
from typing import Any, Callable

import numpy as np
import torch

from ..buffers import tensor_memoryview
from ..describe import check_object
from ..dtypes import dtype_name
from ..errors import DistCkptError, PickleNotAllowed
from ..flatten import KeyPath, format_path, unflatten
from ..fragments import read_metadata
from ..layout_names import TMP, fragment_name, sibling
from ..logs import get_logger
from ..manifest import BLOCK_BYTES, ChunkTable, Manifest, Pickled, TensorEntry, unpickle_if_allowed
from ..manifest_v2 import decode_fragment, decode_index
from ..materialize import from_manifest
from ..storage import SaveTarget, Storage, get_storage
from ..writer import WriteItem, write_items
from ._common import _ST_DTYPES, _WEIGHTS_ONLY_LEAVES, ConvertError, LazyTensor, Meter, Options, local_path

log = get_logger(__name__)

BATCH_BYTES = 256 << 20
CHUNK_BYTES = 64 << 20
BUCKET_BYTES = 256 << 20
"""(--to dcp) bytes per DCP data file: files are written one at a time, so this bounds memory."""


# -- leaves ---------------------------------------------------------------------


def is_tensor(value: Any) -> bool:
    return isinstance(value, (LazyTensor, torch.Tensor))


def meta(value: Any) -> tuple[torch.dtype, tuple[int, ...], int]:
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


def _object(value: Any, key: KeyPath, opts: Options, target: str) -> Any:
    why = (
        f"{format_path(key)} is stored pickled; writing it as {target} means unpickling it, which can execute code: "
        "pass --trust-pickle (trust_pickle=True) only for a checkpoint you trust"
    )
    return unpickle_if_allowed(value, opts.trust_pickle, why)


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
    """A chunk table from ``(offsets, sizes, file, offset, nbytes, xxh3, blocks)`` rows."""
    n = len(rows)
    blocks = None if any(r[6] is None for r in rows) else np.concatenate([np.zeros(0, np.uint64)] + [r[6] for r in rows])
    return ChunkTable(
        np.array([r[0] for r in rows], np.int64).reshape(n, ndim),
        np.array([r[1] for r in rows], np.int64).reshape(n, ndim),
        np.array([r[2] for r in rows], np.int32),
        np.array([r[3] for r in rows], np.int64),
        np.array([r[4] for r in rows], np.int64),
        np.array([r[5] for r in rows], np.uint64),
        blocks,
        BLOCK_BYTES if blocks is not None else 0,
    )


class _BatchWriter:
    """Writes tensors into a save's data files (:meth:`Storage.open_stream`), one per batch."""

    def __init__(self, storage: Storage, target: SaveTarget) -> None:
        self.storage, self.target = storage, target
        self.files: list[str] = []
        self.entries: dict[KeyPath, TensorEntry] = {}
        self._pending: list[tuple[KeyPath, str, torch.Tensor]] = []
        self._bytes = 0
        self._batches = 0

    def add(self, key: KeyPath, t: torch.Tensor) -> None:
        self._pending.append((key, dtype_name(t.dtype, key), t))
        self._bytes += t.numel() * t.element_size()
        if self._bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        boxes = []
        items: list[WriteItem] = []
        for key, _, t in self._pending:
            for offsets, sizes, piece in _pieces(t):
                boxes.append((key, offsets, sizes))
                items.append(WriteItem(len(items), tensor_memoryview(piece)))
        # write_items names its file after the "rank": the batch number keeps files apart.
        records = write_items(self.storage, self.target, self._batches, items, threads=2)
        rows: dict[KeyPath, list[tuple]] = {}
        for (key, offsets, sizes), rec in zip(boxes, records):
            if rec.file not in self.files:
                self.files.append(rec.file)
            rows.setdefault(key, []).append((offsets, sizes, self.files.index(rec.file), rec.offset, rec.nbytes, rec.xxh3, rec.blocks))
        for key, dtype, t in self._pending:
            self.entries[key] = TensorEntry(dtype, tuple(t.shape), _table(rows.get(key, []), t.dim()))
        self._pending, self._bytes = [], 0
        self._batches += 1


def _write_dist_ckpt(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: Meter, opts: Options) -> list[str]:
    # The same commit path as a save: begin → streams → publish, or abort.
    storage, path = get_storage(dst)
    target = storage.save_target(path, "convert-" + uuid.uuid4().hex[:12], overwrite=False)
    storage.begin_save(target)
    try:
        batch = _BatchWriter(storage, target)
        objects: dict[KeyPath, Any] = {}
        for key, value in leaves.items():
            if is_tensor(value):
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
        # As a save's commit does: the MANIFEST names what the storage stored (S3 adds the save id to each name).
        files = tuple(storage.stored_name(target, f) for f in batch.files)
        manifest = Manifest(1, files, batch.entries, objects, structure, user_meta={"converted_from": opts.src_format})
        data = manifest.to_msgpack() if opts.format_version == 1 else _write_fragments(storage, target, manifest)
        read_metadata(data, "the converted MANIFEST")  # the same validation a load applies, before anything is published
        storage.publish(target, data)
    except BaseException:
        try:
            storage.abort(target)
        except OSError as e:  # the conversion's own error is the one to raise
            log.error("removing the unfinished conversion %s failed: %s", target.location, e)
        raise
    return []


def _write_fragments(storage: Storage, target: SaveTarget, manifest: Manifest) -> bytes:
    """Format version 2: write each writer batch's fragment (fsync'd) and return the index, its fragments checked."""
    index, frags = from_manifest(manifest, lambda name: storage.stored_name(target, name))
    data = index.to_msgpack()
    check = decode_index(data)
    for r, frag in frags.items():
        decode_fragment(frag, r, check)
        stream = storage.open_stream(target, fragment_name(r))
        try:
            stream.append(memoryview(frag), 0)
            stream.sync()
        finally:
            stream.close()
    return data


def _lazy_save_planner(lazy: dict[int, tuple[KeyPath, Any]], meter: Meter) -> Any:
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


def _bucketed_writer(path: str) -> Any:
    """A DCP ``FileSystemWriter`` writing one file per ~BUCKET_BYTES of items, one file at a time."""
    import queue

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.planner import WriteItemType

    class BucketedWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            files: queue.Queue = queue.Queue()
            bucket: list[Any] = []
            size = 0

            def put() -> None:
                name = f"{plan.storage_data.prefix}{files.qsize()}.distcp"
                files.put((self.fs.concat_path(self.path, name), name, list(bucket)))

            for item in plan.items:
                n = 0 if item.type == WriteItemType.BYTE_IO else math.prod(item.tensor_data.size) * item.tensor_data.properties.dtype.itemsize
                if bucket and size + n > BUCKET_BYTES:
                    put()
                    bucket, size = [], 0
                bucket.append(item)
                size += n
            if bucket:
                put()
            return self._write_data(planner, files)

    # thread_count=1: one file in memory at a time (DCP holds a file's tensors until it is closed).
    return BucketedWriter(path, single_file_per_rank=True, thread_count=1)


def _write_dcp(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: Meter, opts: Options) -> list[str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    lazy: dict[int, tuple[KeyPath, Any]] = {}
    values: dict[KeyPath, Any] = {}
    for key, value in leaves.items():
        if is_tensor(value):
            dtype, shape, _ = meta(value)
            values[key] = torch.empty(shape, dtype=dtype, device="meta")
            lazy[id(values[key])] = (key, value)
        else:
            values[key] = _object(value, key, opts, "DCP")
    tree = unflatten(values, structure)
    if not isinstance(tree, dict):
        raise ConvertError(f"DCP needs a dict at the top of the state dict; this checkpoint holds a {type(tree).__name__}")
    tmp = sibling(local_path(dst), TMP, uuid.uuid4().hex[:12])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            writer = _bucketed_writer(tmp)
            dcp.save(tree, storage_writer=writer, planner=_lazy_save_planner(lazy, meter), no_dist=True)
        os.rename(tmp, local_path(dst))
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


def _write_torch(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: Meter, opts: Options) -> list[str]:
    values: dict[KeyPath, Any] = {}
    for key, value in leaves.items():
        if is_tensor(value):
            values[key] = _load(value, key)
            meter.add(values[key].numel() * values[key].element_size())
        else:
            values[key] = _object(value, key, opts, "a torch.save file")
            _check_weights_only(values[key], key)
    _atomic_file(local_path(dst), lambda f: torch.save(unflatten(values, structure), f))
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


def _write_safetensors(leaves: dict[KeyPath, Any], structure: Any, dst: str, meter: Meter, opts: Options) -> list[str]:
    header: dict[str, Any] = {}
    metadata = {"format": "pt"}
    order: list[tuple[KeyPath, Any]] = []
    skipped: list[str] = []
    pos = 0
    for name, key in _safetensors_names(leaves).items():
        value = leaves[key]
        if is_tensor(value):
            dtype, shape, nbytes = meta(value)
            st = _ST_DTYPES.get(dtype_name(dtype, key))
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

    _atomic_file(local_path(dst), write)
    return skipped


def _atomic_file(path: str, write: Callable[[Any], None]) -> None:
    """Write through ``<path>.tmp-*``, fsync and rename, so no partial output is ever at ``path``."""
    tmp = sibling(path, TMP, uuid.uuid4().hex[:12])
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


SINKS: dict[str, Callable[[dict[KeyPath, Any], Any, str, Meter, Options], list[str]]] = {
    "dist_ckpt": _write_dist_ckpt,
    "dcp": _write_dcp,
    "torch": _write_torch,
    "safetensors": _write_safetensors,
}
