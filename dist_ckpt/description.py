"""What one rank holds, as the coordinator plans from it: a schema plus raw boxes.

A rank describes every tensor it holds by *what* the tensor is (key path,
dtype, global shape, rank-local or not) and *which box* of it the rank holds
(offsets and sizes in the global tensor). In an FSDP job the first part, the
**schema**, is the same on every rank; only the boxes differ. So the wire form
keeps them apart, and the coordinator decodes each distinct schema once and
every rank's boxes as one ``np.frombuffer`` (no Python object per tensor)::

    desc   = msgpack [2, schema, boxes], each an ext 1 (its zlib stream) or bin (raw)
    schema = msgpack [keys, dtypes, shapes, local]   (one entry per tensor, in order)
    boxes  = little-endian int64: every tensor's offsets, then every tensor's sizes
             (tensor i owns ndim_i values in each half, 0-d tensors none)

Both are compressed (zlib): an FSDP rank's 1000 tensors are a 38 KB schema and
28 KB of boxes raw, ~3 KB and a few hundred bytes compressed, and the coordinator
holds every request that has arrived but is not yet decoded (16,384 of them at
once, at worst). It inflates the boxes bounded by the schema's size, straight
before copying them into its matrix, and a schema only when its compressed bytes
are not in its :class:`SchemaCache` (every rank of an FSDP job sends the same).

``local[i]`` marks a rank-local tensor (stored for the describing rank only).

Who runs what:

1. (every rank) :meth:`RankDescription.to_msgpack` and :meth:`~RankDescription.digest`;
2. (coordinator) :func:`decode_description` per PlanRequest, with a
   :class:`SchemaCache` so each distinct schema is decoded once; the boxes are
   validated for every rank at once by :func:`box_problem` inside ``plan_save``.
"""

from __future__ import annotations

import gc
import math
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np
import xxhash

from .dtypes import is_dtype_name, itemsize
from .errors import PlanError, WireError
from .flatten import KeyPath, format_path

WIRE_VERSION = 2
ZLIB = 1  # msgpack ext type of a compressed schema or boxes
MAX_NDIM = 64
MAX_INT = 2**62  # dims, offsets and byte counts stay far from int64 overflow
MAX_TENSORS = 1 << 24
INT32_LIMIT = 2**31  # a boxes matrix whose every value is below this is stored as int32


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while many small acyclic objects are built.

    Otherwise it rescans every live object again and again (msgpack gives the
    same advice for big messages).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _only(values: Iterable[Any], *types: type) -> bool:
    """Every value's exact type is one of ``types`` (``bool`` is not ``int``)."""
    return set(map(type, values)) <= set(types)


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True, eq=False)
class Schema:
    """Key, dtype, global shape and rank-locality of each tensor a rank describes.

    Built once per distinct schema; the numpy columns below serve the
    vectorised checks and planning over every rank that shares it.
    """

    keys: tuple[KeyPath, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    local: tuple[bool, ...]
    blob: bytes = field(repr=False)  # the canonical wire form; equal blobs mean equal schemas
    digest: int = field(init=False, repr=False)
    ndim: np.ndarray = field(init=False, repr=False)  # (T,)
    start: np.ndarray = field(init=False, repr=False)  # (T,) first value of tensor i in each half of the boxes
    width: int = field(init=False, repr=False)  # S: values in each half (sum of ndims)
    shape_flat: np.ndarray = field(init=False, repr=False)  # (S,) global extent of each described dim
    dim_tensor: np.ndarray = field(init=False, repr=False)  # (S,) the tensor each dim belongs to
    numel: np.ndarray = field(init=False, repr=False)  # (T,)
    itemsize: np.ndarray = field(init=False, repr=False)  # (T,), 0 for a dtype unknown here
    is_local: np.ndarray = field(init=False, repr=False)  # (T,) bool

    def __post_init__(self) -> None:
        ndim = np.fromiter(map(len, self.shapes), np.int64, len(self.shapes))
        width = int(ndim.sum())
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("digest", xxhash.xxh3_64_intdigest(self.blob))
        put("ndim", ndim)
        put("start", np.cumsum(ndim) - ndim)
        put("width", width)
        put("shape_flat", np.fromiter(chain.from_iterable(self.shapes), np.int64, width))
        put("dim_tensor", np.repeat(np.arange(len(ndim), dtype=np.int64), ndim))
        put("numel", np.fromiter((math.prod(s) for s in self.shapes), np.int64, len(ndim)))
        sizes = {d: itemsize(d) if is_dtype_name(d) else 0 for d in set(self.dtypes)}
        put("itemsize", np.fromiter(map(sizes.__getitem__, self.dtypes), np.int64, len(ndim)))
        put("is_local", np.fromiter(self.local, bool, len(ndim)))

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.digest == other.digest and self.blob == other.blob

    def __hash__(self) -> int:
        return self.digest

    @classmethod
    def build(cls, keys: Iterable[KeyPath], dtypes: Iterable[str], shapes: Iterable[tuple[int, ...]], local: Iterable[bool]) -> Schema:
        """A schema from its columns (rank side: values come from real tensors)."""
        keys, dtypes, shapes, local = tuple(map(tuple, keys)), tuple(dtypes), tuple(map(tuple, shapes)), tuple(map(bool, local))
        blob = msgpack.packb([keys, dtypes, shapes, local], use_bin_type=True)
        return cls(keys, dtypes, shapes, local, blob)

    @classmethod
    def from_msgpack(cls, blob: bytes, rank: int) -> Schema:
        """Decode and validate a schema received from ``rank``.

        Raises:
            WireError: on anything malformed, naming the tensor and field.
        """
        try:
            obj = msgpack.unpackb(blob, raw=False, use_list=False, strict_map_key=True, max_bin_len=0, max_ext_len=0, max_map_len=0)
        except Exception as e:  # msgpack raises a zoo of types on garbage
            raise WireError(f"rank {rank}: description schema is not valid msgpack ({type(e).__name__}: {e})") from e
        if not (type(obj) is tuple and len(obj) == 4 and _only(obj, tuple) and len(set(map(len, obj))) == 1):
            raise WireError(f"rank {rank}: description schema must be [keys, dtypes, shapes, local] of equal lengths")
        if len(obj[0]) > MAX_TENSORS:
            raise WireError(f"rank {rank}: description holds {len(obj[0])} tensors, more than {MAX_TENSORS}")
        if not _columns_valid(*obj):  # something is off: the row-by-row check names it
            for i, row in enumerate(zip(*obj)):
                _check_row(*row, i, rank)
        return cls(*obj, blob=bytes(blob))


def _columns_valid(keys: tuple, dtypes: tuple, shapes: tuple, local: tuple) -> bool:
    """Column-wise check; ``False`` when any row may be invalid (:func:`_check_row` decides)."""
    if not (_only(keys, tuple) and _only(chain.from_iterable(keys), str, int) and _only(dtypes, str) and _only(local, bool)):
        return False
    if not (all(map(is_dtype_name, set(dtypes))) and _only(shapes, tuple)):
        return False
    lens = np.fromiter(map(len, shapes), np.int64, len(shapes))
    if (lens > MAX_NDIM).any() or not _only(chain.from_iterable(shapes), int):
        return False
    try:
        flat = np.fromiter(chain.from_iterable(shapes), np.int64, int(lens.sum()))
    except OverflowError:
        return False
    if ((flat < 0) | (flat >= MAX_INT)).any():
        return False
    numel = np.ones(len(shapes))
    np.multiply.at(numel, np.repeat(np.arange(len(shapes)), lens), flat.astype(np.float64))
    return not (numel * 16 >= MAX_INT / 4).any()  # near the limit: let the exact check decide


def _check_row(key: Any, dtype: Any, shape: Any, local: Any, i: int, rank: int) -> None:
    where = f"rank {rank}: tensor #{i}"
    if type(key) is not tuple or not _only(key, str, int):
        raise WireError(f"{where}: key path must be a list of str and int")
    where = f"rank {rank}: tensor {format_path(key)}"
    if not is_dtype_name(dtype):
        raise WireError(f"{where}: unknown dtype {dtype!r}")
    if type(shape) is not tuple or len(shape) > MAX_NDIM:
        raise WireError(f"{where}: shape must be a list of at most {MAX_NDIM} ints")
    for x in shape:
        if type(x) is not int or not 0 <= x < MAX_INT:
            raise WireError(f"{where}: shape must hold non-negative ints below 2**62, got {x!r}")
    if math.prod(shape) * 16 >= MAX_INT:
        raise WireError(f"{where}: shape {list(shape)} is too large")
    if type(local) is not bool:
        raise WireError(f"{where}: local must be true or false, got {local!r}")


class SchemaCache:
    """Decoded schemas by content, so the coordinator decodes each distinct one once.

    Keyed by xxh3-64 of the schema bytes and confirmed by comparing the bytes,
    so a collision can never hand a rank another rank's schema. Keeps the
    ``capacity`` most recently used schemas.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._by_digest: OrderedDict[int, list[tuple[bool, bytes, Schema]]] = OrderedDict()

    def get(self, blob: bytes, rank: int, packed: bool = False) -> Schema:
        """The schema encoded by ``blob`` (decoded and validated on first sight).

        Args:
            packed: ``blob`` is the schema's zlib stream (the wire's ext 1), inflated only on a miss.

        Raises:
            WireError: ``blob`` is not a valid schema.
        """
        digest = xxhash.xxh3_64_intdigest(blob, seed=int(packed))
        known = self._by_digest.get(digest)
        if known is not None:
            self._by_digest.move_to_end(digest)
            for was_packed, wire, schema in known:
                if was_packed == packed and wire == blob:
                    return schema
        raw = inflate_bounded(blob, None, "description schema", rank) if packed else blob
        schema = Schema.from_msgpack(raw, rank)
        self._by_digest.setdefault(digest, []).append((packed, bytes(blob), schema))
        while len(self._by_digest) > self._capacity:
            self._by_digest.popitem(last=False)
        return schema


# --------------------------------------------------------------------------- one rank, columnar


@dataclass(frozen=True, eq=False)
class RankColumns:
    """One rank's description as the coordinator holds it: a shared schema and raw boxes.

    ``boxes`` is ``(2 * schema.width,)`` int64: offsets of every tensor, then
    sizes. Decoding checks only the structure; :func:`box_problem` checks the
    values for every rank of a schema at once.
    """

    rank: int
    schema: Schema
    boxes: np.ndarray
    store: BoxStore | None = None  # when set, ``boxes`` is row ``rank`` of ``store.matrix(schema)``

    def to_description(self) -> RankDescription:
        """The per-tensor form (tests, tools and error paths; slow for big descriptions)."""
        sch, vals = self.schema, self.boxes.tolist()
        owner = self.rank
        tensors = []
        for i, (key, dtype, shape, local) in enumerate(zip(sch.keys, sch.dtypes, sch.shapes, sch.local)):
            a, n = int(sch.start[i]), len(shape)
            off, siz = tuple(vals[a : a + n]), tuple(vals[sch.width + a : sch.width + a + n])
            tensors.append(TensorDescription(key, dtype, shape, off, siz, owner if local else None))
        return RankDescription(self.rank, tuple(tensors))


class BoxStore:
    """(coordinator) Every rank's boxes of one save: per schema, one matrix with row ``r`` for rank ``r``.

    Rows of ranks that use another schema are never written, so they take no
    memory (the matrices are zero-filled lazily by the OS). For an FSDP job
    this is the one ``(ranks, 2S)`` matrix that planning works on, filled as
    requests arrive, with no per-rank copy kept and none made at planning.

    A matrix is int32 (half the memory: 233 MB instead of 466 at 16,384 ranks x 1000
    tensors) when its schema's every dim is below 2**31, so that every *valid* box
    fits; a row with a value outside ``[0, 2**31)`` is invalid then, and rather than
    narrowing it (2**32 would become 0, a valid-looking offset) the matrix is widened
    to int64 once, so that :func:`box_problem` sees and names the real value.
    Whoever computes ends, volumes or byte counts from a matrix widens first.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._matrices: dict[Schema, np.ndarray] = {}

    def matrix(self, schema: Schema) -> np.ndarray:
        """The ``(world_size, 2S)`` boxes of ``schema`` (int32 or int64, see the class)."""
        m = self._matrices.get(schema)
        if m is None:
            narrow = not schema.width or int(schema.shape_flat.max()) < INT32_LIMIT
            m = self._matrices[schema] = np.zeros((self.world_size, 2 * schema.width), np.int32 if narrow else np.int64)
        return m

    def put(self, cols: RankColumns) -> RankColumns:
        """Keep ``cols``'s boxes here; returns the same description, its boxes a row of the store."""
        m = self.matrix(cols.schema)
        b = cols.boxes
        if m.dtype != b.dtype and len(b) and not (int(b.min()) >= 0 and int(b.max()) < INT32_LIMIT):
            m = self._matrices[cols.schema] = m.astype(np.int64)  # an invalid box: keep its value for box_problem
        m[cols.rank] = b
        return RankColumns(cols.rank, cols.schema, m[cols.rank], self)


def encode_description(schema_blob: bytes, offsets: np.ndarray, sizes: np.ndarray) -> bytes:
    """The wire form of one description: the schema's bytes and the flat offsets and sizes.

    Args:
        schema_blob: :attr:`Schema.blob`.
        offsets, sizes: every tensor's box, concatenated in schema order.
    """
    boxes = np.concatenate([np.asarray(offsets, "<i8").reshape(-1), np.asarray(sizes, "<i8").reshape(-1)])
    packed = [msgpack.ExtType(ZLIB, zlib.compress(b, 6)) for b in (schema_blob, boxes.tobytes())]
    return msgpack.packb([WIRE_VERSION, *packed], use_bin_type=True)


def decode_description(data: Any, rank: int, schemas: SchemaCache | None = None) -> RankColumns:
    """Decode the structure of a description received from ``rank``.

    Args:
        data: the PlanRequest's ``desc`` payload.
        rank: the sender (rank-local tensors belong to it).
        schemas: a cache of decoded schemas (the coordinator keeps one).

    Raises:
        WireError: not a description, an invalid schema, or boxes whose count
            does not match the schema. Box *values* are checked by :func:`box_problem`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"rank {rank}: description must be bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=False, max_str_len=0, max_array_len=3, max_map_len=0)
    except Exception as e:
        raise WireError(f"rank {rank}: description is not valid msgpack ({type(e).__name__}: {e})") from e
    if not (type(obj) is tuple and len(obj) == 3):
        raise WireError(f"rank {rank}: description must be [version, schema, boxes]")
    version, blob, boxes = obj
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"rank {rank}: unsupported description version {version!r}")
    packed_schema, packed = (type(x) is msgpack.ExtType and x.code == ZLIB for x in (blob, boxes))
    if (type(blob) is not bytes and not packed_schema) or (type(boxes) is not bytes and not packed):
        raise WireError(f"rank {rank}: description schema and boxes must be binary")
    if packed_schema:
        blob = blob.data
    schemas = schemas if schemas is not None else SchemaCache(capacity=1)
    schema = schemas.get(blob, rank, packed_schema)
    if packed:
        boxes = inflate_bounded(boxes.data, 16 * schema.width, "description boxes", rank)
    if len(boxes) != 16 * schema.width:
        raise WireError(f"rank {rank}: description has {len(boxes)} bytes of boxes, its schema needs {16 * schema.width}")
    return RankColumns(rank, schema, np.frombuffer(boxes, "<i8").astype(np.int64, copy=False))


def inflate_bounded(data: bytes, want: int | None, what: str, rank: int) -> bytes:
    """Inflate a zlib stream of the wire, bounded: exactly ``want`` bytes, or (``None``) at most what
    deflate's ratio allows for ``data`` (1032:1), so a message never inflates further than its own size implies.

    Raises:
        WireError: not zlib data, not one complete stream, or not ``want`` bytes; names ``what`` and the rank.
    """
    limit = want + 1 if want is not None else 1032 * len(data) + 1024
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(data, limit)
        complete = inflate.eof and not inflate.unconsumed_tail and not inflate.unused_data
    except zlib.error as e:
        raise WireError(f"rank {rank}: {what}: not zlib data ({e})") from e
    if (want is not None and len(raw) != want) or not complete:
        got = f"more than {len(raw) - 1}" if len(raw) == limit else str(len(raw))
        raise WireError(f"rank {rank}: {what} inflate to {got} bytes{f', its schema needs {want}' if want is not None else ' (not one complete stream)'}")
    return raw


def box_problem(schema: Schema, boxes: np.ndarray) -> tuple[int, int, str] | None:
    """Check the boxes of every rank that shares ``schema`` at once.

    Args:
        boxes: ``(n_ranks, 2 * schema.width)`` int64 or int32 (a :class:`BoxStore`'s), one row per rank.

    Returns:
        ``None`` when every box lies inside its global shape, else
        ``(row, tensor index, sentence)`` for the first bad box.
    """
    s = schema.width
    # Where both halves are non-negative their sum is exact as the unsigned type of the same width (below 2**32
    # for int32, 2**64 for int64), so an int32 matrix (a 16,384-rank one is 233 MB) is read as it is, not widened.
    narrow = boxes.dtype == np.int32 and (not s or int(schema.shape_flat.max()) < 1 << 32)
    unsigned = np.uint32 if narrow else np.uint64
    shape = schema.shape_flat.astype(unsigned)
    for a in range(0, len(boxes), 256):  # blocks of rows bound the temporaries
        blk = boxes[a : a + 256]
        if not narrow and blk.dtype != np.int64:
            blk = np.asarray(blk, np.int64)  # int32 offset + size could pass an int32 shape's 2**32: widen first
        off, siz = blk[:, :s], blk[:, s:]
        negative = (off | siz) < 0
        bad = negative | (off.view(unsigned) + siz.view(unsigned) > shape)
        if bad.any():
            row, dim = (int(x[0]) for x in np.nonzero(bad))
            return _describe_box(schema, boxes, a + row, dim, bool(negative[row].any()))
    return None


def _describe_box(schema: Schema, boxes: np.ndarray, row: int, dim: int, negative: bool) -> tuple[int, int, str]:
    s, i = schema.width, int(schema.dim_tensor[dim])
    a, n = int(schema.start[i]), int(schema.ndim[i])
    o, z = boxes[row, a : a + n].tolist(), boxes[row, s + a : s + a + n].tolist()
    if negative:
        return row, i, f"box at offsets {o} sizes {z} has a negative offset or size"
    return row, i, f"box at offsets {o} sizes {z} lies outside shape {list(schema.shapes[i])}"


# --------------------------------------------------------------------------- one rank, per tensor


@dataclass(frozen=True, slots=True)
class TensorDescription:
    """One tensor (or one chunk of it) as one rank holds it.

    ``offsets``/``sizes`` place this rank's box in the global tensor of shape
    ``shape``; a size of 0 makes an empty shard. ``owner`` is set for
    rank-local tensors (stored per rank, never deduplicated across ranks).
    """

    key: KeyPath
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    owner: int | None = None


@dataclass(frozen=True, slots=True)
class RankDescription:
    """Everything the coordinator needs from one rank to plan a save (rank side form)."""

    rank: int
    tensors: tuple[TensorDescription, ...]
    _memo: dict = field(default_factory=dict, compare=False, repr=False)  # columns and wire bytes, built once

    def columns(self) -> RankColumns:
        """The columnar form.

        Raises:
            PlanError: a box whose length differs from its shape's, or a
                rank-local tensor owned by another rank.
        """
        cols = self._memo.get("columns")
        if cols is None:
            for t in self.tensors:
                if not len(t.offsets) == len(t.sizes) == len(t.shape):
                    raise PlanError(
                        f"tensor {format_path(t.key)} on rank {self.rank}: box offsets {list(t.offsets)} sizes {list(t.sizes)} do not match shape {list(t.shape)}",
                        t.key,
                        [self.rank],
                    )
                if t.owner is not None and t.owner != self.rank:
                    raise PlanError(f"tensor {format_path(t.key)} described by rank {self.rank} is owned by rank {t.owner}", t.key, [self.rank, t.owner])
            ts = self.tensors
            schema = Schema.build((t.key for t in ts), (t.dtype for t in ts), (t.shape for t in ts), (t.owner is not None for t in ts))
            flat = list(chain(chain.from_iterable(t.offsets for t in ts), chain.from_iterable(t.sizes for t in ts)))
            cols = self._memo["columns"] = RankColumns(self.rank, schema, np.array(flat, dtype=np.int64).reshape(-1))
        return cols

    def to_msgpack(self) -> bytes:
        """Compact, deterministic wire form (the rank travels in the message header)."""
        data = self._memo.get("wire")
        if data is None:
            cols = self.columns()
            s = cols.schema.width
            data = self._memo["wire"] = encode_description(cols.schema.blob, cols.boxes[:s], cols.boxes[s:])
        return data

    def digest(self) -> int:
        """xxh3-64 of :meth:`to_msgpack`; equal digests mean an unchanged description."""
        return xxhash.xxh3_64_intdigest(self.to_msgpack())

    @classmethod
    def from_msgpack(cls, data: bytes, rank: int) -> RankDescription:
        """Decode and fully validate a description received from ``rank``.

        Raises:
            WireError: on anything malformed, naming the tensor and field;
                never any other exception type.
        """
        with gc_paused():
            cols = decode_description(data, rank)
            problem = box_problem(cols.schema, cols.boxes.reshape(1, -1))
            if problem is not None:
                _, i, why = problem
                raise WireError(f"rank {rank}: tensor {format_path(cols.schema.keys[i])}: {why}")
            return cols.to_description()
