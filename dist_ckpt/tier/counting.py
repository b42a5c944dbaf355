"""A storage wrapper that counts the bytes a load reads (a restore's ``bytes_durable``)."""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from ..storage import MAX_READ_BYTES, ReadHandle, SaveTarget, Storage, WriteStream


class CountingReads(Storage):
    """Delegates everything to ``inner``; adds every byte its read handles return to :attr:`nbytes`.

    Args:
        inner: the storage read from.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.nbytes = 0
        self._lock = threading.Lock()  # a load reads from several threads

    def add(self, n: int) -> None:
        with self._lock:
            self.nbytes += n

    def open_read(self, path: str) -> ReadHandle:
        return CountedHandle(self.inner.open_read(path), self.add)

    def open_in(self, root: str, name: str) -> ReadHandle:
        return CountedHandle(self.inner.open_in(root, name), self.add)

    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        return self.inner.read_bytes(path, max_bytes)

    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        return self.inner.save_target(path, save_id, overwrite)

    def begin_save(self, target: SaveTarget) -> None:
        self.inner.begin_save(target)

    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        return self.inner.open_stream(target, name)

    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        self.inner.publish(target, manifest)

    def abort(self, target: SaveTarget) -> None:
        self.inner.abort(target)

    def uncommit(self, path: str) -> None:
        self.inner.uncommit(path)

    def set_aside(self, path: str) -> str:
        return self.inner.set_aside(path)

    def makedirs(self, path: str) -> None:
        self.inner.makedirs(path)

    def remove_tree(self, path: str) -> None:
        self.inner.remove_tree(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def version(self, path: str) -> tuple[int, ...] | None:
        return self.inner.version(path)


class CountedHandle(ReadHandle):
    """``inner``, with every byte its reads return passed to ``add`` (a restore's bytes per tier).

    The read hint goes through to ``inner``, so a wrapped S3 object is still
    fetched in a few large GETs.
    """

    def __init__(self, inner: ReadHandle, add: Callable[[int], None]) -> None:
        self.inner, self._add = inner, add

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        n = self.inner.preadv(buffers, offset)
        self._add(n)
        return n

    def will_read(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.inner.will_read(ranges)

    def size(self) -> int:
        return self.inner.size()

    def close(self) -> None:
        self.inner.close()
