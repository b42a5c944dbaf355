"""One scan of a checkpoint root: what each entry is, and what this library may remove.

Shared by :class:`~dist_ckpt.manager.CheckpointManager` (stale entries at
start, retention, resume) and the ``dist-ckpt`` command (``ls``, ``gc``), so
that both decide the same way. A root holds, by name::

    step-00000100/              committed (has a MANIFEST)
    step-00000200/              incomplete: no MANIFEST, and only this library's
                                data layout (``data/rNNNNN*.bin``) or nothing at all
    step-00000300/              foreign: no MANIFEST and something else inside (a
                                DCP checkpoint, a user's files): reported, never removed
    step-00000400.tmp-<id>/     a save in flight or crashed, an interrupted delete
    step-00000100.old-<id>/     the old copy during an overwrite's swap
    step-00000500.bad-<id>/     a step the manager could not load and set aside
    step-00000600/MANIFEST.bad-<id>   the same on S3 (no rename: the MANIFEST is set aside in place)

Only the first kind counts as a checkpoint; only ``.tmp-`` / ``.old-`` /
``.bad-`` names and *incomplete* directories are garbage this library could
have left. Other names under the root are not listed unless they hold a
MANIFEST (``dist-ckpt ls`` also shows a checkpoint saved under any name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .layout_names import BAD_MANIFEST_PREFIX, MANIFEST, STEP_RE, step_dir_name  # STEP_RE, step_dir_name: re-exported
from .layout_names import LOOSE_DATA_FILE_RE as _DATA_FILE_RE
from .layout_names import SUFFIX_RE as _SUFFIX_RE
from .storage import Storage

COMMITTED, INCOMPLETE, FOREIGN, TMP, OLD, BAD = "committed", "incomplete", "foreign", "tmp", "old", "bad"


@dataclass(frozen=True)
class Entry:
    """One directory under a root.

    Attributes:
        name: the entry name.
        kind: one of ``committed``, ``incomplete``, ``foreign``, ``tmp``, ``old``, ``bad``.
        step: N of ``step-N`` (also of ``step-N.tmp-*`` etc.), else None.
        detail: for ``foreign``, what was found instead (e.g. "a DCP checkpoint (.metadata)").
    """

    name: str
    kind: str
    step: int | None
    detail: str = ""


def _isdir(storage: Storage, path: str) -> bool:
    # The Storage interface has no isdir; listing tells a directory from a file or nothing.
    try:
        storage.listdir(path)
        return True
    except (NotADirectoryError, FileNotFoundError):
        return False


def _step_of(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def holds_own_layout(storage: Storage, path: str) -> tuple[bool, str]:
    """``(True, "")`` when directory ``path`` holds nothing but this library's data layout.

    That is: nothing at all, or only ``data/`` whose entries are data files
    named as :func:`~dist_ckpt.layout_names.data_file_name` names them. Otherwise
    ``(False, what else is there)``.
    """
    names = storage.listdir(path)
    others = [n for n in names if n != "data"]
    if others:
        what = "a DCP checkpoint (.metadata)" if ".metadata" in others else f"other files ({', '.join(sorted(others)[:3])})"
        return False, what
    if not names:
        return True, ""
    foreign = [n for n in storage.listdir(f"{path}/data") if not _DATA_FILE_RE.match(n)] if _isdir(storage, f"{path}/data") else ["data"]
    return (False, f"other files in data/ ({', '.join(sorted(foreign)[:3])})") if foreign else (True, "")


def classify(storage: Storage, root: str, name: str) -> Entry | None:
    """The entry ``root/name``, or None when it is neither ours nor a step directory."""
    path = f"{root}/{name}"
    if not _isdir(storage, path):
        return None
    m = _SUFFIX_RE.match(name)
    if m:
        return Entry(name, m.group("kind"), _step_of(m.group("base")))
    step = _step_of(name)
    if storage.exists(f"{path}/{MANIFEST}"):
        return Entry(name, COMMITTED, step)
    if any(n.startswith(BAD_MANIFEST_PREFIX) for n in storage.listdir(path)):  # the S3 backend's set_aside keeps the step in place
        return Entry(name, BAD, step)
    ours, what = holds_own_layout(storage, path)
    if ours and (step is not None or _isdir(storage, f"{path}/data")):
        return Entry(name, INCOMPLETE, step)
    return Entry(name, FOREIGN, step, what) if step is not None else None


def scan_root(storage: Storage, root: str) -> list[Entry]:
    """Every entry of ``root`` :func:`classify` knows, by name (missing root: empty)."""
    if not _isdir(storage, root):
        return []
    found = (classify(storage, root, n) for n in storage.listdir(root))
    return [e for e in found if e is not None]


@dataclass(frozen=True)
class RootListing:
    """The step entries of a root, by kind (what the manager decides on).

    Attributes:
        committed: steps whose ``step-N`` directory has a MANIFEST, ascending.
        incomplete: steps whose ``step-N`` directory has no MANIFEST and only our data layout.
        tmp: ``step-N.tmp-*`` entry names (saves in flight or crashed, deletes interrupted).
        old: ``step-N.old-*`` entry names with their step (an overwrite's old copy).
        foreign: ``(name, what is there)`` of ``step-N`` directories this library did not write.
        bad: ``step-N.bad-*`` entry names (set aside by a resume that could not load them).
    """

    committed: tuple[int, ...] = ()
    incomplete: tuple[int, ...] = ()
    tmp: tuple[str, ...] = ()
    old: tuple[tuple[str, int], ...] = ()
    foreign: tuple[tuple[str, str], ...] = ()
    bad: tuple[str, ...] = ()

    @staticmethod
    def of(entries: Iterable[Entry]) -> RootListing:
        """The listing of ``entries`` whose names are step names (others are left out)."""
        steps = [e for e in entries if e.step is not None]
        return RootListing(
            committed=tuple(sorted(e.step for e in steps if e.kind == COMMITTED)),  # type: ignore[misc]
            incomplete=tuple(sorted(e.step for e in steps if e.kind == INCOMPLETE)),  # type: ignore[misc]
            tmp=tuple(e.name for e in steps if e.kind == TMP),
            old=tuple((e.name, e.step) for e in steps if e.kind == OLD),  # type: ignore[misc]
            foreign=tuple((e.name, e.detail) for e in steps if e.kind == FOREIGN),
            bad=tuple(e.name for e in steps if e.kind == BAD),
        )


def scan(storage: Storage, root: str) -> RootListing:
    """The :class:`RootListing` of ``root`` (missing root: empty)."""
    return RootListing.of(scan_root(storage, root))


def stale_entries(listing: RootListing) -> list[str]:
    """Entry names a crashed run left behind that are safe to remove at start.

    - every ``step-N.tmp-*``: no save of this job is in flight yet, and a
      temporary directory is never loaded;
    - ``step-N.old-*`` only when ``step-N`` is committed (otherwise the old copy
      is the complete one, and load falls back to it);
    - an incomplete ``step-N`` (our layout, no MANIFEST) when N is older than the
      newest committed step (a newer one may still be a save of another writer;
      a later save of that step removes it first).

    Foreign directories and ``.bad-*`` ones are never stale: they may be all
    that is left of someone's data.
    """
    committed = set(listing.committed)
    newest = max(committed, default=-1)
    out = list(listing.tmp)
    out += [name for name, step in listing.old if step in committed]
    out += [step_dir_name(s) for s in listing.incomplete if s < newest]
    return sorted(out)
