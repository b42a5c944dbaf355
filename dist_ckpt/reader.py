"""The reader: byte ranges of data files → destination tensors, in parallel.

Executes the read operations of :func:`dist_ckpt.load_planner.plan_reads`. When the
destination box is one contiguous region of a contiguous CPU tensor the runs
are read straight into it (``preadv``, no copy); otherwise they land in a
bounce buffer and are copied once.

Every byte returned is verified (unless the caller turned checks off): a
chunk read in full against its xxh3-64, a chunk read in part against the
block sums of the blocks its runs touch (see docs/format.md). Bytes are
hashed right after they are read, while still in the CPU cache: a whole
chunk in :data:`READ_PIECE` pieces, one run block by block (read in place,
the bytes of its two edge blocks outside it read by the same ``preadv``
into scratch); several runs (a slice of a middle dimension) are read
as whole touched blocks into a bounce buffer, checked, and copied out
(equally spaced runs as one strided copy per span).
A checkpoint saved before block sums (none in its manifest) cannot have a
partial read checked; ``dist-ckpt verify`` checks every chunk.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xxhash

from .buffers import tensor_memoryview
from .commit import segment_index
from .errors import ChecksumError, DataFileError
from .flatten import KeyPath, format_path
from .kept_pool import spread
from .load_planner import ReadOp, plan_reads
from .manifest import TensorEntry
from .storage import WRITE_PIECE, ReadHandle, Storage

log = logging.getLogger(__name__)

SPAN_BYTES = WRITE_PIECE  # most bytes of touched blocks read at once for a multi-run partial read
READ_PIECE = 1 << 20  # bytes of a whole chunk read, then hashed while still in the CPU cache


@dataclass
class ReadTask:
    """Fill ``dst`` (the target's local box ``offsets``/``sizes``) from ``entry``'s chunks."""

    key: KeyPath
    entry: TensorEntry
    dst: torch.Tensor  # contiguous CPU tensor shaped like ``sizes``
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class _Files:
    """Open read handles, one per data file, shared by the reader threads."""

    def __init__(self, storage: Storage, root: str, names: Sequence[str]) -> None:
        self._storage, self._root, self._names = storage, root, names
        self._handles: dict[int, ReadHandle] = {}
        self._lock = threading.Lock()

    def get(self, index: int) -> ReadHandle:
        with self._lock:
            h = self._handles.get(index)
            if h is None:
                path = self.path(index)
                try:
                    h = self._handles[index] = self._storage.open_in(self._root, self._names[index])
                except FileNotFoundError as e:
                    raise DataFileError(e.errno, f"data file {path} is missing") from e
                except OSError as e:
                    raise DataFileError(e.errno, f"cannot open data file {path}: {e.strerror or e}") from e
            return h

    def path(self, index: int) -> str:
        return f"{self._root}/{self._names[index]}"

    def close(self) -> None:
        for h in self._handles.values():
            h.close()


def _contiguous_region(sizes: tuple[int, ...], box_off: tuple[int, ...], box_size: tuple[int, ...]) -> tuple[int, int] | None:
    """Element ``(start, count)`` of a box inside a row-major array, if it is one contiguous region."""
    if tuple(box_size) == tuple(sizes):  # the whole array (box_off is then all zeros)
        return 0, math.prod(sizes)
    nd = len(sizes)
    k = 0
    while k < nd and box_size[k] == 1:
        k += 1
    if any(box_size[d] != sizes[d] for d in range(k + 1, nd)):
        return None
    strides = [math.prod(sizes[d + 1 :]) for d in range(nd)]
    return sum(o * s for o, s in zip(box_off, strides)), math.prod(box_size)


class _Segment:
    """What one thread's reads share: the files, a scratch buffer, each task's destination bytes.

    The scratch holds the bytes a verified read needs but does not return
    (edge blocks, touched blocks of a multi-run read) and grows to the
    largest need of the segment; it lives as long as the segment's reads, so
    a load allocates it once per thread instead of once per read (a fresh
    buffer is zero-filled and page-faulted in: for a resharded load that was
    every edge block of every chunk it reads part of).
    """

    def __init__(self, files: _Files, verify: bool) -> None:
        self.files, self.verify = files, verify
        self._scratch = bytearray(0)
        self._views: dict[int, memoryview] = {}

    def scratch(self, n: int) -> memoryview:
        """``n`` bytes of scratch (contents undefined), valid until the next call."""
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def view(self, task: ReadTask) -> memoryview:
        """The bytes of ``task``'s destination, made once per task."""
        v = self._views.get(id(task))
        if v is None:
            v = self._views[id(task)] = tensor_memoryview(task.dst)
        return v


def _run_op(seg: _Segment, task: ReadTask, op: ReadOp) -> int:
    files, verify = seg.files, seg.verify
    item = task.dst.element_size()
    total = len(op.run_offsets) * op.run_nbytes
    region = _contiguous_region(task.sizes, op.dst_offsets, op.dst_sizes)
    if region is not None:
        start, count = region
        target = seg.view(task)[start * item : (start + count) * item]
        bounce = None
    else:
        bounce = torch.empty(total, dtype=torch.uint8)
        target = tensor_memoryview(bounce)
    c = task.entry.chunks
    by_blocks = verify and not op.whole_chunk and c.blocks is not None
    if verify and op.whole_chunk:
        _read_whole_chunk(files, task, op, target)
    elif by_blocks and len(op.run_offsets) > 1:
        _read_blocks(seg, task, op, target)
    elif by_blocks:
        _read_run_blocks(seg, task, op, target)
    else:
        _read_runs(files, task, op, target)
    if bounce is not None:
        src = bounce.view(task.dst.dtype).view(op.dst_sizes)
        task.dst[tuple(slice(o, o + s) for o, s in zip(op.dst_offsets, op.dst_sizes))].copy_(src)
    return total


def _pread(files: _Files, task: ReadTask, op: ReadOp, buf: memoryview, off: int, more: Sequence[memoryview] = ()) -> None:
    """Fill ``buf`` (then each of ``more``) from ``off`` of the op's file, or raise naming the file and key."""
    bufs = [buf, *more] if more else [buf]
    want = sum(len(b) for b in bufs) if more else len(buf)
    n = files.get(op.file).preadv(bufs, off)
    if n != want:
        raise DataFileError(f"data file {files.path(op.file)} is truncated: wanted {want} bytes at offset {off} for {format_path(task.key)}, got {n}")


def _read_runs(files: _Files, task: ReadTask, op: ReadOp, target: memoryview) -> None:
    """The op's runs straight into ``target``, one after another (nothing to verify)."""
    pos = 0
    for off in op.run_offsets.tolist():
        _pread(files, task, op, target[pos : pos + op.run_nbytes], off)
        pos += op.run_nbytes


def _read_whole_chunk(files: _Files, task: ReadTask, op: ReadOp, target: memoryview) -> None:
    """The whole chunk into ``target``, hashed piece by piece right after each piece is read.

    A piece of :data:`READ_PIECE` bytes is still in the CPU cache when it is
    hashed; hashing the chunk after reading all of it would fetch every byte
    from memory a second time (the warm-load cost is mostly memory traffic).
    """
    off, n = int(op.run_offsets[0]), op.run_nbytes
    if n <= READ_PIECE:
        _pread(files, task, op, target, off)
        got = xxhash.xxh3_64_intdigest(target)
    else:
        h = xxhash.xxh3_64()
        for s in range(0, n, READ_PIECE):
            piece = target[s : s + READ_PIECE]
            _pread(files, task, op, piece, off + s)
            h.update(piece)
        got = h.intdigest()
    want = int(task.entry.chunks.xxh3[op.chunk])
    if got != want:
        raise ChecksumError(
            f"checksum mismatch for {format_path(task.key)} chunk {op.chunk} in {files.path(op.file)} at offset {off} ({n} bytes): xxh3 {got:016x}, manifest says {want:016x}"
        )


def _block_sums(task: ReadTask, op: ReadOp) -> list[int]:
    """The manifest's sums of the op's chunk's blocks, as ints (one conversion per op, not per block)."""
    c = task.entry.chunks
    assert c.blocks is not None
    return c.blocks[c.block_starts[op.chunk] : c.block_starts[op.chunk + 1]].tolist()


def _block_mismatch(files: _Files, task: ReadTask, op: ReadOp, block: int, got: int, want: int, nbytes: int) -> ChecksumError:
    c = task.entry.chunks
    off = int(c.offset[op.chunk]) + block * c.block_bytes
    return ChecksumError(
        f"checksum mismatch for {format_path(task.key)} chunk {op.chunk} block {block} in {files.path(op.file)} at offset {off} ({nbytes} bytes): xxh3 {got:016x}, manifest says {want:016x}"
    )


def _check_block(files: _Files, task: ReadTask, op: ReadOp, block: int, want: int, parts: Sequence[memoryview]) -> None:
    """Raise ChecksumError unless the concatenated ``parts`` hash to ``want``, block ``block``'s sum."""
    if len(parts) == 1:
        got = xxhash.xxh3_64_intdigest(parts[0])
    else:
        h = xxhash.xxh3_64()
        for p in parts:
            h.update(p)
        got = h.intdigest()
    if got != want:
        raise _block_mismatch(files, task, op, block, got, want, sum(len(p) for p in parts))


def _read_run_blocks(seg: _Segment, task: ReadTask, op: ReadOp, target: memoryview) -> None:
    """One run straight into ``target``, the blocks it touches (only those) verified as soon as they are read.

    The run's part of a block goes into ``target``; the head of the first
    block and the tail of the last (outside the run) into the segment's
    scratch, read by the same ``preadv``. Consecutive blocks are read
    :data:`READ_PIECE` at a time (one call for several small blocks) and
    each is hashed while its bytes are still in the CPU cache.
    """
    files, c = seg.files, task.entry.chunks
    bsz, base, size = c.block_bytes, int(c.offset[op.chunk]), int(c.nbytes[op.chunk])
    sums = _block_sums(task, op)
    lo = int(op.run_offsets[0]) - base
    hi = lo + op.run_nbytes
    first, last = lo // bsz, (hi - 1) // bsz
    head, tail = lo - first * bsz, min((last + 1) * bsz, size) - hi  # bytes of the edge blocks outside the run
    scratch = seg.scratch(head + tail)
    per = max(1, READ_PIECE // bsz)
    for b0 in range(first, last + 1, per):
        b1 = min(b0 + per, last + 1)
        bufs = [target[max(b0 * bsz, lo) - lo : min(b1 * bsz, hi) - lo]]
        if b0 == first and head:
            bufs.insert(0, scratch[:head])
        if b1 == last + 1 and tail:
            bufs.append(scratch[head:])
        _pread(files, task, op, bufs[0], base + b0 * bsz, bufs[1:])
        for b in range(b0, b1):
            b_lo, b_hi = b * bsz, min((b + 1) * bsz, size)
            parts = [target[max(b_lo, lo) - lo : min(b_hi, hi) - lo]]
            if b == first and head:
                parts.insert(0, scratch[:head])
            if b == last and tail:
                parts.append(scratch[head:])
            _check_block(files, task, op, b, sums[b], parts)


def _copy_runs(target: memoryview, span: memoryview, s_lo: int, rel: np.ndarray, j0: int, j1: int, n: int) -> None:
    """Copy the parts inside ``span`` (chunk bytes from ``s_lo``) of runs ``j0 .. j1 - 1`` (at chunk offsets ``rel``, ``n`` bytes each) to ``target``.

    The runs wholly inside the span are one strided numpy copy when equally
    spaced (the rows of a slice of the last dimension), not one Python step
    per run; the two a span edge cuts (and any unequally spaced ones) are
    copied one by one.
    """
    s_hi = s_lo + len(span)
    w0 = j0 if j0 < j1 and rel[j0] >= s_lo else j0 + 1  # the wholly inside runs: w0 .. w1 - 1
    w1 = j1 if j1 > w0 and rel[j1 - 1] + n <= s_hi else j1 - 1
    one_by_one: Sequence[int] = range(j0, j1)
    if w1 - w0 > 1 and np.all(np.diff(rel[w0:w1]) == rel[w0 + 1] - rel[w0]):
        rows = np.lib.stride_tricks.as_strided(
            np.frombuffer(span, np.uint8)[int(rel[w0]) - s_lo :], shape=(w1 - w0, n), strides=(int(rel[w0 + 1] - rel[w0]), 1), writeable=False
        )
        np.frombuffer(target, np.uint8)[w0 * n : w1 * n].reshape(w1 - w0, n)[...] = rows
        one_by_one = [j for j in (j0, j1 - 1) if not w0 <= j < w1]
    for j in sorted(set(one_by_one)):
        r = int(rel[j])
        a, z = max(r, s_lo), min(r + n, s_hi)
        if a < z:
            target[j * n + a - r : j * n + z - r] = span[a - s_lo : z - s_lo]


def _read_blocks(seg: _Segment, task: ReadTask, op: ReadOp, target: memoryview) -> None:
    """Several runs: read the whole blocks they touch (only those), verify each, copy the runs out."""
    files, c = seg.files, task.entry.chunks
    bsz, base, size, n = c.block_bytes, int(c.offset[op.chunk]), int(c.nbytes[op.chunk]), op.run_nbytes
    sums = _block_sums(task, op)
    rel = op.run_offsets - base  # run starts within the chunk, ascending
    first, last = rel // bsz, (rel + n - 1) // bsz
    touched = np.unique(segment_index(first, last - first + 1))
    # Spans of consecutive touched blocks, at most SPAN_BYTES each.
    cut = np.flatnonzero(np.diff(touched) != 1) + 1
    per = max(1, SPAN_BYTES // bsz)
    buf = seg.scratch(min(per * bsz, size))
    for run in np.split(touched, cut):
        for i in range(0, len(run), per):
            b0, b1 = int(run[i]), int(run[min(i + per, len(run)) - 1]) + 1
            s_lo, s_hi = b0 * bsz, min(b1 * bsz, size)
            span = buf[: s_hi - s_lo]
            _pread(files, task, op, span, base + s_lo)
            for b in range(b0, b1):
                _check_block(files, task, op, b, sums[b], [span[b * bsz - s_lo : min((b + 1) * bsz, size) - s_lo]])
            j0, j1 = int(np.searchsorted(rel, s_lo - n, side="right")), int(np.searchsorted(rel, s_hi, side="left"))
            _copy_runs(target, span, s_lo, rel, j0, j1, n)


def _sequential_segments(jobs: list[tuple[ReadTask, ReadOp]], threads: int) -> list[list[tuple[ReadTask, ReadOp]]]:
    """Split reads into ``threads`` runs of similar size, each in file and offset order.

    One thread walking a file front to back keeps the disk's access pattern
    sequential; many threads hopping between files cost ~20% on one disk.
    """
    ordered = sorted(jobs, key=lambda j: (j[1].file, int(j[1].run_offsets[0]) if len(j[1].run_offsets) else 0))
    total = sum(len(op.run_offsets) * op.run_nbytes for _, op in ordered)
    share = max(1, -(-total // max(1, threads)))
    segments: list[list[tuple[ReadTask, ReadOp]]] = [[]]
    size = 0
    for job in ordered:
        if size >= share and len(segments) < threads:
            segments.append([])
            size = 0
        segments[-1].append(job)
        size += len(job[1].run_offsets) * job[1].run_nbytes
    return [seg for seg in segments if seg]


def _will_read(files: _Files, segment: list[tuple[ReadTask, ReadOp]], verify: bool) -> None:
    """Tell each file's handle that takes hints, once, the byte runs this thread reads from it, in order (S3 fetches them in a few large GETs).

    A verified partial read also reads the rest of the blocks its runs touch, so those runs are widened to block edges
    (and then merged where they touch).
    """
    by_file: dict[int, list[tuple[int, int]]] = {}
    for task, op in segment:
        if op.file not in by_file:
            if type(files.get(op.file)).will_read is ReadHandle.will_read:
                continue  # the local backend: nothing to compute
            by_file[op.file] = []
        c = task.entry.chunks
        starts = op.run_offsets.astype(np.int64)
        ends = starts + op.run_nbytes
        if verify and not op.whole_chunk and c.blocks is not None and len(starts):
            base, bsz = int(c.offset[op.chunk]), c.block_bytes
            starts = base + (starts - base) // bsz * bsz
            ends = np.minimum(base + -(-(ends - base) // bsz) * bsz, base + int(c.nbytes[op.chunk]))
            first = np.flatnonzero(np.concatenate(([True], starts[1:] > ends[:-1])))  # runs are in file order
            starts, ends = starts[first], np.maximum.reduceat(ends, first)
        by_file[op.file].extend(zip(starts.tolist(), (ends - starts).tolist()))
    for index, ranges in by_file.items():
        files.get(index).will_read(ranges)


def read_tensors(
    storage: Storage, root: str, file_names: Sequence[str], tasks: Sequence[ReadTask], threads: int = 4, verify: bool = True, rank: int = 0
) -> int:
    """Fill every task's destination; returns the bytes read.

    Raises:
        ChecksumError: a fully-read chunk's bytes, or a block a partial read touched, do
            not match the manifest's hash (names key, chunk, block, file, offset).
        DataFileError: a data file is missing or too short (names the file).
    """
    t0 = time.perf_counter()
    jobs: list[tuple[ReadTask, ReadOp]] = []
    for task in tasks:
        c = task.entry.chunks
        for op in plan_reads(task.offsets, task.sizes, task.dst.element_size(), c.offsets, c.sizes, c.file, c.offset):
            jobs.append((task, op))
    files = _Files(storage, root, file_names)
    segments = _sequential_segments(jobs, threads)

    def run(segment: list[tuple[ReadTask, ReadOp]]) -> int:
        _will_read(files, segment, verify)
        seg = _Segment(files, verify)
        return sum(_run_op(seg, t, op) for t, op in segment)

    try:
        # The calling thread reads the first segment itself, the others go to
        # reader threads kept between loads (see kept_pool).
        total = sum(spread(run, segments))
    finally:
        files.close()  # spread returns or raises only once every reader is done with the files
    dt = time.perf_counter() - t0
    log.debug("[rank %d] read %d tensors, %.1f MB in %.3f s (%.2f GB/s) from %s", rank, len(tasks), total / 1e6, dt, total / max(dt, 1e-9) / 1e9, root)
    return total
