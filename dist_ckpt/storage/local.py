"""Local (or network-mounted POSIX) filesystem backend."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from typing import Sequence

from ..errors import UnsafeFileError
from ..logs import get_logger
from . import MAX_READ_BYTES, ReadHandle, Storage, WriteHandle

log = get_logger(__name__)  # prefixes the rank to each line

SYNC_FILE_RANGE_WRITE = 2
# No link followed at the last component; a FIFO opens without waiting for a writer.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


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


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only, refusing a symbolic link or anything but a regular file.

    Returns:
        ``(fd, stat)``; the caller closes the fd.

    Raises:
        UnsafeFileError: ``path`` is a link, a FIFO, a device, a directory or a socket.
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(errno.ELOOP, f"{path} is a symbolic link; files inside a checkpoint are never read through links") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
        raise UnsafeFileError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, f"{path} is a {kind}, not a regular file")
    return fd, st


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
        self._fd: int | None = open_regular(path)[0]

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

    def open_in(self, root: str, name: str) -> ReadHandle:
        # Every directory below root is opened under its parent's fd without
        # following links, then the file itself with O_NOFOLLOW. (A swap of a
        # directory between the walk and the open is not excluded; the bytes
        # read are checksummed either way.)
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeFileError(errno.EINVAL, f"{name!r} is not a plain relative path inside {root}")
        fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(f"{root}/{'/'.join(parts[: i + 1])}"):
                        raise UnsafeFileError(errno.ELOOP, f"{root}/{'/'.join(parts[: i + 1])} is a symbolic link; files inside a checkpoint are never read through links") from e
                    raise
                os.close(fd)
                fd = sub
        finally:
            os.close(fd)
        return self.open_read(f"{root}/{name}")

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

    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        fd, st = open_regular(path)
        with os.fdopen(fd, "rb", buffering=0) as f:
            if st.st_size > max_bytes:
                raise UnsafeFileError(errno.EFBIG, f"{path} is {st.st_size} bytes, more than the {max_bytes} a reader accepts")
            # Exactly the size fstat gave: a file that grows while read is not followed.
            pieces, left = [], st.st_size
            while left:
                piece = f.read(left)
                if not piece:
                    break
                pieces.append(piece)
                left -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

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
