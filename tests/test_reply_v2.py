"""The format-version-2 plan reply: ranks derive their (entry, cell)s from their own boxes and a group spec."""

from __future__ import annotations

import math
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from test_planner import describe, mixed_jobs

from dist_ckpt.commit import entry_names
from dist_ckpt.errors import WireError
from dist_ckpt.index_build import plan_cells
from dist_ckpt.plan import SavePlan
from dist_ckpt.reply_v2 import GroupSpec
from dist_ckpt.save_planner import RankDescription, TensorDescription, plan_save
from dist_ckpt.split import ColumnMemo, detect_columns, detect_split


def brute_force(plan, cells, d):
    """Per tensor ``d``'s rank writes: its entry by name, and the cell of that entry's split whose box is the rank's box."""
    entry_of = {(key, owner): e for e, (owner, key, _, _) in enumerate(entry_names(plan))}
    entries, found = [], []
    for i in plan.writes[d.rank]:
        t = d.tensors[i]
        e = entry_of[(t.key, t.owner)]
        split = cells.splits[e]
        off, siz = split.cell_boxes(np.arange(split.ncells))
        hit = np.flatnonzero((off == np.array(t.offsets, np.int64)).all(axis=1) & (siz == np.array(t.sizes, np.int64)).all(axis=1))
        assert len(hit) == 1 and int(split.owner(hit)[0]) == d.rank
        entries.append(e)
        found.append(int(hit[0]))
    return entries, found


def derived(plan, cells, d):
    assigned, got = SavePlan.parse_rank_plan_v2(cells.reply(plan, d.rank), len(d.tensors), d.columns())
    assert assigned == plan.writes[d.rank]
    assert got is not None
    return got[0].tolist(), got[1].tolist()


@settings(max_examples=80, deadline=None)
@given(mixed_jobs())
def test_rank_derived_cells_equal_brute_force_and_the_coordinators(descs):
    """Uneven, 2-D mesh, replicated, several schemas, shuffled ranks (owners no formula), rank-local tensors."""
    plan = plan_save(descs)
    cells = plan_cells(plan)
    for d in descs:
        mine = derived(plan, cells, d)
        assert mine == brute_force(plan, cells, d)
        assert mine == tuple(a.tolist() for a in cells.for_rank(plan, d.rank))


def irregular_job():
    """Boundaries that are no even step (``w``: rows 0-3, 3-5, 5-10), a 2-D tiling that is no grid (``g``),
    a 2-D mesh Shard(0)/Shard(1) (``m``), a replicated scalar and rank-local tensors."""
    w = [(0, 3), (3, 2), (5, 5), (10, 0)]
    g = [((0, 0), (2, 4)), ((2, 0), (2, 2)), ((2, 2), (2, 2)), ((0, 0), (0, 0))]
    m = [((r // 2) * 3, (r % 2) * 2) for r in range(4)]
    out = []
    for r in range(4):
        ts = [
            TensorDescription(("w",), "float32", (10, 3), (w[r][0], 0), (w[r][1], 3)),
            TensorDescription(("g",), "int64", (4, 4), *g[r]),
            TensorDescription(("m",), "float32", (6, 4), m[r], (3, 2)),
            TensorDescription(("step",), "int64", (), (), ()),
            TensorDescription(("rng",), "uint8", (5,), (0,), (5,), owner=r),
        ]
        out.append(RankDescription(r, tuple(ts)))
    return out


def test_irregular_layouts_send_explicit_cells_only_where_needed():
    descs = irregular_job()
    plan = plan_save(descs)
    cells = plan_cells(plan)
    (spec,) = cells.specs
    kinds = dict(zip(descs[0].columns().schema.keys, spec.kind.tolist()))
    assert kinds == {("w",): 1, ("g",): 1, ("m",): 0, ("step",): 0, ("rng",): 0}
    for d in descs:
        assert derived(plan, cells, d) == brute_force(plan, cells, d)


def test_an_fsdp_groups_spec_is_a_few_hundred_bytes_whatever_the_ranks():
    sizes = []
    for world in (8, 256):
        tensors = {("t", i): ((world * 4 - i % 5, 8 * (1 + i % 3)) if i % 4 else (world * 2 - i % 3,), [0]) for i in range(300)}
        descs = describe(tensors, (world,))
        plan = plan_save(descs)
        cells = plan_cells(plan)
        sizes.append(len(cells.reply(plan, world - 1)))
        assert derived(plan, cells, descs[world - 1]) == brute_force(plan, cells, descs[world - 1])
    assert max(sizes) < 600 and sizes[1] - sizes[0] < 16, sizes  # not per tensor, not per rank (the old reply: 12 bytes per tensor)


# -- crafted replies: typed errors, never a wrong record ----------------------------------------------------------


def reply_parts(descs, rank):
    plan = plan_save(descs)
    cells = plan_cells(plan)
    d = next(d for d in descs if d.rank == rank)
    return msgpack.unpackb(cells.reply(plan, rank), raw=False), d


def spec_of(d, blob):
    return GroupSpec.from_bytes(blob, len(d.tensors), d.columns().schema.width, d.rank)


def parse(obj, d):
    return SavePlan.parse_rank_plan_v2(msgpack.packb(obj, use_bin_type=True), len(d.tensors), d.columns())


def test_a_spec_whose_step_or_owner_does_not_fit_the_ranks_box_is_refused():
    obj, d = reply_parts(irregular_job(), 2)
    spec = spec_of(d, obj[4])
    m = [k for k, t in enumerate(d.tensors) if t.key == ("m",)][0]
    for field, value in (("steps", 1), ("a", 1), ("b", 3)):
        cols = {k: getattr(spec, k).copy() for k in ("code", "kind", "a", "b", "steps")}
        at = d.columns().schema.start[m] if field == "steps" else m
        cols[field][at] += value
        with pytest.raises(WireError, match=r"rank 2: plan reply \(phase plan\): its box of tensor m is not the cell"):
            parse(obj[:4] + [GroupSpec(**cols).to_bytes()], d)


def test_explicit_cells_not_one_per_kind1_tensor_are_refused():
    obj, d = reply_parts(irregular_job(), 1)
    for explicit in (obj[3] + bytes(8), obj[3][:-8], b"\x00" * 3):
        with pytest.raises(WireError, match="rank 1: plan reply|cells"):
            parse(obj[:3] + [explicit] + obj[4:], d)


def test_a_spec_of_the_wrong_size_or_a_zlib_bomb_is_refused_without_inflating_it():
    obj, d = reply_parts(irregular_job(), 0)
    raw = zlib.decompress(obj[4])
    bomb = zlib.compress(bytes(1 << 26))  # 64 MiB of zeros in ~64 KiB: at most the schema's size is inflated
    for blob in (zlib.compress(raw[:-8]), zlib.compress(raw + bytes(8)), bomb, b"not zlib", obj[4] + b"x"):
        with pytest.raises(WireError, match="rank 0: plan reply's group spec"):
            parse(obj[:4] + [blob], d)


def test_a_spec_reply_without_the_ranks_boxes_or_with_a_bad_local_first_is_refused():
    obj, d = reply_parts(irregular_job(), 3)
    with pytest.raises(WireError, match="derived from this rank's boxes"):
        SavePlan.parse_rank_plan_v2(msgpack.packb(obj, use_bin_type=True), len(d.tensors))
    for bad in (-1, 1 << 31):
        with pytest.raises(WireError, match="local_first"):
            parse(obj[:2] + [bad] + obj[3:], d)
    with pytest.raises(WireError, match="binary"):
        parse(obj[:4] + [7], d)


def test_the_saved_records_name_the_derived_cells():
    """The rank side as the saver runs it: the (entry, cell) it puts in its fragment are its box's cell."""
    descs = irregular_job()
    plan = plan_save(descs)
    cells = plan_cells(plan)
    for d in descs:
        entries, got = derived(plan, cells, d)
        for i, e, c in zip(plan.writes[d.rank], entries, got):
            t = d.tensors[i]
            off, siz = cells.splits[e].cell_boxes(np.array([c]))
            assert (tuple(off[0]), tuple(siz[0])) == (t.offsets, t.sizes) and math.prod(t.sizes) > 0


@settings(max_examples=80, deadline=None)
@given(mixed_jobs())
def test_detect_columns_finds_what_detect_split_finds(descs):
    """The coordinator's block-of-columns detection (FSDP, Shard(d), written once) against the per-tensor one."""
    plan = plan_save(descs)
    assert plan.boxes is not None
    for g, boxes in zip(plan.groups, plan.boxes):
        sch = g.schema
        cols = np.array([c for c in range(len(sch)) if sch.numel[c] > 0 and sch.ndim[c] > 0], np.int64)
        if not len(cols):
            continue
        got = detect_columns([sch.shapes[c] for c in cols.tolist()], sch.start[cols], sch.width, boxes, g.writes[:, cols], g.ranks)
        for c, split in zip(cols.tolist(), got):
            rows = np.flatnonzero(g.writes[:, c])
            a, n = int(sch.start[c]), int(sch.ndim[c])
            want, cell = detect_split(sch.shapes[c], boxes[rows, a : a + n], boxes[rows, sch.width + a : sch.width + a + n], g.ranks[rows])
            if split is not None:
                assert split.to_obj() == want.to_obj() and cell.tolist() == list(range(len(rows)))


def test_detect_columns_leaves_what_is_no_tiling_in_row_order_to_detect_split():
    descs = irregular_job()
    plan = plan_save(descs)
    (g,), (boxes,) = plan.groups, plan.boxes
    sch = g.schema
    cols = np.flatnonzero(sch.ndim > 0)  # all but the 0-d step counter
    found = detect_columns([sch.shapes[c] for c in cols], sch.start[cols], sch.width, boxes, g.writes[:, cols], g.ranks)
    got = dict(zip([sch.keys[c] for c in cols], found))
    assert got[("g",)] is None and got[("m",)] is None  # no tiling, and split along two dims
    assert got[("rng",)] is None  # four writers of the whole tensor (rank-local: an entry each) are no one split
    assert got[("w",)] is not None and got[("w",)].to_obj()["grid"][1] == 3


# -- replies packed once per distinct key (the coordinator's _send_replies) ---------------------------------------


@settings(max_examples=60, deadline=None)
@given(mixed_jobs())
def test_ranks_with_equal_reply_keys_get_equal_replies(descs):
    """The coordinator packs one reply per key: a key must hold everything the reply depends on (v1 and v2),
    rank-local entries, explicit cells and bitmaps included."""
    plan = plan_save(descs)
    cells = plan_cells(plan)
    ranks = [d.rank for d in descs] + [max(d.rank for d in descs) + 1]  # and a rank that took no part
    for key_of, reply_of in ((plan.reply_key, plan.to_msgpack_for), (lambda r: cells.reply_key(plan, r), lambda r: cells.reply(plan, r))):
        by_key: dict = {}
        for r in ranks:
            by_key.setdefault(key_of(r), set()).add(reply_of(r))
        assert all(len(replies) == 1 for replies in by_key.values())


def test_an_fsdp_groups_ranks_share_a_handful_of_reply_keys():
    world = 64
    tensors = {("t", i): ((world * 4 - i % 5, 8) if i % 4 else (world * 2 - i % 3,), [0]) for i in range(40)}
    plan = plan_save(describe(tensors, (world,)))
    cells = plan_cells(plan)
    assert len({plan.reply_key(r) for r in range(world)}) <= 3  # the last ranks' shorter shares differ
    assert len({cells.reply_key(plan, r) for r in range(world)}) <= 3
    assert cells.reply(plan, 0) == cells.reply(plan, 1)


def test_detect_columns_splits_equal_columns_once_and_tells_apart_their_writers():
    """Columns of one shape, boxes and writers (an FSDP model's layers) share one split; the same boxes with
    other writers (a replicated tensor each rank writes one of) do not."""
    ranks = np.arange(4)
    sharded = [(r * 2, 2) for r in range(4)]  # (8,) split in row order
    boxes = np.array([[o, o, 0, 0, z, z, 8, 8] for o, z in sharded], np.int64)  # tensors a, b sharded; c, d replicated
    writes = np.zeros((4, 4), bool)
    writes[:, :2] = True
    writes[0, 2] = writes[1, 3] = True
    a, b, c, d = detect_columns([(8,)] * 4, np.arange(4), 4, boxes, writes, ranks)
    assert a is b and a.to_obj() == {"grid": [2], "owner": [0, 1]}
    assert c.to_obj() == {"grid": [8], "owner": [0, 0]} and d.to_obj() == {"grid": [8], "owner": [1, 0]}
    for got, col in zip((a, b, c, d), range(4)):
        rows = np.flatnonzero(writes[:, col])
        want, _ = detect_split((8,), boxes[rows, col : col + 1], boxes[rows, 4 + col : 5 + col], ranks[rows])
        assert got.to_obj() == want.to_obj()
    memo = ColumnMemo()  # the blocks of one group: a later block's equal column gets the earlier split
    (first,) = detect_columns([(8,)], np.array([0]), 4, boxes, writes[:, :1], ranks, memo)
    later = detect_columns([(8,)] * 2, np.array([1, 3]), 4, boxes, writes[:, [1, 3]], ranks, memo)
    assert later[0] is first and later[1].to_obj() == d.to_obj()
    (unkept,) = detect_columns([(8,)], np.array([1]), 4, boxes, writes[:, 1:2], ranks, ColumnMemo(limit=0))
    assert unkept is not first and unkept.to_obj() == first.to_obj()
