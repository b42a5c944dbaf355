"""Storage backends: where checkpoint bytes go.

A backend is a small set of path-level operations; everything above it
(layout, commit order, checksums) is the same for every backend. Backends are
chosen by URL scheme in :func:`get_storage` from a registry
(:func:`register_storage`; plain paths and ``file://`` are the local
filesystem); an unregistered scheme is refused with the list of registered ones.

Call order during one save (which rank runs each step):

1. (coordinator) ``makedirs(tmp/data)`` for the temporary checkpoint directory.
2. (every rank) ``open_write(tmp/data/rNNNNN.bin)`` → ``pwrite`` … → ``sync`` →
   ``close``; a writer never touches another rank's file.
3. (coordinator) ``write_atomic(tmp/MANIFEST, bytes)``, then
   ``rename_dir(tmp, final)``; the rename is the commit point.
4. (coordinator, on abort) ``remove_tree(tmp)``.

During a load every rank only calls ``read_bytes(MANIFEST)`` and
``open_in(checkpoint, data file)`` → ``preadv`` … → ``close``.

Reading treats a checkpoint as untrusted: a backend opens only regular files,
follows no symbolic link below the checkpoint directory, never blocks opening
a FIFO, and reads at most ``max_bytes`` of a whole file, so a crafted
checkpoint can neither hang a reader nor make it read without end.
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

from ..errors import UnsupportedScheme

WRITE_PIECE = 16 << 20  # bytes written (and hashed) at a time, each piece's writeback started at once
MAX_READ_BYTES = 4 << 30
"""Largest whole file :meth:`Storage.read_bytes` reads (a MANIFEST of a 4096-rank job is hundreds of MB)."""


class WriteHandle(abc.ABC):
    """An open data file being written by one thread of one rank."""

    @abc.abstractmethod
    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (short writes are retried)."""

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Hint: start sending these written bytes to the device now, without waiting.

        Lets the device work while the next piece is hashed and copied, so
        :meth:`sync` has less left to do. Durability still needs :meth:`sync`;
        the default does nothing.
        """

    def write_pieces(self, data: memoryview, offset: int, each: Callable[[memoryview], object] | None = None) -> None:
        """Write ``data`` at ``offset`` in :data:`WRITE_PIECE` pieces, starting each one's writeback once written.

        ``each(piece)`` runs before a piece is written (the writer hashes
        there), so one huge chunk streams instead of waiting for ``sync``.
        """
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_PIECE):
            piece = view[start : start + WRITE_PIECE]
            if each is not None:
                each(piece)
            self.pwrite(piece, offset + start)
            self.start_writeback(offset + start, len(piece))

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every byte written so far durable (fsync)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle; idempotent."""


class ReadHandle(abc.ABC):
    """An open data file being read; safe to use from several threads."""

    @abc.abstractmethod
    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` in order from ``offset``; returns bytes read (short at EOF)."""

    @abc.abstractmethod
    def size(self) -> int:
        """Length of the file in bytes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle; idempotent."""


class Storage(abc.ABC):
    """Path-level operations a checkpoint needs (see the module docstring for call order)."""

    @abc.abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abc.abstractmethod
    def open_write(self, path: str) -> WriteHandle: ...

    @abc.abstractmethod
    def open_read(self, path: str) -> ReadHandle:
        """Open a regular file for reading.

        Raises:
            UnsafeFileError: ``path`` is a symbolic link or not a regular file.
            OSError: it cannot be opened.
        """

    def open_in(self, root: str, name: str) -> ReadHandle:
        """Open ``name`` (a relative path from a manifest) inside the checkpoint ``root``, never leaving it.

        The default trusts the backend's namespace to have no links and opens
        ``root/name``; backends with links refuse any below ``root``.

        Raises:
            UnsafeFileError: a component of ``name`` is a link or not a directory, or the file is not regular.
            OSError: it cannot be opened.
        """
        return self.open_read(f"{root}/{name}")

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to a temporary sibling, fsync, rename over ``path``, fsync the directory."""

    @abc.abstractmethod
    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """The whole regular file ``path``: the bytes its size said when it was opened, at most ``max_bytes``.

        Raises:
            UnsafeFileError: ``path`` is a symbolic link, not a regular file, or over ``max_bytes``.
            OSError: it cannot be read.
        """

    @abc.abstractmethod
    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename directory ``src`` to ``dst`` (which must not exist) and fsync the parent."""

    @abc.abstractmethod
    def remove_tree(self, path: str) -> None:
        """Remove ``path`` and everything below it; a missing path is not an error."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    def version(self, path: str) -> tuple[int, ...] | None:
        """A token for the file at ``path`` that changes whenever the file is replaced.

        Its first field orders versions by time written (newest largest).
        Loads compare it before and after reading to detect a concurrent
        overwrite; None (the default) means the backend cannot tell, and
        such loads are not checked.

        Raises:
            FileNotFoundError: nothing at ``path``.
        """
        return None


#: URL scheme -> backend factory. ``file`` is built in; a new backend (e.g. ``s3``)
#: adds itself with :func:`register_storage` and is then listed in every refusal.
_BACKENDS: dict[str, Callable[[], Storage]] = {}


def register_storage(scheme: str, factory: Callable[[], Storage]) -> None:
    """Make ``scheme://...`` paths use the backend ``factory()`` builds.

    Raises:
        ValueError: ``scheme`` is empty or not lower-case letters, digits, ``+``, ``-``, ``.``.
    """
    if not scheme or not all(c.islower() or c.isdigit() or c in "+-." for c in scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    _BACKENDS[scheme] = factory


def supported_schemes() -> list[str]:
    """Registered URL schemes, sorted (plain paths are always the local filesystem)."""
    _builtin()
    return sorted(_BACKENDS)


def _builtin() -> None:
    if "file" not in _BACKENDS:
        from .local import LocalStorage  # imported late: local imports this module

        _BACKENDS["file"] = LocalStorage


def get_storage(path: str) -> tuple[Storage, str]:
    """Pick the backend for ``path`` by URL scheme.

    Called first by every save, load and manager, so an unknown scheme is
    refused before any directory, socket or thread is touched.

    Returns:
        ``(storage, path)`` with the scheme stripped from the path.

    Raises:
        UnsupportedScheme: the scheme has no registered backend; lists the supported ones.
    """
    _builtin()
    if "://" not in path:
        return _BACKENDS["file"](), path
    scheme, rest = path.split("://", 1)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        schemes = ", ".join(f"{s}://" for s in supported_schemes())
        raise UnsupportedScheme(f"no storage backend for {scheme}:// in {path!r}; supported: plain paths, {schemes}")
    return factory(), rest
