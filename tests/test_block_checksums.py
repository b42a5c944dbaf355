"""Every byte a load returns is checked: partial-chunk reads verify the block sums of the blocks they touch."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from dist_helpers import CountingStorage, as_v1, dtensor
from hypothesis import given, settings
from hypothesis import strategies as st
from launcher import run_ranks
from test_planner import commit, mixed_jobs, records_of

import dist_ckpt as dc
from dist_ckpt.commit import RecordTable, decode_records, encode_record_columns
from dist_ckpt.errors import ChecksumError, FragmentError
from dist_ckpt.loader import read_manifest
from dist_ckpt.manifest import BLOCK_BYTES, Manifest, block_counts
from dist_ckpt.manifest_v2 import FragmentRef, decode_index
from dist_ckpt.reader import READ_PIECE, ReadTask, read_tensors
from dist_ckpt.save_planner import plan_save
from dist_ckpt.verify import CHECKSUM_MISMATCH, verify

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "20"}
ROW = 1024 * 4  # bytes per row of the (rows, 1024) float32 tensors below
W = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB: one chunk of 4 blocks


def _saved(tmp_path, t: torch.Tensor = W) -> tuple[str, str]:
    path = str(tmp_path / "ck")
    dc.save({"w": t}, path)
    manifest, root, _ = read_manifest(path)
    return path, f"{root}/{manifest.files[int(manifest.tensors[('w',)].chunks.file[0])]}"


def _flip(data_file: str, pos: int) -> None:
    with open(data_file, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


def _read_box(path: str, offsets: tuple[int, int], sizes: tuple[int, int], verify: bool = True) -> torch.Tensor:
    manifest, root, storage = read_manifest(path)
    out = torch.zeros(sizes)
    read_tensors(storage, root, manifest.files, [ReadTask(("w",), manifest.tensors[("w",)], out, offsets, sizes)], verify=verify)
    return out


BOXES = {"rows": ((300, 0), (400, 1024)), "cols": ((0, 100), (1024, 100)), "block": ((512, 256), (128, 512))}


@pytest.mark.parametrize("box", BOXES, ids=list(BOXES))
def test_partial_reads_return_the_right_bytes(tmp_path, box):
    path, _ = _saved(tmp_path)
    (r, c), (h, w) = BOXES[box]
    assert torch.equal(_read_box(path, (r, c), (h, w)), W[r : r + h, c : c + w])


@pytest.mark.parametrize("box", BOXES, ids=list(BOXES))
def test_a_flipped_byte_in_a_touched_block_fails_a_partial_read(tmp_path, box):
    path, data = _saved(tmp_path)
    (r, c), (h, w) = BOXES[box]
    pos = r * ROW + c * 4 + 8 * ROW  # inside the box, 8 rows down
    _flip(data, pos)
    block = pos // BLOCK_BYTES
    with pytest.raises(ChecksumError, match=rf"w chunk 0 block {block} in .*r00000\.bin at offset {block * BLOCK_BYTES} \({BLOCK_BYTES} bytes\)"):
        _read_box(path, (r, c), (h, w))


def test_a_byte_outside_the_box_but_in_its_edge_block_is_still_checked(tmp_path):
    path, data = _saved(tmp_path)
    _flip(data, 299 * ROW)  # the row just above rows 300..699, in block 1 which those rows start in
    with pytest.raises(ChecksumError, match="block 1 "):
        _read_box(path, (300, 0), (400, 1024))
    assert torch.equal(_read_box(path, (0, 0), (200, 1024)), W[:200])  # block 0 only: untouched, fine


def test_a_checkpoint_without_block_sums_still_loads(tmp_path):
    path, data = _saved(tmp_path)
    as_v1(path)  # the chunk tables to edit are version 1's
    with open(f"{path}/MANIFEST", "rb") as f:
        obj = msgpack.unpackb(f.read(), strict_map_key=False, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})
    for entry in obj["tensors"].values():
        del entry["chunks"]["block"], entry["chunks"]["blocks"]
    with open(f"{path}/MANIFEST", "wb") as f:
        f.write(msgpack.packb(obj))
    assert read_manifest(path)[0].tensors[("w",)].chunks.blocks is None
    assert torch.equal(_read_box(path, (300, 0), (400, 1024)), W[300:700])
    out = {"w": torch.zeros(1024, 1024)}
    dc.load(out, path)
    assert torch.equal(out["w"], W)
    _flip(data, 5)
    with pytest.raises(ChecksumError, match="w chunk 0 in"):  # the whole-chunk xxh3 still checks a full read
        dc.load(out, path)


# -- 2 ranks loading a 1-rank save into Shard(0): every rank reads part of the one chunk ---------

V = torch.arange(600 * 1024, dtype=torch.float32).reshape(600, 1024)  # 2.3 MiB: blocks 0, 1, 2


def _load_shard0(rank, world, path):
    sd = {"w": dtensor(torch.zeros(600, 1024), world, "shard0")}
    try:
        dc.load(sd, path)
    except ChecksumError as e:
        return f"ChecksumError: {e}"
    lo = rank * 300
    return bool(torch.equal(sd["w"].to_local(), V[lo : lo + 300]))


def test_resharded_load_on_two_ranks_checks_the_blocks_each_rank_reads(tmp_path):
    path, data = _saved(tmp_path, V)
    assert run_ranks(_load_shard0, 2, path, env=FAST) == {0: True, 1: True}
    _flip(data, 550 * ROW)  # row 550: block 2 (rows 512 on), which only rank 1 (rows 300..599) reads
    got = run_ranks(_load_shard0, 2, path, env=FAST)
    assert got[0] is True
    assert got[1].startswith("ChecksumError") and "w chunk 0 block 1 in" not in got[1]
    assert f"block 2 in {data}" in got[1] and f"at offset {2 * BLOCK_BYTES} ({600 * ROW - 2 * BLOCK_BYTES} bytes)" in got[1], got[1]


def test_resharded_load_rejects_another_checkpoints_bytes(tmp_path):
    # The case: a data file whose bytes come from elsewhere (here copied in, not
    # linked, since links are refused outright) was loaded silently by a partial read.
    path, data = _saved(tmp_path, V)
    other = str(tmp_path / "other")
    dc.save({"w": V + 1}, other)
    (name,) = [n for n in os.listdir(f"{other}/data") if n.endswith(".bin")]  # the data file (a v2 save also has its fragment)
    os.replace(f"{other}/data/{name}", data)
    got = run_ranks(_load_shard0, 2, path, env=FAST)
    assert got[0].startswith("ChecksumError") and " block 0 in " in got[0], got  # rows 0..299: blocks 0, 1
    assert got[1].startswith("ChecksumError") and " block 1 in " in got[1], got  # rows 300..599: blocks 1, 2


def _spoil_block_sum(path: str, block: int) -> None:
    """Rewrite the MANIFEST with one block sum of tensor w changed; the data stays intact."""
    manifest, _, _ = read_manifest(path)
    entry = manifest.tensors[("w",)]
    blocks = entry.chunks.blocks.copy()
    blocks[block] ^= 1
    tensors = {("w",): dataclasses.replace(entry, chunks=dataclasses.replace(entry.chunks, blocks=blocks))}
    with open(f"{path}/MANIFEST", "wb") as f:
        f.write(dataclasses.replace(manifest, tensors=tensors).to_msgpack())


def test_verify_checks_every_block_sum(tmp_path):
    path, _ = _saved(tmp_path, torch.zeros(5, 1 << 20, dtype=torch.uint8))  # 5 blocks, read in one segment
    assert verify(path).ok
    _spoil_block_sum(path, 3)
    report = verify(path)
    assert [(b.key, b.reason) for b in report.bad] == [(("w",), CHECKSUM_MISMATCH)]
    assert report.bad[0].detail.startswith(f"block 3 at offset {3 * BLOCK_BYTES}: ")
    big, _ = _saved(tmp_path / "big", torch.zeros(20, 1 << 20, dtype=torch.uint8))  # 20 MiB: streamed in 16 MiB reads
    _spoil_block_sum(big, 17)
    assert verify(big).bad[0].detail.startswith(f"block 17 at offset {17 * BLOCK_BYTES}: ")


@pytest.mark.parametrize("box, blocks", [("rows", [1, 2]), ("cols", [0, 1, 2, 3]), ("block", [2])])
def test_a_partial_read_reads_the_touched_blocks_once_and_nothing_else(tmp_path, box, blocks):
    path, _ = _saved(tmp_path)
    manifest, root, _ = read_manifest(path)
    (r, c), (h, w) = BOXES[box]
    for verify_on, want in ((True, len(blocks) * BLOCK_BYTES), (False, h * w * 4)):
        storage = CountingStorage()
        out = torch.zeros(h, w)
        read_tensors(storage, root, manifest.files, [ReadTask(("w",), manifest.tensors[("w",)], out, (r, c), (h, w))], verify=verify_on)
        assert storage.counted[0] == want and torch.equal(out, W[r : r + h, c : c + w])


@settings(max_examples=100, deadline=None)
@given(mixed_jobs(), st.integers(0, 2**32 - 1), st.booleans())
def test_block_sums_land_with_their_chunks_in_manifest_order(descs, seed, shuffle):
    """The coordinator scatters each rank's block sums (sent in any record order) into manifest chunk order."""
    plan = plan_save(descs)
    table = RecordTable(plan)
    rng = np.random.default_rng(seed)
    for d in sorted(descs, key=lambda d: d.rank):
        rec = records_of(plan, d, rng if shuffle else None)  # xxh3 = rank * 1000 + tag
        sums = [np.full(int(k), int(h), np.uint64) for h, k in zip(rec.xxh3, block_counts(rec.nbytes, BLOCK_BYTES))]
        blocks = np.concatenate([np.zeros(0, np.uint64)] + sums)
        table.add(d.rank, decode_records(encode_record_columns(rec.files, rec.tag, rec.file, rec.offset, rec.nbytes, rec.xxh3, blocks), d.rank))
    m = Manifest.from_msgpack(commit(plan, table, len(descs)).to_msgpack())
    for entry in list(m.tensors.values()) + [e for s in m.local.values() for e in s.tensors.values()]:
        c = entry.chunks
        if len(c):
            assert c.blocks is not None and c.block_bytes == BLOCK_BYTES
            assert np.array_equal(c.blocks, np.repeat(c.xxh3, block_counts(c.nbytes, BLOCK_BYTES)))


# -- version 2: the block sums live in the writer's fragment, whose size and xxh3 the index states ---------


def _saved_v2(tmp_path, monkeypatch, t: torch.Tensor) -> tuple[str, str]:
    monkeypatch.setenv("DIST_CKPT_FORMAT_VERSION", "2")
    path, data = _saved(tmp_path, t)
    assert read_manifest(path)[0].version == 2
    return path, data


def _spoil_fragment_block_sum(path: str, block: int, fix_index: bool) -> str:
    """Change one block sum of tensor w in rank 0's fragment (the data stays intact); returns the fragment's path.

    ``fix_index``: also restate the fragment's size and xxh3 in the index, as a writer of a
    consistent-but-wrong checkpoint would; otherwise the index still names the old bytes.
    """
    with open(f"{path}/MANIFEST", "rb") as f:
        index = decode_index(f.read())
    ref = index.fragments[0]
    frag_path = f"{path}/{ref.name}"
    with open(frag_path, "rb") as f:
        obj = msgpack.unpackb(f.read(), raw=False)
    blocks = np.frombuffer(obj["blocks"], "<u8").copy()
    blocks[block] ^= 1
    obj["blocks"] = blocks.tobytes()
    data = msgpack.packb(obj, use_bin_type=True)
    assert len(data) == ref.nbytes  # same size: only the xxh3 can tell
    with open(frag_path, "wb") as f:
        f.write(data)
    if fix_index:
        refs = (FragmentRef(ref.name, len(data), xxhash.xxh3_64_intdigest(data)),) + index.fragments[1:]
        with open(f"{path}/MANIFEST", "wb") as f:
            f.write(dataclasses.replace(index, fragments=refs).to_msgpack())
    return frag_path


def test_verify_checks_every_block_sum_v2(tmp_path, monkeypatch):
    path, _ = _saved_v2(tmp_path, monkeypatch, torch.zeros(5, 1 << 20, dtype=torch.uint8))
    assert verify(path).ok
    _spoil_fragment_block_sum(path, 3, fix_index=True)
    report = verify(path)
    assert [(b.key, b.reason) for b in report.bad] == [(("w",), CHECKSUM_MISMATCH)]
    assert report.bad[0].detail.startswith(f"block 3 at offset {3 * BLOCK_BYTES}: ")
    big, _ = _saved_v2(tmp_path / "big", monkeypatch, torch.zeros(20, 1 << 20, dtype=torch.uint8))
    _spoil_fragment_block_sum(big, 17, fix_index=True)
    assert verify(big).bad[0].detail.startswith(f"block 17 at offset {17 * BLOCK_BYTES}: ")


def test_a_spoiled_block_sum_in_a_v2_fragment_fails_the_resharded_load_that_reads_it(tmp_path, monkeypatch):
    path, data = _saved_v2(tmp_path, monkeypatch, V)
    _spoil_fragment_block_sum(path, 2, fix_index=True)  # block 2: rows 512 on, which only rank 1 (rows 300..599) reads
    got = run_ranks(_load_shard0, 2, path, env=FAST)
    assert got[0] is True
    assert got[1].startswith("ChecksumError") and "w chunk 0 block 2 in" in got[1] and data in got[1], got[1]


def test_a_v2_fragment_whose_xxh3_no_longer_matches_is_refused_before_any_block_sum(tmp_path, monkeypatch):
    path, _ = _saved_v2(tmp_path, monkeypatch, V)
    frag = _spoil_fragment_block_sum(path, 2, fix_index=False)
    with pytest.raises(FragmentError, match=f"fragment {frag}: xxh3 .* does not match the MANIFEST's"):
        verify(path)
    out = {"w": torch.zeros(600, 1024)}
    with pytest.raises(FragmentError, match=f"fragment {frag}: xxh3"):
        dc.load(out, path)
    assert not out["w"].any()  # refused before any data was read


# -- block sizes other than 1 MiB: the size is recorded per chunk table (fragment), and loads honour it ----


def _with_block_sums_of(path: str, bsz: int) -> str:
    """Rewrite the checkpoint's MANIFEST (version 1) with ``bsz``-byte block sums of its data, as a save with that block size records them.

    Returns the data file of tensor ``w``.
    """
    as_v1(path)
    manifest, root, _ = read_manifest(path)
    tensors = {}
    for key, entry in manifest.tensors.items():
        c, sums = entry.chunks, []
        for f, off, n in zip(c.file.tolist(), c.offset.tolist(), c.nbytes.tolist()):
            with open(f"{root}/{manifest.files[f]}", "rb") as fh:
                fh.seek(off)
                data = fh.read(n)
            sums += [xxhash.xxh3_64_intdigest(data[b : b + bsz]) for b in range(0, n, bsz)]
        tensors[key] = dataclasses.replace(entry, chunks=dataclasses.replace(c, blocks=np.array(sums, np.uint64), block_bytes=bsz))
    with open(f"{root}/MANIFEST", "wb") as fh:
        fh.write(dataclasses.replace(manifest, tensors=tensors).to_msgpack())
    return f"{root}/{manifest.files[int(manifest.tensors[('w',)].chunks.file[0])]}"


SMALL = 128 << 10


def _load_shard0_counting(rank, world, path):
    """One rank of a 1 -> ``world`` load into Shard(0): (bytes its reads returned, preadv calls, values right) or the ChecksumError."""
    storage = CountingStorage()
    calls = [0]
    open_read = storage.open_read

    def counting_open(p):
        h = open_read(p)
        inner = h.preadv

        def preadv(buffers, offset):
            calls[0] += 1
            return inner(buffers, offset)

        h.preadv = preadv
        return h

    storage.open_read = counting_open
    sd = {"w": dtensor(torch.zeros(600, 1024), world, "shard0")}
    try:
        dc.load(sd, path, storage=storage)
    except ChecksumError as e:
        return f"ChecksumError: {e}"
    lo = rank * 600 // world
    return storage.counted[0], calls[0], bool(torch.equal(sd["w"].to_local(), V[lo : lo + 600 // world]))


def test_a_resharded_load_of_small_blocks_reads_only_the_blocks_it_touches_a_piece_at_a_time(tmp_path):
    """Rows 0..299 / 300..599 of a 2.3 MiB chunk: each rank reads its rows plus the rest of its 128 KiB edge blocks, not of 1 MiB ones."""
    path, _ = _saved(tmp_path, V)
    _with_block_sums_of(path, SMALL)
    got = run_ranks(_load_shard0_counting, 2, path, env=FAST)
    for rank, (lo, hi) in enumerate(((0, 300 * ROW), (300 * ROW, 600 * ROW))):
        touched = min(-(-hi // SMALL) * SMALL, 600 * ROW) - lo // SMALL * SMALL
        nbytes, calls, right = got[rank]
        assert right and nbytes == touched, (rank, got)  # 1.25 MiB each; with 1 MiB blocks: 2 MiB (rank 0), 1.3 MiB (rank 1)
        assert calls == -(-touched // READ_PIECE), (rank, got)  # a READ_PIECE of blocks per call, not one call per 128 KiB block


def test_a_flipped_byte_in_a_small_block_is_caught_naming_key_block_and_file(tmp_path):
    path, _ = _saved(tmp_path, V)
    data = _with_block_sums_of(path, SMALL)
    pos = 450 * ROW + 12  # rank 1's rows; block 14 of 128 KiB
    _flip(data, pos)
    got = run_ranks(_load_shard0_counting, 2, path, env=FAST)
    assert got[0][2] is True  # rank 0 reads blocks 0..9 only
    block = pos // SMALL
    assert got[1].startswith("ChecksumError") and f"w chunk 0 block {block} in {data} at offset {block * SMALL} ({SMALL} bytes)" in got[1], got[1]


def test_old_1mib_and_small_block_checkpoints_both_verify_whole(tmp_path):
    """`dist-ckpt verify` and a full load honour the recorded block size of either."""
    for bsz in (1 << 20, SMALL):
        path, data = _saved(tmp_path / str(bsz), V)
        _with_block_sums_of(path, bsz)
        assert read_manifest(path)[0].tensors[("w",)].chunks.block_bytes == bsz
        assert verify(path).ok
        out = {"w": torch.zeros(600, 1024)}
        dc.load(out, path)
        assert torch.equal(out["w"], V)
        _spoil_block_sum(path, 2)
        assert verify(path).bad[0].detail.startswith(f"block 2 at offset {2 * bsz}: ")
