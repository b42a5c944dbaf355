"""Multipart upload of one S3 object, several parts in flight, bounded memory.

A checkpoint's data object is written through :meth:`S3Client.open_writer
<dist_ckpt.storage.s3_client.S3Client.open_writer>`; this module holds the
writer so that the client module stays about requests.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn

from ..errors import StorageError
from .s3_client import MAX_PARTS, MIN_PART_SIZE, S3Client, _status, multipart_etag


class MultipartWriter:
    """One object written as a multipart upload, parts uploaded in parallel.

    Call order (one thread): ``write`` any number of times, then either
    ``complete`` (the object appears, whole) or ``abort`` / ``close`` (no
    object appears; the parts are dropped). A failed part upload is raised by
    the next ``write`` or by ``complete``, after aborting.

    Memory: at most ``max_in_flight`` parts upload while one more fills, so
    the writer holds at most ``(max_in_flight + 1) * part_size`` bytes. An
    object smaller than one part is written with one plain PUT instead.

    Args:
        client: the S3Client of the bucket.
        key: the object key.
        part_size: bytes per part (≥ 5 MiB).
        max_in_flight: parts uploading at once (≥ 1).

    Raises:
        ValueError: a part size or concurrency out of range.
    """

    def __init__(self, client: S3Client, key: str, part_size: int, max_in_flight: int) -> None:
        if part_size < MIN_PART_SIZE or max_in_flight < 1:
            raise ValueError(f"{client._where(key)}: part_size {part_size} (>= {MIN_PART_SIZE}) and max_in_flight {max_in_flight} (>= 1) out of range")
        self._client, self.key = client, key
        self.part_size, self.max_in_flight = part_size, max_in_flight
        self._upload_id: str | None = None
        self._parts: list[Future[str]] = []
        self._slots = threading.Semaphore(max_in_flight)
        self._spare: list[bytearray] = []  # buffers whose upload finished, reused
        self._spare_lock = threading.Lock()
        self._buf, self._fill = bytearray(part_size), 0
        self._pool: ThreadPoolExecutor | None = None
        self.size = 0  # bytes written so far
        self.done = False  # completed or aborted

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes; full parts start uploading, blocking while ``max_in_flight`` are busy.

        Args:
            data: the bytes to append (copied; the caller may reuse its buffer).

        Raises:
            StorageError: an earlier part failed (the upload is aborted), or
                the writer is already completed or aborted.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self.part_size - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            self.size += n
            view = view[n:]
            if self._fill == self.part_size:
                self._submit_full_part()

    def _check_open(self) -> None:
        if self.done:
            raise StorageError(f"{self._client._where(self.key)}: multipart writer already completed or aborted")
        failed = next((f for f in self._parts if f.done() and f.exception() is not None), None)
        if failed is not None:
            self._fail(failed.exception())

    def _fail(self, cause: BaseException | None) -> NoReturn:
        """Abort the upload and raise ``cause`` (a part's error) as the writer's error."""
        where = self._client._where(self.key)
        try:
            self.abort()
        except StorageError as e:
            # The part's error stays the one raised; the leftover parts are
            # named so that gc (list_uploads / abort_upload) can find them.
            raise StorageError(f"multipart upload of {where} failed: {cause}; aborting upload {self._upload_id} failed too: {e}") from cause
        if isinstance(cause, StorageError):
            raise cause
        raise StorageError(f"multipart upload of {where} failed: {cause!r}") from cause

    def _submit_full_part(self) -> None:
        if len(self._parts) >= MAX_PARTS:
            self._fail(StorageError(f"{self._client._where(self.key)}: over {MAX_PARTS} parts; raise part_size above {self.part_size}"))
        if self._upload_id is None:
            self._upload_id = str(
                self._client.call(
                    "CreateMultipartUpload", self.key, lambda: self._client.raw.create_multipart_upload(Bucket=self._client.bucket, Key=self.key)
                )["UploadId"]
            )
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="s3-part")
        self._slots.acquire()  # the bound on memory and on requests in flight
        assert self._pool is not None
        buf, number = self._buf, len(self._parts) + 1
        self._parts.append(self._pool.submit(self._upload_part, number, buf, self._fill))
        with self._spare_lock:
            self._buf = self._spare.pop() if self._spare else bytearray(self.part_size)
        self._fill = 0

    def _upload_part(self, number: int, buf: bytearray, n: int) -> str:
        try:
            body = buf if n == len(buf) else bytes(buf[:n])  # botocore takes bytearray, not memoryview
            resp = self._client.call(
                f"UploadPart({number})",
                self.key,
                lambda: self._client.raw.upload_part(Bucket=self._client.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body),
            )
            return str(resp["ETag"])
        finally:
            with self._spare_lock:
                self._spare.append(buf)
            self._slots.release()

    def complete(self) -> str:
        """Upload what is left, wait for every part, and make the object appear.

        Returns:
            The object's ETag.

        Raises:
            StorageError: a part or the completion failed; the upload is aborted.
        """
        self._check_open()
        if self._upload_id is None:  # smaller than one part: one PUT
            etag = self._client.put(self.key, bytes(self._buf[: self._fill]))
            self._finish()
            return etag
        if self._fill:
            self._submit_full_part()
        try:
            etags = [f.result() for f in self._parts]
        except BaseException as e:  # noqa: BLE001 - re-raised by _fail after aborting
            self._fail(e)
        return self._complete_upload(etags)

    def _complete_upload(self, etags: list[str]) -> str:
        expected = multipart_etag(etags)
        parts = {"Parts": [{"PartNumber": i + 1, "ETag": t} for i, t in enumerate(etags)]}

        def already_done(e: BaseException) -> str | None:
            # A completion whose answer was lost was applied: the retry finds
            # the upload gone, and the object there has our parts' ETag.
            if _status(e)[1] != "NoSuchUpload":
                return None
            info = self._client.head(self.key)
            return info.etag if info is not None and info.etag == expected else None

        try:
            resp = self._client.call(
                "CompleteMultipartUpload",
                self.key,
                lambda: self._client.raw.complete_multipart_upload(Bucket=self._client.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload=parts),
                on_retry_error=already_done,
            )
        except StorageError as e:
            self._fail(e)
        self._finish()
        return str(resp["ETag"]) if isinstance(resp, dict) else resp

    def _finish(self) -> None:
        self.done = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._buf, self._spare = bytearray(), []

    def abort(self) -> None:
        """Drop the upload: wait for parts in flight, then abort it (idempotent).

        Raises:
            StorageError: the abort request failed (after retries); the parts
                stay until ``list_uploads``/``abort_upload`` (gc) removes them.
        """
        if self.done:
            return
        self._finish()
        if self._upload_id is not None:
            self._client.abort_upload(self.key, self._upload_id)

    def close(self) -> None:
        """Abort unless completed (so a writer left by an exception leaves no object)."""
        self.abort()

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
