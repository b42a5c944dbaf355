"""Manifest encode/decode and validation (pure, no processes)."""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from fuzz_gen import Gen, fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ckpt.errors import ManifestError
from dist_ckpt.manifest import ALIGN, ChunkTable, LocalSection, Manifest, Pickled, TensorEntry


def table(boxes, itemsize=4, file=0):
    off = np.array([b[0] for b in boxes], np.int64).reshape(len(boxes), -1)
    siz = np.array([b[1] for b in boxes], np.int64).reshape(len(boxes), -1)
    nbytes = np.prod(siz, axis=1) * itemsize if siz.shape[1] else np.full(len(boxes), itemsize)
    pos = np.concatenate([[0], np.cumsum(-(-nbytes // ALIGN) * ALIGN)[:-1]]).astype(np.int64)
    return ChunkTable(off, siz, np.full(len(boxes), file, np.int32), pos, nbytes.astype(np.int64), np.arange(len(boxes), dtype=np.uint64))


def make(tensors=None, objects=None, **kw):
    tensors = tensors if tensors is not None else {("w",): TensorEntry("float32", (4, 4), table([((0, 0), (2, 4)), ((2, 0), (2, 4))]))}
    return Manifest(world_size=2, files=("data/r00000.bin",), tensors=tensors, objects=objects or {("step",): 3}, structure=["d", ["w", "step"], [0, 0]], **kw)


def raw(m: Manifest) -> dict:
    return msgpack.unpackb(m.to_msgpack(), strict_map_key=False, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})


def repack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_round_trip_keeps_every_field():
    m = make(local={1: LocalSection({("rng",): TensorEntry("uint8", (8,), table([((0,), (8,))], 1))}, {("seed",): 7})}, user_meta={"step": 10})
    back = Manifest.from_msgpack(m.to_msgpack())
    assert back.world_size == 2 and back.files == m.files and back.user_meta == {"step": 10}
    assert back.objects == {("step",): 3}
    e = back.tensors[("w",)]
    assert e.dtype == "float32" and e.shape == (4, 4)
    for col in ("offsets", "sizes", "file", "offset", "nbytes", "xxh3"):
        assert np.array_equal(getattr(e.chunks, col), getattr(m.tensors[("w",)].chunks, col))
    assert back.local[1].objects == {("seed",): 7} and back.local[1].tensors[("rng",)].shape == (8,)
    assert back.structure == m.structure


def test_int_and_str_keys_stay_distinct():
    m = make(objects={("state", 0): 1, ("state", "0"): 2})
    back = Manifest.from_msgpack(m.to_msgpack())
    assert back.objects == {("state", 0): 1, ("state", "0"): 2}


def test_pickled_objects_stay_bytes_on_decode():
    back = Manifest.from_msgpack(make(objects={("o",): Pickled(b"\x80\x04N.")}).to_msgpack())
    assert back.objects[("o",)] == Pickled(b"\x80\x04N.")


def test_zero_d_and_empty_tensors():
    t = {("s",): TensorEntry("int64", (), table([((), ())], 8)), ("e",): TensorEntry("float32", (0, 3), ChunkTable.empty(2))}
    back = Manifest.from_msgpack(make(tensors=t).to_msgpack())
    assert back.tensors[("s",)].shape == () and len(back.tensors[("e",)].chunks) == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.update(format="other"), "not a dist_ckpt MANIFEST"),
        (lambda o: o.update(version=2), "version 2 is not supported"),
        (lambda o: o.pop("tensors"), r"lacks field\(s\) tensors"),
        (lambda o: o.update(world_size="2"), "world_size must be a positive int"),
        (lambda o: o.update(files=["/etc/passwd"]), "relative path"),
        (lambda o: o.update(files=["../x"]), "relative path"),
        (lambda o: o["tensors"][("w",)].update(dtype="float33"), "unknown dtype"),
        (lambda o: o["tensors"][("w",)].update(shape=[4, -4]), "non-negative ints"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(n=3), "must be"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(offset=np.array([0, 100], "<i8").tobytes()), "aligned"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(offsets=np.array([0, 0, 1, 0], "<i8").tobytes()), "gap"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(offsets=np.array([0, 0, 3, 0], "<i8").tobytes()), "outside shape"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(offsets=np.array([0, 0, -2, 0], "<i8").tobytes()), "negative"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(sizes=np.array([2, 4, 1 << 62, 4], "<i8").tobytes()), "overflowing"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(nbytes=np.array([32, 31], "<i8").tobytes()), "nbytes"),
        (lambda o: o["tensors"][("w",)]["chunks"].update(file=np.array([0, 5], "<i4").tobytes()), "file index"),
        (lambda o: o.update(structure=["x"]), "structure|tag|node"),
        (lambda o: o.update(local={9: {}}), "outside world_size"),
    ],
)
def test_invalid_manifests_raise_precise_errors(mutate, message):
    obj = raw(make())
    mutate(obj)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_msgpack(repack(obj))


def test_overlapping_chunks_are_rejected():
    t = {("w",): TensorEntry("float32", (4, 4), table([((0, 0), (3, 4)), ((2, 0), (2, 4))]))}
    with pytest.raises(ManifestError, match="gap|overlap|outside"):
        Manifest.from_msgpack(make(tensors=t).to_msgpack())
    t = {("w",): TensorEntry("float32", (4, 4), table([((0, 0), (4, 4)), ((0, 0), (2, 2))]))}
    with pytest.raises(ManifestError, match="overlap"):
        Manifest.from_msgpack(make(tensors=t).to_msgpack())


@pytest.mark.parametrize("data", [b"", b"\xc1", b"garbage that is not msgpack", msgpack.packb([1, 2]), msgpack.packb({"format": "dist_ckpt"})])
def test_garbage_and_truncated_manifests(data):
    with pytest.raises(ManifestError):
        Manifest.from_msgpack(data)


def test_truncated_manifest():
    data = make().to_msgpack()
    for n in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(ManifestError):
            Manifest.from_msgpack(data[:n])


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(0, 5), c, max_size=4),
    max_leaves=20,
)


def decodes_or_manifest_error(data: bytes) -> None:
    """Whatever the bytes, decoding yields a manifest or raises :class:`ManifestError`, nothing else."""
    try:
        Manifest.from_msgpack(data)
    except ManifestError:
        pass


# Hypothesis on a few hundred inputs (shrinking, its own edge cases); each seeded twin
# runs 10,000 of the same kinds in a second or two (see fuzz_gen.py).
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=200), _values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_fuzz_decoder_only_raises_manifest_error(data):
    decodes_or_manifest_error(data)


def _seeded_manifest_input(g: Gen) -> bytes:
    """What the hypothesis fuzzer draws: up to 200 random bytes, or a packed value as ``_values`` draws it."""
    if g.random() < 0.5:
        return g.binary(200)
    value = g.value(20, 4, key=lambda: g.text(6) if g.random() < 0.5 else g.randint(0, 5), leaf=lambda: g.scalar(8, 16))
    return msgpack.packb(value, use_bin_type=True)


def test_fuzz_decoder_only_raises_manifest_error_seeded():
    fuzz("manifest_decoder", _seeded_manifest_input, decodes_or_manifest_error)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_mutated_valid_manifest(data):
    blob = bytearray(make().to_msgpack())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    decodes_or_manifest_error(bytes(blob))


def test_fuzz_mutated_valid_manifest_seeded():
    valid = make().to_msgpack()
    fuzz("manifest_mutated", lambda g: g.mutate(valid, 4), decodes_or_manifest_error)


class _Draws:
    """The draws :func:`_layout` makes, from hypothesis (``data.draw``); :class:`_SeededDraws` makes them from a :class:`Gen`."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def coin(self) -> bool:
        return self.draw(st.booleans())

    def pick(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def sorted_ints(self, lo: int, hi: int, max_size: int) -> list[int]:
        return sorted(self.draw(st.lists(st.integers(lo, hi), max_size=max_size)))

    def permutation(self, items: list[Any]) -> list[Any]:
        return list(self.draw(st.permutations(items)))


class _SeededDraws(_Draws):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen

    def integer(self, lo: int, hi: int) -> int:
        return self.gen.randint(lo, hi)

    def coin(self) -> bool:
        return self.gen.random() < 0.5

    def pick(self, options: list[Any]) -> Any:
        return self.gen.choice(options)

    def sorted_ints(self, lo: int, hi: int, max_size: int) -> list[int]:
        return sorted(self.gen.randint(lo, hi) for _ in range(self.gen.size(max_size)))

    def permutation(self, items: list[Any]) -> list[Any]:
        return self.gen.sample(items, len(items))


def _layout(d: _Draws) -> TensorEntry:
    """A tensor entry of 0-3 dims: a sound layout (chained along one dim, a grid, one chunk), then maybe one defect."""
    ndim = d.integer(0, 3)
    shape = tuple(d.integer(0, 5) for _ in range(ndim))
    dim = d.integer(0, max(ndim - 1, 0))
    if ndim and d.coin():  # chained along dim d, possibly with empty chunks
        cuts = d.sorted_ints(0, shape[dim], 4)
        bounds = [0, *cuts, shape[dim]]
        boxes = [
            (tuple(lo if i == dim else 0 for i in range(ndim)), tuple(hi - lo if i == dim else shape[i] for i in range(ndim)))
            for lo, hi in zip(bounds, bounds[1:])
        ]
    elif ndim >= 2 and shape[0] >= 2 and shape[1] >= 2:  # a 2 x 2 grid over the first two dims
        a, b = shape[0] // 2, shape[1] // 2
        rest = shape[2:]
        boxes = [((r, c) + (0,) * len(rest), (h, w) + rest) for r, h in ((0, a), (a, shape[0] - a)) for c, w in ((0, b), (b, shape[1] - b))]
    else:
        boxes = [((0,) * ndim, shape)]
    if d.coin():
        boxes = d.permutation(boxes)
    t = table(boxes, 4)
    cols = {name: getattr(t, name).copy() for name in ("offsets", "sizes", "file", "offset", "nbytes", "xxh3")}
    defect = d.pick(["none", "none", "offsets", "sizes", "file", "offset", "nbytes", "dup", "drop", "blocks"])
    i = d.integer(0, max(len(t) - 1, 0))
    if defect in ("offsets", "sizes") and ndim and len(t):
        cols[defect][i, d.integer(0, ndim - 1)] += d.pick([-1, 1, 1 << 62])
    elif defect == "file" and len(t):
        cols["file"][i] = d.pick([1, 2, -1])
    elif defect == "offset" and len(t):
        cols["offset"][i] += d.pick([1, -ALIGN, 1 << 62])
    elif defect == "nbytes" and len(t):
        cols["nbytes"][i] += 4
    elif defect in ("dup", "drop") and len(t):
        keep = list(range(len(t))) + [i] if defect == "dup" else [j for j in range(len(t)) if j != i]
        cols = {k: v[keep] for k, v in cols.items()}
    blocks = None
    if defect == "blocks" or d.coin():
        count = int((-(-cols["nbytes"] // ALIGN)).clip(0).sum()) + (d.pick([-1, 1]) if defect == "blocks" else 0)
        blocks = np.zeros(max(count, 0), np.uint64)
    return TensorEntry("float32", shape, ChunkTable(**cols, blocks=blocks, block_bytes=ALIGN if blocks is not None else 0))


def check_tables_together(entries: dict[tuple[str, ...], TensorEntry]) -> None:
    """Decoding all tables at once fails exactly as decoding each in turn (or neither fails)."""
    from dist_ckpt.manifest import decode_tensor_entry

    obj = raw(make(tensors=entries))
    try:
        for k, e in obj["tensors"].items():
            decode_tensor_entry(e, 1, f"tensors[{list(k)!r:.120}]")
        want = None
    except ManifestError as e:
        want = str(e)
    try:
        Manifest.from_msgpack(repack(obj))
        got = None
    except ManifestError as e:
        got = str(e)
    assert got == want


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_tables_checked_together_fail_exactly_as_one_by_one(data):
    """The vectorised pass over all tables accepts and refuses what checking each table in turn does, with its message."""
    check_tables_together({(f"t{i}",): _layout(_Draws(data.draw)) for i in range(data.draw(st.integers(1, 5)))})


def test_tables_checked_together_fail_exactly_as_one_by_one_seeded():
    """The same on 1,500 seeded inputs (hypothesis' own cost made 1,500 examples take ~20 s)."""
    fuzz("tables_together", lambda g: {(f"t{i}",): _layout(_SeededDraws(g)) for i in range(g.randint(1, 5))}, check_tables_together, n=1_500)
