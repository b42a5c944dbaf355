"""A thin S3 client for checkpoints: multipart writes, conditional puts, ranged reads.

Built on boto3/botocore (chosen by measurement: ``benchmarks/README.md``,
"S3 client libraries"). Credentials, region and endpoint come from the
standard AWS chain that botocore already implements (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` and the config files, instance roles),
so an S3-compatible store (MinIO, Ceph RGW, R2) needs no code.

What this module adds over the bare client, and why:

- **Bounded retries of its own** (botocore's are turned off): 5xx, 429,
  throttling and dropped connections are retried with jittered exponential
  backoff, up to :class:`RetryPolicy` ``attempts``; then a
  :class:`~dist_ckpt.errors.StorageError` names the operation, bucket and key.
  Owning the loop lets a conditional put that was retried after an ambiguous
  failure recognise its own earlier success (see :meth:`S3Client.put_if_absent`).
- **Create-only and compare-and-swap puts** (``If-None-Match: *`` and
  ``If-Match: <etag>``), the commit primitives of a checkpoint without rename.
- **A multipart writer with bounded memory** (:mod:`.s3_multipart`):
  ``max_in_flight`` parts upload at once; ``write`` blocks while they are all
  busy; a writer that is closed or fails without ``complete`` aborts its
  upload, so no object appears.

Nothing here knows the checkpoint layout; it imports only
:mod:`dist_ckpt.errors`.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import DataFileError, DistCkptError, StorageError

try:
    import boto3
    import botocore.config
    import botocore.exceptions as bexc
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("s3:// paths need boto3: pip install 'dist-ckpt[s3]'") from e

if TYPE_CHECKING:
    from .s3_multipart import MultipartWriter

T = TypeVar("T")

MIN_PART_SIZE = 5 << 20  # S3's smallest part (all but the last)
MAX_PARTS = 10_000  # S3's most parts in one upload
DELETE_BATCH = 1000  # S3's most keys in one DeleteObjects
# A ranged read lands in pieces so that a connection dropped mid-body keeps
# what arrived (one big readinto keeps nothing when it fails).
READ_PIECE = 1 << 20
# Error codes S3 (and compatible stores) send for "slow down / try again".
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        # S3's answer to two conditional writes of one key at once: try again
        "ConditionalRequestConflict",
    }
)
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


class ObjectExists(StorageError, FileExistsError):
    """A create-only put found the object already there."""


class ObjectChanged(StorageError):
    """A conditional replace found another ETag (or no object) at the key."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or the bucket) does not exist."""


@dataclass(frozen=True)
class S3Url:
    """A parsed ``s3://bucket/prefix`` URL; ``prefix`` has no leading or trailing ``/``."""

    bucket: str
    prefix: str

    def key(self, name: str) -> str:
        """The object key of ``name`` under this prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_s3_url(url: str) -> S3Url:
    """Split ``s3://bucket[/prefix]`` into bucket and prefix.

    Args:
        url: the URL; repeated and trailing slashes in the prefix are dropped.

    Returns:
        The bucket and the normalised prefix.

    Raises:
        ValueError: not an ``s3://`` URL, no bucket, or a ``.``/``..`` part in
            the prefix (keys must not be ambiguous about where they live).
    """
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, rest = url[len("s3://") :].partition("/")
    parts = [p for p in rest.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts):
        raise ValueError(f"bad s3:// URL {url!r}: needs s3://bucket/prefix without '.' or '..' parts")
    return S3Url(bucket, "/".join(parts))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is retried.

    Args:
        attempts: tries in all (1 = no retry).
        base_delay: seconds before the first retry; doubles each time.
        max_delay: the longest pause between two tries.
    """

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError(f"bad RetryPolicy: {self}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): full jitter."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD or LIST says about one object."""

    key: str
    size: int
    etag: str
    modified: float | None = None  # LastModified (Unix seconds) where a LIST gave it


def _status(e: BaseException | None) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a botocore error; (0, "") for others."""
    if isinstance(e, bexc.ClientError):
        return (int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0), str(e.response.get("Error", {}).get("Code", "")))
    return 0, ""


def is_retryable(e: BaseException) -> bool:
    """Whether a request that raised ``e`` may succeed if sent again.

    Args:
        e: the exception the client raised.

    Returns:
        True for 5xx, 429, throttling codes and dropped or timed-out connections.
    """
    status, code = _status(e)
    if status:
        return status >= 500 or status == 429 or code in _RETRY_CODES
    return isinstance(e, (bexc.HTTPClientError, bexc.ConnectionError, bexc.IncompleteReadError, ConnectionError, TimeoutError))


def _md5_etag(data: bytes | bytearray | memoryview) -> str:
    """The ETag S3 gives a single-PUT object without KMS encryption."""
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives a completed multipart upload of these parts.

    Args:
        part_etags: each part's ETag, in part order.

    Returns:
        ``"<md5 of the parts' md5s>-<count>"``, quoted.
    """
    digest = hashlib.md5(b"".join(bytes.fromhex(t.strip('"')) for t in part_etags), usedforsecurity=False)
    return f'"{digest.hexdigest()}-{len(part_etags)}"'


class S3Client:
    """One bucket of an S3 (or S3-compatible) store.

    Thread-safe: botocore clients may be shared between threads; the
    connection pool holds ``max_connections``.

    Args:
        bucket: the bucket every key refers to.
        endpoint_url: overrides ``AWS_ENDPOINT_URL`` (None: the AWS chain).
        region: overrides ``AWS_REGION`` (None: the AWS chain).
        profile: an AWS profile name (None: ``AWS_PROFILE`` or the default).
        retry: the retry policy of every request.
        max_connections: HTTP connections kept open (≥ parts in flight).
        timeout: seconds to connect, and to wait for each read.

    Raises:
        StorageError: the AWS configuration is invalid (e.g. an unknown profile).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 32,
        timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.retry = retry
        config = botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # our loop retries: is_retryable
            max_pool_connections=max_connections,
            connect_timeout=timeout,
            read_timeout=timeout,
        )
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
            self._s3 = session.client("s3", endpoint_url=endpoint_url, config=config)
        except bexc.BotoCoreError as e:
            raise StorageError(f"s3://{bucket}: cannot configure the S3 client: {e}") from e

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"

    def call(self, op: str, key: str | None, fn: Callable[[], T], on_retry_error: Callable[[BaseException], T | None] | None = None) -> T:
        """Run one request with bounded retries, turning errors into StorageError.

        Args:
            op: the operation's name, for messages (``"PutObject"`` …).
            key: the key it concerns, for messages (None: the bucket).
            fn: sends the request once.
            on_retry_error: given a non-retryable error raised by a *retry*
                (when an earlier try may have been applied), returns the
                result to use instead, or None to fail as usual.

        Returns:
            What ``fn`` returned.

        Raises:
            ObjectNotFound: the key or bucket does not exist.
            StorageError: a non-retryable error, or ``attempts`` tries failed.
        """
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except DistCkptError:
                raise  # already typed and named (e.g. a short read)
            except Exception as e:
                if attempt > 1 and on_retry_error is not None and not is_retryable(e):
                    result = on_retry_error(e)
                    if result is not None:
                        return result
                if not is_retryable(e) or attempt == self.retry.attempts:
                    raise self._error(op, key, e, attempt) from e
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _error(self, op: str, key: str | None, e: BaseException, attempts: int) -> StorageError:
        status, code = _status(e)
        tries = f" after {attempts} tries" if attempts > 1 else ""
        msg = f"{op} {self._where(key)} failed{tries}: {type(e).__name__}: {e}"
        if code in _NOT_FOUND or code == "NoSuchBucket" or (status == 404 and op == "HeadObject"):
            return ObjectNotFound(msg)
        return StorageError(msg)

    def put(self, key: str, data: bytes | bytearray) -> str:
        """Write a whole object in one PUT, replacing any object at the key.

        Args:
            key: the object key.
            data: its bytes.

        Returns:
            The new object's ETag.

        Raises:
            StorageError: the put failed (after retries).
        """
        resp = self.call("PutObject", key, lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=data))
        return str(resp["ETag"])

    def _put_conditional(self, op: str, key: str, data: bytes | bytearray, **cond: str) -> str:
        """A PUT with a precondition; a retry that finds our own bytes there succeeds."""
        mine = _md5_etag(data)

        def already_mine(e: BaseException) -> str | None:
            # A try whose answer was lost may have been applied; S3 then
            # refuses the retry's precondition. The object's ETag being the
            # MD5 of our bytes says the write was ours (callers make their
            # bytes unique, e.g. a MANIFEST carries its save's id).
            if _status(e)[1] != "PreconditionFailed":
                return None
            info = self.head(key)
            return info.etag if info is not None and info.etag == mine else None

        resp = self.call(op, key, lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, **cond), on_retry_error=already_mine)
        return str(resp["ETag"]) if isinstance(resp, dict) else resp

    def put_if_absent(self, key: str, data: bytes | bytearray) -> str:
        """Create an object only if none exists at the key (``If-None-Match: *``).

        Args:
            key: the object key.
            data: its bytes; make them unique to this writer (see the module doc).

        Returns:
            The new object's ETag.

        Raises:
            ObjectExists: an object is already at the key (another writer won).
            StorageError: the put failed (after retries).
        """
        try:
            return self._put_conditional("PutObject(If-None-Match)", key, data, IfNoneMatch="*")
        except StorageError as e:
            if _status(e.__cause__)[1] == "PreconditionFailed":
                raise ObjectExists(f"s3://{self.bucket}/{key} already exists (create-only put refused)") from e
            raise

    def replace_if_match(self, key: str, data: bytes | bytearray, etag: str) -> str:
        """Replace an object only if its ETag is still ``etag`` (``If-Match``).

        Args:
            key: the object key.
            data: the new bytes; unique to this writer (see the module doc).
            etag: the ETag of the object being replaced, as :meth:`head` gave it.

        Returns:
            The new object's ETag.

        Raises:
            ObjectChanged: the object at the key has another ETag, or is gone.
            StorageError: the put failed (after retries).
        """
        try:
            return self._put_conditional("PutObject(If-Match)", key, data, IfMatch=etag)
        except StorageError as e:
            if isinstance(e, ObjectNotFound) or _status(e.__cause__)[1] == "PreconditionFailed":
                raise ObjectChanged(f"s3://{self.bucket}/{key} is no longer ETag {etag} (replace refused)") from e
            raise

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of an object.

        Args:
            key: the object key.

        Returns:
            Its ObjectInfo, or None when there is no object at the key (a
            HEAD answer has no body, so a missing bucket reads the same).

        Raises:
            StorageError: the request failed (after retries), or the bucket is missing.
        """
        try:
            resp = self.call("HeadObject", key, lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp["ETag"]))

    def get(self, key: str, max_size: int) -> bytes:
        """Read a whole (small) object, refusing one larger than ``max_size``.

        Args:
            key: the object key.
            max_size: the largest size accepted, checked before reading the body.

        Returns:
            The object's bytes.

        Raises:
            ObjectNotFound: no object at the key.
            DataFileError: the object is over ``max_size``.
            StorageError: the request failed (after retries).
        """

        def once() -> bytes:
            resp = self._s3.get_object(Bucket=self.bucket, Key=key)
            size = int(resp["ContentLength"])
            if size > max_size:
                resp["Body"].close()
                raise DataFileError(f"{self._where(key)} is {size} bytes, over the limit of {max_size}")
            return bytes(resp["Body"].read())

        return self.call("GetObject", key, once)

    def get_range(self, key: str, start: int, length: int, out: memoryview | bytearray | None = None) -> memoryview:
        """Read ``length`` bytes at ``start`` of an object, into ``out`` if given.

        A connection dropped mid-body is resumed from the first missing byte.

        Args:
            key: the object key.
            start: the first byte.
            length: how many bytes (> 0).
            out: a writable buffer of at least ``length`` bytes (None: a new one).

        Returns:
            A memoryview of the ``length`` bytes read (into ``out`` when given).

        Raises:
            ValueError: ``length`` is not positive or ``out`` is too small.
            ObjectNotFound: no object at the key.
            DataFileError: the object ends before ``start + length``.
            StorageError: the request failed (after retries).
        """
        if length <= 0 or start < 0:
            raise ValueError(f"bad range of {self._where(key)}: start={start}, length={length}")
        view = memoryview(out if out is not None else bytearray(length)).cast("B")
        if len(view) < length:
            raise ValueError(f"buffer of {len(view)} bytes for a {length}-byte range of {self._where(key)}")
        view = view[:length]
        done = [0]  # bytes already in `view`, kept across retries

        def once() -> memoryview:
            first = start + done[0]
            resp = self._s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={first}-{start + length - 1}")
            body = resp["Body"]
            with body:
                while done[0] < length:
                    n = body.readinto(view[done[0] : done[0] + READ_PIECE])
                    if n == 0:
                        raise DataFileError(f"{self._where(key)} ends at {start + done[0]}, before the end of range {start}+{length}")
                    done[0] += n
            return view

        try:
            return self.call("GetObject(Range)", key, once)
        except StorageError as e:
            if _status(e.__cause__)[1] == "InvalidRange":
                raise DataFileError(f"{self._where(key)} is shorter than range {start}+{length}") from e
            raise

    def list(self, prefix: str, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, page by page.

        Args:
            prefix: the start of the keys (not necessarily ending in ``/``).
            page_size: keys asked for per LIST request (≤ 1000).

        Yields:
            Each object's ObjectInfo.

        Raises:
            StorageError: a LIST request failed (after retries), or the bucket is missing.
        """
        token: dict[str, str] = {}
        while True:
            page = self.call(
                "ListObjectsV2", prefix, functools.partial(self._s3.list_objects_v2, Bucket=self.bucket, Prefix=prefix, MaxKeys=page_size, **token)
            )
            for item in page.get("Contents", []):
                modified = item.get("LastModified")
                yield ObjectInfo(str(item["Key"]), int(item["Size"]), str(item["ETag"]), modified.timestamp() if modified is not None else None)
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": str(page["NextContinuationToken"])}

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete objects, up to 1000 per request; keys already gone are fine.

        Args:
            keys: the object keys.

        Raises:
            StorageError: a request failed (after retries), or the store
                refused some keys (each named with its error code).
        """
        batch: builtins.list[str] = []  # `list` is a method of this class
        for key in keys:
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: Sequence[str]) -> None:
        request = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        resp = self.call("DeleteObjects", keys[0], lambda: self._s3.delete_objects(Bucket=self.bucket, Delete=request))
        errors = resp.get("Errors") or []
        if errors:
            listed = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:10])
            raise StorageError(f"DeleteObjects in {self._where(None)} refused {len(errors)} keys: {listed}")

    def list_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Multipart uploads begun and neither completed nor aborted, under ``prefix``.

        A writer killed mid-upload leaves one; its parts are stored (and
        billed) until aborted: garbage collection calls this, then
        :meth:`abort_upload`.

        Args:
            prefix: the start of the keys.

        Yields:
            (key, upload id) of each upload.

        Raises:
            StorageError: a request failed (after retries).
        """
        for key, upload, _ in self.uploads(prefix):
            yield key, upload

    def uploads(self, prefix: str) -> Iterator[tuple[str, str, float | None]]:
        """:meth:`list_uploads` with when each upload began.

        Yields:
            (key, upload id, Initiated as Unix seconds, None if not given) of each upload.

        Raises:
            StorageError: a request failed (after retries).
        """
        marker: dict[str, str] = {}
        while True:
            page = self.call("ListMultipartUploads", prefix, functools.partial(self._s3.list_multipart_uploads, Bucket=self.bucket, Prefix=prefix, **marker))
            for up in page.get("Uploads", []):
                began = up.get("Initiated")
                yield str(up["Key"]), str(up["UploadId"]), began.timestamp() if began is not None else None
            if not page.get("IsTruncated"):
                return
            marker = {"KeyMarker": str(page["NextKeyMarker"]), "UploadIdMarker": str(page["NextUploadIdMarker"])}

    def last_part_time(self, key: str, upload_id: str) -> float | None:
        """When the newest part of an unfinished upload was stored (Unix seconds; None: no part yet).

        A writer still uploading adds parts: this says it is alive better than when the upload began.

        Raises:
            StorageError: a request failed (after retries); an upload gone meanwhile reads as None.
        """
        newest: float | None = None
        marker: dict[str, int] = {}
        while True:
            call = functools.partial(self._s3.list_parts, Bucket=self.bucket, Key=key, UploadId=upload_id, **marker)
            try:
                page = self.call("ListParts", key, call)
            except StorageError as e:
                if _status(e.__cause__)[1] == "NoSuchUpload":
                    return newest
                raise
            for part in page.get("Parts", []):
                t = part["LastModified"].timestamp()
                newest = t if newest is None else max(newest, t)
            if not page.get("IsTruncated"):
                return newest
            marker = {"PartNumberMarker": int(page["NextPartNumberMarker"])}

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, dropping its parts; one already gone is fine.

        Args:
            key: the upload's key.
            upload_id: its id.

        Raises:
            StorageError: the request failed (after retries).
        """
        try:
            self.call("AbortMultipartUpload", key, lambda: self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id))
        except StorageError as e:
            if _status(e.__cause__)[1] != "NoSuchUpload":
                raise

    def open_writer(self, key: str, part_size: int = 16 << 20, max_in_flight: int = 4) -> MultipartWriter:
        """A writer that uploads ``key`` in parts, several at once.

        Args:
            key: the object key.
            part_size: bytes per part (≥ 5 MiB, S3's minimum).
            max_in_flight: parts uploading at once.

        Returns:
            The writer; call ``write`` …, then ``complete`` (or ``abort``).

        Raises:
            ValueError: a part size or concurrency out of range.
        """
        from .s3_multipart import MultipartWriter  # it builds on this module

        return MultipartWriter(self, key, part_size, max_in_flight)

    @property
    def raw(self) -> Any:
        """The botocore client (for a request this wrapper does not cover)."""
        return self._s3

    def close(self) -> None:
        """Close the HTTP connections."""
        self._s3.close()
