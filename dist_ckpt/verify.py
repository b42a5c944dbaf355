"""Verify: re-hash every chunk of a committed checkpoint against its manifest.

A load checks what it reads: a whole chunk against its xxh3-64, part of one
against the block sums of the blocks it touches. :func:`verify` reads every
chunk of every tensor (the global ones and each rank's rank-local ones) in
full and checks both, the whole-chunk hash and every block sum (so a chunk a
resharded load would reject is reported too), and reports each chunk whose
bytes are missing or differ.

Reads are large and sequential: the chunks of one data file are taken in
offset order and grouped into segments of up to :data:`BLOCK` bytes, each read
with one ``preadv`` and hashed slice by slice; a chunk larger than a block is
streamed through an incremental hash. Segments run on a thread pool (``xxhash``
releases the GIL), so memory stays at ``workers * BLOCK`` whatever the
checkpoint size.
"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import xxhash

from .flatten import KeyPath
from .loader import read_manifest
from .manifest import Manifest, TensorEntry
from .storage import ReadHandle, Storage

BLOCK = 16 << 20
"""Bytes read per ``preadv``; also the buffer each worker thread holds."""

CHECKSUM_MISMATCH = "checksum mismatch"
FILE_MISSING = "file missing"
FILE_TRUNCATED = "file truncated"
READ_ERROR = "read error"  # an I/O error other than a missing file (EIO, EACCES, ...)

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``, called from the calling thread."""


@dataclass(frozen=True)
class BadChunk:
    """One chunk whose stored bytes cannot be trusted.

    ``rank`` is the owner of a rank-local tensor (``None`` for a global one);
    ``detail`` says more (both hashes, the file size, the OS error).
    """

    key: KeyPath
    file: str
    offset: int
    nbytes: int
    reason: str
    rank: int | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    ``ok`` is true when ``bad`` is empty; ``chunks_checked`` counts every chunk
    examined, ``bytes_checked`` the bytes actually read and hashed (chunks in
    missing files or past a file's end are reported without being read).
    """

    path: str
    ok: bool
    chunks_checked: int
    bytes_checked: int
    bad: list[BadChunk] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Chunk:
    key: KeyPath
    rank: int | None
    file: int
    offset: int
    nbytes: int
    xxh3: int
    blocks: Sequence[int] = ()  # the chunk's block sums, empty when the manifest has none
    block_bytes: int = 0


def _chunks(manifest: Manifest) -> list[_Chunk]:
    """Every chunk of the checkpoint, global tensors first, then each rank's local ones."""
    sections: list[tuple[int | None, dict[KeyPath, TensorEntry]]] = [(None, dict(manifest.tensors))]
    sections += [(r, dict(sec.tensors)) for r, sec in sorted(manifest.local.items())]
    out = []
    for rank, tensors in sections:
        for key, entry in tensors.items():
            c = entry.chunks
            starts = c.block_starts.tolist()
            for i, (f, off, n, h) in enumerate(zip(c.file.tolist(), c.offset.tolist(), c.nbytes.tolist(), c.xxh3.tolist())):
                blocks = c.blocks[starts[i] : starts[i + 1]].tolist() if c.blocks is not None else ()
                out.append(_Chunk(key, rank, f, off, n, h, blocks, c.block_bytes))
    return out


class _BlockSums:
    """Hashes a chunk's bytes, fed in pieces, block by block against its block sums."""

    def __init__(self, c: _Chunk) -> None:
        self.c, self.index, self.filled = c, 0, 0
        self.first_bad: tuple[int, int] | None = None
        self.h = xxhash.xxh3_64()

    def update(self, piece: memoryview) -> None:
        if not self.c.block_bytes:
            return
        pos = 0
        while pos < len(piece):
            take = min(self.c.block_bytes - self.filled, len(piece) - pos)
            self.h.update(piece[pos : pos + take])
            self.filled += take
            pos += take
            if self.filled == self.c.block_bytes:
                self._end_block()

    def _end_block(self) -> None:
        if self.first_bad is None and self.h.intdigest() != self.c.blocks[self.index]:
            self.first_bad = (self.index, self.h.intdigest())
        self.index, self.filled = self.index + 1, 0
        self.h.reset()

    def problem(self) -> str | None:
        """After the last piece: the first bad block, or None."""
        if self.filled:
            self._end_block()
        if self.first_bad is None:
            return None
        b, got = self.first_bad
        return f"block {b} at offset {self.c.offset + b * self.c.block_bytes}: xxh3 {got:016x}, manifest says {self.c.blocks[b]:016x}"


def _bad(c: _Chunk, name: str, reason: str, detail: str = "") -> BadChunk:
    return BadChunk(c.key, name, c.offset, c.nbytes, reason, c.rank, detail)


def _segments(chunks: Sequence[_Chunk]) -> Iterable[list[_Chunk]]:
    """Group offset-sorted chunks into runs spanning at most BLOCK bytes (a larger chunk alone)."""
    seg: list[_Chunk] = []
    for c in chunks:
        if seg and (c.nbytes > BLOCK or c.offset + c.nbytes - seg[0].offset > BLOCK):
            yield seg
            seg = []
        seg.append(c)
        if c.nbytes > BLOCK:
            yield seg
            seg = []
    if seg:
        yield seg


class _Checker:
    """Reads and hashes segments of one checkpoint; one buffer per worker thread."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = files
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(BLOCK))
        return buf

    def check(self, handle: ReadHandle, seg: list[_Chunk]) -> list[BadChunk]:
        """Hash every chunk of ``seg``; returns the bad ones (never raises for bad data)."""
        name = self.files[seg[0].file]
        try:
            if len(seg) == 1 and seg[0].nbytes > BLOCK:
                return self._stream(handle, seg[0], name)
            start = seg[0].offset
            span = seg[-1].offset + seg[-1].nbytes - start
            view = self._buffer()[:span]
            got = handle.preadv([view], start) if span else 0
        except OSError as e:
            return [_bad(c, name, READ_ERROR, f"{e.strerror or e}") for c in seg]
        bad = []
        for c in seg:
            lo = c.offset - start
            if lo + c.nbytes > got:  # the file shrank after its size was checked
                bad.append(_bad(c, name, FILE_TRUNCATED, f"read {max(0, got - lo)} of {c.nbytes} bytes"))
                continue
            digest = xxhash.xxh3_64_intdigest(view[lo : lo + c.nbytes])
            sums = _BlockSums(c)
            sums.update(view[lo : lo + c.nbytes])
            problem = sums.problem()
            if digest != c.xxh3:
                bad.append(_bad(c, name, CHECKSUM_MISMATCH, f"xxh3 {digest:016x}, manifest says {c.xxh3:016x}" + (f"; {problem}" if problem else "")))
            elif problem:
                bad.append(_bad(c, name, CHECKSUM_MISMATCH, problem))
        return bad

    def _stream(self, handle: ReadHandle, c: _Chunk, name: str) -> list[BadChunk]:
        h = xxhash.xxh3_64()
        sums = _BlockSums(c)
        buf = self._buffer()
        for pos in range(0, c.nbytes, BLOCK):
            want = min(BLOCK, c.nbytes - pos)
            got = handle.preadv([buf[:want]], c.offset + pos)
            if got != want:
                return [_bad(c, name, FILE_TRUNCATED, f"read {pos + got} of {c.nbytes} bytes")]
            h.update(buf[:want])
            sums.update(buf[:want])
        problem = sums.problem()
        if h.intdigest() != c.xxh3:
            return [_bad(c, name, CHECKSUM_MISMATCH, f"xxh3 {h.intdigest():016x}, manifest says {c.xxh3:016x}" + (f"; {problem}" if problem else ""))]
        return [_bad(c, name, CHECKSUM_MISMATCH, problem)] if problem else []


def _open(storage: Storage, root: str, name: str) -> tuple[ReadHandle | None, int, str, str]:
    """``(handle, size, reason, detail)``; handle is None and reason set when it cannot be opened.

    A link, FIFO or other non-regular file is a read error, reported unread.
    """
    path = f"{root}/{name}"
    try:
        handle = storage.open_in(root, name)
        return handle, handle.size(), "", ""
    except FileNotFoundError:
        return None, 0, FILE_MISSING, f"{path} does not exist"
    except OSError as e:
        reason = FILE_MISSING if e.errno == errno.ENOENT else READ_ERROR
        return None, 0, reason, f"{path}: {e.strerror or e}"


def verify(path: str, workers: int = 4, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every chunk of the committed checkpoint at ``path``.

    Args:
        path: checkpoint directory (or ``file://`` URL).
        workers: reader/hasher threads (each holds one :data:`BLOCK` buffer).
        progress: called with ``(bytes_done, bytes_total)``, first with ``(0, total)``.

    Returns:
        A :class:`VerifyReport`; bad data (a flipped byte, a truncated or missing
        data file, an I/O error) is reported chunk by chunk, never raised.

    Raises:
        CheckpointNotFound: nothing committed at ``path``.
        ManifestError: the MANIFEST is malformed; ``FragmentError`` (a subclass): a version-2
            fragment is missing, its size or xxh3 is not the MANIFEST's, or its records are bad
            (every fragment is checked before any chunk is).
        ValueError: ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    manifest, root, storage = read_manifest(path)
    chunks = _chunks(manifest)
    total = sum(c.nbytes for c in chunks)
    by_file: dict[int, list[_Chunk]] = {}
    for c in chunks:
        by_file.setdefault(c.file, []).append(c)
    checker = _Checker(manifest.files)
    bad: list[BadChunk] = []
    handles: list[ReadHandle] = []
    jobs: list[tuple[ReadHandle, list[_Chunk]]] = []
    skipped = 0
    for index, file_chunks in sorted(by_file.items()):
        name = manifest.files[index]
        file_chunks.sort(key=lambda c: c.offset)
        # Empty chunks need no bytes: check them even when their file is absent.
        empty = [c for c in file_chunks if c.nbytes == 0]
        bad += [_bad(c, name, CHECKSUM_MISMATCH, "empty chunk with a non-empty hash") for c in empty if c.xxh3 != xxhash.xxh3_64_intdigest(b"")]
        file_chunks = [c for c in file_chunks if c.nbytes]
        if not file_chunks:
            continue
        handle, size, reason, detail = _open(storage, root, name)
        if handle is None:
            bad += [_bad(c, name, reason, detail) for c in file_chunks]
            skipped += sum(c.nbytes for c in file_chunks)
            continue
        handles.append(handle)
        short = [c for c in file_chunks if c.offset + c.nbytes > size]
        bad += [_bad(c, name, FILE_TRUNCATED, f"file has {size} bytes, chunk ends at {c.offset + c.nbytes}") for c in short]
        skipped += sum(c.nbytes for c in short)
        jobs += [(handle, seg) for seg in _segments([c for c in file_chunks if c.offset + c.nbytes <= size])]
    done = skipped
    if progress is not None:
        progress(done, total)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="dist_ckpt-verify") as pool:
            futures = {pool.submit(checker.check, h, seg): sum(c.nbytes for c in seg) for h, seg in jobs}
            for fut in as_completed(futures):
                bad += fut.result()
                done += futures[fut]
                if progress is not None:
                    progress(done, total)
    finally:
        for h in handles:
            h.close()
    bad.sort(key=lambda b: (b.file, b.offset))
    return VerifyReport(root, not bad, len(chunks), total - skipped, bad, time.perf_counter() - t0)
