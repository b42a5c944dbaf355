"""Local (or network-mounted POSIX) filesystem backend."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from typing import Sequence

from ..logs import get_logger
from . import ReadHandle, Storage, WriteHandle

log = get_logger(__name__)  # prefixes the rank to each line

SYNC_FILE_RANGE_WRITE = 2


def _find_sync_file_range() -> "ctypes._CFuncPtr | None":
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _find_sync_file_range()


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
        self._writeback = _sync_file_range

    def pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None, "write on a closed handle"
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def start_writeback(self, offset: int, nbytes: int) -> None:
        # Without this the kernel holds the dirty pages until fsync (its own
        # writeback starts at ~10% of RAM dirty), so the disk idles while we copy.
        if self._writeback is None or self._fd is None:
            return
        if self._writeback(self._fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
            # Only a hint: an I/O error also surfaces at fsync, which raises it.
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
                log.debug("sync_file_range unsupported for %s (%s); not starting writeback early", self.path, os.strerror(err))
                self._writeback = None

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
        handle = LocalWriteHandle(tmp)
        try:
            handle.write_pieces(memoryview(data), 0)  # a manifest can be hundreds of MB
            handle.sync()
        finally:
            handle.close()
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

    def version(self, path: str) -> tuple[int, ...]:
        # A replaced file is a new inode with a later ctime (an inode number alone may be reused).
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino, st.st_size)
