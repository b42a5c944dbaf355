"""The exact-cover check of chunk boxes: correct against brute force, and quick on adversarial tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ckpt.boxes import cover_problem
from dist_ckpt.errors import ManifestError
from dist_ckpt.manifest import ALIGN, ChunkTable, Manifest, TensorEntry


def brute_force(shape, boxes) -> str | None:
    """Rasterise every box: "overlap", "gap" or None."""
    count = np.zeros(shape, np.int64)
    for off, siz in boxes:
        count[tuple(slice(o, o + s) for o, s in zip(off, siz))] += 1
    if (count > 1).any():
        return "overlap"
    if (count == 0).any():
        return "gap"
    return None


def check(shape, boxes) -> str | None:
    nd = len(shape)
    off = np.array([b[0] for b in boxes], np.int64).reshape(len(boxes), nd)
    siz = np.array([b[1] for b in boxes], np.int64).reshape(len(boxes), nd)
    return cover_problem(shape, off, siz)


def guillotine(shape, cuts, rng) -> list:
    """A valid, irregular tiling: repeatedly cut a random box in two along a random dim."""
    boxes = [((0,) * len(shape), tuple(shape))]
    for _ in range(cuts):
        i = int(rng.integers(len(boxes)))
        off, siz = boxes[i]
        dims = [d for d in range(len(shape)) if siz[d] > 1]
        if not dims:
            continue
        d = dims[int(rng.integers(len(dims)))]
        at = int(rng.integers(1, siz[d]))
        a = (off, siz[:d] + (at,) + siz[d + 1 :])
        b = (off[:d] + (off[d] + at,) + off[d + 1 :], siz[:d] + (siz[d] - at,) + siz[d + 1 :])
        boxes[i : i + 1] = [a, b]
    return boxes


def _box(shape):
    return st.tuples(*[st.integers(0, s - 1) for s in shape]).flatmap(
        lambda off: st.tuples(st.just(off), st.tuples(*[st.integers(1, s - o) for o, s in zip(off, shape)]))
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(lambda shape: st.tuples(st.just(tuple(shape)), st.lists(_box(shape), min_size=1, max_size=6)))
)
def test_random_boxes_agree_with_brute_force(case):
    shape, boxes = case
    want = brute_force(shape, boxes)
    got = check(shape, boxes)
    assert (got is None) == (want is None), (shape, boxes, got)
    if want is not None:
        assert got is not None and ("overlap" in got or "gap" in got), got


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 12), st.integers(0, 2**32 - 1), st.integers(0, 3))
def test_tilings_pass_and_perturbed_tilings_fail_like_brute_force(shape, cuts, seed, mutation):
    rng = np.random.default_rng(seed)
    boxes = guillotine(tuple(shape), cuts, rng)
    assert check(shape, boxes) is None
    if mutation == 1 and len(boxes) > 1:  # drop one box: a gap
        boxes.pop(int(rng.integers(len(boxes))))
    elif mutation == 2:  # duplicate one: an overlap
        boxes.append(boxes[int(rng.integers(len(boxes)))])
    elif mutation == 3:  # shrink one along a dim and grow its neighbour's region nowhere: a gap
        i = int(rng.integers(len(boxes)))
        off, siz = boxes[i]
        d = int(np.argmax(siz))
        if siz[d] > 1:
            boxes[i] = (off, siz[:d] + (siz[d] - 1,) + siz[d + 1 :])
    want, got = brute_force(shape, boxes), check(shape, boxes)
    assert (got is None) == (want is None), (shape, boxes, got)


def test_the_reported_element_is_really_bad():
    # 4x4 tensor: a 2x2 box twice (overlap at [0, 0]) ... and one missing quadrant
    boxes = [((0, 0), (2, 2)), ((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2))]
    msg = check((4, 4), boxes)
    assert msg == "chunks overlap: element [0, 0] is covered 2 times"
    boxes = [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2)), ((2, 2), (1, 2)), ((3, 2), (1, 1))]
    assert check((4, 4), boxes) == "chunks leave a gap: element [3, 3] is not covered"


def test_valid_2d_and_3d_tilings_pass():
    grid = [((i, j), (2, 3)) for i in range(0, 8, 2) for j in range(0, 9, 3)]
    assert check((8, 9), grid) is None
    brick = [((r, c + (r % 2) * 2), (1, 4)) for r in range(6) for c in range(0, 12, 4) if c + (r % 2) * 2 + 4 <= 12]
    brick += [((r, 0), (1, 2)) for r in range(1, 6, 2)] + [((r, 10), (1, 2)) for r in range(1, 6, 2)]
    assert check((6, 12), brick) is None
    cube = [((i, j, l), (1, 2, 2)) for i in range(3) for j in range(0, 4, 2) for l in range(0, 4, 2)]
    assert check((3, 4, 4), cube) is None
    assert "overlap" in check((3, 4, 4), cube[:-1] + [((2, 2, 1), (1, 2, 2))])


def _manifest(shape, off, siz) -> bytes:
    n, nbytes = len(off), np.prod(siz, axis=1).astype(np.int64)
    pos = np.concatenate([[0], np.cumsum(-(-nbytes // ALIGN) * ALIGN)[:-1]]).astype(np.int64)
    t = ChunkTable(off, siz, np.zeros(n, np.int32), pos, nbytes, np.zeros(n, np.uint64))
    return Manifest(1, ("data/r00000.bin",), {("w",): TensorEntry("uint8", shape, t)}, {}, ["d", ["w"], [0]]).to_msgpack()


@pytest.mark.timeout(30)
def test_thousands_of_nested_squares_are_rejected_quickly():
    # 7,000 squares [0, k)^2, each inside the next: a 7,000 x 7,000 boundary grid
    # (49M cells) that the old check rasterised box by box, N^3: 127 s in the issue.
    n = 7000
    k = np.arange(1, n + 1, dtype=np.int64)
    off = np.zeros((n, 2), np.int64)
    siz = np.stack([k, k], axis=1)
    with pytest.raises(ManifestError, match=r"overlap: element \[0, 0\] is covered 7000 times"):
        Manifest.from_msgpack(_manifest((n, n), off, siz))
    i = np.arange(n, dtype=np.int64)  # centred squares: the same with 14,000 boundaries per dim
    with pytest.raises(ManifestError, match="overlap"):
        Manifest.from_msgpack(_manifest((2 * n, 2 * n), np.stack([i, i], 1), np.stack([2 * n - 2 * i] * 2, 1)))


@pytest.mark.timeout(30)
def test_thousands_of_irregular_chunks_are_checked_quickly():
    rng = np.random.default_rng(7)
    boxes = guillotine((4096, 4096), 4000, rng)  # 2-D, no grid structure
    off = np.array([b[0] for b in boxes], np.int64)
    siz = np.array([b[1] for b in boxes], np.int64)
    assert cover_problem((4096, 4096), off, siz) is None
    assert "overlap" in cover_problem((4096, 4096), np.concatenate([off, off[17:18]]), np.concatenate([siz, siz[17:18]]))
    boxes3 = guillotine((64, 64, 64), 3000, rng)  # 3-D
    off3 = np.array([b[0] for b in boxes3], np.int64)
    siz3 = np.array([b[1] for b in boxes3], np.int64)
    assert cover_problem((64, 64, 64), off3, siz3) is None
    staggered = [((r, c + (r % 2)), (1, 2)) for r in range(3000) for c in range(0, 4, 2) if c + (r % 2) + 2 <= 4]
    assert "gap" in check((3000, 4), staggered)  # odd rows leave their first and last column uncovered
