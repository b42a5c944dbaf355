"""Load planning: read requests that reshard a saved tensor onto any target layout.

A saved tensor is simulated by a numpy global array cut into chunks laid at
4 KiB-aligned offsets into in-memory "files"; a tiny executor runs the plan.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner import shard_boxes  # one definition of DTensor-like box placement

from dist_ckpt.load_planner import ReadOp, plan_reads, required_bytes

ALIGN = 4096


class Saved:
    """A global array saved as chunks: one file per saving rank, chunks 4 KiB-aligned."""

    def __init__(self, glob: np.ndarray, boxes, n_files: int | None = None):
        self.glob = glob
        uniq = list(dict.fromkeys(b for b in boxes if math.prod(b[1])))  # dedup replicas, drop empties
        n_files = n_files or max(1, len(uniq))
        self.files = [bytearray() for _ in range(n_files)]
        offs, sizs, fidx, foff = [], [], [], []
        for i, (o, s) in enumerate(uniq):
            f = self.files[i % n_files]
            f.extend(b"\xee" * (-len(f) % ALIGN))  # padding that must never be read
            fidx.append(i % n_files)
            foff.append(len(f))
            f.extend(np.ascontiguousarray(glob[_sl(o, s)]).tobytes())
            offs.append(o)
            sizs.append(s)
        nd = glob.ndim
        self.offsets = np.array(offs, dtype=np.int64).reshape(len(uniq), nd)
        self.sizes = np.array(sizs, dtype=np.int64).reshape(len(uniq), nd)
        self.file_idx = np.array(fidx, dtype=np.int64)
        self.file_off = np.array(foff, dtype=np.int64)

    def plan(self, off, siz) -> list[ReadOp]:
        return plan_reads(off, siz, self.glob.itemsize, self.offsets, self.sizes, self.file_idx, self.file_off)

    def load(self, off, siz) -> tuple[np.ndarray, list[ReadOp]]:
        """Plan and execute the reads for one target box; check invariants on the way."""
        ops = self.plan(off, siz)
        local = np.zeros(siz, dtype=self.glob.dtype)
        hits = np.zeros(siz, dtype=np.int64)
        for op in ops:
            assert op.run_offsets.dtype == np.int64 and op.run_offsets.ndim == 1
            assert np.all(np.diff(op.run_offsets) >= op.run_nbytes)  # in order, disjoint
            buf = b"".join(bytes(self.files[op.file][o : o + op.run_nbytes]) for o in op.run_offsets.tolist())
            assert len(buf) == math.prod(op.dst_sizes) * self.glob.itemsize
            if op.whole_chunk:
                assert tuple(self.sizes[op.chunk]) == op.dst_sizes and len(op.run_offsets) == 1
                assert op.run_offsets[0] == self.file_off[op.chunk]
            local[_sl(op.dst_offsets, op.dst_sizes)] = np.frombuffer(buf, dtype=self.glob.dtype).reshape(op.dst_sizes)
            hits[_sl(op.dst_offsets, op.dst_sizes)] += 1
        assert (hits == 1).all(), "every target element is read exactly once"
        assert required_bytes(ops) == local.nbytes, "no over-read"
        return local, ops


def _sl(off, siz):
    return tuple(slice(o, o + s) for o, s in zip(off, siz))


def reshard(shape, save_mesh, save_pl, load_mesh, load_pl, dtype=np.float32):
    glob = np.arange(math.prod(shape), dtype=np.int64).astype(dtype).reshape(shape)
    saved = Saved(glob, shard_boxes(shape, save_mesh, save_pl))
    for off, siz in shard_boxes(shape, load_mesh, load_pl):
        local, _ = saved.load(off, siz)
        np.testing.assert_array_equal(local, glob[_sl(off, siz)])
    return saved


@pytest.mark.parametrize(
    "shape, save, load",
    [
        ((64, 6), ((8,), [0]), ((4,), [0])),  # 8 -> 4
        ((64, 6), ((4,), [0]), ((8,), [0])),  # 4 -> 8
        ((60, 7), ((4,), [0]), ((3,), [0])),  # 4 -> 3
        ((61, 7), ((3,), [0]), ((5,), [0])),  # 3 -> 5, uneven on both sides
        ((20, 9), ((1,), [None]), ((4,), [0])),  # 1 -> 4
        ((20, 9), ((4,), [0]), ((1,), [None])),  # 4 -> 1
        ((12, 16), ((4,), [0]), ((4,), [1])),  # Shard(0) -> Shard(1)
        ((12, 16), ((4,), [1]), ((4,), [0])),  # Shard(1) -> Shard(0)
        ((12, 18), ((2, 3), [0, 1]), ((6,), [0])),  # 2-D mesh -> 1-D
        ((12, 18), ((6,), [1]), ((3, 2), [0, 1])),  # 1-D -> 2-D mesh
        ((12, 18), ((2, 2), [None, 0]), ((2, 3), [1, 0])),  # HSDP replicas -> other 2-D mesh
        ((173, 10), ((4,), [0]), ((3,), [0])),  # uneven 44,44,44,41 -> 58,58,57
        ((5, 4), ((4,), [0]), ((8,), [0])),  # empty shards on both sides
        ((3, 5, 4), ((2, 4), [0, 1]), ((3, 3), [2, 0])),  # empty shards, 3-D
        ((0, 4), ((2,), [0]), ((3,), [0])),  # empty tensor
        ((), ((4,), [None]), ((2,), [None])),  # 0-d
        ((7,), ((1,), [None]), ((3,), [0])),  # 1-D
    ],
)
def test_reshard(shape, save, load):
    reshard(shape, *save, *load)


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.complex64, np.bool_])
def test_reshard_dtypes(dtype):
    reshard((9, 10), (3,), [1], (2,), [0], dtype=dtype)


def test_zero_dim_is_one_whole_chunk_read():
    saved = Saved(np.array(3.5), [((), ())] * 4)
    local, ops = saved.load((), ())
    assert local == 3.5 and len(ops) == 1 and ops[0].whole_chunk and ops[0].run_nbytes == 8


def test_empty_target_reads_nothing():
    saved = Saved(np.ones((4, 4)), [((0, 0), (4, 4))])
    assert saved.plan((4, 0), (0, 4)) == [] and saved.plan((1, 1), (2, 0)) == []


def test_dim0_slice_is_one_run_per_chunk():
    shape = (64, 5, 7)
    saved = reshard(shape, (4,), [0], (16,), [0])  # each target: a dim-0 slice of one chunk
    glob = saved.glob
    _, ops = saved.load((10, 0, 0), (30, 5, 7))  # spans 3 chunks (16 rows each)
    assert [len(op.run_offsets) for op in ops] == [1, 1, 1]
    assert [op.run_nbytes for op in ops] == [n * 5 * 7 * glob.itemsize for n in (6, 16, 8)]
    assert [op.whole_chunk for op in ops] == [False, True, False]


def test_middle_dim_slice_runs_coalesced():
    shape = (6, 8, 10)
    glob = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    saved = Saved(glob, [((0, 0, 0), shape)])
    # target: rows 2..5 of dim 1, everything of dims 0 and 2 -> one run of 3*10 elements per dim-0 index
    _, ops = saved.load((0, 2, 0), (6, 3, 10))
    (op,) = ops
    assert len(op.run_offsets) == 6 and op.run_nbytes == 3 * 10 * 4
    np.testing.assert_array_equal(np.diff(op.run_offsets), 8 * 10 * 4)
    # a box partial in the last dim: one run per (dim 0, dim 1) index
    _, (op,) = saved.load((1, 2, 3), (2, 3, 4))
    assert len(op.run_offsets) == 2 * 3 and op.run_nbytes == 4 * 4
    # full in dims 1 and 2 but partial in dim 0: one run
    _, (op,) = saved.load((2, 0, 0), (3, 8, 10))
    assert len(op.run_offsets) == 1 and op.run_nbytes == 3 * 8 * 10 * 4
    # a single element
    _, (op,) = saved.load((5, 7, 9), (1, 1, 1))
    assert len(op.run_offsets) == 1 and op.run_offsets[0] == saved.file_off[0] + glob.nbytes - 4


def test_shard1_chunks_read_as_rows():
    shape = (16, 12)
    saved = reshard(shape, (4,), [1], (4,), [0])  # each saved chunk is (16, 3); each target 4 full rows
    _, ops = saved.load((4, 0), (4, 12))
    assert len(ops) == 4
    for op in ops:  # 4 rows of each chunk are contiguous inside it: one run
        assert len(op.run_offsets) == 1 and op.run_nbytes == 4 * 3 * 4


def test_ops_ordered_by_file_and_offset():
    saved = Saved(np.zeros((40, 3)), shard_boxes((40, 3), (8,), [0]), n_files=3)
    ops = saved.plan((0, 0), (40, 3))
    keys = [(op.file, int(op.run_offsets[0])) for op in ops]
    assert keys == sorted(keys) and len(ops) == 8


def test_million_runs_planned_fast():
    # one chunk (1000, 1000, 4) of float32; target every other pair in the last dim: 1e6 runs
    off = np.zeros((1, 3), np.int64)
    siz = np.array([[1000, 1000, 4]], np.int64)
    t = time.perf_counter()
    (op,) = plan_reads((0, 0, 1), (1000, 1000, 2), 4, off, siz, np.zeros(1, np.int64), np.array([8192]))
    elapsed = time.perf_counter() - t
    assert len(op.run_offsets) == 1_000_000 and op.run_nbytes == 8
    assert op.run_offsets[0] == 8192 + 4 and op.run_offsets[-1] == 8192 + (1000 * 1000 * 4 - 3) * 4
    assert elapsed < 5  # generous: a per-run Python loop would take far longer; the design target is < 1 s


# --------------------------------------------------------------------------- property test


@st.composite
def layouts(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))

    def layout():
        mdim = draw(st.integers(1, 2))
        mesh = tuple(draw(st.lists(st.integers(1, 4), min_size=mdim, max_size=mdim)))
        pl = [draw(st.sampled_from([None, *range(ndim)])) for _ in range(mdim)]
        return mesh, pl

    return shape, layout(), layout()


@settings(max_examples=400, deadline=None)
@given(layouts(), st.sampled_from([np.int8, np.float32, np.float64]))
def test_reshard_property(layout, dtype):
    shape, save, load = layout
    reshard(shape, *save, *load, dtype=dtype)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_arbitrary_target_box(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=4)))
    save = (tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))),)
    save += ([data.draw(st.sampled_from([None, *range(len(shape))])) for _ in save[0]],)
    off = tuple(data.draw(st.integers(0, d - 1)) for d in shape)
    siz = tuple(data.draw(st.integers(1, d - o)) for d, o in zip(shape, off))
    glob = np.arange(math.prod(shape), dtype=np.int16).reshape(shape)
    saved = Saved(glob, shard_boxes(shape, *save))
    local, ops = saved.load(off, siz)
    np.testing.assert_array_equal(local, glob[_sl(off, siz)])
    for op in ops:  # runs are maximal: consecutive runs never touch
        assert np.all(np.diff(op.run_offsets) > op.run_nbytes)
