"""S3 (and S3-compatible) backend: checkpoints committed without rename.

Paths reach it as ``bucket/prefix/...`` (``s3://`` stripped by
:func:`~dist_ckpt.storage.get_storage`). A checkpoint ``s3://b/run/step-00000100`` is::

    run/step-00000100/MANIFEST                                  written last, create-only: its presence = committed
    run/step-00000100/data/<h4>.<save_id>.r00003.bin            rank 3's data object of save <save_id>
    run/step-00000100/data/<h4>.<save_id>.r00003-t1.bin         (one per writer thread)
    run/step-00000100/MANIFEST.bad-<id>                         a MANIFEST set aside (the step is no longer committed)

``<h4>`` is four hex digits of xxh3(``<save_id>/<name>``): the ranks' objects
start with different characters right after ``data/``, so the store can split
one hot prefix between partitions. The save id makes every object name
unique: two saves to one path never write the same key, so a loser (or a
zombie coordinator) can only ever remove its own objects. The MANIFEST names
the real objects (:meth:`S3Storage.stored_name`), so a load needs no LIST.

Commit (:meth:`S3Storage.publish`): ``PutObject(If-None-Match: *)`` of the
MANIFEST, then a HEAD that the MANIFEST there is ours (a store that ignores
the precondition, or moto's check-then-put, can let two puts succeed; the
loser sees another ETag). ``overwrite=True``: ``PutObject(If-Match: <old
ETag>)``, then the old save's objects (read from the old MANIFEST) are deleted.
Data objects no MANIFEST references (a killed rank's completed objects, an
aborted save's leftovers, unfinished multipart uploads) are garbage for
:meth:`S3Storage.collect_garbage`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator, Sequence

import numpy as np
import xxhash

from ..errors import CheckpointError, CheckpointExists, ManifestError, StorageError, UnsafeFileError
from ..layout_names import BAD_MANIFEST_PREFIX as BAD_MANIFEST
from ..layout_names import DATA_DIR, MANIFEST
from ..logs import get_logger
from . import MAX_READ_BYTES, ReadHandle, SaveTarget, Storage, Usage, WriteStream
from .s3_client import READ_PIECE, ObjectChanged, ObjectExists, RetryPolicy, S3Client

log = get_logger(__name__)  # prefixes the rank to each line

_SAVE_MARK = "?save="  # location = <path>?save=<save_id>: ranks rebuild object names from it
_SAVE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OBJECT_RE = re.compile(r"^(?P<h>[0-9a-f]{4})\.(?P<save>[A-Za-z0-9_-]{1,64})\.(?P<file>r\d{5,}(?:(?:-t\d{1,3})?\.bin|\.frag))$")
"""A data object's (or a version-2 fragment's) name inside ``data/``, as :func:`object_name` writes it."""
_ZEROS = bytes(1 << 20)  # gaps between appends are sent as zeros, a MiB at a time


def object_name(save_id: str, name: str) -> str:
    """The stored name of data file ``name`` (``data/r00003.bin``) of save ``save_id``.

    Raises:
        ValueError: ``name`` is not under ``data/``.
    """
    head, _, base = name.partition("/")
    if head != DATA_DIR or not base or "/" in base:
        raise ValueError(f"{name!r} is not a data file name (data/rNNNNN.bin)")
    h = xxhash.xxh3_64_hexdigest(f"{save_id}/{name}".encode())[:4]
    return f"{DATA_DIR}/{h}.{save_id}.{base}"


def _is_data_object(key: str) -> bool:
    """Whether ``key`` is named like one of this library's data objects (``…/data/<h4>.<save_id>.rNNNNN.bin``)."""
    folder, _, name = key.rpartition("/")
    return (folder == DATA_DIR or folder.endswith(f"/{DATA_DIR}")) and OBJECT_RE.match(name) is not None


def _save_of(key: str) -> str:
    """The save id in a data object's key ("" if it is not named like one)."""
    m = OBJECT_RE.match(key.rpartition("/")[2])
    return m.group("save") if m else ""


class S3WriteStream(WriteStream):
    """One data object as a multipart upload: appends go to the writer, gaps as zeros; ``sync`` completes it."""

    def __init__(self, name: str, client: S3Client, key: str, part_size: int, max_in_flight: int) -> None:
        super().__init__(name)
        self._writer = client.open_writer(key, part_size, max_in_flight)

    def _write(self, data: memoryview, offset: int) -> None:
        gap = offset - self._writer.size
        while gap > 0:  # the writer placed the chunk at the next aligned offset: at most 4 KiB - 1 each
            n = min(gap, len(_ZEROS))
            self._writer.write(memoryview(_ZEROS)[:n])
            gap -= n
        self._writer.write(data)

    def sync(self) -> None:
        self._writer.complete()

    def close(self) -> None:
        self._writer.close()  # aborts the upload unless it completed: no object appears


COALESCE_GAP = 1 << 20
"""Runs of one :meth:`S3ReadHandle.will_read` this close are fetched by one GET (the gap's bytes are read and dropped)."""
WINDOW_BYTES = 16 << 20
"""The most bytes one coalesced GET fetches (a window)."""
WINDOWS_AHEAD = 2
"""Windows a reading thread holds: the one it reads, the next one fetching meanwhile (memory: 2 x 16 MiB per thread)."""
_FETCH_THREADS = 16


@dataclass
class _Window:
    start: int
    end: int
    bytes: Future[memoryview] | None = None  # None until its GET is started


class _Plan:
    """One thread's announced windows of one object, consumed front to back by its ``preadv`` calls."""

    def __init__(self, windows: list[_Window]) -> None:
        self.windows = deque(windows)

    def serve(self, handle: S3ReadHandle, views: list[memoryview], offset: int, want: int) -> int:
        """Copy what the windows hold of ``[offset, offset + want)`` into ``views``; the bytes served (a prefix, maybe 0)."""
        done = 0
        while done < want and self.windows:
            pos = offset + done
            while self.windows and self.windows[0].end <= pos:  # the reader moved past it
                self._drop()
            self._start(handle)
            if not self.windows or self.windows[0].start > pos:
                break  # not announced: a direct GET reads it
            w = self.windows[0]
            assert w.bytes is not None
            data = w.bytes.result()  # raises the window's StorageError / DataFileError here, in the reading thread
            n = min(want - done, w.end - pos)
            _scatter(views, done, data[pos - w.start : pos - w.start + n])
            done += n
        return done

    def _start(self, handle: S3ReadHandle) -> None:
        for w in itertools.islice(self.windows, WINDOWS_AHEAD):
            if w.bytes is None:
                w.bytes = _fetch_pool().submit(handle.fetch, w.start, w.end - w.start)

    def _drop(self) -> None:
        w = self.windows.popleft()
        if w.bytes is not None:
            w.bytes.cancel()  # a GET not yet started is not sent; one under way finishes and is dropped

    def close(self) -> None:
        while self.windows:
            self._drop()


def _coalesce(ranges: Sequence[tuple[int, int]], size: int, window: int = WINDOW_BYTES) -> list[_Window]:
    """Windows covering ``ranges`` (clipped to ``size``): runs at most COALESCE_GAP apart share a span, cut in ``window``-byte windows
    (the node-local tier's peer reads take them too, smaller)."""
    arr = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    lo, hi = np.clip(arr[:, 0], 0, size), np.clip(arr[:, 0] + arr[:, 1], 0, size)
    keep = hi > lo
    order = np.argsort(lo[keep], kind="stable")
    lo, hi = lo[keep][order], hi[keep][order]
    if not len(lo):
        return []
    reach = np.maximum.accumulate(hi)  # the end of everything up to each run
    first = np.flatnonzero(np.concatenate(([True], lo[1:] - reach[:-1] > COALESCE_GAP)))
    spans = zip(lo[first].tolist(), np.maximum.reduceat(hi, first).tolist())
    # Every window of a span holds needed bytes: its gaps are at most COALESCE_GAP, less than a window.
    return [_Window(a, min(a + window, b)) for a0, b in spans for a in range(a0, b, window)]


class S3ReadHandle(ReadHandle):
    """One object read by ranged GETs; the size comes from the HEAD at open. Thread-safe.

    A thread that announces its reads (:meth:`will_read`) gets them from a few large
    coalesced GETs, fetched ahead; any other read is one ranged GET of its own.
    """

    def __init__(self, client: S3Client, key: str) -> None:
        self._client, self.key = client, key
        info = client.head(key)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, f"no object s3://{client.bucket}/{key}")
        self._size = info.size
        self._plans: dict[int, _Plan] = {}  # thread ident -> its plan
        self._lock = threading.Lock()

    def will_read(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Plan this thread's next reads: ``(offset, length)`` runs, coalesced into windows of at most WINDOW_BYTES.

        Replaces the thread's earlier plan; the first windows' GETs start now.
        """
        plan = _Plan(_coalesce(ranges, self._size))
        with self._lock:
            old = self._plans.pop(threading.get_ident(), None)
            if plan.windows:
                self._plans[threading.get_ident()] = plan
        if old is not None:
            old.close()
        plan._start(self)

    def fetch(self, start: int, length: int) -> memoryview:
        """One window's bytes (a ranged GET, resumed if the body drops); failures are logged and raised."""
        try:
            return self._client.get_range(self.key, start, length)
        except BaseException as e:
            log.warning("prefetching s3://%s/%s bytes %d+%d failed: %s", self._client.bucket, self.key, start, length, e)
            raise

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        want = min(sum(len(v) for v in views), max(0, self._size - offset))
        if want <= 0:
            return 0
        with self._lock:
            plan = self._plans.get(threading.get_ident())
        done = plan.serve(self, views, offset, want) if plan is not None else 0
        if done < want:
            self._get(views, offset, want, done)
        return want

    def _get(self, views: list[memoryview], offset: int, want: int, skip: int) -> None:
        """Bytes ``skip`` to ``want`` of the read at ``offset`` into ``views``: one ranged GET streamed in, resumed if it drops."""
        done = [skip]  # bytes already landed, kept across retries (a dropped body resumes)

        def once() -> int:
            first = offset + done[0]
            resp = self._client.raw.get_object(Bucket=self._client.bucket, Key=self.key, Range=f"bytes={first}-{offset + want - 1}")
            with resp["Body"] as body:
                for view in _pieces(views, done[0], want):
                    got = 0
                    while got < len(view):
                        n = body.readinto(view[got:])
                        if n == 0:  # the connection ended mid-body: retried from the first missing byte
                            raise ConnectionError(f"s3://{self._client.bucket}/{self.key}: body ended at {offset + done[0]}, before {offset + want}")
                        got += n
                        done[0] += n
            return done[0]

        self._client.call("GetObject(Range)", self.key, once)

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        # The connection pool belongs to the client; windows not yet fetched are cancelled, fetched ones freed.
        with self._lock:
            plans, self._plans = list(self._plans.values()), {}
        for plan in plans:
            plan.close()


def _scatter(views: list[memoryview], skip: int, src: memoryview) -> None:
    """Copy ``src`` into the concatenation of ``views`` from its byte ``skip``."""
    pos, done = 0, 0
    for v in views:
        lo = max(skip + done - pos, 0)
        if lo < len(v) and done < len(src):
            n = min(len(v) - lo, len(src) - done)
            v[lo : lo + n] = src[done : done + n]
            done += n
        pos += len(v)


_pool: ThreadPoolExecutor | None = None


def _fetch_pool() -> ThreadPoolExecutor:
    """The process's window-fetching threads (started on first use; a forked child starts its own)."""
    global _pool
    with _shared_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="dist_ckpt-s3-fetch")
        return _pool


def _pieces(views: list[memoryview], skip: int, total: int) -> Iterator[memoryview]:
    """The parts of ``views`` from byte ``skip`` to ``total``, each at most READ_PIECE long."""
    pos = 0
    for v in views:
        lo, hi = max(skip - pos, 0), min(len(v), total - pos)
        for a in range(lo, hi, READ_PIECE):
            yield v[a : min(a + READ_PIECE, hi)]
        pos += len(v)
        if pos >= total:
            return


_SHARED_MAX = 8  # settings seen by one process (a process that keeps changing its AWS_* variables evicts the oldest)
_shared: dict[str, S3Storage] = {}
_shared_lock = threading.Lock()


def _forget_shared() -> None:
    """In a forked child: drop the parent's storages (their clients' sockets are the parent's) and a lock it may have held."""
    global _shared_lock, _pool
    _shared.clear()
    _shared_lock, _pool = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_shared)


def _settings_key() -> str:
    """What selects the clients of :func:`shared_storage`: every ``AWS_*`` and ``DIST_CKPT_S3_*`` variable, and the pid.

    The AWS chain reads endpoint, region, profile, credentials and config files from ``AWS_*``;
    part size and concurrency come from ``DIST_CKPT_S3_*``. Hashed: the key holds no secret.
    """
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "DIST_CKPT_S3_")))
    return f"{os.getpid()}:" + hashlib.sha256(repr(env).encode()).hexdigest()


def shared_storage() -> S3Storage:
    """This process's :class:`S3Storage` for the current environment: what ``s3://`` paths get from ``get_storage``.

    Building boto3 clients costs most of a small save (a one-tensor save took 0.8-1.0 s with new
    clients, 0.06 s reusing them), so every ``dc.save`` / ``dc.load`` on ``s3://`` shares one
    storage (and its per-bucket clients, whose connection pools are thread-safe) while the
    ``AWS_*`` / ``DIST_CKPT_S3_*`` variables stay the same. A forked child never gets its parent's.

    Returns:
        The storage (built on first use for these settings).

    Raises:
        ValueError: a ``DIST_CKPT_S3_*`` setting out of range.
    """
    key = _settings_key()
    with _shared_lock:
        storage = _shared.get(key)
        if storage is None:
            storage = S3Storage()
            if len(_shared) >= _SHARED_MAX:
                del _shared[next(iter(_shared))]
            _shared[key] = storage
        return storage


class S3Storage(Storage):
    """``s3://bucket/prefix`` checkpoints (see the module docstring for names, commit and garbage).

    Credentials, region and endpoint come from the standard AWS chain
    (``AWS_*`` variables, profiles, instance roles).

    Args:
        part_size: bytes per multipart part (None: ``Config.from_env().s3_part_size``).
        max_in_flight: parts uploading at once per data object (None: ``Config.from_env().s3_max_in_flight``).
        retry: the client's retry policy (None: its default).
        endpoint_url: overrides ``AWS_ENDPOINT_URL``.

    Raises:
        ValueError: a setting out of range (from ``Config``).
    """

    def __init__(
        self, part_size: int | None = None, max_in_flight: int | None = None, retry: RetryPolicy | None = None, endpoint_url: str | None = None
    ) -> None:
        from ..config import Config  # config imports nothing of storage; late import keeps storage light

        cfg = Config.from_env(s3_part_size=part_size, s3_max_in_flight=max_in_flight)
        self.part_size, self.max_in_flight = cfg.s3_part_size, cfg.s3_max_in_flight
        self.retry, self.endpoint_url = retry or RetryPolicy(), endpoint_url
        self._reset_clients()

    def _reset_clients(self) -> None:
        self._clients: dict[str, S3Client] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Process mode pickles the storage to the writer subprocess: clients hold sockets, so they are rebuilt there.
        return {k: v for k, v in self.__dict__.items() if k not in ("_clients", "_lock", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_clients()

    def _where(self, path: str) -> tuple[S3Client, str]:
        """(client of the bucket, key prefix) of ``bucket/prefix``; the prefix has no leading or trailing ``/``.

        Raises:
            ValueError: no bucket, or a ``.``/``..`` component.
        """
        bucket, _, rest = path.strip("/").partition("/")
        parts = [p for p in rest.split("/") if p]
        if not bucket or any(p in (".", "..") for p in parts):
            raise ValueError(f"bad s3:// path {path!r}: needs s3://bucket/prefix without '.' or '..' parts")
        if self._pid != os.getpid():  # a forked child: the parent's clients share its sockets (and maybe a held lock)
            self._reset_clients()
        with self._lock:
            client = self._clients.get(bucket)
            if client is None:
                client = self._clients[bucket] = S3Client(
                    bucket, endpoint_url=self.endpoint_url, retry=self.retry, max_connections=max(32, 2 * self.max_in_flight)
                )
        return client, "/".join(parts)

    @staticmethod
    def _join(prefix: str, name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    # -- a save -------------------------------------------------------------------

    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        if not _SAVE_ID_RE.match(save_id):
            raise ValueError(f"save id {save_id!r} cannot be part of an object name (letters, digits, '-', '_')")
        path = path.rstrip("/")
        return SaveTarget(path, f"{path}{_SAVE_MARK}{save_id}", save_id, overwrite)

    def stored_name(self, target: SaveTarget, name: str) -> str:
        """``data/<h4>.<save_id>.rNNNNN.bin``: what the MANIFEST records for data file ``name``."""
        return object_name(self._save_id(target), name)

    @staticmethod
    def _save_id(target: SaveTarget) -> str:
        path, mark, save_id = target.location.rpartition(_SAVE_MARK)
        if not mark or path != target.path or not _SAVE_ID_RE.match(save_id):
            raise ValueError(f"{target.location!r} is not an S3 save location of {target.path!r}")
        return save_id

    def begin_save(self, target: SaveTarget) -> None:
        client, prefix = self._where(target.path)
        if not target.overwrite and client.head(self._join(prefix, MANIFEST)) is not None:
            raise CheckpointExists(f"checkpoint s3://{target.path} already exists; pass overwrite=True to replace it")

    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        client, prefix = self._where(target.path)
        key = self._join(prefix, self.stored_name(target, name))
        return S3WriteStream(f"s3://{client.bucket}/{key}", client, key, self.part_size, self.max_in_flight)

    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        client, prefix = self._where(target.path)
        key = self._join(prefix, MANIFEST)
        old = client.head(key) if target.overwrite else None
        if old is None:
            try:
                etag = client.put_if_absent(key, manifest)
            except ObjectExists as e:
                if target.overwrite:
                    raise CheckpointError(f"checkpoint s3://{target.path} was committed by another save at the same moment; this save was not committed") from e
                raise CheckpointExists(f"checkpoint s3://{target.path} was committed by another save first; this save was not committed") from e
        else:
            old_files = self._referenced_or_none(client, prefix, MANIFEST) or []  # unreadable: its objects become garbage
            try:
                etag = client.replace_if_match(key, manifest, old.etag)
            except ObjectChanged as e:
                raise CheckpointError(f"checkpoint s3://{target.path} was replaced by another save at the same moment; this save was not committed") from e
        self._check_won(client, key, etag, target)
        if old is not None:
            self._delete_quietly(client, [self._join(prefix, f) for f in old_files], f"the objects of the checkpoint s3://{target.path} replaced")

    def _check_won(self, client: S3Client, key: str, etag: str, target: SaveTarget) -> None:
        """After our conditional put: the MANIFEST there must be ours (a store ignoring the precondition can let two puts succeed)."""
        try:
            info = client.head(key)
        except StorageError as e:  # the put itself succeeded: committed, as far as this store told us
            log.warning("could not re-read s3://%s/%s after committing it: %s", client.bucket, key, e)
            return
        if info is None or info.etag != etag:
            kind = CheckpointError if target.overwrite else CheckpointExists
            raise kind(
                f"checkpoint s3://{target.path} was committed by another save at the same moment (its MANIFEST is not this save's); this save was not committed"
            )

    def abort(self, target: SaveTarget) -> None:
        client, prefix = self._where(target.path)
        save_id = self._save_id(target)
        data = self._join(prefix, f"{DATA_DIR}/")
        for key, upload in list(client.list_uploads(data)):
            if _save_of(key) == save_id:
                client.abort_upload(key, upload)
        client.delete_many([o.key for o in client.list(data) if _save_of(o.key) == save_id])

    # -- un-committing ---------------------------------------------------------------

    def uncommit(self, path: str) -> None:
        client, prefix = self._where(path)
        # One DeleteObject un-commits atomically; a crash after it leaves only garbage, never a MANIFEST beside missing data.
        client.call("DeleteObject", self._join(prefix, MANIFEST), lambda: client.raw.delete_object(Bucket=client.bucket, Key=self._join(prefix, MANIFEST)))
        self.remove_tree(path)

    def set_aside(self, path: str) -> str:
        """Copy MANIFEST to ``MANIFEST.bad-<id>`` beside it, then delete MANIFEST: the step is no longer committed,
        its objects stay (referenced by the copy, so :meth:`collect_garbage` keeps them) for a post-mortem."""
        client, prefix = self._where(path)
        src, aside = self._join(prefix, MANIFEST), self._join(prefix, f"{BAD_MANIFEST}{uuid.uuid4().hex[:8]}")
        source = {"Bucket": client.bucket, "Key": src}
        client.call("CopyObject", aside, lambda: client.raw.copy_object(Bucket=client.bucket, Key=aside, CopySource=source))
        client.call("DeleteObject", src, lambda: client.raw.delete_object(Bucket=client.bucket, Key=src))
        return f"{path.rstrip('/')}/{aside.rsplit('/', 1)[-1]}"

    # -- garbage -----------------------------------------------------------------------

    def collect_garbage(self, root: str, dry_run: bool = False, min_age_s: float = 0.0) -> list[str]:
        """Remove this library's data objects under ``root`` that no MANIFEST (or set-aside ``MANIFEST.bad-*``) references,
        and abort its unfinished multipart uploads there.

        A save's objects are unreferenced until its MANIFEST is written: run it when no save to ``root`` is in flight
        (the manager does at start), or with ``min_age_s`` longer than any save takes (``dist-ckpt gc --min-age``).
        Objects of any other name are never touched.

        Args:
            root: ``bucket/prefix``: a manager's root or one checkpoint.
            dry_run: remove nothing; return what would be removed.
            min_age_s: keep objects written, and uploads begun or given a part, less than this many seconds ago (by
                this machine's clock against the store's LastModified / Initiated; one the store gives no time for is
                kept, and so is an upload with no part yet).

        Returns:
            The ``s3://`` URLs removed (uploads aborted included), sorted; with ``dry_run``, those that would be.

        Raises:
            StorageError: a LIST, read or delete failed.
        """
        client, prefix = self._where(root)
        start = self._join(prefix, "") if prefix else ""
        young = time.time() - min_age_s

        def old_enough(when: float | None) -> bool:
            return min_age_s <= 0 or (when is not None and when < young)

        manifests: dict[str, list[str]] = {}  # checkpoint prefix -> its MANIFEST and MANIFEST.bad-* names
        objects: dict[str, list[str]] = {}  # checkpoint prefix -> its data object keys
        recent: set[str] = set()
        for info in client.list(start):
            folder, _, name = info.key.rpartition("/")
            if name == MANIFEST or name.startswith(BAD_MANIFEST):
                manifests.setdefault(folder, []).append(name)
            elif _is_data_object(info.key):
                objects.setdefault(folder.rpartition("/")[0], []).append(info.key)
                if not old_enough(info.modified):
                    recent.add(info.key)
        found = (k for ckpt, keys in objects.items() for k in self._unreferenced(client, ckpt, keys, manifests.get(ckpt, [])))
        doomed = sorted(k for k in found if k not in recent)
        if not dry_run:
            client.delete_many(doomed)
        removed = [f"s3://{client.bucket}/{k}" for k in doomed]
        for key, upload, began in list(client.uploads(start)):
            # A writer still uploading adds parts: its newest part dates it (it may have begun long ago). An upload
            # with no part yet holds no bytes: kept under min_age_s (a writer about to send its first), aborted by a gc without it.
            if _is_data_object(key) and old_enough(began) and (min_age_s <= 0 or old_enough(client.last_part_time(key, upload))):
                if not dry_run:
                    client.abort_upload(key, upload)
                removed.append(f"s3://{client.bucket}/{key} (upload {upload})")
        return sorted(removed)

    def _unreferenced(self, client: S3Client, ckpt: str, keys: list[str], manifests: list[str]) -> list[str]:
        """The data objects ``keys`` of checkpoint ``ckpt`` that none of its ``manifests`` names."""
        if manifests == [MANIFEST] and len({_save_of(k) for k in keys}) == 1:
            # One save's objects beside its MANIFEST (which names only its own save's): the steady state, decided without reading it.
            return []
        keep: set[str] = set()
        for name in manifests:
            files = self._referenced_or_none(client, ckpt, name)
            if files is None:  # cannot tell what it references: keep everything of that checkpoint
                return []
            keep.update(self._join(ckpt, f) for f in files)
        return [k for k in keys if k not in keep]

    def _referenced_or_none(self, client: S3Client, prefix: str, manifest: str) -> list[str] | None:
        """:meth:`_referenced`, or None (logged) when that MANIFEST is over the size limit or does not decode."""
        try:
            return self._referenced(client, prefix, manifest)
        except (ManifestError, UnsafeFileError) as e:
            log.warning("s3://%s/%s/%s cannot be read (%s); keeping every object of that checkpoint", client.bucket, prefix, manifest, e)
            return None

    def _referenced(self, client: S3Client, prefix: str, manifest: str) -> list[str]:
        """The objects a MANIFEST of checkpoint ``prefix`` references: data objects, and a version-2 one's
        fragments (named by its index; no fragment is read) ([] if it is gone; unreadable: an error)."""
        from ..fragments import checkpoint_files, read_metadata  # the format modules; imported late, only the S3 commit and gc need them

        key = self._join(prefix, manifest)
        info = client.head(key)
        if info is None:
            return []
        if info.size > MAX_READ_BYTES:
            raise UnsafeFileError(errno.EFBIG, f"s3://{client.bucket}/{key} is {info.size} bytes, more than the {MAX_READ_BYTES} a reader accepts")
        data = bytes(client.get_range(key, 0, info.size)) if info.size else b""
        return list(checkpoint_files(read_metadata(data, f"s3://{client.bucket}/{key}")))

    def _delete_quietly(self, client: S3Client, keys: list[str], what: str) -> None:
        """Delete after a commit: a failure leaves garbage (collect_garbage removes it), never fails the committed save."""
        try:
            client.delete_many(keys)
        except StorageError as e:
            log.warning("deleting %s failed (garbage now; collect_garbage removes it): %s", what, e)

    # -- reading, listing ----------------------------------------------------------------

    def open_read(self, path: str) -> ReadHandle:
        client, key = self._where(path)
        return S3ReadHandle(client, key)

    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        client, key = self._where(path)
        info = client.head(key)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, f"no object s3://{client.bucket}/{key}")
        if info.size > max_bytes:
            raise UnsafeFileError(errno.EFBIG, f"s3://{client.bucket}/{key} is {info.size} bytes, more than the {max_bytes} a reader accepts")
        # Exactly the size the HEAD gave: an object replaced by a longer one meanwhile is not followed.
        return bytes(client.get_range(key, 0, info.size)) if info.size else b""

    def makedirs(self, path: str) -> None:
        # No directories on S3; checking the bucket here fails a manager at construction, not at its first save.
        client, _ = self._where(path)
        client.call("HeadBucket", None, lambda: client.raw.head_bucket(Bucket=client.bucket))

    def remove_tree(self, path: str) -> None:
        client, prefix = self._where(path)
        start = self._join(prefix, "") if prefix else ""
        for key, upload in list(client.list_uploads(start)):
            client.abort_upload(key, upload)
        client.delete_many(o.key for o in client.list(start))

    def exists(self, path: str) -> bool:
        client, key = self._where(path)
        if not key:
            return True  # the bucket itself: its absence surfaces on the first request
        return client.head(key) is not None or bool(self._list_level(client, key, limit=1))

    def listdir(self, path: str) -> list[str]:
        """Names one level below ``path``, as if ``/`` separated directories.

        Raises:
            FileNotFoundError: nothing is stored below ``path`` (an empty bucket lists as empty).
        """
        client, key = self._where(path)
        names = self._list_level(client, key)
        if not names and key:
            raise FileNotFoundError(errno.ENOENT, f"nothing stored under s3://{client.bucket}/{key}")
        return sorted(names)

    def entry_usage(self, path: str) -> dict[str, Usage]:
        """One paginated LIST of ``path``: each first-level name's summed object sizes and newest ``LastModified``."""
        client, key = self._where(path)
        start = self._join(key, "") if key else ""
        out: dict[str, Usage] = {}
        for info in client.list(start):
            name = info.key[len(start) :].split("/", 1)[0]
            seen = out.get(name, Usage(0, 0.0))
            out[name] = Usage(seen.nbytes + info.size, max(seen.mtime, info.modified or 0.0))
        return out

    def _list_level(self, client: S3Client, key: str, limit: int | None = None) -> list[str]:
        start = self._join(key, "") if key else ""
        names: list[str] = []
        token: dict[str, str] = {}
        while True:
            call = functools.partial(client.raw.list_objects_v2, Bucket=client.bucket, Prefix=start, Delimiter="/", MaxKeys=limit or 1000, **token)
            page = client.call("ListObjectsV2", start, call)
            names += [str(p["Prefix"])[len(start) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            names += [str(o["Key"])[len(start) :] for o in page.get("Contents", [])]
            if (limit and names) or not page.get("IsTruncated"):
                return names
            token = {"ContinuationToken": str(page["NextContinuationToken"])}

    def version(self, path: str) -> tuple[int, ...]:
        client, key = self._where(path)
        resp = client.call("HeadObject", key, lambda: client.raw.head_object(Bucket=client.bucket, Key=key))
        modified: datetime = resp["LastModified"]
        etag = "".join(c for c in str(resp["ETag"]) if c in "0123456789abcdef")
        return (int(modified.timestamp() * 1e9), int(etag or "0", 16), int(resp["ContentLength"]))
