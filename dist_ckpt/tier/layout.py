"""Where the node-local tier keeps its steps (one directory tree per node; part of the format).

::

    <local_dir>/<job_key>/step-<8 digits>/MANIFEST          the step's global manifest, written last
    <local_dir>/<job_key>/step-<8 digits>/data/r00003.bin   every data file this node holds (its ranks'
                                                            primaries and the replicas it keeps for partners)
    <local_dir>/<job_key>/step-<N>.tmp-<save_id>/...        a local save in flight (or crashed)
    <local_dir>/<job_key>/step-<N>.old-<save_id>/...        a copy being replaced by a re-save of step N
    <local_dir>/<job_key>/step-<N>.tmp-<save_id>/recycled/  (in a save in flight) the data files of the step
                                                            retention removed for it, reused file by file

A node's copy of a step is committed iff its step directory holds a regular
``MANIFEST``: :func:`commit_step` fsyncs the manifest in the tmp directory
and renames the directory, as the POSIX backend does. ``job_key`` separates
jobs (and managers) that share one ``/dev/shm``. Nothing here follows a
symbolic link: the tree is read back at restart and served to peers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat

from ..errors import UnsafeFileError
from ..layout_names import DATA_DIR, DATA_FILE_RE, MANIFEST, OLD, STEP_RE, SUFFIX_RE, TMP, sibling, step_dir_name
from ..storage.local import LocalStorage, fsync_dir

__all__ = [
    "SAVE_ID_RE",
    "job_key",
    "local_root",
    "ensure_local_root",
    "step_dir",
    "tmp_dir",
    "parse_location",
    "check_name",
    "check_save_id",
    "committed_steps",
    "commit_step",
    "remove_step",
    "recycle_step",
    "reuse_file",
    "zero_stale",
    "cut_stale",
    "clear_incomplete",
]

SAVE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
"""A save id that may name a ``.tmp-`` directory (the coordinator's ``<job[:8]>-<seq>``)."""
MAX_STEP = (1 << 63) - 1
RECYCLED = "recycled"
"""In a save's tmp directory: the data files of the step retention removed for it, until each is reused or the save commits."""
_ZEROS = bytes(1 << 20)


def job_key(root: str) -> str:
    """First 16 hex digits of sha256 of the durable root, normalised.

    A plain path is made absolute and normalised (``./ckpt/`` and ``ckpt``
    are one job); a URL keeps its scheme (lower-cased) and drops trailing
    slashes.

    Args:
        root: the manager's durable root (a path or ``scheme://...``).

    Returns:
        16 lower-case hex digits.
    """
    if "://" in root:
        scheme, rest = root.split("://", 1)
        norm = f"{scheme.lower()}://{rest.rstrip('/')}"
    else:
        norm = os.path.normpath(os.path.abspath(root))
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


def local_root(local_dir: str, root: str) -> str:
    """``<local_dir>/<job_key(root)>``: this job's tree in the node-local directory."""
    return f"{local_dir.rstrip('/')}/{job_key(root)}"


def ensure_local_root(local_root: str) -> None:
    """Create ``local_root`` (0700) if needed; refuse it, or its parent, if another user could swap entries in it.

    Each must be a real directory (no link) owned by this user or root, and
    not writable by group or others unless sticky (``/dev/shm`` itself).
    Below it every name is checked and opened without following links, so
    this is what keeps a node-local tree in a shared ``/dev/shm`` private.

    Raises:
        UnsafeFileError: one of them is a link, not a directory, someone else's, or writable by others.
    """
    os.makedirs(local_root, mode=0o700, exist_ok=True)
    for path in (os.path.dirname(os.path.abspath(local_root)), local_root):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafeFileError(errno.ENOTDIR, f"node-local tier directory {path} is a link or not a directory")
        if st.st_uid not in (os.geteuid(), 0) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise UnsafeFileError(
                errno.EPERM, f"node-local tier directory {path} (uid {st.st_uid}, {stat.filemode(st.st_mode)}) could be changed by another user"
            )


def step_dir(local_root: str, step: int) -> str:
    """``<local_root>/step-<8 digits>``.

    Raises:
        ValueError: ``step`` is negative.
    """
    return f"{local_root}/{step_dir_name(step)}"


def tmp_dir(local_root: str, step: int, save_id: str) -> str:
    """``<local_root>/step-N.tmp-<save_id>``: where a local save of step N writes until committed.

    Raises:
        ValueError: ``step`` is negative or ``save_id`` is not a plain token.
    """
    check_save_id(save_id)
    return sibling(step_dir(local_root, step), TMP, save_id)


def parse_location(location: str) -> tuple[int, str]:
    """``(step, save_id)`` of a save target's location ``.../step-N.tmp-<save_id>``.

    The coordinator names the location in its own node's tree; every node
    rebuilds the same save in its own local root from these two values.

    Raises:
        ValueError: the last component is not ``step-N.tmp-<save_id>``.
    """
    base = location.rstrip("/").rpartition("/")[2]
    m = SUFFIX_RE.match(base)
    step = STEP_RE.match(m.group("base")) if m and m.group("kind") == TMP else None
    if m is None or step is None:
        raise ValueError(f"{location!r} is not a local-tier save location (step-N.tmp-<save id>)")
    save_id = base[len(m.group("base")) + len(".tmp-") :]
    check_save_id(save_id)
    return int(step.group(1)), save_id


def check_name(name: object) -> str:
    """``name`` if it is ``MANIFEST`` or a data file name (``data/rNNNNN[-tK].bin``).

    Raises:
        ValueError: anything else (a path, ``..``, another file).
    """
    if not isinstance(name, str) or (name != MANIFEST and not DATA_FILE_RE.match(name)):
        raise ValueError(f"{name!r} is neither {MANIFEST} nor a data file name (data/rNNNNN.bin)")
    return name


def check_save_id(save_id: object) -> str:
    """``save_id`` if it matches :data:`SAVE_ID_RE`.

    Raises:
        ValueError: it does not (it would name another directory).
    """
    if not isinstance(save_id, str) or not SAVE_ID_RE.match(save_id):
        raise ValueError(f"save id {save_id!r} is not 1-80 letters, digits, '_' or '-'")
    return save_id


def committed_steps(local_root: str) -> dict[int, dict[str, int]]:
    """The steps this node holds committed: ``{step: {data file name: size}}``.

    Only regular files count (links and other kinds are ignored, never
    followed); a step directory without a regular ``MANIFEST`` is not
    committed and is left out. A missing ``local_root`` holds nothing.
    """
    try:
        entries = os.listdir(local_root)
    except FileNotFoundError:
        return {}
    steps: dict[int, dict[str, int]] = {}
    for entry in entries:
        m = STEP_RE.match(entry)
        if m is None or not _is_regular(f"{local_root}/{entry}/{MANIFEST}"):
            continue
        steps[int(m.group(1))] = _data_files(f"{local_root}/{entry}")
    return steps


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _data_files(step_path: str) -> dict[str, int]:
    """``{data/<file>: size}`` of the regular data files below ``step_path`` (``data`` itself no link)."""
    data = f"{step_path}/{DATA_DIR}"
    try:
        if not stat.S_ISDIR(os.lstat(data).st_mode):
            return {}
        names = os.listdir(data)
    except OSError:
        return {}
    files = {}
    for n in names:
        name = f"{DATA_DIR}/{n}"
        try:
            st = os.lstat(f"{step_path}/{name}")
        except OSError:  # removed meanwhile
            continue
        if DATA_FILE_RE.match(name) and stat.S_ISREG(st.st_mode):
            files[name] = st.st_size
    return files


def commit_step(local_root: str, step: int, save_id: str) -> None:
    """Commit this node's copy of step ``step`` from ``step-N.tmp-<save_id>`` (its ``MANIFEST`` already written).

    fsyncs the manifest and the directory, then renames it to ``step-N``
    (parent fsync'd). A copy of step N already there (a re-save after a
    restart from an older step) is moved to ``step-N.old-<save_id>`` first
    and removed after: the local tier is a cache, the newest save of a step wins.

    Raises:
        FileNotFoundError: the tmp directory or its ``MANIFEST`` is missing.
        UnsafeFileError-like OSError: the ``MANIFEST`` is not a regular file.
        OSError: a rename or fsync failed (nothing new is committed).
    """
    tmp, final = tmp_dir(local_root, step, save_id), step_dir(local_root, step)
    manifest = f"{tmp}/{MANIFEST}"
    fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{manifest} is not a regular file")
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(f"{tmp}/{RECYCLED}", ignore_errors=True)  # what a recycled step held that this save did not write again
    fsync_dir(tmp)
    old = None
    if os.path.lexists(final):
        old = sibling(final, OLD, save_id)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(local_root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_step(local_root: str, step: int) -> None:
    """Remove this node's copy of ``step``: un-committed first (renamed to a ``.tmp-delete-`` sibling), then deleted.

    A missing step is not an error.

    Raises:
        OSError: it could not be un-committed (it is then still committed).
    """
    LocalStorage().uncommit(step_dir(local_root, step))


def recycle_step(local_root: str, step: int, new_step: int, save_id: str) -> bool:
    """Un-commit ``step`` by making it the tmp directory of save ``save_id`` of ``new_step``, its data files kept for reuse.

    The save then writes each of its files over the removed step's file of
    the same name (:func:`reuse_file`) instead of this node freeing every page
    of the old step and allocating as many again (on tmpfs the two cost about
    as much as writing the bytes). The rename un-commits atomically: a crash
    leaves a ``.tmp-`` directory, cleared at the next start. Nothing is done
    (False) when ``step`` is not a committed directory (a link is never one)
    or the save's tmp directory exists already.

    Returns:
        Whether ``step`` was recycled (else it is untouched).

    Raises:
        OSError: a rename failed; ``step`` is then still committed, or only a tmp directory.
    """
    src, dst = step_dir(local_root, step), tmp_dir(local_root, new_step, save_id)
    if not (_is_dir(src) and _is_dir(f"{src}/{DATA_DIR}") and _is_regular(f"{src}/{MANIFEST}")) or os.path.lexists(dst):
        return False
    os.rename(src, dst)
    os.unlink(f"{dst}/{MANIFEST}")
    os.rename(f"{dst}/{DATA_DIR}", f"{dst}/{RECYCLED}")
    os.mkdir(f"{dst}/{DATA_DIR}")
    return True


def reuse_file(tmp: str, name: str) -> bool:
    """Move data file ``name`` of the step recycled into save directory ``tmp`` (if it held one) to its place there.

    Returns:
        Whether a file was moved: its writer then overwrites it in place (see :func:`zero_stale`).
    """
    if not name.startswith(f"{DATA_DIR}/"):
        return False
    src = f"{tmp}/{RECYCLED}/{name[len(DATA_DIR) + 1 :]}"
    try:
        if not stat.S_ISREG(os.lstat(src).st_mode):
            return False
        os.rename(src, f"{tmp}/{name}")
    except FileNotFoundError:
        return False
    return True


def zero_stale(fd: int, start: int, stop: int, old_size: int) -> None:
    """Zero the bytes ``[start, stop)`` of a reused file that still hold its old content (those below ``old_size``).

    A stream's gap must read as zeros; past the old size it already does.
    """
    stop = min(stop, old_size)
    while start < stop:
        start += os.pwrite(fd, memoryview(_ZEROS)[: min(len(_ZEROS), stop - start)], start)


def cut_stale(fd: int, end: int, old_size: int) -> int:
    """Cut a reused file at ``end``, what its writer wrote, if its old content ran further; returns its size now.

    Called at ``sync``: past ``end`` the file must end, not hold the old step's bytes.
    """
    if old_size > end:
        os.ftruncate(fd, end)
        return end
    return old_size


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def clear_incomplete(local_root: str, keep: str | None = None) -> list[str]:
    """Remove every ``step-N.tmp-*`` / ``step-N.old-*`` entry of ``local_root`` (local saves that crashed or failed).

    Call it only while no local save but save ``keep`` is in flight on this node.

    Args:
        local_root: this node's tree.
        keep: a save id whose ``step-N.tmp-<keep>`` stays (the save being prepared).

    Returns:
        The names removed.
    """
    try:
        entries = os.listdir(local_root)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        m = SUFFIX_RE.match(entry)
        if m and m.group("kind") in (TMP, OLD) and STEP_RE.match(m.group("base")) and entry != f"{m.group('base')}.{TMP}-{keep}":
            path = f"{local_root}/{entry}"
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(entry)
    return removed
