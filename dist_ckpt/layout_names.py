"""Every name a checkpoint and its root use, in one place (part of the on-disk format).

A checkpoint directory holds ``MANIFEST`` and ``data/rNNNNN.bin`` (or
``data/rNNNNN-tK.bin``, one per writer thread). Beside a checkpoint ``<path>``
the local backend may leave, for a while:

- ``<path>.tmp-<id>``: a save in flight or crashed (``<id>`` is the save id), a
  conversion (``convert-…``) or an interrupted un-commit (``delete-…``);
- ``<path>.old-<id>``: the previous checkpoint during an overwrite's swap;
- ``<path>.bad-<id>``: a step the manager could not load and set aside.

A manager's root holds ``step-<8+ digits>`` checkpoints. The first suffix
decides the kind: ``step-N.old-x.tmp-delete-y`` is an old copy.
See ``docs/format.md``.
"""

from __future__ import annotations

import re
import uuid

MANIFEST = "MANIFEST"
DATA_DIR = "data"
TMP, OLD, BAD = "tmp", "old", "bad"

STEP_RE = re.compile(r"^step-(\d{8,})$")
"""A step directory, as :func:`step_dir_name` writes it."""
SUFFIX_RE = re.compile(r"^(?P<base>.+?)\.(?P<kind>tmp|old|bad)-.+$")
"""A ``.tmp-`` / ``.old-`` / ``.bad-`` sibling; ``base`` is the checkpoint it belongs to."""
DATA_FILE_RE = re.compile(r"^data/r(\d{5})(?:(?:-t\d{1,3})?\.bin|\.frag)$")
"""A file a rank writes into a checkpoint: a data file as :func:`data_file_name` writes it, or its
version-2 fragment (:func:`fragment_name`); group 1 is the rank. (The node-local tier replicates,
serves and inventories both kinds alike.)"""
FRAGMENT_RE = re.compile(r"^data/r(\d{5})\.frag$")
"""A rank's fragment of a version-2 checkpoint as :func:`fragment_name` writes it; group 1 is the rank."""
STORED_RE = re.compile(r"^data/(?:[0-9a-f]{4}\.[A-Za-z0-9_-]{1,64}\.)?(?P<base>r(?P<rank>\d{5,})(?P<thread>-t\d{1,3})?\.(?P<kind>bin|frag))$")
"""A data file or fragment as a MANIFEST names it (plain, or the S3 backend's stored name): ``rank``
wrote it, ``base`` is its plain name without ``data/``, ``kind`` ``bin`` or ``frag``."""
LOOSE_DATA_FILE_RE = re.compile(r"^(?:[0-9a-f]{4}\.[A-Za-z0-9_-]{1,64}\.)?r\d{5,}.*\.(?:bin|frag)$")
"""A file inside ``data/`` that looks like ours (the root scan's test for "our layout"); the S3
backend's objects carry ``<h4>.<save_id>.`` before the file name (``storage/s3.py``)."""
BAD_MANIFEST_PREFIX = f"{MANIFEST}.{BAD}-"
"""``MANIFEST.bad-<id>``: where the S3 backend sets a MANIFEST aside (the step is no longer committed)."""


def data_file_name(rank: int, thread: int | None) -> str:
    """Relative name of a rank's data file (``thread`` None: the single-file form)."""
    return f"{DATA_DIR}/r{rank:05d}.bin" if thread is None else f"{DATA_DIR}/r{rank:05d}-t{thread}.bin"


def fragment_name(rank: int) -> str:
    """Relative name of a rank's fragment (its chunk records) in a version-2 checkpoint."""
    return f"{DATA_DIR}/r{rank:05d}.frag"


def stored_rank(name: str) -> int | None:
    """The rank that wrote data file or fragment ``name`` (as a MANIFEST names it), None if it is not named so."""
    m = STORED_RE.match(name)
    return int(m.group("rank")) if m else None


def save_tag(job: str, save_id: str) -> str:
    """``<job[:8]>-<save id>``: what a save's temporary sibling is tagged with (the coordinator names its
    target so, and the node-local tier's retention recycles a step into that same directory)."""
    return f"{job[:8]}-{save_id}"


def step_dir_name(step: int) -> str:
    """``step-<8 digits>`` (more digits past 99,999,999).

    Raises:
        ValueError: ``step`` is negative.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


def sibling(path: str, kind: str, tag: str | None = None) -> str:
    """``<path>.<kind>-<tag>``: a temporary, old or set-aside sibling of checkpoint ``path``.

    Args:
        path: the checkpoint path (a trailing ``/`` is ignored).
        kind: :data:`TMP`, :data:`OLD` or :data:`BAD`.
        tag: the save id or purpose; None picks a fresh random one.

    Returns:
        The sibling's path.
    """
    assert kind in (TMP, OLD, BAD), kind
    return f"{path.rstrip('/')}.{kind}-{tag if tag is not None else uuid.uuid4().hex[:8]}"


def is_sibling_of(name: str, base: str, kind: str) -> bool:
    """Whether entry ``name`` is a ``<base>.<kind>-*`` sibling."""
    return name.startswith(f"{base}.{kind}-")
