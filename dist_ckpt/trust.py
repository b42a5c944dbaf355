"""Where a session's secret comes from: the launcher's environment or a 0600 key file.

The launcher's store (torchrun's TCPStore) is unauthenticated and listens
on every interface, so it only ever carries public material: the
coordinator's endpoint and the session's job id. The secret, from which the
wire MAC key and every CURVE key derive (:mod:`dist_ckpt.transport`), reaches
the ranks one of two ways, checked in this order:

1. ``DIST_CKPT_SECRET`` (at least 16 bytes), set by the launcher for every
   rank (e.g. ``export DIST_CKPT_SECRET=$(openssl rand -hex 32)`` before
   ``srun``). Each session's secret is ``HMAC(DIST_CKPT_SECRET, job id)``,
   so sessions never share keys. No file is written.
2. Otherwise rank 0 draws 32 random bytes and writes them to
   ``<key dir>/<job id>.key``: mode 0600 in a 0700 directory owned by the
   job's user, created exclusively, never through a symlink. The key dir is
   ``DIST_CKPT_KEY_DIR``, else ``$XDG_CACHE_HOME/dist_ckpt/keys`` (default
   ``~/.cache/dist_ckpt/keys``): on one node that is always shared, and on a
   cluster home directories usually are; otherwise point it at any directory
   every node of the job mounts. Other ranks open it without following
   links and refuse it unless it is a regular file of their own user with no
   group or other permissions. Rank 0 deletes it once every rank has
   authenticated (or at close); files of sessions that died before that are
   swept after a day.

A one-rank session needs neither: its secret never leaves the process.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import stat
import time

from .errors import SecretError

log = logging.getLogger(__name__)

__all__ = ["ENV_SECRET", "ENV_KEY_DIR", "KEY_BYTES", "env_secret", "key_dir", "valid_job_id", "write_key_file", "read_key_file", "remove_key_file"]

ENV_SECRET = "DIST_CKPT_SECRET"
ENV_KEY_DIR = "DIST_CKPT_KEY_DIR"
KEY_BYTES = 32
_JOB = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: also what makes a key file name safe
_STALE_S = 24 * 3600.0


def valid_job_id(job: str) -> bool:
    """Whether ``job`` (read from the untrusted store) is a session id: 32 hex digits."""
    return _JOB.fullmatch(job) is not None


def env_secret(job: str) -> bytes | None:
    """This session's secret derived from ``DIST_CKPT_SECRET``, or None when it is unset.

    Raises:
        SecretError: the variable is set but shorter than 16 bytes.
    """
    value = os.environ.get(ENV_SECRET)
    if not value:
        return None
    if len(value.encode()) < 16:
        raise SecretError(f"{ENV_SECRET} must hold at least 16 bytes (e.g. 64 hex digits), got {len(value.encode())}")
    return hmac.new(value.encode(), b"dist_ckpt/session/" + job.encode(), hashlib.sha256).digest()


def key_dir() -> str:
    """The directory of key files: ``DIST_CKPT_KEY_DIR`` or ``$XDG_CACHE_HOME/dist_ckpt/keys``."""
    if os.environ.get(ENV_KEY_DIR):
        return os.environ[ENV_KEY_DIR]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dist_ckpt", "keys")


def _check_owned(st: os.stat_result, what: str, forbidden: int) -> None:
    if st.st_uid != os.geteuid():
        raise SecretError(f"{what} belongs to uid {st.st_uid}, not to this job's user ({os.geteuid()}); refusing to trust it")
    if st.st_mode & forbidden:
        raise SecretError(
            f"{what} has mode {stat.filemode(st.st_mode)}; it must not be {'readable or writable' if forbidden == 0o077 else 'writable'} by group or others"
        )


def _safe_dir(directory: str) -> None:
    """Create ``directory`` (0700) if needed; refuse it if others could swap files in it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise SecretError(f"key dir {directory} is not a directory")
    _check_owned(st, f"key dir {directory}", 0o022)


def write_key_file(directory: str, job: str, secret: bytes) -> str:
    """(rank 0) Write ``secret`` to ``<directory>/<job>.key`` (0600, exclusive, no symlinks).

    Returns:
        The file's path.

    Raises:
        SecretError: the directory is not safe, or the file cannot be created.
    """
    assert valid_job_id(job) and len(secret) == KEY_BYTES
    try:
        _safe_dir(directory)
        _sweep_stale(directory)
        path = os.path.join(directory, f"{job}.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # No fsync: the key is transient (durability is moot) and close() is
            # what makes it visible to other NFS clients; fsync on a busy disk took seconds.
            os.write(fd, secret.hex().encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise SecretError(
            f"cannot write the session key file in {directory}: {e} (set {ENV_KEY_DIR} to a private directory all ranks share, or {ENV_SECRET})"
        ) from e
    return path


def read_key_file(directory: str, job: str, timeout_s: float) -> bytes:
    """(ranks > 0) Read the session secret rank 0 wrote; waits up to ``timeout_s`` for it to appear.

    Raises:
        SecretError: no such file in time (the directory is not shared?), or it is
            not a regular 0600 file of this user holding a key.
    """
    path = os.path.join(directory, f"{job}.key")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _read_checked(path)
        except FileNotFoundError:  # a shared filesystem may show it late (NFS attribute caches)
            if time.monotonic() >= deadline:
                raise SecretError(
                    f"no session key file {path} after {timeout_s:.0f} s: rank 0 writes it there; set {ENV_KEY_DIR} to a directory every node of the job shares, or give every rank {ENV_SECRET}"
                ) from None
            time.sleep(0.1)


def _read_checked(path: str) -> bytes:
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the rank; O_NOFOLLOW: no symlinks.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(path) from e
        raise SecretError(f"cannot open session key file {path}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"session key file {path} is not a regular file")
        _check_owned(st, f"session key file {path}", 0o077)
        data = os.read(fd, 2 * KEY_BYTES + 1)
    finally:
        os.close(fd)
    try:
        if len(data) != 2 * KEY_BYTES:
            raise ValueError(f"{len(data)} bytes")
        return bytes.fromhex(data.decode("ascii"))
    except ValueError as e:
        raise SecretError(f"session key file {path} does not hold a key ({e})") from e


def remove_key_file(path: str) -> None:
    """Delete a key file (idempotent); a failure is logged, the file is then swept later."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove session key file %s: %s (it is swept after a day)", path, e)


def _sweep_stale(directory: str) -> None:
    """Remove key files older than a day: sessions whose rank 0 died before every rank connected."""
    now = time.time()
    for name in os.listdir(directory):
        if name.endswith(".key") and valid_job_id(name[:-4]):
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
                if st.st_uid == os.geteuid() and now - st.st_mtime > _STALE_S:
                    os.unlink(path)
            except OSError:
                pass  # another job's rank 0 swept it first
