"""Fuzzed decoding of format v2's index (MANIFEST) and fragments: typed errors only, 10,000 inputs each.

Inputs come from ``random.Random`` seeded per input (a fixed list: every run
is the same, and a failure names the seed and the input it rebuilds), not
from hypothesis, whose own machinery costs more per example than a decode:
each test runs its 10,000 inputs in a few seconds. The kinds of input:
random bytes, random msgpack values, byte flips and truncations of valid
encodings, and mutations of valid decoded objects (a field deleted or
replaced by a value of another type, a huge or edge int, a truncated or
oversized bin, a bin's int64/int32 element changed, deep nesting).

What a decoder may do with an input: refuse it with a
:class:`~dist_ckpt.errors.ManifestError` (its subclasses included), or
return a value that keeps its promises, checked here: owners inside
``world_size``, cells inside the tensor, re-encoding accepted again; a
fragment's records owned by its rank with their cell's byte count, and
materialisable. Set ``DIST_CKPT_FUZZ_SEED`` to explore other inputs.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import fuzz_gen
import msgpack
import numpy as np
import pytest
from dist_helpers import chunk_table

from dist_ckpt import manifest_v2 as v2
from dist_ckpt.dtypes import itemsize
from dist_ckpt.errors import ManifestError
from dist_ckpt.manifest import ALIGN, ChunkTable, LocalSection, Manifest, TensorEntry, block_counts
from dist_ckpt.materialize import from_manifest, materialize
from dist_ckpt.split import cells_for_box

N_INPUTS = 10_000
BASE_SEED = int(os.environ.get("DIST_CKPT_FUZZ_SEED", "0")) * 1_000_000

pytestmark = pytest.mark.timeout(300)

# -- valid checkpoints to mutate ------------------------------------------------------------


def _chunked(rows: int, cols: int, ranks: int, blocks: bool = False) -> ChunkTable:
    """torch.chunk of dim 0 over ``ranks`` ranks (empty shards dropped, as the planner does)."""
    step = -(-rows // ranks)
    boxes = [((a, 0), (min(step, rows - a), cols)) for a in range(0, rows, step)]
    return chunk_table(boxes, list(range(len(boxes))), blocks=blocks)


def _manifests() -> list[Manifest]:
    """Every split form (even grid, boundaries, 2-D mesh, explicit boxes, explicit owners, scalar, empty), locals, blocks."""
    files = tuple(f"data/r{r:05d}.bin" for r in range(4))
    uneven = chunk_table([((0,), (3,)), ((3,), (4,)), ((7,), (1,))], [1, 3, 0], itemsize=2)  # boundaries, owners not affine
    tensors = {
        ("w",): TensorEntry("float32", (10, 3), _chunked(10, 3, 4, blocks=True)),
        ("bias",): TensorEntry("float32", (6,), chunk_table([((0,), (6,))], [2], blocks=True)),
        ("mesh",): TensorEntry("bfloat16", (4, 6), chunk_table([((a, b), (2, 3)) for a in (0, 2) for b in (0, 3)], [0, 1, 2, 3], itemsize=2, blocks=True)),
        ("irr",): TensorEntry("float32", (4, 4), chunk_table([((0, 0), (2, 4)), ((2, 0), (2, 1)), ((2, 1), (2, 3))], [3, 1, 0], blocks=True)),
        ("scalar",): TensorEntry("int64", (), chunk_table([((), ())], [1], itemsize=8, blocks=True)),
        ("empty",): TensorEntry("float32", (0, 5), ChunkTable.empty(2)),
    }
    local = {1: LocalSection({("rng",): TensorEntry("uint8", (8,), chunk_table([((0,), (8,))], [1], itemsize=1, blocks=True))}, {("seed",): 7})}
    structure = ["d", ["w", "bias", "mesh", "irr", "scalar", "empty", "rng", "seed", "step"], [0] * 9]
    small = Manifest(4, files, tensors, {("step",): 3}, structure, local=local, user_meta={"tag": "x"}, created=1.5e9)
    files8 = tuple(f"data/r{r:05d}.bin" for r in range(8))
    plain = {
        ("a",): TensorEntry("float32", (37, 5), _chunked(37, 5, 8)),
        ("u",): TensorEntry("int32", (8,), chunk_table([((0,), (3,)), ((3,), (4,)), ((7,), (1,))], [5, 7, 6], itemsize=4)),
        ("b",): TensorEntry("float16", (8,), uneven),
    }
    fsdp = Manifest(8, files8, plain, {}, ["d", ["a", "u", "b"], [0, 0, 0]], created=2.0e9)
    return [small, fsdp]


def _loose(data: bytes) -> Any:
    """Valid msgpack bytes decoded, list map keys as tuples (key paths), as the decoders build them."""
    return msgpack.unpackb(data, strict_map_key=False, object_pairs_hook=lambda p: {_hashable(k): v for k, v in p})


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


BASES = []  # (index bytes, index object, decoded index, {rank: fragment bytes}, {rank: fragment object})
for _m in _manifests():
    _index, _frags = from_manifest(_m)
    _data = _index.to_msgpack()
    BASES.append((_data, _loose(_data), v2.decode_index(_data), _frags, {r: _loose(f) for r, f in _frags.items()}))

# -- the generator ---------------------------------------------------------------------------

_INT_EDGES = [0, 1, -1, 2, 3, 4, 7, 8, 4096, 2**31 - 1, 2**31, 2**32, 2**40, 2**62 - 1, 2**62, 2**63 - 1, -(2**31), -(2**63), 2**64 - 1]
_FLOATS = [0.0, -0.0, 1.5, float("nan"), float("inf"), -float("inf"), 1e300, 5e-324]
_MSGPACK_BYTES = bytes([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xD4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x80, 0x91, 0x81, 0xA0, 0xFF])
_NAMES = ["data/r00000.frag", "data/r00001.frag", "data/r00001.bin", "data/r0000000000000000000000001.bin", "data/r99999999999999999999.frag", "MANIFEST"]
_NAMES += ["data", "../x", "data/r00002-t7.bin", "data/abcd.s3-name.r00003.frag", "", "data/r\u0661\u0662\u0663\u0664\u0665.bin", "float32", "grid", "boxes"]


class Gen(fuzz_gen.Gen):
    """Seeded fuzz values: integers around this format's edges (offsets past 2**62, cells past 2**40)."""

    INT_EDGES = _INT_EDGES
    INT_ODDS = (0.5, 0.8)
    SMALL_INTS = (-10, 40)

    def blob(self, n: int) -> bytes:
        data = bytearray(self.getrandbits(8 * n).to_bytes(n, "little")) if n else bytearray()
        for _ in range(self.randint(0, n // 4)):
            data[self.randrange(n)] = self.choice(_MSGPACK_BYTES)
        return bytes(data)

    def scalar(self) -> Any:
        kind = self.randrange(8)
        if kind == 0:
            return None
        if kind == 1:
            return self.random() < 0.5
        if kind in (2, 3):
            return self.integer()
        if kind == 4:
            return self.choice(_FLOATS)
        if kind == 5:
            return self.choice(_NAMES) if self.random() < 0.6 else "".join(chr(self.randint(32, 0x3000)) for _ in range(self.randint(0, 6)))
        if kind == 6:
            return self.blob(self.choice([0, 1, 4, 8, 12, 16, 24, 40]))
        return (
            msgpack.ExtType(self.choice([1, 1, 2, 127]), self.blob(self.randint(0, 6)))
            if self.random() < 0.8
            else msgpack.Timestamp(self.randint(0, 2**34 - 1))
        )

    def value(self, budget: int = 12) -> Any:
        """A nested value of at most ``budget`` leaves; keys str, int or arrays (key paths)."""
        if budget <= 1 or self.random() < 0.45:
            return self.scalar()
        n = self.randint(0, 4)
        if self.random() < 0.5:
            return [self.value(budget // 2) for _ in range(n)]
        return {self.key(): self.value(budget // 2) for _ in range(n)}

    def key(self) -> Any:
        r = self.random()
        if r < 0.4:
            return self.choice(["format", "version", "world_size", "files", "fragments", "tensors", "objects", "structure", "local", "split", "grid", "n"])
        if r < 0.7:
            return self.integer()
        return tuple(self.choice(["w", "a", 0, 1]) for _ in range(self.randint(0, 3)))

    def deep(self) -> Any:
        """Nesting past the decoders' depth limit (and msgpack's): built as bytes by :func:`pack`."""
        return Deep(self.choice([30, 63, 64, 65, 200, 1100, 3000]), self.random() < 0.5, self.scalar())

    def like(self, v: Any) -> Any:
        """A value near ``v``: its int nudged to an edge, its bin cut, grown or with one element changed, its list or map thinned."""
        if type(v) is int:
            w = self.choice([v + self.randint(-2, 2), -v, v * 2 ** self.randint(1, 40), self.integer()])
            return max(-(2**63), min(2**64 - 1, w))  # msgpack's int range
        if type(v) is bytes:
            return self.near_bin(v)
        if type(v) is list and v:
            w = list(v)
            op = self.randrange(4)
            if op == 0:
                del w[self.randrange(len(w))]
            elif op == 1:
                w.insert(self.randrange(len(w) + 1), self.like(self.choice(w)))
            elif op == 2:
                i = self.randrange(len(w))
                w[i] = self.like(w[i])
            else:
                self.shuffle(w)
            return w
        if type(v) is dict and v:
            w = dict(v)
            k = self.choice(list(w))
            if self.random() < 0.5:
                del w[k]
            else:
                w[k] = self.like(w[k])
            return w
        if type(v) is str:
            return self.choice(_NAMES) if self.random() < 0.7 else v[: self.randint(0, len(v))] + self.choice(["", "x", "\x00", "/..", "0"])
        return self.scalar()

    def near_bin(self, v: bytes) -> bytes:
        op = self.randrange(6)
        if op == 5 and len(v) >= 8 and len(v) % 4 == 0:  # one element copied onto another: equal boundaries, repeated cells
            width = 8 if len(v) % 8 == 0 else 4
            a = np.frombuffer(v, f"<i{width}").copy()
            a[self.randrange(len(a))] = a[self.randrange(len(a))]
            return a.tobytes()
        if op == 0 and v:
            return v[: self.randrange(len(v))]
        if op == 1:
            return v + self.blob(self.choice([1, 4, 8, 16]))
        if op == 2 and len(v) >= 4 and len(v) % 4 == 0:
            width = 8 if len(v) % 8 == 0 and self.random() < 0.7 else 4
            a = np.frombuffer(v, f"<i{width}").copy()
            lim = 2 ** (8 * width - 1)
            a[self.randrange(len(a))] = max(-lim, min(lim - 1, self.integer()))
            return a.tobytes()
        if op == 3:
            return self.blob(len(v))
        return b"\x00" * len(v) if self.random() < 0.5 else b"\xff" * len(v)

    def mutate(self, obj: Any) -> Any:
        """``obj`` with 1-3 nodes, each drawn among all its nodes, changed (deleted, replaced by another type,
        made near, nested deep, given a stray key)."""
        for _ in range(self.randint(1, 3)):
            obj = self._replace(obj, self.choice(paths(obj)))
        return obj

    def _replace(self, node: Any, path: tuple) -> Any:
        if path:
            node = dict(node) if isinstance(node, dict) else list(node)
            node[path[0]] = self._replace(node[path[0]], path[1:])
            return node
        op = self.randrange(6)
        if op == 0 and isinstance(node, dict) and node:
            node = dict(node)
            del node[self.choice(list(node))]
            return node
        if op == 1 and isinstance(node, dict):
            return {**node, self.key(): self.value()}
        if op == 2:
            return self.value()
        if op == 3:
            return self.deep()
        return self.like(node)

    def bytes_from(self, data: bytes) -> bytes:
        """``data`` flipped in a few bytes, truncated, extended or spliced."""
        out = bytearray(data)
        op = self.randrange(4)
        if op == 0:
            for _ in range(self.randint(1, 4)):
                out[self.randrange(len(out))] ^= 1 << self.randrange(8)
        elif op == 1:
            for _ in range(self.randint(1, 3)):
                out[self.randrange(len(out))] = self.choice(_MSGPACK_BYTES) if self.random() < 0.5 else self.randrange(256)
        elif op == 2:
            del out[self.randrange(len(out)) :]
        else:
            at = self.randrange(len(out))
            out[at:at] = self.blob(self.randint(1, 9))
        return bytes(out)


def paths(obj: Any, at: tuple = ()) -> list[tuple]:
    """The path (keys and indices from the root) of every node of a decoded value, the root's included."""
    out = [at]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, at + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, at + (i,))
    return out


class Deep:
    """``depth`` one-element arrays (or one-key maps) around ``leaf``: deeper than msgpack's packer nests."""

    def __init__(self, depth: int, maps: bool, leaf: Any) -> None:
        self.depth, self.maps, self.leaf = depth, maps, leaf
        self.marker = os.urandom(16)  # packed as a bin, then replaced by the nesting's bytes

    def encoded(self) -> bytes:
        return (b"\x81\xa1k" if self.maps else b"\x91") * self.depth + msgpack.packb(self.leaf, use_bin_type=True)

    def __repr__(self) -> str:
        return f"Deep({self.depth}, maps={self.maps}, {self.leaf!r})"


def pack(obj: Any) -> bytes:
    """msgpack bytes of a fuzz value (its :class:`Deep` nodes spliced in)."""
    deep: list[Deep] = []

    def default(v: Any) -> Any:
        if isinstance(v, Deep):
            deep.append(v)
            return v.marker
        raise TypeError(type(v).__name__)

    data = msgpack.packb(obj, use_bin_type=True, default=default)
    for d in deep:
        data = data.replace(b"\xc4\x10" + d.marker, d.encoded(), 1)
    return data


def make_input(g: Gen, valid_bytes: bytes, valid_obj: Any, head: dict) -> bytes:
    """One input: random bytes, a random value, bytes of a valid encoding changed, or a valid object mutated."""
    r = g.random()
    if r < 0.08:
        return g.blob(g.randint(0, 64))
    if r < 0.16:
        return pack({**head, **{g.key(): g.value() for _ in range(g.randint(0, 5))}} if g.random() < 0.7 else g.value())
    if r < 0.4:
        return g.bytes_from(valid_bytes)
    return pack(g.mutate(valid_obj))


def fuzz(name: str, make: Callable[[Gen], Any], check: Callable[[Any], None], n: int = N_INPUTS) -> dict[str, int]:
    """``check(make(Gen(seed)))`` for ``n`` fixed seeds; how many inputs each outcome had.

    Raises:
        AssertionError: ``check`` raised anything but a ManifestError (names the seed and the input).
    """
    base = BASE_SEED + sum(map(ord, name)) * 100_000
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(n):
        seed = base + i
        case = make(Gen(seed))
        try:
            check(case)
            outcomes["accepted"] += 1
        except ManifestError:
            outcomes["refused"] += 1
        except Exception as e:  # anything else (a KeyError, RecursionError, a broken promise) is what a fuzzer is for
            raise AssertionError(f"fuzz {name}: input {i} (Gen({seed})) raised {type(e).__name__}: {e}\ninput: {case!r:.3000}") from e
    return outcomes


# -- the index -------------------------------------------------------------------------


def use_index(index: v2.Index) -> None:
    """What a reader does with an accepted index must work: every promise of the decoder, checked."""
    ws = index.world_size
    assert len(index.fragments) == ws
    index.file_rank  # noqa: B018  (a fragment's check needs it)
    for _, key, e in index.entries[:64]:
        split, n = e.split, e.split.ncells
        assert split.shape == e.shape and itemsize(e.dtype) > 0
        if not n:
            continue
        ends = np.arange(n, dtype=np.int64) if n <= 4096 else np.array([0, n - 1], np.int64)
        owners = split.owner(ends)
        assert ((owners >= 0) & (owners < ws)).all(), (key, owners)
        off, siz = split.cell_boxes(ends)
        assert ((off >= 0) & (siz > 0) & (off + siz <= np.asarray(e.shape, np.int64))).all(), (key, off, siz)
        if n <= 4096:  # every cell seen: together they tile the tensor
            assert int(np.prod(siz, axis=1).sum()) == int(np.prod(e.shape)), (key, off, siz)
        if all(L > 0 for L in e.shape):
            cells = cells_for_box(split, [0] * len(e.shape), [1] * len(e.shape))
            assert len(cells) == 1 and 0 <= int(cells[0]) < n, (key, cells)
    again = v2.decode_index(index.to_msgpack())  # what was accepted re-encodes into what is accepted
    assert again.world_size == ws and list(again.tensors) == list(index.tensors)


def test_fuzz_index_decoding_raises_only_manifest_errors():
    def make(g: Gen) -> bytes:
        data, obj, _, _, _ = g.choice(BASES)
        return make_input(g, data, obj, {"format": "dist_ckpt", "version": 2})

    outcomes = fuzz("index", make, lambda data: use_index(v2.decode_index(data)))
    # the inputs reach past the header: both outcomes are common
    assert outcomes["refused"] > N_INPUTS // 2 and outcomes["accepted"] > N_INPUTS // 50, outcomes


# -- fragments -------------------------------------------------------------------------


_COLS = (("entry", "<i4"), ("cell", "<i8"), ("file", "<i4"), ("offset", "<i8"), ("nbytes", "<i8"), ("xxh3", "<u8"))


def records_changed(g: Gen, obj: dict) -> dict:
    """A valid fragment object with whole records duplicated, dropped, reordered or given another's cell (columns kept consistent)."""
    cols = {name: np.frombuffer(obj[name], dt) for name, dt in _COLS if type(obj.get(name)) is bytes}
    n = obj["n"]
    per_block = None
    if "blocks" in obj:  # each record's block sums move with it
        starts = np.concatenate([[0], np.cumsum(block_counts(cols["nbytes"].astype(np.int64), obj["block"]))])
        blocks = np.frombuffer(obj["blocks"], "<u8")
        per_block = [blocks[starts[i] : starts[i + 1]] for i in range(n)]
    op = g.randrange(4)
    rows = list(range(n))
    if op == 0 and n:
        rows.insert(g.randrange(n + 1), g.randrange(n))  # a record twice
    elif op == 1 and n:
        del rows[g.randrange(n)]
    elif op == 2:
        g.shuffle(rows)
    out = {**obj, "n": len(rows), **{name: c[rows].tobytes() for name, c in cols.items()}}
    if op == 3 and n >= 2:  # one record takes another's (entry, cell)
        i, j = g.randrange(n), g.randrange(n)
        for name in ("entry", "cell") if g.random() < 0.5 else ("cell",):
            c = cols[name].copy()
            c[i] = c[j]
            out[name] = c.tobytes()
    if per_block is not None:
        out["blocks"] = np.concatenate([np.zeros(0, "<u8")] + [per_block[r] for r in rows]).tobytes()
    return out


def use_fragment(index: v2.Index, rank: int, f: v2.Fragment, others: dict[int, v2.Fragment]) -> None:
    """An accepted fragment's records are its rank's, of their cell's size, once each; they materialise."""
    assert f.rank == rank
    cells: dict[int, list[int]] = {}
    for e, c, nb in zip(f.entry.tolist(), f.cell.tolist(), f.nbytes.tolist()):
        _, _, entry = index.entries[e]
        assert int(entry.split.owner(np.array([c]))[0]) == rank
        assert nb == int(entry.split.volumes(np.array([c]))[0]) * itemsize(entry.dtype)
        assert c not in cells.setdefault(e, [])
        cells[e].append(c)
    assert (index.file_rank[f.file] == rank).all() and (f.offset % ALIGN == 0).all()
    wanted = {e: np.array(sorted(c), np.int64) for e, c in cells.items()}
    m = materialize(index, {rank: f}, wanted)  # only its own cells: must not fail
    assert sum(len(t.chunks) for t in m.tensors.values()) + sum(len(t.chunks) for s in m.local.values() for t in s.tensors.values()) == len(f)
    materialize(index, {**others, rank: f})  # every cell: may miss ones the mutation dropped (a FragmentError)


DECODED = [{r: v2.decode_fragment(b, r, base[2]) for r, b in base[3].items()} for base in BASES]


def test_fuzz_fragment_decoding_raises_only_manifest_errors():
    def make(g: Gen) -> tuple[int, int, bytes]:
        b = g.randrange(len(BASES))
        _, _, _, frags, objs = BASES[b]
        rank = g.choice(sorted(frags))
        head = {"format": v2.FRAGMENT_FORMAT, "version": 2, "rank": rank, "n": g.choice([0, 1, 2, 3])}
        claimed = rank if g.random() < 0.95 else g.randrange(BASES[b][2].world_size)  # sometimes read for another rank
        if g.random() < 0.15:
            return b, claimed, pack(records_changed(g, objs[rank]))
        return b, claimed, make_input(g, frags[rank], objs[rank], head)

    def check(case: tuple[int, int, bytes]) -> None:
        b, rank, data = case
        index = BASES[b][2]
        use_fragment(index, rank, v2.decode_fragment(data, rank, index), DECODED[b])

    outcomes = fuzz("fragment", make, check)
    assert outcomes["refused"] > N_INPUTS // 2 and outcomes["accepted"] > N_INPUTS // 50, outcomes


def test_the_valid_bases_are_accepted_and_cover_every_split_form():
    """The fuzzers start from valid inputs of every split form (else they would test the refusal of garbage only)."""
    forms = set()
    for (data, _, index, frags, _), decoded in zip(BASES, DECODED):
        use_index(v2.decode_index(data))
        for r, f in frags.items():
            use_fragment(index, r, v2.decode_fragment(f, r, index), decoded)
        for _, _, e in index.entries:
            s = e.split
            forms.add(("boxes" if s.dims is None else "grid", "affine" if s.affine is not None else "owners"))
            forms.update("bounds" for d in (s.dims or ()) if not isinstance(d, int))
    assert forms >= {("grid", "affine"), ("grid", "owners"), ("boxes", "owners"), "bounds"}, forms


def test_a_rank_too_large_for_any_world_in_a_file_name_is_no_rank():
    """Found by the index fuzzer: such a name overflowed the int64 column of file ranks (OverflowError) when a fragment was checked."""
    data, obj, _, frags, _ = BASES[0]
    obj = {**obj, "files": ["data/r99999999999999999999.bin"] + obj["files"][1:]}
    index = v2.decode_index(pack(obj))
    with pytest.raises(ManifestError, match="r00000.frag"):
        v2.decode_fragment(frags[0], 0, index)  # its records name file 0, which is now no rank's
    assert v2.decode_fragment(frags[1], 1, index).rank == 1
