"""Storage backends: where checkpoint bytes go, and how a save is committed.

A backend owns the commit: everything above it (plan, layout, checksums,
manifest) is the same for every backend, and nothing above it composes
renames. Backends are chosen by URL scheme in :func:`get_storage` from one
registry: built-in ``file`` (plain paths too) and ``s3`` (:mod:`.s3`, needs
boto3), :func:`register_storage`, and
the ``dist_ckpt.storage`` entry-point group for third-party packages; a
storage object can also be passed in (``storage=``) to every save, load,
checkpointer and manager.

Call order during one save (which rank runs each step):

1. (coordinator, event loop) ``target = save_target(path, save_id, overwrite)``:
   names only, no I/O, so an abort can be queued before the next step ran.
2. (coordinator, I/O thread) ``begin_save(target)``: refuses an existing
   checkpoint unless ``overwrite``; prepares where the data files go.
3. (every rank) ``open_stream(target, data/rNNNNN.bin)`` → ``append`` at
   increasing 4 KiB-aligned offsets … → ``sync`` → ``close``; a rank never
   touches another rank's file. (A multipart upload can serve this.)
4. (coordinator, I/O thread) ``publish(target, manifest bytes)``: the commit
   point. Before it nothing at ``path`` changes; after it the checkpoint is
   complete. On failure, or instead of 4, ``abort(target)`` removes
   everything of that save.

Un-committing (retention, ``dist-ckpt gc``) is one call, ``uncommit(path)``
(rank 0 / the CLI): the checkpoint stops being committed atomically first,
then its data goes, so a crash in between never leaves a MANIFEST beside
missing data. ``set_aside(path)`` moves an unloadable one out of the way.

During a load every rank only calls ``read_bytes(MANIFEST)`` and
``open_in(checkpoint, data file)`` → ``preadv`` … → ``close``.

Reading treats a checkpoint as untrusted: a backend opens only regular files,
follows no symbolic link below the checkpoint directory, never blocks opening
a FIFO, and reads at most ``max_bytes`` of a whole file, so a crafted
checkpoint can neither hang a reader nor make it read without end.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Sequence

from ..errors import UnsupportedScheme

log = logging.getLogger(__name__)

WRITE_PIECE = 16 << 20  # bytes written (and hashed) at a time, each piece's writeback started at once
STREAM_ALIGN = 4096  # every append starts at a multiple of this (the manifest's ALIGN)
MAX_READ_BYTES = 4 << 30
"""Largest whole file :meth:`Storage.read_bytes` reads (a MANIFEST of a 4096-rank job is hundreds of MB)."""
ENTRY_POINT_GROUP = "dist_ckpt.storage"
"""Entry points here map a URL scheme (the name) to a backend factory (``module:callable``)."""


@dataclass(frozen=True)
class SaveTarget:
    """Where one save writes before it is published.

    The coordinator gets it from :meth:`Storage.save_target`; a rank rebuilds
    it from the path and the ``location`` its plan reply carries (streams need
    nothing else).

    Attributes:
        path: the final checkpoint path (scheme stripped).
        location: where the data files go until :meth:`Storage.publish`
            (the local backend's ``<path>.tmp-<save_id>``).
        save_id: unique per save; names the save's temporary objects ("" on ranks).
        overwrite: whether an existing checkpoint at ``path`` may be replaced.
    """

    path: str
    location: str
    save_id: str = ""
    overwrite: bool = False


@dataclass(frozen=True)
class Usage:
    """One entry's bytes (every file or object below it) and its last change (seconds since the epoch)."""

    nbytes: int
    mtime: float


class WriteStream(abc.ABC):
    """One data file being written by one thread of one rank, as an append stream.

    Each :meth:`append` starts at a :data:`STREAM_ALIGN`-aligned offset at or
    past the end of the previous one (the gap reads as zeros), so a backend
    can send the file as consecutive parts without seeking back.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.end = 0  # bytes appended so far, gaps included

    def append(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``.

        Raises:
            ValueError: ``offset`` is before the end of the stream or not aligned.
            OSError: the write failed.
        """
        if offset < self.end or offset % STREAM_ALIGN:
            raise ValueError(f"{self.name}: append at {offset} but the stream ends at {self.end} (offsets increase, {STREAM_ALIGN}-aligned)")
        self._write(memoryview(data).cast("B"), offset)
        self.end = offset + len(data)

    @abc.abstractmethod
    def _write(self, data: memoryview, offset: int) -> None:
        """Backend part of :meth:`append`: write ``data`` (already checked) at ``offset``."""

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Hint: start sending these written bytes to the device now, without waiting.

        Lets the device work while the next piece is hashed and copied, so
        :meth:`sync` has less left to do. Durability still needs :meth:`sync`;
        the default does nothing.
        """

    def write_pieces(self, data: memoryview, offset: int, each: Callable[[memoryview], object] | None = None) -> None:
        """Append ``data`` at ``offset`` in :data:`WRITE_PIECE` pieces, starting each one's writeback once written.

        ``each(piece)`` runs before a piece is written (the writer hashes
        there), so one huge chunk streams instead of waiting for ``sync``.
        """
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_PIECE):
            piece = view[start : start + WRITE_PIECE]
            if each is not None:
                each(piece)
            self.append(piece, offset + start)
            self.start_writeback(offset + start, len(piece))

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every byte appended so far durable (fsync; an upload's completion)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the stream; idempotent."""


class ReadHandle(abc.ABC):
    """An open data file being read; safe to use from several threads."""

    @abc.abstractmethod
    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` in order from ``offset``; returns bytes read (short at EOF)."""

    def will_read(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Hint: the calling thread's next ``preadv`` calls read these ``(offset, length)`` runs, in this order.

        The reader calls it once per file and reader thread with what that
        thread is about to read; a backend whose requests are costly (S3)
        can fetch them in a few large requests ahead of the reads. The reads
        themselves are unchanged (and still verified). The default does nothing.
        """

    @abc.abstractmethod
    def size(self) -> int:
        """Length of the file in bytes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle; idempotent."""


class Storage(abc.ABC):
    """What a checkpoint needs of a backend (see the module docstring for the call order and who calls what).

    Construct with no arguments (the registry calls ``factory()``); paths are
    passed per call with the scheme stripped.
    """

    # -- a save: target → begin → streams → publish / abort --------------------

    @abc.abstractmethod
    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        """(coordinator) Name where save ``save_id`` to ``path`` writes; no I/O."""

    @abc.abstractmethod
    def begin_save(self, target: SaveTarget) -> None:
        """(coordinator's I/O thread) Prepare ``target`` for the ranks' streams.

        Raises:
            CheckpointExists: a checkpoint is at ``target.path`` and ``target.overwrite`` is false.
            OSError: the preparation failed.
        """

    @abc.abstractmethod
    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        """(every rank) Create data file ``name`` (relative, e.g. ``data/r00003.bin``) of the save.

        Raises:
            OSError: it cannot be created.
        """

    @abc.abstractmethod
    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        """(coordinator's I/O thread, after every rank synced its streams) Commit the save atomically.

        Raises:
            CheckpointExists: a checkpoint appeared at the path and ``overwrite`` is false.
            CheckpointError: another save replaced the checkpoint at the same moment.
            OSError: writing or committing failed; nothing was committed.
        """

    @abc.abstractmethod
    def abort(self, target: SaveTarget) -> None:
        """(coordinator's I/O thread) Remove everything save ``target`` wrote; nothing there is not an error.

        Raises:
            OSError: something of it is still there.
        """

    # -- un-committing ---------------------------------------------------------

    @abc.abstractmethod
    def uncommit(self, path: str) -> None:
        """(rank 0, or the CLI) Delete the checkpoint at ``path``: un-commit it atomically first, then its data.

        A path without a MANIFEST is simply removed; a missing one is not an error.

        Raises:
            OSError: it could not be un-committed (it is then still committed).
        """

    @abc.abstractmethod
    def set_aside(self, path: str) -> str:
        """(rank 0) Move checkpoint ``path`` out of the way, kept for a post-mortem (``<path>.bad-*``).

        Returns:
            Where it is now.

        Raises:
            OSError: it could not be moved.
        """

    # -- reading and listing ----------------------------------------------------

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
    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """The whole regular file ``path``: the bytes its size said when it was opened, at most ``max_bytes``.

        Raises:
            UnsafeFileError: ``path`` is a symbolic link, not a regular file, or over ``max_bytes``.
            OSError: it cannot be read.
        """

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create directory ``path`` and its parents (a manager's root); existing is fine."""

    @abc.abstractmethod
    def remove_tree(self, path: str) -> None:
        """Remove ``path`` and everything below it, committed or not (garbage only); a missing path is not an error."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    def entry_usage(self, path: str) -> dict[str, Usage]:
        """Bytes and last change of every entry directly under ``path``, by name (``dist-ckpt ls`` and ``gc --min-age``).

        The default (a backend that cannot tell) is empty: the command line
        shows ``-`` and treats an age as unknown.

        Raises:
            OSError: ``path`` cannot be listed.
        """
        return {}

    def stored_name(self, target: SaveTarget, name: str) -> str:
        """(coordinator, at commit) The name the MANIFEST records for data file ``name`` of save ``target``.

        :meth:`open_stream` stores ``name`` under this name; a load opens it
        by this name (no listing). The default is ``name`` itself; the S3
        backend adds the save id and a hash (``data/<h4>.<save_id>.rNNNNN.bin``).
        """
        return name

    def collect_garbage(self, root: str, dry_run: bool = False, min_age_s: float = 0.0) -> list[str]:
        """(rank 0 at a manager's start, ``dist-ckpt gc``) Remove what no committed checkpoint under ``root`` references.

        For backends whose garbage is not a ``.tmp-*`` sibling the root scan
        finds (S3: objects no MANIFEST names, unfinished uploads). The default
        has none and returns ``[]``. ``dry_run``: remove nothing, return what
        would be removed; ``min_age_s``: keep what was written less than that
        many seconds ago (a save in flight's). A backend overriding it with
        ``root`` alone gets neither (``dist-ckpt gc`` then skips it with them).

        Returns:
            What was removed.

        Raises:
            OSError: a listing or removal failed.
        """
        return []

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


# -- the registry ----------------------------------------------------------------

#: URL scheme -> backend factory: ``file`` built in, then :func:`register_storage`,
#: then the ``dist_ckpt.storage`` entry points (loaded on first use of their scheme).
_BACKENDS: dict[str, Callable[[], Storage]] = {}


def register_storage(scheme: str, factory: Callable[[], Storage]) -> None:
    """Make ``scheme://...`` paths use the backend ``factory()`` builds (replacing any earlier one).

    Raises:
        ValueError: ``scheme`` is empty or not lower-case letters, digits, ``+``, ``-``, ``.``.
    """
    if not scheme or not all(c.islower() or c.isdigit() or c in "+-." for c in scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    _BACKENDS[scheme] = factory


def _entry_points() -> dict[str, metadata.EntryPoint]:
    """Installed packages' backends, by scheme (read each time: a package may be installed meanwhile)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def supported_schemes() -> list[str]:
    """Registered and installed URL schemes, sorted (plain paths are always the local filesystem)."""
    _builtin()
    return sorted(set(_BACKENDS) | set(_entry_points()))


def _builtin() -> None:
    if "file" not in _BACKENDS:
        from .local import LocalStorage  # imported late: local imports this module

        _BACKENDS["file"] = LocalStorage
    _BACKENDS.setdefault("s3", _s3_storage)


def _s3_storage() -> Storage:
    """The built-in ``s3`` backend, imported on first use (boto3 is an optional dependency); one per process and settings (:func:`.s3.shared_storage`).

    Raises:
        UnsupportedScheme: boto3 is not installed; says how to install it.
    """
    try:
        from .s3 import shared_storage
    except ImportError as e:
        raise UnsupportedScheme(f"s3:// paths need boto3, which is not installed: pip install 'dist-ckpt[s3]' ({e})") from e
    return shared_storage()


def _factory(scheme: str, path: str) -> Callable[[], Storage]:
    """The factory for ``scheme``: registered first, else an installed entry point (then registered).

    Raises:
        UnsupportedScheme: none is registered or installed, or the entry point cannot be loaded.
    """
    factory = _BACKENDS.get(scheme)
    if factory is not None:
        return factory
    ep = _entry_points().get(scheme)
    if ep is None:
        schemes = ", ".join(f"{s}://" for s in supported_schemes())
        raise UnsupportedScheme(f"no storage backend for {scheme}:// in {path!r}; supported: plain paths, {schemes}")
    try:
        loaded = ep.load()
    except Exception as e:  # a broken plugin must not look like an unknown scheme
        raise UnsupportedScheme(
            f"the storage backend for {scheme}:// ({ep.value}, entry point group {ENTRY_POINT_GROUP}) failed to load: {type(e).__name__}: {e}"
        ) from e
    register_storage(scheme, loaded)
    return loaded


def strip_scheme(path: str) -> str:
    """``path`` without its ``scheme://`` prefix, if any."""
    return path.split("://", 1)[1] if "://" in path else path


def get_storage(path: str, storage: Storage | None = None) -> tuple[Storage, str]:
    """Pick the backend for ``path`` by URL scheme, unless one is given.

    Called first by every save, load and manager, so an unknown scheme is
    refused before any directory, socket or thread is touched.

    Args:
        path: a plain path or ``scheme://rest``.
        storage: an injected backend (``storage=`` of the public API): used
            for ``path`` whatever its scheme.

    Returns:
        ``(storage, path)`` with the scheme stripped from the path.

    Raises:
        UnsupportedScheme: the scheme has no registered or installed backend; lists the supported ones.
    """
    if storage is not None:
        return storage, strip_scheme(path)
    _builtin()
    if "://" not in path:
        return _BACKENDS["file"](), path
    scheme, rest = path.split("://", 1)
    return _factory(scheme, path)(), rest
