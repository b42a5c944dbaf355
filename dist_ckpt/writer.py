"""The writer: host bytes → this rank's own data file(s), hashed and fsync'd.

Each rank writes only the chunks the plan assigned to it, into files nobody
else touches (``data/r00003.bin``, or ``data/r00003-t1.bin`` … with several
writer threads), each an append stream of the storage
(:meth:`~dist_ckpt.storage.Storage.open_stream`): chunks go in order, every
one at the next 4 KiB-aligned offset, so no write ever goes back. Each is hashed
with xxh3-64 while it is written (xxhash releases the GIL, so hashing on one
thread overlaps writing on another): once whole, and once per
:data:`~dist_ckpt.manifest.BLOCK_BYTES` block, so that a load reading part of
the chunk can verify the blocks it reads. Both hashes run block by block,
and each block is appended right after them, so the second hash and the copy
into the file find the block in the CPU cache; each piece's writeback starts
once its blocks are written (small chunks' together, once a piece's worth
of them is written).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

from .errors import StorageError
from .layout_names import data_file_name
from .manifest import ALIGN, BLOCK_BYTES
from .storage import STREAM_ALIGN, WRITE_PIECE, SaveTarget, Storage, WriteStream

# Bytes hashed, then appended, at a time: small enough to stay in the CPU's cache between the
# hashes and the copy into the file, large enough that a small block size does not cost one
# append (a syscall) per block.
APPEND_BYTES = 1 << 20

# Blocks are hashed append by append, so no block may straddle two appends (nor two pieces).
assert WRITE_PIECE % APPEND_BYTES == 0 and APPEND_BYTES % BLOCK_BYTES == 0, "BLOCK_BYTES must divide APPEND_BYTES, which must divide WRITE_PIECE"
# Chunks start at ALIGN multiples, appends at APPEND_BYTES multiples past them: every append is stream-aligned.
assert ALIGN % STREAM_ALIGN == 0 and APPEND_BYTES % STREAM_ALIGN == 0

log = logging.getLogger(__name__)

MIN_PER_THREAD = 32 << 20  # below this a second file costs more than it overlaps


@dataclass(frozen=True)
class WriteItem:
    """One chunk to write: the caller's tag and its contiguous bytes."""

    tag: int
    data: memoryview


@dataclass(frozen=True)
class WriteRecord:
    """Where a chunk landed: file (relative to the checkpoint), offset, size, hash, block hashes."""

    tag: int
    file: str
    offset: int
    nbytes: int
    xxh3: int
    blocks: np.ndarray | None = None  # uint64, one per BLOCK_BYTES of the chunk (the last may be short)


def split_by_bytes(items: Sequence[WriteItem], n: int) -> list[list[WriteItem]]:
    """Greedy split into at most ``n`` non-empty groups of similar byte counts, keeping order within each."""
    groups: list[list[WriteItem]] = [[] for _ in range(max(1, n))]
    load = [0] * len(groups)
    for item in sorted(items, key=lambda i: -len(i.data)):
        g = load.index(min(load))
        groups[g].append(item)
        load[g] += len(item.data) or 1
    return [sorted(g, key=lambda i: i.tag) for g in groups if g]


def write_items(storage: Storage, target: SaveTarget, rank: int, items: Sequence[WriteItem], threads: int = 2) -> list[WriteRecord]:
    """Write ``items`` into this rank's data file(s) and sync them.

    Args:
        storage: backend to write through.
        target: the save (its :meth:`~dist_ckpt.storage.Storage.begin_save` has run).
        rank: this rank, which names the files.
        items: chunks to write; empty is fine (no file is created).
        threads: writer threads, one file each.

    Returns:
        One record per item, in ``items`` order.

    Raises:
        StorageError: a write or fsync failed; names the file and rank.
    """
    total = sum(len(i.data) for i in items)
    groups = split_by_bytes(items, max(1, min(threads, -(-total // MIN_PER_THREAD))))
    t0 = time.perf_counter()
    if len(groups) <= 1:
        results = [_write_file(storage, target, data_file_name(rank, None), g) for g in groups]
    else:
        # The calling thread writes the first file itself: it would only wait, and each thread
        # started is one more wait for the scheduler before its file's first byte is written.
        with ThreadPoolExecutor(len(groups) - 1, thread_name_prefix=f"dist_ckpt-w{rank}") as pool:
            futs = [pool.submit(_write_file, storage, target, data_file_name(rank, t), g) for t, g in enumerate(groups) if t]
            first = _write_file(storage, target, data_file_name(rank, 0), groups[0])  # on failure, the pool's exit waits for the others
            results = [first] + [f.result() for f in futs]
    by_tag = {r.tag: r for rs in results for r in rs}
    dt = time.perf_counter() - t0
    log.debug(
        "[rank %d] wrote %d chunks, %.1f MB in %.3f s (%.2f GB/s, %d file(s))", rank, len(by_tag), total / 1e6, dt, total / max(dt, 1e-9) / 1e9, len(groups)
    )
    return [by_tag[i.tag] for i in items]


class _Writeback:
    """When a data file's written bytes start going to the device: a whole piece at once, small chunks together.

    Starting writeback is a syscall that submits the range to the device at
    once; after every chunk of a state of many small tensors it was most of
    the save's CPU (3000 chunks of 1-2.5 KiB: 263 ms of CPU, 55 without).
    So small chunks' bytes wait until a piece's worth has gathered, a large
    chunk (or the end of the file) comes; a large chunk's pieces start one by one.
    """

    def __init__(self, handle: WriteStream) -> None:
        self.handle = handle
        self.start = self.end = 0  # the written range whose writeback has not started

    def wrote(self, offset: int, nbytes: int) -> None:
        """``nbytes`` were appended at ``offset``; start the writeback of a piece's worth gathered."""
        if self.start == self.end:
            self.start = offset
        self.end = offset + nbytes
        if self.end - self.start >= WRITE_PIECE:
            self.flush()

    def flush(self) -> None:
        """Start the writeback of everything written and not yet started."""
        if self.end > self.start:
            self.handle.start_writeback(self.start, self.end - self.start)
        self.start = self.end


def _write_file(storage: Storage, target: SaveTarget, name: str, items: list[WriteItem]) -> list[WriteRecord]:
    path = f"{target.location}/{name}"
    try:
        handle = storage.open_stream(target, name)
    except OSError as e:
        raise StorageError(e.errno, f"cannot create data file {path}: {e.strerror or e}") from e
    records = []
    offset = 0
    writeback = _Writeback(handle)
    try:
        for item in items:
            records.append(_write_chunk(handle, name, item, offset, writeback))
            offset += -(-len(item.data) // ALIGN) * ALIGN if len(item.data) else 0
        writeback.flush()
        handle.sync()
    except OSError as e:
        raise StorageError(e.errno, f"writing data file {path} failed at byte {offset}: {e.strerror or e}") from e
    finally:
        handle.close()
    return records


def _write_chunk(handle: WriteStream, name: str, item: WriteItem, offset: int, writeback: _Writeback) -> WriteRecord:
    """Append one chunk at ``offset``, hashed whole and per block, the writeback of its pieces started as they are written.

    :data:`APPEND_BYTES` at a time: the whole-chunk hash, the sums of its
    blocks, then the append, so the block hashes and the copy into the file
    (the page cache) find the bytes in the CPU cache; a whole piece is larger
    than the cache, and hashing a piece before writing it read every byte
    from memory twice (64 MiB per rank: 28-30 -> 24 ms of CPU before the
    fsync). A chunk of a piece or more starts the writeback of the small
    chunks before it, then of each of its pieces.
    """
    data = memoryview(item.data).cast("B")
    large = len(data) >= WRITE_PIECE
    if large:
        writeback.flush()
    h = xxhash.xxh3_64()
    blocks: list[int] = []
    for start in range(0, len(data), WRITE_PIECE):
        piece = data[start : start + WRITE_PIECE]
        for a in range(0, len(piece), APPEND_BYTES):
            unit = piece[a : a + APPEND_BYTES]
            h.update(unit)
            blocks.extend(xxhash.xxh3_64_intdigest(unit[b : b + BLOCK_BYTES]) for b in range(0, len(unit), BLOCK_BYTES))
            handle.append(unit, offset + start + a)
        writeback.wrote(offset + start, len(piece))
        if large:
            writeback.flush()
    return WriteRecord(item.tag, name, offset, len(data), h.intdigest(), np.array(blocks, np.uint64))
