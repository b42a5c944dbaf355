"""Save planning: dedup, coverage, writer assignment and the description wire format."""

from __future__ import annotations

import math
import random
import zlib

import msgpack
import numpy as np
import pytest
from fuzz_gen import Gen, fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ckpt.commit import CommitRequest, Records, RecordTable, build_manifest, entry_names
from dist_ckpt.description import BoxStore, SchemaCache, decode_description
from dist_ckpt.errors import CheckpointError, WireError
from dist_ckpt.index_build import plan_cells
from dist_ckpt.manifest import Manifest
from dist_ckpt.plan import PlanCache, SavePlan
from dist_ckpt.save_planner import PlanError, RankDescription, TensorDescription, plan_save
from dist_ckpt.storage import SaveTarget


def shard_boxes(shape, mesh, placements):
    """Per-rank ``(offsets, sizes)`` as DTensor places a tensor (row-major ranks).

    ``placements[i]`` is the tensor dim sharded over mesh dim ``i`` (split like
    ``torch.chunk``, trailing ranks possibly empty) or ``None`` for Replicate.
    """
    out = []
    for coord in np.ndindex(*mesh):
        off, siz = [0] * len(shape), list(shape)
        for md, d in enumerate(placements):
            if d is not None:
                c = -(-siz[d] // mesh[md])
                start = min(coord[md] * c, siz[d])
                off[d], siz[d] = off[d] + start, max(0, min(c, siz[d] - start))
        out.append((tuple(off), tuple(siz)))
    return out


def describe(tensors, mesh, dtype="float32"):
    """RankDescriptions for ``{key: (shape, placements)}`` laid out on ``mesh``."""
    nranks = math.prod(mesh)
    per_rank = [[] for _ in range(nranks)]
    for key, (shape, placements) in tensors.items():
        for r, (off, siz) in enumerate(shard_boxes(shape, mesh, placements)):
            per_rank[r].append(TensorDescription(key, dtype, tuple(shape), off, siz))
    return [RankDescription(r, tuple(ts)) for r, ts in enumerate(per_rank)]


def written(descs, plan):
    """``{(key, owner): [(rank, offsets, sizes), ...]}`` of what the plan writes."""
    out = {}
    for d in descs:
        for i in plan.writes[d.rank]:
            t = d.tensors[i]
            out.setdefault((t.key, t.owner), []).append((d.rank, t.offsets, t.sizes))
    return out


def check_written_bytes(descs, plan, itemsize=4):
    for d in descs:
        expect = sum(math.prod(d.tensors[i].sizes) * itemsize for i in plan.writes[d.rank])
        assert plan.bytes_per_rank[d.rank] == expect


# --------------------------------------------------------------------------- dedup and balance


def test_replicated_written_once_by_a_holder_and_balanced():
    sizes = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 7]
    tensors = {("model", f"p{i}"): ((n, 3), [None]) for i, n in enumerate(sizes)}
    descs = describe(tensors, (4,))
    plan = plan_save(descs)
    w = written(descs, plan)
    assert sorted(k for k, _ in w) == sorted(tensors)
    assert all(len(v) == 1 for v in w.values())  # each replicated tensor written exactly once
    check_written_bytes(descs, plan)
    loads = sorted(plan.bytes_per_rank.values())
    assert sum(loads) == sum(sizes) * 3 * 4
    assert loads[-1] - loads[0] <= max(sizes) * 3 * 4  # greedy LPT bound
    assert all(v > 0 for v in loads)  # every rank got work
    # biggest goes to rank 0 (all loads equal: lowest rank wins), next to rank 1, ...
    assert [w[(("model", f"p{i}"), None)][0][0] for i in range(4)] == [0, 1, 2, 3]


def test_plan_is_deterministic_and_order_independent():
    tensors = {("w", i): ((10 + i, 4), [None]) for i in range(20)}
    descs = describe(tensors, (4,))
    shuffled = descs[:]
    random.Random(0).shuffle(shuffled)
    assert plan_save(descs) == plan_save(shuffled) == plan_save(descs)


def test_replicated_zero_dim_tensor():
    descs = describe({("step",): ((), [None])}, (4,), dtype="int64")
    plan = plan_save(descs)
    assert sum(len(v) for v in plan.writes.values()) == 1
    assert plan.bytes_per_rank == {0: 8, 1: 0, 2: 0, 3: 0}


# --------------------------------------------------------------------------- sharded layouts


@pytest.mark.parametrize(
    "shape, mesh, placements",
    [
        ((16, 6), (4,), [0]),  # Shard(0)
        ((6, 16), (4,), [1]),  # Shard(1)
        ((8, 12), (2, 3), [0, 1]),  # 2-D mesh [Shard(0), Shard(1)]
        ((8, 12), (2, 3), [1, 0]),  # 2-D mesh [Shard(1), Shard(0)]
        ((16, 4), (2, 2), [0, 0]),  # [Shard(0), Shard(0)]: nested split of one dim
        ((173, 5), (4,), [0]),  # uneven: 44, 44, 44, 41
        ((5, 3), (4,), [0]),  # 2, 2, 1, 0: an empty shard
        ((2, 3, 4), (2, 4), [0, 1]),  # empty shards on a 2-D mesh
    ],
)
def test_sharded_each_rank_writes_its_own_box(shape, mesh, placements):
    descs = describe({("x",): (shape, placements)}, mesh)
    plan = plan_save(descs)
    for d in descs:
        t = d.tensors[0]
        assert plan.writes[d.rank] == ((0,) if math.prod(t.sizes) else ())
        assert plan.bytes_per_rank[d.rank] == math.prod(t.sizes) * 4
    assert sum(plan.bytes_per_rank.values()) == math.prod(shape) * 4


def test_uneven_torch_chunk_split():
    descs = describe({("x",): ((173, 10), [0])}, (4,))
    assert [d.tensors[0].sizes[0] for d in descs] == [44, 44, 44, 41]
    plan = plan_save(descs)
    assert [plan.bytes_per_rank[r] for r in range(4)] == [n * 10 * 4 for n in (44, 44, 44, 41)]


def test_hsdp_replicate_then_shard_dedups_between_replicas():
    # mesh (2 replicas, 4 shards): [Replicate, Shard(0)]; each shard written once, replicas share the work
    tensors = {("p", i): ((64, 8), [None, 0]) for i in range(6)}
    descs = describe(tensors, (2, 4))
    plan = plan_save(descs)
    w = written(descs, plan)
    for key in tensors:
        boxes = sorted((o, s) for _, o, s in w[(key, None)])
        assert boxes == sorted(set(shard_boxes((64, 8), (1, 4), [None, 0])))
    check_written_bytes(descs, plan)
    assert set(plan.bytes_per_rank.values()) == {3 * 16 * 8 * 4}  # perfectly balanced


def test_hsdp_with_replicated_scalars_matches_reference():
    # 4 replicas x 8 shards, uneven sizes, plus tensors every rank holds whole: replica groups are
    # assigned in lock step until the first box that spans groups, then one by one (same result).
    tensors = {("p", i): ((8 * (3 + i % 5) - i % 3, 4), [None, 0]) for i in range(24)}
    tensors.update({("step", i): ((), [None, None]) for i in range(3)})
    tensors[("big",)] = ((40, 40), [None, None])
    descs = describe(tensors, (4, 8))
    plan = plan_save(descs)
    assert (plan.writes, plan.bytes_per_rank) == reference_plan(descs)


def test_empty_tensor_writes_nothing():
    descs = describe({("e",): ((0, 4), [0]), ("f",): ((0,), [None])}, (3,))
    plan = plan_save(descs)
    assert all(v == () for v in plan.writes.values())
    assert set(plan.bytes_per_rank.values()) == {0}


def test_rank_holding_several_chunks_of_one_tensor():
    def t(o, s):
        return TensorDescription(("x",), "float32", (4, 2), o, s)

    descs = [RankDescription(0, (t((0, 0), (1, 2)), t((3, 0), (1, 2)))), RankDescription(1, (t((1, 0), (2, 2)),))]
    plan = plan_save(descs)
    assert plan.writes == {0: (0, 1), 1: (0,)}


def test_descriptions_with_gaps_in_rank_numbers():
    descs = describe({("x",): ((4,), [None])}, (1,))
    descs = [RankDescription(7, descs[0].tensors), RankDescription(3, descs[0].tensors)]
    plan = plan_save(descs)
    assert plan.writes == {3: (0,), 7: ()}


def reference_plan(descs, itemsize=4):
    """Straightforward dict-based statement of the rules, to compare plan_save against."""
    descs = sorted(descs, key=lambda d: d.rank)
    order, holders = {}, {}
    for d in descs:
        for i, t in enumerate(d.tensors):
            order.setdefault((t.key, t.owner), len(order))
            if math.prod(t.sizes):
                hs = holders.setdefault((t.key, t.owner, t.offsets, t.sizes), {})
                hs.setdefault(d.rank, i)  # a rank holding a box twice: its first index
    load = {d.rank: 0 for d in descs}
    writes = {d.rank: [] for d in descs}
    nbytes = {b: math.prod(b[3]) * itemsize for b in holders}
    for b, hs in holders.items():
        if len(hs) == 1:
            ((r, i),) = hs.items()
            load[r] += nbytes[b]
            writes[r].append(i)
    shared = sorted((b for b, hs in holders.items() if len(hs) > 1), key=lambda b: (-nbytes[b], order[(b[0], b[1])], b[2], b[3]))
    for b in shared:
        r = min(sorted(holders[b]), key=lambda r: load[r])
        load[r] += nbytes[b]
        writes[r].append(holders[b][r])
    return {r: tuple(sorted(w)) for r, w in writes.items()}, load


@st.composite
def random_jobs(draw):
    mesh = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    tensors = {}
    for i in range(draw(st.integers(1, 6))):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 12), min_size=ndim, max_size=ndim)))
        tensors[("t", i)] = (shape, [draw(st.sampled_from([None, *range(ndim)])) for _ in mesh])
    return tensors, mesh


@settings(max_examples=300, deadline=None)
@given(random_jobs())
def test_plan_matches_reference_and_covers_each_element_once(job):
    tensors, mesh = job
    descs = describe(tensors, mesh)
    plan = plan_save(descs)
    assert (plan.writes, plan.bytes_per_rank) == reference_plan(descs)
    cache = SchemaCache()  # the coordinator's path: wire bytes, one schema decoded for all ranks
    assert plan_save([decode_description(d.to_msgpack(), d.rank, cache) for d in descs]) == plan
    for key, (shape, _) in tensors.items():
        hits = np.zeros(shape, dtype=np.int64)
        for d in descs:
            for i in plan.writes[d.rank]:
                t = d.tensors[i]
                if t.key == key:
                    hits[tuple(slice(o, o + s) for o, s in zip(t.offsets, t.sizes))] += 1
        assert (hits == 1).all()


@st.composite
def mixed_jobs(draw):
    """Random jobs, then: rank labels shuffled (rank order no longer follows the mesh), a
    replicated tensor only some ranks hold (several schemas), rank-local tensors on some ranks."""
    tensors, mesh = draw(random_jobs())
    descs = describe(tensors, mesh)
    n = len(descs)
    label = draw(st.permutations(range(n)))
    extra = draw(st.sets(st.sampled_from(range(n))))
    local = draw(st.sets(st.sampled_from(range(n))))
    out = []
    for d in descs:
        r, ts = label[d.rank], list(d.tensors)
        if d.rank in extra:
            ts.insert(draw(st.integers(0, len(ts))), TensorDescription(("extra",), "float32", (3, 2), (0, 0), (3, 2)))
        if d.rank in local:
            ts.append(TensorDescription(("rng",), "float32", (r % 3 + 1,), (0,), (r % 3 + 1,), owner=r))
        out.append(RankDescription(r, tuple(ts)))
    return out


@settings(max_examples=300, deadline=None)
@given(mixed_jobs())
def test_mixed_jobs_match_reference(descs):
    plan = plan_save(descs)
    assert (plan.writes, plan.bytes_per_rank) == reference_plan(descs)
    cache, store = SchemaCache(), BoxStore(len(descs))  # as the coordinator: one box matrix per schema
    assert plan_save([store.put(decode_description(d.to_msgpack(), d.rank, cache)) for d in descs]) == plan


@settings(max_examples=60, deadline=None)
@given(mixed_jobs())
def test_v2_cells_come_from_the_groups_boxes_without_a_chunk_layout(descs):
    """plan_cells: every written box is its entry's split cell, owned by its writer, each cell once; no ChunkLayout built."""
    plan = plan_save(descs)
    cells = plan_cells(plan)
    assert "layout" not in vars(plan) and plan.boxes is None  # nothing chunk-proportional besides the cells themselves
    entry_of = {(key, owner): e for e, (owner, key, _, _) in enumerate(entry_names(plan))}
    claimed: dict[int, list[int]] = {}
    for d in descs:
        entries, got = cells.for_rank(plan, d.rank)
        tags = plan.writes[d.rank]
        assert len(entries) == len(got) == len(tags)
        for i, e, c in zip(tags, entries.tolist(), got.tolist()):
            t = d.tensors[i]
            assert e == entry_of[(t.key, t.owner)]
            if math.prod(t.sizes) == 0:
                assert c == -1
                continue
            split = cells.splits[e]
            off, siz = split.cell_boxes(np.array([c]))
            assert (tuple(off[0]), tuple(siz[0])) == (t.offsets, t.sizes) and int(split.owner(np.array([c]))[0]) == d.rank
            claimed.setdefault(e, []).append(c)
    for e, split in enumerate(cells.splits):
        nonempty = np.flatnonzero(split.volumes(np.arange(split.ncells)) > 0).tolist()
        assert sorted(claimed.get(e, [])) == nonempty, e  # each cell written exactly once
    assert (
        SavePlan.parse_rank_plan_v2(plan.to_msgpack_for(descs[0].rank, *cells.for_rank(plan, descs[0].rank)), len(descs[0].tensors))[0]
        == plan.writes[descs[0].rank]
    )


def report_all(plan, descs, shuffle=None):
    """A RecordTable with every rank's records as its writer would send them (``xxh3`` = rank * 1000 + tag)."""
    table = RecordTable(plan)
    for d in sorted(descs, key=lambda d: d.rank):
        table.add(d.rank, records_of(plan, d, shuffle))
    return table


def records_of(plan, d, shuffle=None):
    tags = np.array(plan.writes[d.rank], np.int64)
    nbytes = np.array([math.prod(d.tensors[i].sizes) * 4 for i in tags], np.int64)
    offset = np.cumsum(-(-nbytes // 4096) * 4096) - (-(-nbytes // 4096) * 4096)
    order = shuffle.permutation(len(tags)) if shuffle is not None else np.arange(len(tags))
    files = [f"data/r{d.rank:05d}.bin"] if len(tags) else []
    return Records(files, tags[order], np.zeros(len(tags), np.int32), offset[order], nbytes[order], (d.rank * 1000 + tags[order]).astype(np.uint64))


def commit(plan, table, world):
    objects = {r: {"objects": {}, "local": {}, "structure": ["d", [], []]} for r in range(world)}
    return build_manifest(CommitRequest(SaveTarget("ck", "ck.tmp", "0"), world, plan, table, objects))


@settings(max_examples=200, deadline=None)
@given(mixed_jobs(), st.integers(0, 2**32 - 1), st.booleans())
def test_manifest_from_plan_and_records(descs, seed, shuffle):
    """Every written chunk lands in its key's table with its own box, file, offset and hash."""
    plan = plan_save(descs)
    m = commit(plan, report_all(plan, descs, np.random.default_rng(seed) if shuffle else None), len(descs))
    back = Manifest.from_msgpack(m.to_msgpack())  # validates bounds, sizes and exact cover
    expect: dict = {}
    for d in descs:
        for i in plan.writes[d.rank]:
            t = d.tensors[i]
            expect.setdefault((t.owner, t.key), set()).add((t.offsets, t.sizes, f"data/r{d.rank:05d}.bin", d.rank * 1000 + i))
    got: dict = {}
    sections = [(None, back.tensors)] + [(r, sec.tensors) for r, sec in back.local.items()]
    for owner, tables in sections:
        for key, e in tables.items():
            c = e.chunks
            got[(owner, key)] = {(tuple(c.offsets[j].tolist()), tuple(c.sizes[j].tolist()), back.files[c.file[j]], int(c.xxh3[j])) for j in range(len(c))}
    assert {k: v for k, v in got.items() if v} == expect
    described = {(t.owner, t.key) for d in descs for t in d.tensors}
    assert set(got) == described  # empty tensors too


def test_record_table_refuses_what_the_plan_did_not_assign():
    descs = describe({("a", i): ((8, 2), [0]) for i in range(3)}, (4,))
    plan = plan_save(descs)
    table = RecordTable(plan)
    good = records_of(plan, descs[1])
    bad = Records(good.files, good.tag[:2], good.file[:2], good.offset[:2], good.nbytes[:2], good.xxh3[:2])
    with pytest.raises(WireError, match=r"rank 1: wrote chunks \[0, 1\] but was assigned \[0, 1, 2\]"):
        table.add(1, bad)
    bad = Records(good.files, good.tag, good.file, good.offset, good.nbytes + np.array([0, 4, 0]), good.xxh3)
    with pytest.raises(WireError, match=r"rank 1: key \['a', 1\]: wrote 20 bytes, its box needs 16"):
        table.add(1, bad)
    with pytest.raises(WireError, match="rank 9 is not expected"):
        table.add(9, good)
    table.add(1, good)
    with pytest.raises(WireError, match="rank 1 is not expected"):  # twice
        table.add(1, good)
    with pytest.raises(CheckpointError, match=r"ranks \[0, 2, 3\] have not reported"):
        commit(plan, table, 4)


# --------------------------------------------------------------------------- errors


def test_dtype_disagreement_names_key_ranks_and_values():
    descs = describe({("model", "layers", 0, "w"): ((4, 4), [None])}, (3,))
    bad = descs[2].tensors[0]
    descs[2] = RankDescription(2, (TensorDescription(bad.key, "float16", bad.shape, bad.offsets, bad.sizes),))
    with pytest.raises(PlanError) as ei:
        plan_save(descs)
    msg = str(ei.value)
    assert "model.layers[0].w" in msg and "ranks 0, 1" in msg and "rank 2" in msg
    assert "float32" in msg and "float16" in msg
    assert ei.value.key == ("model", "layers", 0, "w") and set(ei.value.ranks) == {0, 1, 2}
    assert isinstance(ei.value, CheckpointError)


def test_shape_disagreement():
    descs = describe({("x",): ((8,), [0])}, (2,))
    descs[1] = RankDescription(1, (TensorDescription(("x",), "float32", (9,), (4,), (4,)),))
    with pytest.raises(PlanError, match=r"x disagrees.*rank 0 holds dtype float32 shape \[8\].*rank 1 holds dtype float32 shape \[9\]"):
        plan_save(descs)


def test_partially_overlapping_boxes_name_the_ranks():
    def t(o, s):
        return TensorDescription(("opt", "m"), "float32", (10, 2), o, s)

    descs = [RankDescription(0, (t((0, 0), (4, 2)),)), RankDescription(1, (t((4, 0), (3, 2)),)), RankDescription(2, (t((5, 0), (5, 2)),))]
    with pytest.raises(PlanError, match=r"opt\.m .*overlap.*ranks 1, 2") as ei:
        plan_save(descs)
    assert set(ei.value.ranks) == {1, 2}


def test_gap_is_an_error():
    descs = describe({("x",): ((8, 2), [0])}, (4,))
    del_rank = RankDescription(3, ())
    with pytest.raises(PlanError, match=r"x \(shape \[8, 2\]\): chunks leave a gap"):
        plan_save(descs[:3] + [del_rank])


def test_duplicate_rank_is_an_error():
    descs = describe({("x",): ((4,), [None])}, (2,))
    with pytest.raises(PlanError, match="duplicate rank descriptions: rank 1"):
        plan_save(descs + [descs[1]])


def test_unknown_dtype_is_a_plan_error():
    with pytest.raises(PlanError, match="unknown dtype 'float7'"):
        plan_save([RankDescription(0, (TensorDescription(("x",), "float7", (2,), (0,), (2,)),))])


@pytest.mark.parametrize(
    "offsets, sizes, match",
    [
        ((1, 0), (4, 2), "lies outside shape"),  # full-size box at a wrong offset
        ((0, 0), (-4, 2), "negative offset or size"),
        ((0,), (4,), "do not match shape"),
    ],
)
def test_malformed_local_descriptions(offsets, sizes, match):
    with pytest.raises(PlanError, match=match):
        plan_save([RankDescription(0, (TensorDescription(("x",), "float32", (4, 2), offsets, sizes),))])


# --------------------------------------------------------------------------- rank-local tensors


def test_rank_local_tensors_written_by_owner_never_deduped():
    descs = [
        RankDescription(
            r, (TensorDescription(("rng",), "uint8", (16,), (0,), (16,), owner=r), TensorDescription(("buf",), "int64", (r + 1,), (0,), (r + 1,), owner=r))
        )
        for r in range(4)
    ]
    plan = plan_save(descs)
    assert plan.writes == {r: (0, 1) for r in range(4)}
    assert plan.bytes_per_rank == {r: 16 + 8 * (r + 1) for r in range(4)}


def test_key_both_global_and_rank_local_is_an_error():
    descs = [
        RankDescription(0, (TensorDescription(("k",), "uint8", (4,), (0,), (4,), owner=0),)),
        RankDescription(1, (TensorDescription(("k",), "uint8", (4,), (0,), (4,)),)),
    ]
    with pytest.raises(PlanError, match=r"k is rank-local on rank 0 but global on rank 1"):
        plan_save(descs)


def test_owner_must_be_the_describing_rank():
    with pytest.raises(PlanError, match="described by rank 1 is owned by rank 0"):
        plan_save([RankDescription(1, (TensorDescription(("k",), "uint8", (4,), (0,), (4,), owner=0),))])


# --------------------------------------------------------------------------- wire format

keys = st.lists(st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)), max_size=4).map(tuple)
DTYPES = ["float32", "bfloat16", "int64", "bool", "uint8", "complex64"]


@st.composite
def tensor_descs(draw, rank):
    shape = tuple(draw(st.lists(st.integers(0, 50), max_size=4)))
    off = tuple(draw(st.integers(0, d)) for d in shape)
    siz = tuple(draw(st.integers(0, d - o)) for d, o in zip(shape, off))
    owner = draw(st.sampled_from([None, rank]))
    return TensorDescription(draw(keys), draw(st.sampled_from(DTYPES)), shape, off, siz, owner)


@st.composite
def rank_descs(draw):
    rank = draw(st.integers(0, 5000))
    return RankDescription(rank, tuple(draw(st.lists(tensor_descs(rank), max_size=6))))


@settings(max_examples=300, deadline=None)
@given(rank_descs())
def test_description_round_trip(desc):
    data = desc.to_msgpack()
    back = RankDescription.from_msgpack(data, desc.rank)
    assert back == desc
    assert all(type(t.key) is tuple and type(t.shape) is tuple for t in back.tensors)
    assert back.digest() == desc.digest() == __import__("xxhash").xxh3_64_intdigest(data)


def test_digest_changes_with_content():
    a = RankDescription(0, (TensorDescription(("x",), "float32", (4,), (0,), (4,)),))
    b = RankDescription(0, (TensorDescription(("x",), "float32", (4,), (0,), (2,)),))
    assert a.digest() != b.digest()


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=6), st.binary(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=7), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=30,
)


@st.composite
def garbage(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return msgpack.packb(draw(msgpack_values), use_bin_type=True)
    if kind == 2:  # a structurally plausible description: random schema columns, random boxes
        columns = draw(st.lists(st.lists(msgpack_values, max_size=2), min_size=3, max_size=5))
        return msgpack.packb([2, msgpack.packb(columns, use_bin_type=True), draw(st.binary(max_size=48))], use_bin_type=True)
    data = bytearray(draw(rank_descs()).to_msgpack())  # a valid one, mutated
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


def description_refused_or_valid(data: bytes, rank: int) -> None:
    """Decoding raises ``WireError`` or yields a description whose every tensor is consistent."""
    try:
        desc = RankDescription.from_msgpack(data, rank)
    except WireError:
        return
    for t in desc.tensors:  # whatever got through is fully valid
        assert len(t.shape) == len(t.offsets) == len(t.sizes)
        assert all(o + s <= d for o, s, d in zip(t.offsets, t.sizes, t.shape))
        assert t.owner in (None, rank)


# 100 hypothesis examples (~10 ms each here); the seeded twin below runs 10,000 in seconds (fuzz_gen.py).
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage(), st.integers(0, 8))
def test_from_msgpack_only_raises_wire_error(data, rank):
    description_refused_or_valid(data, rank)


def _seeded_value(g: Gen) -> object:
    """What ``msgpack_values`` draws (lists of up to 7, maps with short text keys, at most 30 leaves)."""
    return g.value(30, 7, key=lambda: g.text(3), leaf=lambda: g.scalar(6, 6))


def _seeded_desc(g: Gen) -> RankDescription:
    """What ``rank_descs`` draws: up to 6 tensors with boxes inside their shapes, owned by the rank or global."""
    rank, tensors = g.randint(0, 5000), []
    for _ in range(g.size(6)):
        shape = tuple(g.randint(0, 50) for _ in range(g.size(4)))
        off = tuple(g.randint(0, d) for d in shape)
        siz = tuple(g.randint(0, d - o) for d, o in zip(shape, off))
        key = tuple(g.text(8) if g.random() < 0.5 else g.integer() for _ in range(g.size(4)))
        tensors.append(TensorDescription(key, g.choice(DTYPES), shape, off, siz, g.choice([None, rank])))
    return RankDescription(rank, tuple(tensors))


def _seeded_garbage(g: Gen) -> tuple[bytes, int]:
    """What ``garbage`` draws (random bytes, packed values, plausible columns, a mutated valid description), and a rank."""
    kind = g.randint(0, 3)
    if kind == 0:
        data = g.binary(200)
    elif kind == 1:
        data = msgpack.packb(_seeded_value(g), use_bin_type=True)
    elif kind == 2:
        columns = [[_seeded_value(g) for _ in range(g.randint(0, 2))] for _ in range(g.randint(3, 5))]
        data = msgpack.packb([2, msgpack.packb(columns, use_bin_type=True), g.binary(48)], use_bin_type=True)
    else:
        valid = _seeded_desc(g).to_msgpack()
        data = g.mutate(valid, 4) if valid else valid
        data = data[: g.randint(0, len(data))] if g.random() < 0.5 else data
    return data, g.randint(0, 8)


def test_from_msgpack_only_raises_wire_error_seeded():
    fuzz("rank_description", _seeded_garbage, lambda case: description_refused_or_valid(*case))


def _wire(key=("x",), dtype="float32", shape=(4,), off=(0,), siz=(4,), local=False, boxes=None):
    """A one-tensor description in the wire form, any field possibly wrong."""
    schema = msgpack.packb([[key], [dtype], [list(shape)], [local]])
    if boxes is None:
        boxes = np.array([*off, *siz], "<i8").tobytes()
    return msgpack.packb([2, schema, boxes])


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xc1", "not valid msgpack"),
        (_wire() + b"\x00", "not valid msgpack"),
        (msgpack.packb({"a": 1}), "not valid msgpack"),
        (msgpack.packb([2, b""]), r"must be \[version, schema, boxes\]"),
        (msgpack.packb([1, b"", b""]), "unsupported description version 1"),
        (msgpack.packb([2, 5, b""]), "schema and boxes must be binary"),
        (msgpack.packb([2, msgpack.packb([[["x"]], ["float32"], [[4]]]), b""]), r"\[keys, dtypes, shapes, local\] of equal lengths"),
        (msgpack.packb([2, msgpack.packb([[["x"]], ["float32"], [[4]], []]), b""]), "of equal lengths"),
        (_wire(dtype="float7"), "tensor x: unknown dtype 'float7'"),
        (_wire(shape=(4, 4)), "has 16 bytes of boxes, its schema needs 32"),
        (_wire(boxes=b"\x00" * 15), "has 15 bytes of boxes"),
        (_wire(off=(1,)), r"tensor x: box at offsets \[1\] sizes \[4\] lies outside shape \[4\]"),
        (_wire(off=(-1,)), r"tensor x: box at offsets \[-1\] sizes \[4\] has a negative offset or size"),
        (_wire(siz=(-(2**63),)), "negative offset or size"),
        (_wire(shape=(True,), off=(0,), siz=(1,)), r"shape must hold non-negative ints below 2\*\*62, got True"),
        (_wire(shape=(2.0,)), r"shape must hold non-negative ints below 2\*\*62, got 2.0"),
        (_wire(shape=(-4,)), "got -4"),
        (_wire(shape=(2**64 - 1,)), "got 18446744073709551615"),
        (_wire(shape=(2**62 - 1,), off=(2**62 - 1,), siz=(2**62 - 1,)), "too large"),
        (_wire(shape=(8,), off=(2**63 - 1,), siz=(2**63 - 1,)), "lies outside shape"),  # no int64 overflow
        (_wire(shape=(2**40, 2**40), off=(0, 0), siz=(0, 0)), "too large"),
        (_wire(local=1), "local must be true or false, got 1"),
        (_wire(key=(1.5,)), "key path must be a list of str and int"),
        (_wire(key=5), "key path must be a list of str and int"),
    ],
)
def test_from_msgpack_rejects_with_precise_message(data, match):
    with pytest.raises(WireError, match=match):
        RankDescription.from_msgpack(data, 0)


def test_rank_local_flag_means_owned_by_the_sender():
    data = _wire(local=True)
    assert RankDescription.from_msgpack(data, 7).tensors[0].owner == 7
    assert RankDescription.from_msgpack(data, 3).tensors[0].owner == 3


def test_schema_is_decoded_once_and_shared():
    descs = describe({("w", i): ((64, 8), [0]) for i in range(5)}, (8,))
    cache = SchemaCache()
    cols = [decode_description(d.to_msgpack(), d.rank, cache) for d in descs]
    assert len({id(c.schema) for c in cols}) == 1
    assert cols[3].boxes.tolist() == [24, 0] * 5 + [8, 8] * 5  # offsets of every tensor, then sizes
    other = describe({("w", i): ((64, 8), [0]) for i in range(6)}, (8,))
    assert decode_description(other[0].to_msgpack(), 0, cache).schema is not cols[0].schema


def test_box_errors_from_the_wire_name_the_key_and_rank():
    descs = describe({("opt", "m"): ((8, 2), [0])}, (4,))
    bad = msgpack.unpackb(descs[2].to_msgpack())
    bad[2] = np.array([6, 0, 4, 2], "<i8").tobytes()  # rank 2 claims rows 6..10 of an (8, 2) tensor
    cache = SchemaCache()
    cols = [decode_description(d.to_msgpack() if d.rank != 2 else msgpack.packb(bad), d.rank, cache) for d in descs]
    with pytest.raises(PlanError, match=r"tensor opt\.m on rank 2: box at offsets \[6, 0\] sizes \[4, 2\] lies outside shape \[8, 2\]") as ei:
        plan_save(cols)
    assert ei.value.key == ("opt", "m") and ei.value.ranks == (2,)


def test_from_msgpack_rejects_non_bytes():
    with pytest.raises(WireError, match="must be bytes"):
        RankDescription.from_msgpack("text", 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rank plan wire and cache


def test_rank_plan_round_trip():
    descs = describe({("a", i): ((8, 2), [None]) for i in range(9)}, (3,))
    plan = plan_save(descs)
    for d in descs:
        assert SavePlan.parse_rank_plan(plan.to_msgpack_for(d.rank), len(d.tensors)) == plan.writes[d.rank]
    assert SavePlan.parse_rank_plan(plan.to_msgpack_for(99), 0) == ()


@pytest.mark.parametrize(
    "obj",
    [
        [3, 1],
        [5, b"\x00\x00"],
        [4, b"\x00"],
        [5, b"\x20"],
        [5, b"\x80"],
        [-1, b""],
        [True, b"\x00"],
        [5.0, b"\x00"],
        [5, "x"],
        [5, b"\x00", 1],
        "x",
        {"a": 1},
        None,
    ],
)
def test_rank_plan_garbage(obj):
    with pytest.raises(WireError):
        SavePlan.parse_rank_plan(msgpack.packb(obj), 5)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_rank_plan_random_bytes_only_wire_error(data):
    try:
        out = SavePlan.parse_rank_plan(data, 10)
    except WireError:
        return
    assert list(out) == sorted(set(out)) and all(0 <= i < 10 for i in out)


def test_plan_cache_hit_and_miss():
    descs = describe({("x",): ((8,), [0])}, (2,))
    digests = {d.rank: d.digest() for d in descs}
    cache = PlanCache()
    assert cache.lookup(digests) is None
    plan = plan_save(descs)
    cache.store(digests, plan)
    assert cache.lookup(dict(reversed(digests.items()))) is plan
    assert cache.lookup([(1, digests[1]), (0, digests[0])]) is plan
    assert cache.lookup({0: digests[0], 1: digests[1] ^ 1}) is None  # one rank changed
    assert cache.lookup({0: digests[0]}) is None  # a rank missing
    assert cache.lookup({**digests, 2: 0}) is None  # an extra rank
    new = plan_save(descs[:1] + [RankDescription(1, descs[1].tensors)])
    cache.store({0: 1, 1: 2}, new)
    assert cache.lookup(digests) is None and cache.lookup({0: 1, 1: 2}) is new


def test_description_boxes_travel_compressed_and_are_inflated_bounded():
    """Boxes go as a zlib'd msgpack ext (an FSDP rank's 28 KB are a few hundred bytes); the inflate stops at the schema's size."""
    descs = describe({("w", i): ((256 * 4 - i % 5, 64 * (1 + i % 4)), [0]) for i in range(300)}, (256,))[:3]
    wire = descs[2].to_msgpack()
    raw_bytes = 16 * descs[2].columns().schema.width
    assert len(wire) < len(descs[2].columns().schema.blob) + raw_bytes // 20
    assert decode_description(wire, 2).boxes.tolist() == descs[2].columns().boxes.tolist()
    version, schema, boxes = msgpack.unpackb(wire)
    assert boxes.code == 1
    bomb = zlib.compress(bytes(1 << 26))
    for bad, match in (
        (msgpack.ExtType(1, zlib.compress(bytes(raw_bytes - 8))), f"inflate to {raw_bytes - 8} bytes, its schema needs {raw_bytes}"),
        (msgpack.ExtType(1, zlib.compress(bytes(raw_bytes + 8))), f"inflate to more than {raw_bytes} bytes"),
        (msgpack.ExtType(1, bomb), f"inflate to more than {raw_bytes} bytes"),
        (msgpack.ExtType(1, b"not zlib"), "not zlib data"),
        (msgpack.ExtType(1, boxes.data + b"tail"), "inflate to"),
        (msgpack.ExtType(2, boxes.data), "schema and boxes must be binary"),
    ):
        with pytest.raises(WireError, match=match):
            decode_description(msgpack.packb([version, schema, bad]), 2)


def test_description_schema_travels_compressed_and_is_inflated_once_per_distinct_schema():
    descs = describe({("w", i): ((64, 8), [0]) for i in range(200)}, (4,))
    version, schema, boxes = msgpack.unpackb(descs[0].to_msgpack())
    assert schema.code == 1 and len(schema.data) < len(descs[0].columns().schema.blob) // 5
    cache = SchemaCache()
    cols = [decode_description(d.to_msgpack(), d.rank, cache) for d in descs]
    assert len({id(c.schema) for c in cols}) == 1 and cols[0].schema.blob == descs[0].columns().schema.blob
    raw = msgpack.packb([version, descs[0].columns().schema.blob, boxes])  # a raw schema is still read, and is another cache entry
    assert decode_description(raw, 0, cache).schema.keys == cols[0].schema.keys
    bomb = zlib.compress(bytes(1 << 26))  # 64 MiB of zeros: inflated at most 1032x its size (deflate's own limit), then refused
    for bad, match in ((bomb, "rank 1: description schema"), (b"not zlib", "description schema: not zlib data"), (schema.data[:-4], "not one complete stream")):
        with pytest.raises(WireError, match=match):
            decode_description(msgpack.packb([version, msgpack.ExtType(1, bad), boxes]), 1, cache)
