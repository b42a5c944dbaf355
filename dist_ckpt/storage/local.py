"""Local (or network-mounted POSIX) filesystem backend.

A save writes into ``<path>.tmp-<save_id>/``; :meth:`LocalStorage.publish`
writes ``MANIFEST`` there (tmp file, fsync, rename, directory fsync) and
renames the directory to ``<path>`` (parent fsync'd): that rename is the
commit point. An overwrite swaps through ``<path>.old-<save_id>``, which a
load falls back to if a crash hits between the two renames. Un-committing
renames ``<path>`` to ``<path>.tmp-delete-*`` before removing it. Every name
comes from :mod:`dist_ckpt.layout_names`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import uuid
from typing import Callable, Sequence

from ..errors import CheckpointError, CheckpointExists, UnsafeFileError
from ..layout_names import BAD, DATA_DIR, MANIFEST, OLD, TMP, sibling
from ..logs import get_logger
from . import MAX_READ_BYTES, ReadHandle, SaveTarget, Storage, Usage, WriteStream

log = get_logger(__name__)  # prefixes the rank to each line

SYNC_FILE_RANGE_WRITE = 2
# No link followed at the last component; a FIFO opens without waiting for a writer.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _find_sync_file_range() -> "Callable[[int, int, int, int], int] | None":
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


class LocalWriteStream(WriteStream):
    """A data file opened for writing; appends are ``pwrite`` calls (a gap stays a sparse hole).

    ``truncate=False`` keeps an existing file's bytes (a subclass that writes over them in place must zero its gaps).
    """

    def __init__(self, path: str, truncate: bool = True) -> None:
        super().__init__(path)
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0) | os.O_CLOEXEC, 0o644)
        self._writeback = _sync_file_range

    def _write(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None, "write on a closed stream"
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
    """POSIX files; durability through fsync of files and their directories, commit by directory rename."""

    # -- a save -------------------------------------------------------------------

    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        path = path.rstrip("/")
        return SaveTarget(path, sibling(path, TMP, save_id), save_id, overwrite)

    def begin_save(self, target: SaveTarget) -> None:
        if os.path.exists(target.path) and not target.overwrite:
            raise CheckpointExists(
                f"checkpoint {target.path} already exists; pass overwrite=True to replace it (the new one is written beside it and swapped in)"
            )
        self.remove_tree(target.location)  # a crashed save with the same id
        os.makedirs(f"{target.location}/{DATA_DIR}", exist_ok=True)

    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        return LocalWriteStream(f"{target.location}/{name}")

    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        self.write_atomic(f"{target.location}/{MANIFEST}", manifest)
        if os.path.exists(target.path):
            if not target.overwrite:
                raise CheckpointExists(f"checkpoint {target.path} appeared during the save; not replacing it")
            self._swap_in(target)
        else:
            try:
                self._rename_dir(target.location, target.path)
            except FileExistsError as e:  # another save committed there since the check above
                if not target.overwrite:
                    raise CheckpointExists(f"checkpoint {target.path} appeared during the save; not replacing it") from e
                raise CheckpointError(f"checkpoint {target.path} was replaced by another save at the same moment; this save was not committed") from e

    def _swap_in(self, target: SaveTarget) -> None:
        """Replace the committed ``target.path`` by the save's directory: old aside, new in, old removed.

        A crash between the renames leaves the old one complete under
        ``<path>.old-*``, which load falls back to. When another save swaps at the
        same moment, whichever rename loses leaves no ``.old-*`` behind: the
        old copy is removed if a newer checkpoint is in place, put back if not.
        """
        final, old = target.path, sibling(target.path, OLD, target.save_id)
        try:
            self._rename_dir(final, old)
        except FileNotFoundError as e:  # another save moved it aside first
            raise CheckpointError(f"checkpoint {final} was being replaced by another save at the same moment; this save was not committed") from e
        try:
            self._rename_dir(target.location, final)
        except OSError as e:
            if os.path.exists(f"{final}/{MANIFEST}"):  # another save committed in between: ours and the old one are both superseded
                self.remove_tree(old)
                raise CheckpointError(f"checkpoint {final} was replaced by another save at the same moment; this save was not committed") from e
            self._rename_dir(old, final)  # put the previous checkpoint back
            raise
        self.remove_tree(old)

    def abort(self, target: SaveTarget) -> None:
        self.remove_tree(target.location)
        if os.path.lexists(target.location):  # remove_tree ignores errors
            raise OSError(errno.ENOTEMPTY, f"{target.location} is still there after its removal")

    # -- un-committing ---------------------------------------------------------------

    def uncommit(self, path: str) -> None:
        path = path.rstrip("/")
        doomed = path
        if os.path.isfile(f"{path}/{MANIFEST}"):
            # The rename un-commits atomically: a crash during the removal leaves only a .tmp-* directory.
            doomed = sibling(path, TMP, f"delete-{uuid.uuid4().hex[:8]}")
            self._rename_dir(path, doomed)
        self.remove_tree(doomed)
        if os.path.lexists(doomed):
            raise OSError(errno.ENOTEMPTY, f"{doomed} is still there after its removal (no longer a checkpoint)")

    def set_aside(self, path: str) -> str:
        aside = sibling(path, BAD)
        self._rename_dir(path.rstrip("/"), aside)
        return aside

    # -- reading, listing, files -----------------------------------------------------

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

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
                        raise UnsafeFileError(
                            errno.ELOOP, f"{root}/{'/'.join(parts[: i + 1])} is a symbolic link; files inside a checkpoint are never read through links"
                        ) from e
                    raise
                os.close(fd)
                fd = sub
        finally:
            os.close(fd)
        return self.open_read(f"{root}/{name}")

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to a temporary sibling, fsync, rename over ``path``, fsync the directory."""
        tmp = f"{path}.tmp-{os.getpid()}"
        handle = LocalWriteStream(tmp)
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

    def _rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename directory ``src`` to ``dst`` (which must not exist) and fsync the parent."""
        if os.path.lexists(dst):
            raise FileExistsError(f"refusing to replace existing {dst!r}")
        try:
            self._rename(src, dst)
        except OSError as e:
            # Another save's directory renamed to dst after the check: rename(2) refuses a non-empty one with
            # ENOTEMPTY (or EEXIST), which is the same "dst exists" the check reports, and callers handle as such.
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(e.errno, f"{dst!r} appeared while {src!r} was renamed to it") from e
            raise
        fsync_dir(os.path.dirname(os.path.abspath(dst)))

    def _rename(self, src: str, dst: str) -> None:
        """``rename(2)`` (the one call :meth:`_rename_dir` races other saves on)."""
        os.rename(src, dst)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def entry_usage(self, path: str) -> dict[str, Usage]:
        """Each entry's bytes (files below it, links not followed) and its own mtime (a save adding files changes it)."""
        out = {}
        for name in os.listdir(path):
            entry = os.path.join(path, name)
            try:
                out[name] = Usage(_tree_bytes(entry), os.stat(entry).st_mtime)
            except FileNotFoundError:
                pass  # removed meanwhile
        return out

    def version(self, path: str) -> tuple[int, ...]:
        # A replaced file is a new inode with a later ctime (an inode number alone may be reused).
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino, st.st_size)


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed while walking
    return total
