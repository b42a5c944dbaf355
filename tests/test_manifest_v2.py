"""Format version 2: index + per-rank fragments (pure codec tests, then checkpoints on disk)."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
from dist_helpers import chunk_table
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ckpt import manifest_v2 as v2
from dist_ckpt.errors import FragmentError, ManifestError
from dist_ckpt.fragments import needed_cells
from dist_ckpt.manifest import ChunkTable, LocalSection, Manifest, TensorEntry
from dist_ckpt.materialize import from_manifest, materialize
from dist_ckpt.split import cells_for_box, detect_split

# -- helpers -------------------------------------------------------------------------


FILES = tuple(f"data/r{r:05d}.bin" for r in range(4))


def fsdp(rows, cols, ranks=4, blocks=False):
    """torch.chunk of a (rows, cols) tensor along dim 0 over ``ranks`` ranks (empty shards dropped, as the planner does)."""
    step = -(-rows // ranks)
    boxes = [((a, 0), (min(step, rows - a), cols)) for a in range(0, rows, step)]
    return chunk_table(boxes, list(range(len(boxes))), blocks=blocks)


def sample_manifest(blocks=True) -> Manifest:
    tensors = {
        ("w",): TensorEntry("float32", (10, 3), fsdp(10, 3, blocks=blocks)),
        ("bias",): TensorEntry("float32", (6,), chunk_table([((0,), (6,))], [2], blocks=blocks)),
        ("mesh",): TensorEntry("float32", (4, 6), chunk_table([((a, b), (2, 3)) for a in (0, 2) for b in (0, 3)], [0, 1, 2, 3], blocks=blocks)),
        ("irr",): TensorEntry("float32", (4, 4), chunk_table([((0, 0), (2, 4)), ((2, 0), (2, 1)), ((2, 1), (2, 3))], [3, 1, 0], blocks=blocks)),
        ("scalar",): TensorEntry("int64", (), chunk_table([((), ())], [1], itemsize=8, blocks=blocks)),
        ("empty",): TensorEntry("float32", (0, 5), ChunkTable.empty(2)),
    }
    local = {1: LocalSection({("rng",): TensorEntry("uint8", (8,), chunk_table([((0,), (8,))], [1], itemsize=1, blocks=blocks))}, {("seed",): 7})}
    structure = ["d", ["w", "bias", "mesh", "irr", "scalar", "empty", "rng", "seed", "step"], [0] * 9]
    return Manifest(4, FILES, tensors, {("step",): 3}, structure, local=local, user_meta={"tag": "x"}, created=1.5e9)


def encode(m: Manifest):
    index, frags = from_manifest(m)
    return index.to_msgpack(), frags


def decoded(m: Manifest, **kw):
    data, frags = encode(m)
    index = v2.decode_index(data)
    return index, {r: v2.decode_fragment(f, r, index) for r, f in frags.items()}


def assert_same(a: Manifest, b: Manifest) -> None:
    """Equal content, chunk order aside (v2 orders a tensor's chunks by cell)."""
    assert (a.world_size, a.files, a.objects, a.structure, dict(a.user_meta), a.created) == (
        b.world_size,
        b.files,
        b.objects,
        b.structure,
        dict(b.user_meta),
        b.created,
    )
    pairs = [(a.tensors, b.tensors)] + [(a.local[r].tensors, b.local[r].tensors) for r in a.local]
    assert set(a.local) == set(b.local) and all(a.local[r].objects == b.local[r].objects for r in a.local)
    for ta, tb in pairs:
        assert list(ta) == list(tb)
        for k in ta:
            ea, eb = ta[k], tb[k]
            assert (ea.dtype, ea.shape) == (eb.dtype, eb.shape)
            assert _rows(ea.chunks) == _rows(eb.chunks), k


def _rows(c: ChunkTable):
    out = []
    for i in range(len(c)):
        blk = None if c.blocks is None else c.blocks[c.block_starts[i] : c.block_starts[i + 1]].tolist()
        out.append((tuple(c.offsets[i]), tuple(c.sizes[i]), int(c.file[i]), int(c.offset[i]), int(c.nbytes[i]), int(c.xxh3[i]), blk))
    return sorted(out)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [True, False])
def test_round_trip_equals_the_v1_manifest(blocks):
    m = sample_manifest(blocks)
    index, frags = decoded(m)
    assert v2.peek_version(index.to_msgpack()) == 2 and v2.peek_version(m.to_msgpack()) == 1
    back = materialize(index, frags)
    assert back.version == 2 and len(back.fragments) == 4
    assert_same(m, back)
    # and the materialised manifest re-encodes as a valid v1 one (v2 -> v1 conversion)
    assert_same(m, Manifest.from_msgpack(back.to_msgpack()))


def test_split_forms_are_compact():
    index, _ = decoded(sample_manifest())
    t = index.tensors
    assert t[("w",)].split.dims == (3, 3) and t[("w",)].split.affine == (0, 1)  # torch.chunk: a step and a formula
    assert t[("bias",)].split.dims == (6,) and t[("bias",)].split.affine == (2, 0)  # replicated, written by rank 2
    assert t[("mesh",)].split.dims == (2, 3) and t[("mesh",)].split.affine == (0, 1)  # 2-D mesh
    assert t[("irr",)].split.dims is None and t[("irr",)].split.owners.tolist() == [3, 1, 0]  # not a grid: boxes
    assert t[("scalar",)].split.ncells == 1 and t[("empty",)].split.ncells == 0


def test_fsdp_over_16384_ranks_is_a_few_bytes():
    n = 16384
    off = np.zeros((n, 2), np.int64)
    off[:, 0] = np.arange(n) * 4
    siz = np.tile([4, 512], (n, 1))
    split, cell = detect_split((n * 4, 512), off, siz, np.arange(n))
    assert split.dims == (4, 512) and split.affine == (0, 1) and np.array_equal(cell, np.arange(n))
    assert len(msgpack.packb(split.to_obj())) < 40


def test_uneven_boundaries_and_explicit_owners():
    # boundaries 0, 3, 4, 10 along dim 0 (not an even step), owners shuffled
    boxes = [((0,), (3,)), ((3,), (1,)), ((4,), (6,))]
    split, _ = detect_split((10,), *_arr(boxes), np.array([5, 0, 2]))
    assert split.dims[0].tolist() == [0, 3, 4, 10] and split.owners.tolist() == [5, 0, 2]


def _arr(boxes):
    return np.array([b[0] for b in boxes], np.int64), np.array([b[1] for b in boxes], np.int64)


# -- cells_for_box against brute force --------------------------------------------------------------


@st.composite
def layouts(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    kind = draw(st.sampled_from(["even", "cuts", "boxes"]))
    if kind == "boxes":  # split dim 0 in two, then the second half along dim -1: not a grid when both cut
        a = draw(st.integers(1, shape[0])) if shape[0] > 1 else shape[0]
        bxs = [((0,) * nd, (a,) + shape[1:])]
        if a < shape[0]:
            c = draw(st.integers(0, shape[-1]))
            rest = (shape[0] - a,) + shape[1:]
            if 0 < c < shape[-1] and nd > 1:
                bxs += [((a,) + (0,) * (nd - 1), rest[:-1] + (c,)), ((a,) + (0,) * (nd - 2) + (c,), rest[:-1] + (shape[-1] - c,))]
            else:
                bxs.append(((a,) + (0,) * (nd - 1), rest))
    else:
        per_dim = []
        for L in shape:
            if kind == "even":
                s = draw(st.integers(1, L))
                per_dim.append([(k, min(s, L - k)) for k in range(0, L, s)])
            else:
                cuts = sorted(set(draw(st.lists(st.integers(1, L - 1), max_size=3)))) if L > 1 else []
                b = [0] + cuts + [L]
                per_dim.append([(b[i], b[i + 1] - b[i]) for i in range(len(b) - 1)])
        bxs = [(tuple(o for o, _ in combo), tuple(z for _, z in combo)) for combo in itertools.product(*per_dim)]
    off, siz = _arr(bxs)
    target_off = tuple(draw(st.integers(0, L - 1)) for L in shape)
    target_siz = tuple(draw(st.integers(0, L - o)) for o, L in zip(target_off, shape))
    return shape, off, siz, target_off, target_siz


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_cells_for_box_matches_brute_force(case):
    shape, off, siz, t_off, t_siz = case
    split, cell = detect_split(shape, off, siz, np.arange(len(off)))
    c_off, c_siz = split.cell_boxes(np.arange(split.ncells))
    t_o, t_e = np.array(t_off), np.array(t_off) + np.array(t_siz)
    brute = np.flatnonzero(((c_off < t_e) & (t_o < c_off + c_siz)).all(axis=1)) if all(t_siz) else np.zeros(0, int)
    assert cells_for_box(split, t_off, t_siz).tolist() == brute.tolist()
    # the cells are the input boxes, and owners follow them
    assert sorted(map(tuple, np.concatenate([c_off, c_siz], 1).tolist())) == sorted(map(tuple, np.concatenate([off, siz], 1).tolist()))
    assert np.array_equal(split.owner(cell), np.arange(len(off)))


# -- hostile fragments and index ---------------------------------------------------------------


def test_flipped_byte_in_a_fragment_names_it():
    data, frags = encode(sample_manifest())
    index = v2.decode_index(data)
    bad = bytearray(frags[1])
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(FragmentError, match=r"data/r00001\.frag.*xxh3"):
        v2.check_fragment_bytes(bytes(bad), index.fragments[1], index.fragments[1].name)
    with pytest.raises(FragmentError, match=r"data/r00001\.frag.*bytes"):
        v2.check_fragment_bytes(frags[1][:-1], index.fragments[1], index.fragments[1].name)


def test_missing_fragment_names_it():
    index, frags = decoded(sample_manifest())
    del frags[3]
    with pytest.raises(FragmentError, match=r"rank 3's fragment data/r00003\.frag"):
        materialize(index, frags)


def _crafted(rank, **change):
    data, frags = encode(sample_manifest(blocks=False))
    index = v2.decode_index(data)
    obj = msgpack.unpackb(frags[rank])
    for name, fn in change.items():
        dt = dict(v2._COLS)[name]
        col = np.frombuffer(obj[name], dt).copy()
        fn(col)
        obj[name] = col.tobytes()
    return msgpack.packb(obj), rank, index


def _set(i, v):
    def f(col):
        col[i] = v

    return f


@pytest.mark.parametrize(
    "rank, change, match",
    [
        (1, {"cell": _set(0, 0)}, "belongs to rank 0, not rank 1"),  # w's cell 0 is rank 0's
        (0, {"nbytes": _set(0, 4)}, "has nbytes 4, its box needs"),
        (0, {"file": _set(0, 1)}, "outside its 1 files"),
        (0, {"entry": _set(0, 99)}, "outside"),
        (0, {"offset": _set(0, 5)}, "aligned"),
    ],
)
def test_crafted_records_are_refused(rank, change, match):
    data, r, index = _crafted(rank, **change)
    with pytest.raises(FragmentError, match=match):
        v2.decode_fragment(data, r, index)


def test_duplicate_cell_is_refused():
    data, frags = encode(sample_manifest(blocks=False))
    index = v2.decode_index(data)
    obj = msgpack.unpackb(frags[0])
    for name, dt in v2._COLS:
        col = np.frombuffer(obj[name], dt)
        obj[name] = np.concatenate([col, col[:1]]).tobytes()
    obj["n"] += 1
    with pytest.raises(FragmentError, match="appears twice"):
        v2.decode_fragment(msgpack.packb(obj), 0, index)


@pytest.mark.parametrize("files, match", [(["data/r00001.bin"], "not rank 0's"), (["data/r00000-t9.bin"], "not among"), (["../x.bin"], "not a data file name")])
def test_fragment_naming_a_file_not_its_own_is_refused(files, match):
    data, frags = encode(sample_manifest())
    index = v2.decode_index(data)
    obj = msgpack.unpackb(frags[0])
    obj["files"] = files
    with pytest.raises(FragmentError, match=match):
        v2.decode_fragment(msgpack.packb(obj), 0, index)


def test_fragment_of_another_rank_is_refused():
    data, frags = encode(sample_manifest())
    index = v2.decode_index(data)
    with pytest.raises(FragmentError, match="says rank 0"):
        v2.decode_fragment(frags[0], 1, index)


def _index_obj():
    data, _ = encode(sample_manifest())
    return msgpack.unpackb(data, strict_map_key=False, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda o: o["tensors"][("w",)]["split"].update(owner=[0, 5]), "outside world_size"),
        (lambda o: o["tensors"][("w",)]["split"].update(grid=[0, 3]), "positive"),
        (lambda o: o["tensors"][("w",)]["split"].update(grid=[np.array([0, 4, 9], "<i8").tobytes(), 3]), "rise strictly from 0 to 10"),
        (lambda o: o["tensors"][("irr",)]["split"]["boxes"].update(n=2), "int64 bytes"),
        (lambda o: o["tensors"][("irr",)]["split"].update(owners=b"\x00" * 12 + b"\x09\x00\x00\x00"), "int32"),
        (lambda o: o["fragments"].__setitem__(0, ["data/r00001.frag", 10, 0]), "not the name of rank 0's fragment"),
        (lambda o: o["fragments"].pop(), "entries for world_size"),
        (lambda o: o.update(version=3), "version 3"),
    ],
)
def test_crafted_index_is_refused(change, match):
    obj = _index_obj()
    change(obj)
    with pytest.raises(ManifestError, match=match):
        v2.decode_index(msgpack.packb(obj, use_bin_type=True))


def test_overlapping_explicit_boxes_are_refused():
    obj = _index_obj()
    boxes = obj["tensors"][("irr",)]["split"]["boxes"]
    off = np.frombuffer(boxes["offsets"], "<i8").copy()
    off[2] = 1  # the third box now overlaps the first
    boxes["offsets"] = off.tobytes()
    with pytest.raises(ManifestError, match="irr"):
        v2.decode_index(msgpack.packb(obj, use_bin_type=True))


def test_selective_materialisation_builds_only_needed_rows():
    index, frags = decoded(sample_manifest())
    w = index.number[(None, ("w",))]
    cells = cells_for_box(index.tensors[("w",)].split, (3, 0), (2, 3))  # rows 3-4: cells 1 only
    assert cells.tolist() == [1]
    owners = set(index.tensors[("w",)].split.owner(cells).tolist())
    m = materialize(index, {r: frags[r] for r in owners}, {w: cells})
    assert len(m.tensors[("w",)].chunks) == 1 and m.tensors[("w",)].chunks.offsets.tolist() == [[3, 0]]
    assert all(len(e.chunks) == 0 for k, e in m.tensors.items() if k != ("w",))


def fsdp_model() -> Manifest:
    """Twelve FSDP tensors of three shapes (two dtypes for one of them) over 4 ranks: three distinct splits."""
    tensors = {}
    for i in range(12):
        shape = [(10, 3), (8, 3), (6,)][i % 3]
        dtype = "int64" if i % 6 == 0 else "float32"
        boxes = fsdp(*shape, blocks=True) if len(shape) == 2 else chunk_table([((a,), (min(2, 6 - a),)) for a in range(0, 6, 2)], [0, 1, 2], blocks=True)
        if dtype == "int64":
            boxes = chunk_table(list(zip(boxes.offsets.tolist(), boxes.sizes.tolist())), boxes.file.tolist(), itemsize=8, blocks=True)
        tensors[(f"t{i}",)] = TensorEntry(dtype, shape, boxes)
    return Manifest(4, FILES, tensors, {}, ["d", [f"t{i}" for i in range(12)], [0] * 12], created=1.5e9)


def test_tensors_with_equal_splits_share_one_split_and_their_lookups():
    m = fsdp_model()
    index, frags = decoded(m)  # every fragment checked: per-entry dtypes apply within a shared split
    classes, splits = index.split_classes
    assert len(splits) == 3 and classes.tolist() == [0, 1, 2] * 4
    assert index.tensors[("t0",)].split is index.tensors[("t3",)].split is index.tensors[("t9",)].split
    box = {2: ((3, 0), (4, 3)), 1: ((3,), (2,))}  # rows 3..6 of every 2-D tensor, 3..4 of every 1-D one
    cells = needed_cells(index, [(index.number[(None, k)], *box[len(e.shape)]) for k, e in index.tensors.items()])
    assert cells[0] is cells[3] and [cells[i].tolist() for i in range(3)] == [[1, 2], [1, 2, 3], [1, 2]]
    got = materialize(index, frags, cells)
    for k, e in m.tensors.items():  # the rows built are exactly the v1 table's rows whose boxes meet the target's
        (lo,), (n,) = box[len(e.shape)][0][:1], box[len(e.shape)][1][:1]
        want = [row for row in _rows(e.chunks) if row[0][0] < lo + n and lo < row[0][0] + row[1][0]]
        assert _rows(got.tensors[k].chunks) == want, k


def test_the_lowest_bad_entry_is_named_whatever_its_split():
    index, _ = decoded(fsdp_model())
    data, frags = encode(fsdp_model())
    obj = msgpack.unpackb(frags[1])
    entry, nbytes = np.frombuffer(obj["entry"], "<i4"), np.frombuffer(obj["nbytes"], "<i8").copy()
    first, later = int(np.flatnonzero(entry == 4)[0]), int(np.flatnonzero(entry == 9)[0])  # t4: (8, 3) split; t9: (10, 3)
    nbytes[[first, later]] += 4096
    obj["nbytes"] = nbytes.tobytes()
    with pytest.raises(FragmentError, match=r"cell 1 of key \['t4'\] has nbytes"):
        v2.decode_fragment(msgpack.packb(obj), 1, index)


def test_selective_materialisation_names_the_lowest_entry_missing_a_cell():
    index, frags = decoded(fsdp_model())
    cells = {e: np.array([1], np.int64) for e in (7, 5)}  # rank 1's cells; its fragment is not given
    with pytest.raises(FragmentError, match=r"cell 1 of key \['t5'\] is missing: its writer rank 1's fragment data/r00001.frag"):
        materialize(index, {0: frags[0]}, cells)


# -- checkpoints on disk ---------------------------------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402
from dist_helpers import dtensor, global_tensor  # noqa: E402
from launcher import run_ranks  # noqa: E402

import dist_ckpt as dc  # noqa: E402
from dist_ckpt.cli import main as cli  # noqa: E402
from dist_ckpt.config import Config  # noqa: E402
from dist_ckpt.convert import convert  # noqa: E402
from dist_ckpt.loader import LoadInfo, read_manifest  # noqa: E402
from dist_ckpt.storage.local import LocalStorage  # noqa: E402
from dist_ckpt.verify import verify  # noqa: E402

ENV2 = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "20", "DIST_CKPT_FORMAT_VERSION": "2"}
SHAPES = {"w": (37, 12), "v": (16, 9), "b": (23,)}


class FragmentCounting(LocalStorage):
    """A local storage that records which fragments a reader fetched (the boundary a load reads through)."""

    def __init__(self) -> None:
        self.fragments: list[str] = []

    def read_bytes(self, path, max_bytes=1 << 32):
        if path.endswith(".frag"):
            self.fragments.append(os.path.basename(path))
        return super().read_bytes(path, max_bytes)


def _state():
    return {"w": torch.randn(10, 3), "n": {"b": torch.arange(7), "s": torch.tensor(2.5)}, "empty": torch.zeros(0, 4), "step": 3}


def _save_single(path, version):
    ck = dc.make_sync_checkpointer(config=Config(format_version=version))
    try:
        sd = _state()
        ck.save(path, sd)
    finally:
        ck.close()
    return sd


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            _equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _zeros():
    sd = _state()
    for t in (sd["w"], sd["n"]["b"], sd["n"]["s"]):
        t.zero_()
    sd["step"] = 0
    return sd


def test_v1_and_v2_checkpoints_load_verify_convert_and_list(tmp_path, capsys):
    saved = {v: _save_single(str(tmp_path / f"step-0000000{v}"), v) for v in (1, 2)}
    for v in (1, 2):
        path = str(tmp_path / f"step-0000000{v}")
        assert v2.peek_version(open(f"{path}/MANIFEST", "rb").read()) == v
        assert os.path.exists(f"{path}/data/r00000.frag") == (v == 2)
        got = dc.load(_zeros(), path)
        _equal(got, saved[v])
        assert verify(path).ok
        assert cli(["inspect", "--json", path]) == 0
        assert f'"format_version": {v}' in capsys.readouterr().out
    # v1 -> v2 -> v1 gives the same tensors
    convert(str(tmp_path / "step-00000001"), str(tmp_path / "as_v2"), "dist_ckpt", format_version=2)
    convert(str(tmp_path / "as_v2"), str(tmp_path / "back_v1"), "dist_ckpt", format_version=1)
    assert read_manifest(str(tmp_path / "as_v2"))[0].version == 2 and read_manifest(str(tmp_path / "back_v1"))[0].version == 1
    for p in ("as_v2", "back_v1"):
        _equal(dc.load(_zeros(), str(tmp_path / p)), saved[1])
        assert verify(str(tmp_path / p)).ok
    assert cli(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step-00000001" in out and "step-00000002" in out


def test_ls_and_the_managers_size_figure_read_the_index_alone(tmp_path, capsys):
    from dist_ckpt.manager import checkpoint_bytes

    path = str(tmp_path / "step-00000003")
    _save_single(path, 2)
    full = read_manifest(path)[0]
    size = sum(e.nbytes for e in full.tensors.values()) + sum(e.nbytes for sec in full.local.values() for e in sec.tensors.values())
    os.remove(f"{path}/data/r00000.frag")  # what reads a fragment now fails: these two must not
    assert checkpoint_bytes(path) == size > 0
    assert cli(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "committed" in out and "invalid" not in out, out


def test_corrupt_or_missing_fragment_on_disk_is_a_typed_error_naming_it(tmp_path):
    path = str(tmp_path / "ck")
    _save_single(path, 2)
    frag = f"{path}/data/r00000.frag"
    data = bytearray(open(frag, "rb").read())
    data[-3] ^= 0x01
    open(frag, "wb").write(bytes(data))
    for load in (lambda: dc.load(_zeros(), path), lambda: verify(path), lambda: read_manifest(path)):
        with pytest.raises(FragmentError, match=r"r00000\.frag.*xxh3"):
            load()
    os.remove(frag)
    with pytest.raises(FragmentError, match=r"r00000\.frag.*missing"):
        dc.load(_zeros(), path)


def _save_sharded(rank, world, path):
    sd = {name: dtensor(global_tensor(name, shape), world, "shard0") for name, shape in SHAPES.items()}
    sd["step"] = 11
    dc.save(sd, path)


def _load_sharded(rank, world, path):
    sd = {name: dtensor(torch.zeros(shape), world, "shard0") for name, shape in SHAPES.items()}
    sd["step"] = 0
    storage, info = FragmentCounting(), LoadInfo()
    dc.load(sd, path, storage=storage, info=info)
    for name, shape in SHAPES.items():
        assert torch.equal(sd[name].full_tensor(), global_tensor(name, shape)), name
    assert sd["step"] == 11 and info.fragments_read == len(storage.fragments)
    return sorted(storage.fragments)


def test_v2_save_on_4_ranks_loads_on_2_reading_only_the_fragments_it_needs(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_sharded, 4, path, env=ENV2)
    index = v2.decode_index(open(f"{path}/MANIFEST", "rb").read())
    assert [f.name for f in index.fragments] == [f"data/r{r:05d}.frag" for r in range(4)]
    assert index.tensors[("w",)].split.dims == (10, 12) and index.tensors[("w",)].split.affine == (0, 1)  # torch.chunk over 4: a formula
    read = run_ranks(_load_sharded, 2, path, env=ENV2)
    # rank 0 of 2 holds rows [0, 19) of w, [0, 8) of v, [0, 12) of b: cells of ranks 0 and 1 only
    assert read[0] == ["r00000.frag", "r00001.frag"]
    assert read[1] == ["r00001.frag", "r00002.frag", "r00003.frag"]


def test_index_claiming_2_40_cells_is_refused_before_allocating():
    obj = _index_obj()
    obj["tensors"][("w",)].update(shape=[3 << 40, 3], split={"grid": [3, 3], "owner": [0, 0]})  # 2**40 cells of 3 rows, all rank 0's
    index = v2.decode_index(msgpack.packb(obj, use_bin_type=True))
    _, frags = encode(sample_manifest())
    frag0 = v2.decode_fragment(frags[0], 0, index)  # its record of w is cell 0 (rows 0-2): consistent
    with pytest.raises(FragmentError, match=r"cell 1 of key \['w'\] is missing: .*rank 0's fragment data/r00000\.frag"):
        materialize(index, {0: frag0})  # a per-cell array would be 8 TiB


def test_s3_v2_fragments_are_kept_by_gc_and_an_aborted_saves_are_collected(s3_bucket):
    from dist_ckpt.storage.s3 import S3Storage

    storage = S3Storage(part_size=5 << 20, max_in_flight=1)
    ck = f"{s3_bucket}/v2/ck"
    saved = _save_single(f"s3://{ck}", 2)
    index = v2.decode_index(storage.read_bytes(f"{ck}/MANIFEST"))
    (ref,) = index.fragments
    assert ref.name.startswith("data/") and ref.name.endswith(".r00000.frag") and ref.name != "data/r00000.frag"  # the stored name
    leftover = storage.save_target(ck, "job9-1", True)  # a killed save's fragment: no MANIFEST names it
    stream = storage.open_stream(leftover, "data/r00000.frag")
    stream.append(memoryview(b"x" * 10), 0)
    stream.sync()
    stream.close()
    assert storage.collect_garbage(f"{s3_bucket}/v2") == [f"s3://{ck}/{storage.stored_name(leftover, 'data/r00000.frag')}"]
    assert storage.exists(f"{ck}/{ref.name}")
    _equal(dc.load(_zeros(), f"s3://{ck}"), saved)
    assert verify(f"s3://{ck}").ok


@pytest.mark.parametrize(
    "fragment, files, match",
    [
        (["data/r00002.frag", 10, 1], ["data/r00003.bin"], "not its own data/r00003.frag"),
        (["data/r00003.frag", 10, 1], ["data/r00002.bin"], "not one of its own"),
        (["data/r00003.frag", 10, 1], ["data/r00003.frag"], "not one of its own"),
        (["../r00003.frag", 10, 1], [], "not its own"),
        (["data/r00003.frag", 0, 1], [], "out of range"),
        (["data/r00003.frag", 10, -1], [], "out of range"),
        (["data/r00003.frag", 10], [], "malformed"),
    ],
)
def test_done_fragment_report_is_checked_against_the_sending_rank(fragment, files, match):
    from dist_ckpt.errors import WireError
    from dist_ckpt.index_build import decode_fragment_report

    ok = msgpack.packb({"fragment": ["data/r00003.frag", 10, 1], "files": ["data/r00003.bin", "data/r00003-t1.bin"]})
    assert decode_fragment_report(ok, 3).files == ("data/r00003.bin", "data/r00003-t1.bin")
    with pytest.raises(WireError, match=match):
        decode_fragment_report(msgpack.packb({"fragment": fragment, "files": files}), 3)
