"""The coordinator's boxes matrix as int32: narrowed only when every valid box fits, widened before any arithmetic.

Shapes near 2**31 (no tensor data: plans are metadata) check that no end,
volume or byte count wraps, by comparing the coordinator's int32 path with
the rank-side int64 columns and with exact Python integers.
"""

from __future__ import annotations

import numpy as np
import pytest

from dist_ckpt.boxes import columns_t
from dist_ckpt.description import BoxStore, RankColumns
from dist_ckpt.index_build import plan_cells
from dist_ckpt.save_planner import PlanError, RankDescription, TensorDescription, plan_save

BIG = 2**31 - 1  # the largest extent an int32 matrix holds
HALF = 2**30


def stored(descs: list[RankDescription]) -> tuple[BoxStore, list[RankColumns]]:
    """The descriptions as the coordinator holds them: rows of a :class:`BoxStore`."""
    store = BoxStore(len(descs))
    return store, [store.put(d.columns()) for d in descs]


def one_tensor(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...], dtype: str = "float32") -> list[RankDescription]:
    return [RankDescription(r, (TensorDescription(("w",), dtype, shape, o, z),)) for r, (o, z) in enumerate(boxes)]


def chunk_bytes(plan) -> list[int]:
    return sorted(plan.layout.nbytes.tolist())


def test_store_is_int32_only_when_every_dim_fits():
    fits = one_tensor([((0,), (BIG,))], (BIG,))[0].columns().schema
    too_big = one_tensor([((0,), (2**31,))], (2**31,))[0].columns().schema
    store = BoxStore(2)
    assert store.matrix(fits).dtype == np.int32
    assert store.matrix(too_big).dtype == np.int64


def test_value_past_int32_is_kept_and_named_not_narrowed():
    # 2**32 narrowed to int32 is 0: a valid-looking offset. The store must keep it.
    descs = one_tensor([((0,), (5,)), ((2**32,), (5,))], (10,))
    store, cols = stored(descs)
    m = store.matrix(cols[0].schema)
    assert m.dtype == np.int64 and m.tolist() == [[0, 5], [2**32, 5]]  # widened once, the earlier row kept
    with pytest.raises(PlanError, match=r"tensor w on rank 1: box at offsets \[4294967296\] sizes \[5\] lies outside shape \[10\]") as e:
        plan_save(cols)
    assert e.value.ranks == (1,)


def test_end_that_wraps_int32_is_outside_the_shape():
    # offset and size both fit int32; their sum does not (it would wrap negative and pass a bounds check)
    descs = one_tensor([((0,), (HALF,)), ((HALF,), (BIG,))], (BIG,))
    store, cols = stored(descs)
    assert store.matrix(cols[0].schema).dtype == np.int32
    with pytest.raises(PlanError, match="on rank 1: box at offsets .* lies outside shape"):
        plan_save(cols)


def test_shard0_near_int32_limit_plans_exact_bytes():
    """Shard(0) in rank order (the vectorised ``_tiled`` path and the v2 splits)."""
    descs = one_tensor([((0,), (HALF,)), ((HALF,), (BIG - HALF,))], (BIG,), "float64")
    plan = plan_save(stored(descs)[1])
    assert plan.bytes_per_rank == {0: HALF * 8, 1: (BIG - HALF) * 8}
    assert plan == plan_save(descs)
    assert chunk_bytes(plan) == sorted([HALF * 8, (BIG - HALF) * 8])
    assert plan_cells(plan_save(stored(descs)[1])).splits[0].dims == (HALF,)


def test_replicas_near_int32_limit_plan_exact_bytes():
    """HSDP: two replicas of a two-way split, out of rank order (the sorted path, shared boxes)."""
    h = BIG - 5
    descs = one_tensor([((0,), (h,)), ((h,), (5,)), ((0,), (h,)), ((h,), (5,))], (BIG,))
    plan = plan_save(stored(descs)[1])
    assert plan == plan_save(descs)
    assert sum(plan.loads.tolist()) == BIG * 4
    assert chunk_bytes(plan) == [5 * 4, h * 4]


def test_two_dim_grid_volume_past_int32_is_exact():
    """A 2-D mesh (general path): the first boxes hold 2**31 elements, one more than int32 holds."""
    shape = (BIG, 4)
    boxes = [((r, c), (z, 2)) for r, z in ((0, HALF), (HALF, BIG - HALF)) for c in (0, 2)]
    descs = one_tensor(boxes, shape, "bfloat16")
    store, cols = stored(descs)
    assert store.matrix(cols[0].schema).dtype == np.int32
    plan = plan_save(cols)
    assert plan.bytes_per_rank == {0: HALF * 2 * 2, 1: HALF * 2 * 2, 2: (BIG - HALF) * 2 * 2, 3: (BIG - HALF) * 2 * 2}
    assert plan == plan_save(descs)
    assert chunk_bytes(plan) == sorted([HALF * 4] * 2 + [(BIG - HALF) * 4] * 2)
    assert plan_cells(plan_save(stored(descs)[1])).splits[0].dims == (HALF, 2)


def test_columns_t_widens_and_transposes():
    m = (np.arange(7 * 5, dtype=np.int32).reshape(7, 5) + (2**31 - 40)).astype(np.int32)
    got = columns_t(m, np.array([4, 1]), rows_per_pass=3)
    assert got.dtype == np.int64 and got.flags.c_contiguous
    assert (got == m[:, [4, 1]].T.astype(np.int64)).all()
    assert (got[:, :1] + got[:, :1] > 2**31).all()  # sums do not wrap
    run = columns_t(m, np.array([1, 2, 3]), rows_per_pass=2)  # a run of columns (sliced, not gathered)
    assert run.dtype == np.int64 and (run == m[:, 1:4].T).all()


def test_box_problem_reads_an_int32_matrix_as_it_is_at_every_edge():
    """Sums up to 2**32 - 2 (both halves at the int32 maximum) and negative values, in an int32 matrix, without widening it."""
    from dist_ckpt.description import box_problem

    schema = one_tensor([((0,), (BIG,))], (BIG,))[0].columns().schema
    ok = np.array([[0, BIG], [BIG, 0], [BIG - 1, 1], [HALF, BIG - HALF]], np.int32)
    assert box_problem(schema, ok) is None
    for off, siz, why in ((BIG, BIG, "outside"), (BIG, 1, "outside"), (1, BIG, "outside"), (-1, 1, "negative"), (0, -(2**31), "negative")):
        got = box_problem(schema, np.vstack([ok, np.array([[off, siz]], np.int32)]))
        assert got is not None and got[0] == len(ok) and why in got[2], (off, siz, got)
