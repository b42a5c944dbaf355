"""Local (or network-mounted POSIX) filesystem backend."""

from __future__ import annotations

import os
import shutil
from typing import Sequence

from . import ReadHandle, Storage, WriteHandle


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalWriteHandle(WriteHandle):
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None, "write on a closed handle"
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalReadHandle(ReadHandle):
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        assert self._fd is not None, "read on a closed handle"
        total = 0
        bufs = [memoryview(b).cast("B") for b in buffers]
        while bufs:
            n = os.preadv(self._fd, bufs, offset)
            if n == 0:
                break
            total += n
            offset += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if bufs and n:
                bufs[0] = bufs[0][n:]
        return total

    def size(self) -> int:
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalStorage(Storage):
    """POSIX files; durability through fsync of files and their directories."""

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> WriteHandle:
        return LocalWriteHandle(path)

    def open_read(self, path: str) -> ReadHandle:
        return LocalReadHandle(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def rename_dir(self, src: str, dst: str) -> None:
        if os.path.lexists(dst):
            raise FileExistsError(f"refusing to replace existing {dst!r}")
        os.rename(src, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))
