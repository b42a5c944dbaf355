"""How many bytes each entry under a checkpoint root holds, and when it last changed (``dist-ckpt ls`` and ``gc``).

The :class:`~dist_ckpt.storage.Storage` interface reads and writes
checkpoints; it has no sizes or times, which only the command line shows
(and ``gc --min-age`` decides on). This module gets them from where they
are: the local filesystem (a directory's ``mtime``, the sizes of the files
below it, links not followed) or S3 (one paginated LIST of the root, objects
summed per first-level name, the newest ``LastModified``). Other schemes
have no figures (the command shows ``-`` and treats the age as unknown).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .storage import strip_scheme


@dataclass(frozen=True)
class Usage:
    """One entry's bytes (all files or objects below it) and last change (seconds since the epoch)."""

    nbytes: int
    mtime: float


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed while walking
    return total


def _local(root: str) -> dict[str, Usage]:
    out = {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            out[name] = Usage(_dir_size(path), os.stat(path).st_mtime)  # the directory's own mtime: it changes when a save adds files
        except FileNotFoundError:
            pass  # removed meanwhile
    return out


def _s3(root: str) -> dict[str, Usage]:
    from .storage.s3_client import S3Client, parse_s3_url

    url = parse_s3_url(root)
    start = f"{url.prefix}/" if url.prefix else ""
    sizes: dict[str, int] = {}
    times: dict[str, float] = {}
    client = S3Client(url.bucket)
    token: dict[str, str] = {}
    try:
        while True:  # the wrapper's list() yields no LastModified; the raw pages have it (call() retries and types the errors)
            call = functools.partial(client.raw.list_objects_v2, Bucket=url.bucket, Prefix=start, **token)
            page = client.call("ListObjectsV2", start, call)
            for obj in page.get("Contents", []):
                name = str(obj["Key"])[len(start) :].split("/", 1)[0]
                sizes[name] = sizes.get(name, 0) + int(obj["Size"])
                times[name] = max(times.get(name, 0.0), obj["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": str(page["NextContinuationToken"])}
    finally:
        client.close()
    return {name: Usage(sizes[name], times[name]) for name in sizes}


def entry_usage(root: str) -> dict[str, Usage]:
    """Bytes and last change of every entry directly under ``root``, by name.

    Args:
        root: a local directory (plain path or ``file://``) or an ``s3://bucket/prefix``.

    Returns:
        ``{name: Usage}``; empty for a scheme this module does not know.

    Raises:
        OSError: the root cannot be listed (``StorageError`` for S3).
    """
    if root.startswith("s3://"):
        return _s3(root)
    if "://" in root and not root.startswith("file://"):
        return {}
    return _local(strip_scheme(root))
