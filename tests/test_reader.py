"""The reader's I/O pattern: verified bytes are hashed while still cached, edge bytes come with their blocks."""

from __future__ import annotations

import threading

import pytest
import torch

import dist_ckpt as dc
from dist_ckpt.errors import ChecksumError
from dist_ckpt.loader import read_manifest
from dist_ckpt.manifest import BLOCK_BYTES
from dist_ckpt.reader import READ_PIECE, ReadTask, read_tensors
from dist_ckpt.storage.local import LocalReadHandle, LocalStorage

W = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB: one chunk of 4 blocks


class _RecordingStorage(LocalStorage):
    """Local files whose read handles record every ``preadv``: (offset, bytes asked for, thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, threading.Thread]] = []

    def open_read(self, path: str) -> LocalReadHandle:
        calls = self.calls

        class Recording(LocalReadHandle):
            def preadv(self, buffers, offset):
                calls.append((offset, sum(len(memoryview(b).cast("B")) for b in buffers), threading.current_thread()))
                return super().preadv(buffers, offset)

        return Recording(path)


def _read(tmp_path, state: dict[str, torch.Tensor], boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], threads: int = 1):
    path = str(tmp_path / "ck")
    dc.save(state, path)
    manifest, root, _ = read_manifest(path)
    storage = _RecordingStorage()
    outs = {k: torch.zeros(sizes) for k, (_, sizes) in boxes.items()}
    tasks = [ReadTask((k,), manifest.tensors[(k,)], outs[k], off, sizes) for k, (off, sizes) in boxes.items()]
    read_tensors(storage, root, manifest.files, tasks, threads=threads)
    return storage.calls, outs, manifest, root


def test_a_whole_chunk_is_read_and_hashed_piece_by_piece(tmp_path):
    """Each read of a verified chunk is at most READ_PIECE, so its bytes are hashed before they leave the cache."""
    calls, outs, _, _ = _read(tmp_path, {"w": W}, {"w": ((0, 0), (1024, 1024))})
    assert torch.equal(outs["w"], W)
    assert [n for _, n, _ in calls] == [READ_PIECE] * (W.numel() * 4 // READ_PIECE)
    assert [o for o, _, _ in calls] == [calls[0][0] + i * READ_PIECE for i in range(len(calls))]


def test_a_flipped_byte_in_the_last_piece_of_a_whole_chunk_is_caught(tmp_path):
    _, _, manifest, root = _read(tmp_path, {"w": W}, {"w": ((0, 0), (1024, 1024))})
    c = manifest.tensors[("w",)].chunks
    pos = int(c.offset[0]) + W.numel() * 4 - 3
    with open(f"{root}/{manifest.files[int(c.file[0])]}", "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ChecksumError, match=r"chunk 0 in .* manifest says"):
        read_tensors(LocalStorage(), root, manifest.files, [ReadTask(("w",), manifest.tensors[("w",)], torch.zeros(1024, 1024), (0, 0), (1024, 1024))])


def test_a_row_run_reads_each_touched_block_in_one_call_edges_included(tmp_path):
    """Rows 300..700 touch blocks 1 and 2: two reads of one block each, head and tail bytes in the same calls."""
    calls, outs, _, _ = _read(tmp_path, {"w": W}, {"w": ((300, 0), (400, 1024))})
    assert torch.equal(outs["w"], W[300:700])
    assert [n for _, n, _ in calls] == [BLOCK_BYTES, BLOCK_BYTES]
    assert [o - calls[0][0] for o, _, _ in calls] == [0, BLOCK_BYTES]


def test_with_two_threads_the_calling_thread_reads_one_segment(tmp_path):
    state = {"a": W, "b": W + 1}
    calls, outs, _, _ = _read(tmp_path, state, {k: ((0, 0), (1024, 1024)) for k in state}, threads=2)
    assert torch.equal(outs["a"], W) and torch.equal(outs["b"], W + 1)
    readers = {t for _, _, t in calls}
    assert threading.current_thread() in readers and len(readers) == 2


def test_reader_threads_are_kept_between_loads(tmp_path):
    """The second load reads on the threads of the first: a load starts no thread (each start waits until it runs)."""
    state = {"a": W, "b": W + 1, "c": W + 2}
    boxes = {k: ((0, 0), (1024, 1024)) for k in state}
    first, _, _, _ = _read(tmp_path, state, boxes, threads=3)
    kept = {t for _, _, t in first} - {threading.current_thread()}
    assert kept and all(t.is_alive() and t.name.startswith("dist_ckpt-reader") for t in kept)
    again = _RecordingStorage()
    manifest, root, _ = read_manifest(str(tmp_path / "ck"))
    read_tensors(again, root, manifest.files, [ReadTask((k,), manifest.tensors[(k,)], torch.zeros(1024, 1024), *boxes[k]) for k in state], threads=3)
    pool = {t for t in threading.enumerate() if t.name.startswith("dist_ckpt-reader")}
    assert kept <= pool  # still there, idle, for the next load
    assert {t for _, _, t in again.calls} - {threading.current_thread()} <= pool


T3 = torch.arange(17 * 8 * 33000, dtype=torch.int32).reshape(17, 8, 33000)  # 17.1 MiB: one chunk, 18 blocks, two spans; rows cross blocks

# Boxes of T3 read as several runs: the rows of a slice of the last dim (equally spaced runs, copied out as one strided copy per
# span), a slice of the two inner dims (runs spaced unequally at each outer index), single-row runs crossing blocks and spans.
RUN_BOXES = {
    "last-dim": ((0, 0, 100), (17, 8, 3000)),
    "last-dim-wide": ((0, 0, 1), (17, 8, 32998)),
    "two-inner-dims": ((2, 1, 40), (9, 5, 30000)),
    "one-column": ((5, 0, 32999), (12, 8, 1)),
}


@pytest.mark.parametrize("box", RUN_BOXES, ids=list(RUN_BOXES))
def test_multi_run_reads_return_the_box_with_and_without_checks(tmp_path, box):
    path = str(tmp_path / "ck")
    dc.save({"t": T3}, path)
    manifest, root, _ = read_manifest(path)
    (o0, o1, o2), sizes = RUN_BOXES[box]
    for verify in (True, False):
        out = torch.full(sizes, -1, dtype=torch.int32)
        read_tensors(LocalStorage(), root, manifest.files, [ReadTask(("t",), manifest.tensors[("t",)], out, (o0, o1, o2), sizes)], verify=verify)
        assert torch.equal(out, T3[o0 : o0 + sizes[0], o1 : o1 + sizes[1], o2 : o2 + sizes[2]]), verify
