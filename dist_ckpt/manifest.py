"""The global manifest: frozen, versioned dataclasses and their msgpack form.

The manifest is the only metadata of a checkpoint. It is written last, by the
coordinator, and its presence marks the checkpoint committed. Decoding treats
the bytes as untrusted: every field is type-checked and every chunk table is
checked for bounds, alignment and exact coverage before anything reads data.

Chunk tables are *columnar* (one little-endian array per field) rather than a
list of maps: a 4096-rank job has millions of chunks, and decoding them as
Python objects would take seconds and gigabytes (see docs/format.md).
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np

from . import boxes
from .dtypes import is_dtype_name, itemsize
from .errors import ManifestError, PickleNotAllowed
from .flatten import MAX_DEPTH, KeyPath, check_structure
from .layout_names import DATA_DIR, MANIFEST

FORMAT = "dist_ckpt"
VERSION = 1
ALIGN = 4096
PICKLE_EXT = 1  # msgpack ExtType code of an opted-in pickled object
_MAX_INT = 1 << 62  # offsets, sizes and byte counts stay far below int64 overflow
_MAX_CREATED = float(1 << 34)  # Unix time, year ~2514: past it no clock or time_t of a reader can show it
_RESERVED_NAMES = (DATA_DIR, MANIFEST)  # the data directory and the manifest itself are never data files
_PLAIN_DATA_NAME = re.compile(r"data/r\d{5,12}(?:-t\d{1,3})?\.bin")  # what saves name their files: fully matched, plainly fine
BLOCK_BYTES = 1 << 20
"""Bytes per block checksum: a read of part of a chunk reads and verifies the whole blocks it touches."""
_MAX_BLOCK = 1 << 40

# Column name -> (numpy dtype, values per chunk: "ndim" or 1)
_COLUMNS: dict[str, tuple[str, str | int]] = {
    "offsets": ("<i8", "ndim"),
    "sizes": ("<i8", "ndim"),
    "file": ("<i4", 1),
    "offset": ("<i8", 1),
    "nbytes": ("<i8", 1),
    "xxh3": ("<u8", 1),
}


# Per column: name, on-disk dtype, the native dtype to convert to (None when they agree), one value per dim.
_COLUMN_DTYPES = [(name, np.dtype(dt), None if np.dtype(dt).isnative else np.dtype(dt[1:]), per == "ndim") for name, (dt, per) in _COLUMNS.items()]


@dataclass(frozen=True)
class Pickled:
    """An opted-in pickled object, still as bytes: unpickled only by an opted-in load."""

    data: bytes


def unpickle_if_allowed(value: Any, allowed: bool, refusal: str) -> Any:
    """``value``, unpickled first if it is :class:`Pickled` and the caller opted in.

    The one place a checkpoint's pickled bytes are turned into objects:
    unpickling can execute code, so it needs ``allowed``.

    Raises:
        PickleNotAllowed: ``value`` is pickled and ``allowed`` is false (``refusal`` is the text).
    """
    if not isinstance(value, Pickled):
        return value
    if not allowed:
        raise PickleNotAllowed(refusal)
    return pickle.loads(value.data)


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """The chunks of one tensor, column by column (row ``i`` is chunk ``i``)."""

    offsets: np.ndarray  # (n, ndim) int64: where the chunk starts in the global tensor
    sizes: np.ndarray  # (n, ndim) int64: its extent
    file: np.ndarray  # (n,) int32: index into Manifest.files
    offset: np.ndarray  # (n,) int64: byte offset in that file, 4 KiB aligned
    nbytes: np.ndarray  # (n,) int64: prod(sizes) * itemsize
    xxh3: np.ndarray  # (n,) uint64: xxh3-64 of those bytes
    # xxh3-64 of every block_bytes block of every chunk, chunk after chunk (the
    # last block of a chunk may be short); None in checkpoints saved without them.
    blocks: np.ndarray | None = None
    block_bytes: int = 0

    def __len__(self) -> int:
        return len(self.file)

    @functools.cached_property
    def block_starts(self) -> np.ndarray:
        """``(n + 1,)`` int64: chunk ``i``'s block sums are ``blocks[block_starts[i]:block_starts[i + 1]]``."""
        counts = block_counts(self.nbytes, self.block_bytes) if self.block_bytes else np.zeros(len(self), np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @staticmethod
    def empty(ndim: int) -> "ChunkTable":
        z = np.zeros((0, ndim), np.int64)
        return ChunkTable(z, z.copy(), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))

    def column_bytes(self, name: str) -> memoryview:
        """The on-disk bytes of one column, without a copy when it is already contiguous."""
        return np.ascontiguousarray(getattr(self, name), dtype=_COLUMNS[name][0]).reshape(-1).view(np.uint8).data

    def block_bytes_view(self) -> memoryview:
        """The on-disk bytes of ``blocks`` (little-endian uint64)."""
        assert self.blocks is not None
        return np.ascontiguousarray(self.blocks, dtype="<u8").view(np.uint8).data

    def to_msgpack_obj(self) -> dict:
        out: dict[str, Any] = {"n": len(self)}
        for name in _COLUMNS:
            out[name] = self.column_bytes(name)  # msgpack packs any contiguous buffer as bin
        if self.blocks is not None:
            out["block"] = self.block_bytes
            out["blocks"] = self.block_bytes_view()
        return out

    @staticmethod
    def from_msgpack_obj(obj: Any, ndim: int, where: str) -> "ChunkTable":
        if type(obj) is not dict:
            _expect(obj, dict, f"{where}.chunks")
        n = obj.get("n")
        if type(n) is not int or not 0 <= n < _MAX_INT:
            raise ManifestError(f"{where}.chunks.n must be a non-negative int, got {n!r}")
        cols: dict[str, Any] = {}
        for name, dt, native, per_ndim in _COLUMN_DTYPES:
            raw = obj.get(name)
            count = n * ndim if per_ndim else n
            if type(raw) is not bytes or len(raw) != count * dt.itemsize:
                raise ManifestError(
                    f"{where}.chunks.{name} must be {count} x {dt.str} bytes, got {type(raw).__name__} of {len(raw) if isinstance(raw, bytes) else '?'}"
                )
            arr = np.frombuffer(raw, dtype=dt)
            if native is not None:  # a big-endian host: the columns are little-endian on disk
                arr = arr.astype(native)
            cols[name] = arr.reshape(n, ndim) if per_ndim else arr
        if "blocks" not in obj and "block" not in obj:
            return ChunkTable(**cols)
        block, raw = obj.get("block"), obj.get("blocks")
        if type(block) is not int or not ALIGN <= block <= _MAX_BLOCK or block % ALIGN:
            raise ManifestError(f"{where}.chunks.block must be a multiple of {ALIGN} up to {_MAX_BLOCK}, got {block!r:.40}")
        if not isinstance(raw, bytes) or len(raw) % 8:
            raise ManifestError(f"{where}.chunks.blocks must be uint64 bytes, got {type(raw).__name__}")
        # Its length against the chunks' sizes is checked once the sizes are (see _blocks_problem).
        return ChunkTable(**cols, blocks=np.frombuffer(raw, dtype="<u8").astype(np.uint64, copy=False), block_bytes=block)


@dataclass(frozen=True, eq=False)
class TensorEntry:
    """One global tensor: its dtype name, global shape and chunk table."""

    dtype: str
    shape: tuple[int, ...]
    chunks: ChunkTable

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True, eq=False)
class LocalSection:
    """Values one rank marked rank-local: stored for that rank only."""

    tensors: Mapping[KeyPath, TensorEntry] = field(default_factory=dict)
    objects: Mapping[KeyPath, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Manifest:
    """Everything needed to read a checkpoint back (format version 1, or version 2 materialised)."""

    world_size: int
    files: tuple[str, ...]
    tensors: Mapping[KeyPath, TensorEntry]
    objects: Mapping[KeyPath, Any]
    structure: Any
    local: Mapping[int, LocalSection] = field(default_factory=dict)
    user_meta: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    # Read from a version-2 MANIFEST (an index and per-rank fragments, dist_ckpt/manifest_v2.py): the
    # version it had and its fragments (manifest_v2.FragmentRef, by rank, None for a rank without one).
    # to_msgpack always writes version 1: what this object holds is the whole v1 content.
    version: int = VERSION
    fragments: tuple[Any, ...] = ()

    def to_msgpack(self) -> bytes:
        """Encode as a msgpack map (see docs/format.md).

        The same bytes as packing the whole map, but assembled by one join
        of small packed pieces and the chunk columns' own buffers: no copy of
        the columns and no growing pack buffer (a 4096-rank manifest is
        hundreds of MB, and the coordinator holds it once).
        """
        packer = msgpack.Packer(default=_pack_default, use_bin_type=True)
        fields: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "world_size": self.world_size,
            "user_meta": dict(self.user_meta),
            "files": list(self.files),
            "tensors": self.tensors,
            "objects": _objects_obj(self.objects),
            "local": {r: {"tensors": _tensors_obj(s.tensors), "objects": _objects_obj(s.objects)} for r, s in self.local.items()},
            "structure": self.structure,
        }
        pieces = [packer.pack_map_header(len(fields))]
        for name, value in fields.items():
            pieces.append(packer.pack(name))
            if name == "tensors":
                pieces.append(packer.pack_map_header(len(self.tensors)))
                for k, e in self.tensors.items():
                    pieces.append(packer.pack(tuple(k)))
                    pieces.extend(_entry_pieces(packer, e))
            else:
                pieces.append(packer.pack(value))
        return b"".join(pieces)

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Manifest":
        """Decode and validate untrusted manifest bytes.

        Raises:
            ManifestError: not msgpack, wrong format or version, a missing or
                ill-typed field, or a chunk table that is out of bounds,
                misaligned, overlapping or leaves a gap. Never executes code:
                pickled objects stay :class:`Pickled` bytes.
        """
        try:
            obj = msgpack.unpackb(data, strict_map_key=False, raw=False, ext_hook=_ext_hook, object_pairs_hook=_pairs)
        except ManifestError:
            raise
        except Exception as e:  # msgpack raises many types on garbage; all mean "not a manifest"
            raise ManifestError(f"MANIFEST is not valid msgpack ({type(e).__name__}: {e})") from e
        return _decode(obj)


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, Pickled):
        return msgpack.ExtType(PICKLE_EXT, obj.data)
    raise TypeError(f"cannot encode {type(obj).__name__} in a manifest")


def _pairs(pairs: list) -> dict:
    # Key paths are msgpack arrays used as map keys: make them hashable tuples.
    return {tuple(k) if isinstance(k, list) else k: v for k, v in pairs}


def _ext_hook(code: int, data: bytes) -> Any:
    if code == PICKLE_EXT:
        return Pickled(data)
    raise ManifestError(f"unknown msgpack extension type {code} in MANIFEST")


def _bin_header(n: int) -> bytes:
    """The msgpack bin header of ``n`` bytes, as ``Packer(use_bin_type=True)`` writes it."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _entry_pieces(packer: msgpack.Packer, e: TensorEntry) -> list[bytes | memoryview]:
    """``packer.pack(_entry_obj(e))`` as pieces; the columns stay views of the arrays."""
    c = e.chunks
    pieces: list[bytes | memoryview] = [packer.pack_map_header(3), packer.pack("dtype"), packer.pack(e.dtype), packer.pack("shape"), packer.pack(list(e.shape))]
    extra = 2 if c.blocks is not None else 0
    pieces += [packer.pack("chunks"), packer.pack_map_header(1 + len(_COLUMNS) + extra), packer.pack("n"), packer.pack(len(c))]
    for name in _COLUMNS:
        data = c.column_bytes(name)
        pieces += [packer.pack(name), _bin_header(data.nbytes), data]
    if extra:
        data = c.block_bytes_view()
        pieces += [packer.pack("block"), packer.pack(c.block_bytes), packer.pack("blocks"), _bin_header(data.nbytes), data]
    return pieces


def _entry_obj(e: TensorEntry) -> dict:
    return {"dtype": e.dtype, "shape": list(e.shape), "chunks": e.chunks.to_msgpack_obj()}


def _tensors_obj(tensors: Mapping[KeyPath, TensorEntry]) -> dict:
    return {tuple(k): _entry_obj(e) for k, e in tensors.items()}


def _objects_obj(objects: Mapping[KeyPath, Any]) -> dict:
    return {tuple(k): v for k, v in objects.items()}


def _expect(value: Any, typ: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ManifestError(f"{what} must be {names}, got {type(value).__name__}")


def _key(k: Any, what: str) -> KeyPath:
    if not isinstance(k, tuple) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in k):
        raise ManifestError(f"{what}: key path must be an array of str/int, got {k!r:.80}")
    return k


def _decode(obj: Any) -> Manifest:
    head = decode_header(obj, VERSION, "tensors")
    ws, nfiles = head["world_size"], len(head["files"])
    local = {}
    for r, sec in head["local"].items():
        local[r] = LocalSection(_decode_tensors(sec.get("tensors", {}), nfiles, f"local[{r}]"), _decode_objects(sec.get("objects", {}), f"local[{r}]"))
    return Manifest(
        world_size=ws,
        files=head["files"],
        tensors=_decode_tensors(obj["tensors"], nfiles, "tensors"),
        objects=head["objects"],
        structure=head["structure"],
        local=local,
        user_meta=head["user_meta"],
        created=head["created"],
    )


def decode_header(obj: Any, version: int, *required: str) -> dict[str, Any]:
    """The fields every MANIFEST version shares, checked: ``format``, ``version``, ``world_size``, ``files``,
    ``user_meta``, ``created``, ``structure``, ``objects``, and ``local`` (its ranks and maps; their
    tensors are left to the caller).

    Raises:
        ManifestError: a shared field is missing, ill-typed or out of range, or ``version`` differs.
    """
    _expect(obj, dict, "MANIFEST")
    missing = [f for f in ("format", "version", "world_size", "files", *required, "objects", "structure") if f not in obj]
    if obj.get("format") != FORMAT:
        raise ManifestError(f"not a dist_ckpt MANIFEST (format={obj.get('format')!r:.40})")
    if obj.get("version") != version:
        raise ManifestError(f"MANIFEST version {obj.get('version')!r:.20} is not supported here; this decoder reads version {version}")
    if missing:
        raise ManifestError(f"MANIFEST lacks field(s) {', '.join(missing)}")
    ws = obj["world_size"]
    if type(ws) is not int or not 0 < ws < (1 << 31):
        raise ManifestError(f"world_size must be a positive int, got {ws!r:.40}")
    files = obj["files"]
    _expect(files, list, "files")
    for i, f in enumerate(files):
        _check_file_name(f, i)
    user_meta = obj.get("user_meta", {})
    _expect(user_meta, dict, "user_meta")
    _check_depth(user_meta, "user_meta")
    created = obj.get("created", 0.0)
    _expect(created, (int, float), "created")
    if not 0 <= created < _MAX_CREATED:  # also false for NaN
        raise ManifestError(f"created must be a Unix time in [0, 2**34), got {created!r:.40}")
    structure = obj["structure"]
    check_structure(structure)
    local_obj = obj.get("local", {})
    _expect(local_obj, dict, "local")
    for r, sec in local_obj.items():
        if type(r) is not int or not 0 <= r < ws:
            raise ManifestError(f"local section for rank {r!r:.20} outside world_size {ws}")
        _expect(sec, dict, f"local[{r}]")
    return {
        "world_size": ws,
        "files": tuple(files),
        "user_meta": user_meta,
        "created": float(created),
        "structure": structure,
        "objects": _decode_objects(obj["objects"], "objects"),
        "local": local_obj,
    }


def _check_file_name(f: Any, index: int) -> None:
    """A data file name is a relative path of ordinary components: no NUL, no ``.``/``..``/empty part,
    not the data directory or the MANIFEST (opening those would fail without naming the file)."""
    if type(f) is str and _PLAIN_DATA_NAME.fullmatch(f):  # the common name, one C call: 16k of them in a 16k-rank MANIFEST
        return
    parts = f.split("/") if isinstance(f, str) else []
    if not parts or "\x00" in f or len(f) > 4096 or any(p in ("", ".", "..") for p in parts) or f in _RESERVED_NAMES:
        raise ManifestError(
            f"files[{index}]: data file name {f!r:.80} must be a relative path of plain components inside the checkpoint (not data/ or MANIFEST)"
        )


def _check_depth(value: Any, where: str) -> None:
    """Refuse values nesting deeper than ``MAX_DEPTH`` containers (iterative: a crafted value cannot exhaust the stack)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise ManifestError(f"{where} nests deeper than {MAX_DEPTH} containers")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


def _decode_objects(objs: Any, where: str) -> dict[KeyPath, Any]:
    _expect(objs, dict, where)
    out = {_key(k, where): v for k, v in objs.items()}
    for k, v in out.items():
        _check_depth(v, f"{where}[{list(k)!r:.120}]")
    return out


def _decode_tensors(tensors: Any, nfiles: int, where: str) -> dict[KeyPath, TensorEntry]:
    """Decode a map of tensor entries, checking their chunk tables in one vectorised pass.

    Raises the same error as decoding and checking each entry in turn would
    (:func:`decode_tensor_entry`): the first entry, in map order, with a problem.
    """
    _expect(tensors, dict, where)
    keys: list[KeyPath] = []
    entries: list[tuple[str, TensorEntry]] = []
    try:
        for k, e in tensors.items():
            key = _key(k, where)
            at = f"{where}[{list(key)!r:.120}]"
            entries.append((at, _parse_entry(e, at)))
            keys.append(key)
    except ManifestError:
        _raise_first_table_problem(entries, nfiles)  # the tables before the ill-formed entry come first, as one by one
        raise
    _raise_first_table_problem(entries, nfiles)
    return dict(zip(keys, (e for _, e in entries)))


def decode_tensor_entry(e: Any, nfiles: int, where: str) -> TensorEntry:
    """Decode one tensor entry and check its chunk table (bounds, sizes, alignment, cover)."""
    entry = _parse_entry(e, where)
    problem = _chunk_problem(entry.chunks, entry.shape, itemsize(entry.dtype), nfiles)
    if problem:
        raise ManifestError(f"{where}: {problem}")
    return entry


def _parse_entry(e: Any, where: str) -> TensorEntry:
    """One tensor entry's fields, type-checked; its chunk table is not checked yet."""
    dtype, shape = parse_dtype_shape(e, where)
    return TensorEntry(dtype, shape, ChunkTable.from_msgpack_obj(e.get("chunks"), len(shape), where))


def parse_dtype_shape(e: Any, where: str) -> tuple[str, tuple[int, ...]]:
    """A tensor entry's ``dtype`` and ``shape``, checked (known dtype, at most 64 dims, under 2**62 bytes).

    Raises:
        ManifestError: naming ``where``.
    """
    _expect(e, dict, where)
    dtype = e.get("dtype")
    if not is_dtype_name(dtype):
        raise ManifestError(f"{where}: unknown dtype {dtype!r:.40}")
    shape = e.get("shape")
    if not isinstance(shape, list) or len(shape) > 64 or not all(type(s) is int and 0 <= s < _MAX_INT for s in shape):
        raise ManifestError(f"{where}: shape must be an array of non-negative ints, got {shape!r:.80}")
    shape = tuple(shape)
    if math.prod(shape) * itemsize(dtype) >= _MAX_INT:
        raise ManifestError(f"{where}: shape {list(shape)} is too large")
    return dtype, shape


def _raise_first_table_problem(entries: list[tuple[str, TensorEntry]], nfiles: int) -> None:
    """Raise the first entry's chunk-table problem, checking one by one only the tables the batch does not accept."""
    for i in np.flatnonzero(~_tables_accepted([e for _, e in entries], nfiles)).tolist():
        where, e = entries[i]
        problem = _chunk_problem(e.chunks, e.shape, itemsize(e.dtype), nfiles)
        if problem:
            raise ManifestError(f"{where}: {problem}")


def _tables_accepted(entries: list[TensorEntry], nfiles: int) -> np.ndarray:
    """Per entry, True when the whole-column checks over all tables of its rank (ndim) show its table sound.

    A sufficient condition only: what ``_chunk_problem`` accepts through its
    common path (in-bounds, aligned, non-empty chunks chained along one dim,
    or one chunk for a 0-d tensor). False leaves the entry to ``_chunk_problem``,
    which decides and explains. One pass costs about what one table's checks
    did, whatever the number of tensors.
    """
    accepted = np.zeros(len(entries), bool)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if len(e.chunks):  # an empty table is left to the one-by-one check
            groups.setdefault(len(e.shape), []).append(i)
    for ndim, idx in groups.items():
        accepted[idx] = _group_accepted([entries[i] for i in idx], ndim, nfiles)
    return accepted


def _group_accepted(group: list[TensorEntry], ndim: int, nfiles: int) -> np.ndarray:
    """:func:`_tables_accepted` for entries of one rank: the chunks of all of them as one table."""
    tables = [e.chunks for e in group]
    counts = np.fromiter((len(c) for c in tables), np.int64, len(tables))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(len(tables)), counts)
    off, siz = np.concatenate([c.offsets for c in tables]), np.concatenate([c.sizes for c in tables])
    shapes = np.array([e.shape for e in group], np.int64).reshape(len(group), ndim)
    shape = shapes[owner]
    isz = np.array([itemsize(e.dtype) for e in group], np.int64)[owner]
    file, offset, nbytes = (np.concatenate([getattr(c, name) for c in tables]) for name in ("file", "offset", "nbytes"))
    # Values of a rejected row may wrap around below; the row is refused by its first flag anyway.
    bad = ((off | siz) >> 62).any(axis=1) | (file.astype(np.int64).view(np.uint64) >= nfiles) | ((offset & _BAD_OFFSET_BITS) != 0)
    vol = boxes.box_volume(siz)
    bad |= ((off + siz) > shape).any(axis=1) | (vol * isz != nbytes) | (vol == 0)
    ok = ~np.logical_or.reduceat(bad, starts)
    ok &= _blocks_match(tables, nbytes, starts)
    if ndim == 0:
        return ok & (counts == 1)
    return ok & boxes.chained_along_one_dim(shapes, off, siz, owner, starts, counts)


def _blocks_match(tables: list[ChunkTable], nbytes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per table: True when it has no block sums, or as many as its chunks' blocks (nbytes checked first)."""
    has = np.fromiter((c.blocks is not None for c in tables), bool, len(tables))
    if not has.any():
        return np.ones(len(tables), bool)
    block = np.array([c.block_bytes if c.blocks is not None else 1 for c in tables], np.int64)
    want = np.add.reduceat(-(-nbytes // np.repeat(block, np.diff(np.append(starts, len(nbytes))))), starts)
    have = np.fromiter((len(c.blocks) if c.blocks is not None else 0 for c in tables), np.int64, len(tables))
    return ~has | (want == have)


# Bits a file offset must not have: the sign, 2**62 and up, and those below the alignment.
_BAD_OFFSET_BITS = np.int64(~((1 << 62) - ALIGN))


def _chunk_problem(c: ChunkTable, shape: tuple[int, ...], isz: int, nfiles: int) -> str | None:
    # Few whole-column operations per table: a 4096-rank manifest has thousands of chunks per tensor.
    if len(c) == 0:
        return None if math.prod(shape) == 0 else "no chunks for a non-empty tensor"
    if ((c.offsets | c.sizes) >> 62).any():  # negative, or 2**62 and up
        return "a chunk has a negative or overflowing offset or size"
    if (c.file.astype(np.int64, copy=False).view(np.uint64) >= nfiles).any():
        return f"a chunk names a data file index outside [0, {nfiles})"
    if (c.offset & _BAD_OFFSET_BITS).any():
        return f"a chunk's file offset is negative, overflowing or not {ALIGN}-aligned"
    if len(shape) and ((c.offsets + c.sizes) > np.asarray(shape, np.int64)).any():
        return f"a chunk lies outside shape {list(shape)}"
    if (boxes.box_volume(c.sizes) * isz != c.nbytes).any():
        return "a chunk's nbytes does not match its sizes and dtype"
    return boxes.cover_problem(shape, c.offsets, c.sizes, bounds_checked=True) or _blocks_problem(c)


def block_counts(nbytes: np.ndarray, block: int) -> np.ndarray:
    """Blocks of each chunk: ``ceil(nbytes / block)`` (0 for an empty chunk)."""
    return -(-np.asarray(nbytes, np.int64) // block)


def _blocks_problem(c: ChunkTable) -> str | None:
    # After the cover check: the chunks' nbytes then sum to the tensor's, far below overflow.
    if c.blocks is None:
        return None
    want = int(block_counts(c.nbytes, c.block_bytes).sum())
    return None if len(c.blocks) == want else f"chunks.blocks has {len(c.blocks)} block sums, the chunks have {want} blocks of {c.block_bytes} bytes"
