"""Format version 2: a small MANIFEST (the *index*) and one *fragment* of chunk records per writing rank.

The index holds what v1's MANIFEST holds except the chunk tables: per tensor
its dtype, shape and :class:`~dist_ckpt.split.Split` (the cells and their
writers, a formula for a regular split), and per rank the name, size and
xxh3 of its fragment. A fragment holds, for each cell its rank wrote, the
(entry, cell) and where the bytes are (file, offset, nbytes, xxh3, block
sums); the cell's box is the index's, stored once. A loading rank reads the
index, finds the cells its targets touch (:func:`~dist_ckpt.split.cells_for_box`)
and reads only their owners' fragments.

Entry points (stable): :func:`decode_index`, :func:`decode_fragment`,
:func:`check_fragment_bytes`; seeing v2 as v1 (:func:`~dist_ckpt.materialize.materialize`,
``skeleton``, ``from_manifest``) is in :mod:`dist_ckpt.materialize`.
Decoding raises only :class:`~dist_ckpt.errors.ManifestError` subclasses.
See docs/format.md "Version 2".
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np
import xxhash

from .dtypes import itemsize
from .errors import FragmentError, ManifestError
from .flatten import KeyPath
from .layout_names import STORED_RE, fragment_name, stored_rank
from .manifest import (
    ALIGN,
    FORMAT,
    _decode_objects,
    _expect,
    _ext_hook,
    _key,
    _objects_obj,
    _pack_default,
    _pairs,
    block_counts,
    decode_header,
    parse_dtype_shape,
)
from .split import Split, split_from_obj

__all__ = [
    "FRAGMENT_FORMAT",
    "VERSION",
    "Fragment",
    "FragmentRef",
    "Index",
    "IndexEntry",
    "check_fragment_bytes",
    "decode_fragment",
    "decode_index",
    "peek_version",
    "plain_name",
]

VERSION = 2
FRAGMENT_FORMAT = "dist_ckpt-fragment"
MAX_FRAGMENT_BYTES = 1 << 32
"""Largest fragment a reader accepts (the index states each fragment's size; it is checked before reading)."""
_MAX_BLOCK = 1 << 40
_BAD_OFFSET_BITS = np.int64(~((1 << 62) - ALIGN))
_COLS = (("entry", "<i4"), ("cell", "<i8"), ("file", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("xxh3", "<u8"))


@dataclass(frozen=True)
class FragmentRef:
    """Where a rank's fragment is (its name relative to the checkpoint) and what its bytes must be."""

    name: str
    nbytes: int
    xxh3: int


@dataclass(frozen=True, eq=False)
class IndexEntry:
    """One tensor of the index: dtype, global shape and its split (no chunk rows)."""

    dtype: str
    shape: tuple[int, ...]
    split: Split


@dataclass(frozen=True, eq=False)
class Index:
    """A decoded version-2 MANIFEST.

    Entries are numbered: the global ``tensors`` in map order, then each
    ``local`` section's tensors, sections in map order (:attr:`entries`).
    """

    world_size: int
    files: tuple[str, ...]
    fragments: tuple[FragmentRef | None, ...]
    tensors: Mapping[KeyPath, IndexEntry]
    objects: Mapping[KeyPath, Any]
    structure: Any
    local: Mapping[int, tuple[Mapping[KeyPath, IndexEntry], Mapping[KeyPath, Any]]] = field(default_factory=dict)
    user_meta: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @functools.cached_property
    def entries(self) -> list[tuple[int | None, KeyPath, IndexEntry]]:
        """``(local rank or None, key, entry)`` by entry number."""
        out: list[tuple[int | None, KeyPath, IndexEntry]] = [(None, k, e) for k, e in self.tensors.items()]
        for r, (tensors, _) in self.local.items():
            out.extend((r, k, e) for k, e in tensors.items())
        return out

    @functools.cached_property
    def number(self) -> dict[tuple[int | None, KeyPath], int]:
        """Entry number of ``(local rank or None, key)``."""
        return {(r, k): i for i, (r, k, _) in enumerate(self.entries)}

    @functools.cached_property
    def split_classes(self) -> tuple[np.ndarray, list[Split]]:
        """``(class of each entry, split of each class)``: entries that share one decoded :class:`Split`
        (:func:`decode_index` decodes equal splits of equal shapes once) share a class, so per-cell work
        runs once per class (an FSDP model has a few) rather than once per tensor."""
        first: dict[int, int] = {}
        splits: list[Split] = []
        cls = np.empty(len(self.entries), np.int64)
        for i, (_, _, e) in enumerate(self.entries):
            k = first.setdefault(id(e.split), len(splits))
            if k == len(splits):
                splits.append(e.split)
            cls[i] = k
        return cls, splits

    @functools.cached_property
    def entry_itemsize(self) -> np.ndarray:
        """int64 bytes per element of each entry's dtype."""
        return np.array([itemsize(e.dtype) for _, _, e in self.entries], np.int64)

    @functools.cached_property
    def file_rank(self) -> np.ndarray:
        """int64 rank that wrote each of ``files`` (-1 for a name that does not say)."""
        return self._file_names[0]

    @functools.cached_property
    def file_position(self) -> dict[str, int]:
        """Position in ``files`` of each data file by its plain name (``data/r00003.bin``: what its rank calls it)."""
        return self._file_names[1]

    @functools.cached_property
    def _file_names(self) -> tuple[np.ndarray, dict[str, int]]:
        ranks, position = np.empty(len(self.files), np.int64), {}
        for i, f in enumerate(self.files):
            if f == f"data/r{i:05d}.bin":  # rank i's one plain file at place i (a local save of one file per rank): no parse
                ranks[i], position[f] = i, i
                continue
            ranks[i] = _rank_or(f, -1)
            if STORED_RE.match(f):
                position[plain_name(f)] = i
        return ranks, position

    def to_msgpack(self) -> bytes:
        """Encode (docs/format.md "Version 2")."""
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "world_size": self.world_size,
            "user_meta": dict(self.user_meta),
            "files": list(self.files),
            "fragments": [None if f is None else [f.name, f.nbytes, f.xxh3] for f in self.fragments],
            "tensors": _entries_obj(self.tensors),
            "objects": _objects_obj(self.objects),
            "local": {r: {"tensors": _entries_obj(t), "objects": _objects_obj(o)} for r, (t, o) in self.local.items()},
            "structure": self.structure,
        }
        return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def plain_name(name: str) -> str:
    """The name a rank gave a file the MANIFEST names ``name`` (``data/28c8.x-3.r00003.bin`` -> ``data/r00003.bin``)."""
    m = STORED_RE.match(name)
    return f"data/{m.group('base')}" if m else name


def _rank_or(name: str, default: int) -> int:
    r = stored_rank(name)
    return default if r is None or r >= 1 << 31 else r  # no rank of any world_size: and it must fit the int64 columns


def _entries_obj(tensors: Mapping[KeyPath, IndexEntry]) -> dict:
    return {tuple(k): {"dtype": e.dtype, "shape": list(e.shape), "split": e.split.to_obj()} for k, e in tensors.items()}


@dataclass(frozen=True, eq=False)
class Fragment:
    """One rank's chunk records, column by column (record ``i`` holds cell ``cell[i]`` of entry ``entry[i]``)."""

    rank: int
    entry: np.ndarray  # int32
    cell: np.ndarray  # int64
    file: np.ndarray  # int32: index into ``files`` as stored; once decoded against an index, into the index's files
    offset: np.ndarray  # int64
    nbytes: np.ndarray  # int64
    xxh3: np.ndarray  # uint64
    blocks: np.ndarray | None = None  # uint64 block sums of every record, record after record
    block_bytes: int = 0
    files: tuple[str, ...] = ()  # the rank's data files by their plain names (data/r00003.bin)

    def __len__(self) -> int:
        return len(self.entry)

    def to_msgpack(self) -> bytes:
        obj: dict[str, Any] = {"format": FRAGMENT_FORMAT, "version": VERSION, "rank": self.rank, "files": list(self.files), "n": len(self)}
        for name, dt in _COLS:
            obj[name] = np.ascontiguousarray(getattr(self, name), dt).tobytes()
        if self.blocks is not None:
            obj["block"] = self.block_bytes
            obj["blocks"] = np.ascontiguousarray(self.blocks, "<u8").tobytes()
        return msgpack.packb(obj, use_bin_type=True)

    @functools.cached_property
    def block_starts(self) -> np.ndarray:
        """``(n + 1,)``: record ``i``'s block sums are ``blocks[block_starts[i]:block_starts[i + 1]]``."""
        counts = block_counts(self.nbytes, self.block_bytes) if self.block_bytes else np.zeros(len(self), np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# -- decoding the index --------------------------------------------------------------


def peek_version(data: bytes) -> Any:
    """The ``version`` field of MANIFEST bytes without decoding the rest (None if it cannot be found)."""
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        n = unpacker.read_map_header()
        for _ in range(n):
            if unpacker.unpack() == "version":
                return unpacker.unpack()
            unpacker.skip()
    except Exception:  # garbage: the full decoder explains it
        return None
    return None


def decode_index(data: bytes) -> Index:
    """Decode and check untrusted version-2 MANIFEST bytes.

    Raises:
        ManifestError: not msgpack, not version 2, or any field ill-typed or out of range
            (names the field); never executes code.
    """
    try:
        obj = msgpack.unpackb(data, strict_map_key=False, raw=False, ext_hook=_ext_hook, object_pairs_hook=_pairs)
    except ManifestError:
        raise
    except Exception as e:  # msgpack raises many types on garbage
        raise ManifestError(f"MANIFEST is not valid msgpack ({type(e).__name__}: {e})") from e
    head = decode_header(obj, VERSION, "tensors", "fragments")
    ws = head["world_size"]
    splits: dict[Any, Split] = {}  # equal split objects of equal shapes: decoded once, one Split shared (Index.split_classes)
    local = {}
    for r, sec in head["local"].items():
        local[r] = (_decode_entries(sec.get("tensors", {}), ws, f"local[{r}]", splits), _decode_objects(sec.get("objects", {}), f"local[{r}]"))
    return Index(
        world_size=ws,
        files=head["files"],
        fragments=_decode_refs(obj["fragments"], ws),
        tensors=_decode_entries(obj["tensors"], ws, "tensors", splits),
        objects=head["objects"],
        structure=head["structure"],
        local=local,
        user_meta=head["user_meta"],
        created=head["created"],
    )


def _decode_refs(refs: Any, ws: int) -> tuple[FragmentRef | None, ...]:
    _expect(refs, list, "fragments")
    if len(refs) != ws:
        raise ManifestError(f"fragments has {len(refs)} entries for world_size {ws}")
    out: list[FragmentRef | None] = []
    for r, ref in enumerate(refs):
        if ref is None:
            out.append(None)
            continue
        if type(ref) is not list or len(ref) != 3 or type(ref[0]) is not str or type(ref[1]) is not int or type(ref[2]) is not int:
            raise ManifestError(f"fragments[{r}] must be nil or [name, nbytes, xxh3], got {ref!r:.80}")
        name, nbytes, digest = ref
        if name != f"data/r{r:05d}.frag":  # rank r's plain fragment name (what local saves write) needs no parse
            m = STORED_RE.match(name)
            if not m or m.group("kind") != "frag" or int(m.group("rank")) != r or m.group("thread"):
                raise ManifestError(f"fragments[{r}]: {name!r:.80} is not the name of rank {r}'s fragment ({fragment_name(r)})")
        if not 0 <= nbytes <= MAX_FRAGMENT_BYTES or not 0 <= digest < 1 << 64:
            raise ManifestError(f"fragments[{r}] ({name}): nbytes {nbytes} or xxh3 out of range")
        out.append(FragmentRef(name, nbytes, digest))
    return tuple(out)


def _decode_entries(tensors: Any, ws: int, where: str, splits: dict[Any, Split]) -> dict[KeyPath, IndexEntry]:
    _expect(tensors, dict, where)
    out = {}
    for k, e in tensors.items():
        key = _key(k, where)
        at = f"{where}[{list(key)!r:.120}]"
        dtype, shape = parse_dtype_shape(e, at)
        obj = e.get("split")
        frozen = _frozen(obj)
        if frozen is None:  # not of a split's form: split_from_obj says what is wrong
            out[key] = IndexEntry(dtype, shape, split_from_obj(obj, shape, ws, at))
            continue
        split = splits.get((shape, frozen))
        if split is None:  # decoding is deterministic in (object, shape, world_size): an equal one decodes (or fails) alike
            split = splits[(shape, frozen)] = split_from_obj(obj, shape, ws, at)
        out[key] = IndexEntry(dtype, shape, split)
    return out


def _frozen(obj: Any) -> bytes | None:
    """A hashable form of a split object (its msgpack bytes, the same for equal objects), or None if it has none."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except Exception:  # e.g. an extension type: split_from_obj refuses it by name
        return None


# -- fragments -------------------------------------------------------------------------


def check_fragment_bytes(data: bytes, ref: FragmentRef, where: str) -> None:
    """Refuse fragment bytes that are not those the index states (size, then xxh3).

    Raises:
        FragmentError: naming the fragment (``where``) and what differs.
    """
    if len(data) != ref.nbytes:
        raise FragmentError(f"fragment {where} has {len(data)} bytes, the MANIFEST says {ref.nbytes}")
    digest = xxhash.xxh3_64_intdigest(data)
    if digest != ref.xxh3:
        raise FragmentError(f"fragment {where}: xxh3 {digest:016x} does not match the MANIFEST's {ref.xxh3:016x} (corrupt or replaced)")


def decode_fragment(data: bytes, rank: int, index: Index, where: str | None = None) -> Fragment:
    """Decode and check rank ``rank``'s untrusted fragment against ``index`` (whole-column checks).

    Every record must name an entry and cell of the index that ``rank`` owns,
    with that cell's byte count, in a data file of ``rank``, at an aligned
    offset; no (entry, cell) twice; block sums as many as the records' blocks.

    Raises:
        FragmentError: naming the fragment (``where``, default its index name) and the field.
    """
    if where is None:
        ref = index.fragments[rank] if 0 <= rank < len(index.fragments) else None
        where = ref.name if ref is not None else fragment_name(rank)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise FragmentError(f"fragment {where} is not valid msgpack ({type(e).__name__}: {e})") from e
    if type(obj) is not dict or obj.get("format") != FRAGMENT_FORMAT or obj.get("version") != VERSION:
        raise FragmentError(f"fragment {where} is not a version-{VERSION} dist_ckpt fragment")
    if obj.get("rank") != rank or type(obj.get("rank")) is not int:
        raise FragmentError(f"fragment {where} says rank {obj.get('rank')!r:.20}, the MANIFEST lists it for rank {rank}")
    n = obj.get("n")
    if type(n) is not int or n < 0:
        raise FragmentError(f"fragment {where}: n must be a non-negative int")
    cols = {}
    for name, dt in _COLS:
        raw = obj.get(name)
        if type(raw) is not bytes or len(raw) != n * np.dtype(dt).itemsize:
            raise FragmentError(f"fragment {where}: {name} must be {n} x {dt} bytes")
        cols[name] = np.frombuffer(raw, dt).astype(dt[1:])
    files = _decode_files(obj.get("files"), rank, index, where)
    if n and (int(cols["file"].min()) < 0 or int(cols["file"].max()) >= len(files)):
        raise FragmentError(f"fragment {where}: a record names a file index outside its {len(files)} files")
    cols["file"] = files[cols["file"]].astype(np.int32) if n else cols["file"]
    frag = Fragment(rank, **cols, **_decode_blocks(obj, where))  # type: ignore[arg-type]
    problem = _records_problem(frag, index)
    if problem:
        raise FragmentError(f"fragment {where}: {problem}")
    return frag


def _decode_files(files: Any, rank: int, index: Index, where: str) -> np.ndarray:
    """Positions in the index's files of the fragment's ``files`` (its rank's plain data file names)."""
    if type(files) is not list or len(files) > len(index.files):
        raise FragmentError(f"fragment {where}: files must be an array of at most {len(index.files)} names")
    out = []
    for f in files:
        m = STORED_RE.match(f) if type(f) is str else None
        if not m or m.group("kind") != "bin" or plain_name(f) != f:
            raise FragmentError(f"fragment {where}: {f!r:.80} is not a data file name (data/rNNNNN[-tK].bin)")
        if int(m.group("rank")) != rank:
            raise FragmentError(f"fragment {where}: data file {f!r}, which is not rank {rank}'s")
        if f not in index.file_position:
            raise FragmentError(f"fragment {where}: data file {f!r} is not among the MANIFEST's files")
        out.append(index.file_position[f])
    return np.array(out, np.int64)


def _decode_blocks(obj: dict, where: str) -> dict[str, Any]:
    if "block" not in obj and "blocks" not in obj:
        return {}
    block, raw = obj.get("block"), obj.get("blocks")
    if type(block) is not int or not ALIGN <= block <= _MAX_BLOCK or block % ALIGN:
        raise FragmentError(f"fragment {where}: block must be a multiple of {ALIGN} up to {_MAX_BLOCK}, got {block!r:.40}")
    if type(raw) is not bytes or len(raw) % 8:
        raise FragmentError(f"fragment {where}: blocks must be uint64 bytes")
    return {"blocks": np.frombuffer(raw, "<u8").astype(np.uint64), "block_bytes": block}


def _records_problem(f: Fragment, index: Index) -> str | None:
    """What is wrong with a fragment's records, or None (whole-column checks, then one pass per entry it holds)."""
    if not len(f):
        return None
    n_entries = len(index.entries)
    if int(f.entry.min()) < 0 or int(f.entry.max()) >= n_entries:
        return f"a record names an entry outside [0, {n_entries})"
    if int(f.file.min()) < 0 or int(f.file.max()) >= len(index.files):
        return f"a record names a data file index outside [0, {len(index.files)})"
    bad = np.flatnonzero(index.file_rank[f.file] != f.rank)
    if len(bad):
        return f"a record names data file {index.files[int(f.file[bad[0]])]!r}, which is not rank {f.rank}'s"
    if (f.offset & _BAD_OFFSET_BITS).any() or (f.nbytes >> 62).any() or (f.nbytes < 0).any():
        return f"a record's file offset or nbytes is negative, overflowing or not {ALIGN}-aligned"
    order = np.lexsort((f.cell, f.entry))
    ent, cell = f.entry[order], f.cell[order]
    dup = np.flatnonzero((ent[1:] == ent[:-1]) & (cell[1:] == cell[:-1]))
    if len(dup):
        return f"cell {int(cell[dup[0]])} of {_entry_name(index, int(ent[dup[0]]))} appears twice"
    nbytes = f.nbytes[order]
    worst = _first_bad_entry(index, ent, cell, nbytes, f.rank)
    if worst is not None:  # that entry's records, checked one by one for the message
        a, b = np.searchsorted(ent, [worst, worst + 1]).tolist()
        return _entry_records_problem(index, worst, cell[a:b], nbytes[a:b], f.rank) or f"records of {_entry_name(index, worst)} are inconsistent"
    if f.blocks is not None and len(f.blocks) != int(block_counts(f.nbytes, f.block_bytes).sum()):
        return f"{len(f.blocks)} block sums for records of {int(block_counts(f.nbytes, f.block_bytes).sum())} blocks"
    return None


def _first_bad_entry(index: Index, ent: np.ndarray, cell: np.ndarray, nbytes: np.ndarray, rank: int) -> int | None:
    """The lowest entry with a record whose cell is out of range, not ``rank``'s or of the wrong byte count, or None.

    One pass per split class (:attr:`Index.split_classes`) over all its entries' records, not one per tensor.
    """
    classes, splits = index.split_classes
    cls = classes[ent]
    ok = np.ones(len(ent), bool)
    by_class = np.argsort(cls, kind="stable")
    bounds = np.flatnonzero(np.concatenate([[True], cls[by_class][1:] != cls[by_class][:-1], [True]]))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        rows = by_class[a:b]
        split, c = splits[int(cls[rows[0]])], cell[rows]
        n = split.ncells
        inside = (c >= 0) & (c < n) if n < 1 << 63 else c >= 0
        ok[rows[~inside]] = False
        rows, c = rows[inside], c[inside]
        if len(rows):
            wrong = (split.owner(c) != rank) | (split.volumes(c) * index.entry_itemsize[ent[rows]] != nbytes[rows])
            ok[rows[wrong]] = False
    return None if ok.all() else int(ent[int(np.argmin(ok))])  # ``ent`` ascends: the first bad record has the lowest entry


def _entry_records_problem(index: Index, e: int, cells: np.ndarray, nbytes: np.ndarray, rank: int) -> str | None:
    _, _, entry = index.entries[e]
    split = entry.split
    if int(cells.min()) < 0 or int(cells.max()) >= split.ncells:
        return f"a record names a cell of {_entry_name(index, e)} outside [0, {split.ncells})"
    owner = split.owner(cells)
    if (owner != rank).any():
        c = int(cells[owner != rank][0])
        return f"cell {c} of {_entry_name(index, e)} belongs to rank {int(split.owner(np.array([c]))[0])}, not rank {rank}"
    want = split.volumes(cells) * itemsize(entry.dtype)
    if (want != nbytes).any():
        i = int(np.flatnonzero(want != nbytes)[0])
        return f"cell {int(cells[i])} of {_entry_name(index, e)} has nbytes {int(nbytes[i])}, its box needs {int(want[i])}"
    return None


def _entry_name(index: Index, e: int) -> str:
    r, key, _ = index.entries[e]
    return f"key {list(key)!r:.120}" + (f" (rank {r}'s local)" if r is not None else "")
