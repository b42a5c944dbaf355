"""Reading a version-2 checkpoint's metadata: the index, then only the fragments a reader needs.

:func:`read_metadata` reads a MANIFEST of either version. A v2 one is an
:class:`~dist_ckpt.manifest_v2.Index`; :func:`read_fragments` fetches fragments
(bounded parallel reads, each checked against the index's size and xxh3
before it is decoded), :func:`whole_manifest` materialises the whole v1-equivalent
manifest (verify, convert, CLI, manager), and :func:`needed_manifest` only the
cells some target boxes touch (a load).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import manifest_v2 as v2
from .dtypes import itemsize
from .errors import FragmentError, ManifestError, UnsafeFileError
from .kept_pool import drain
from .layout_names import MANIFEST
from .manifest import Manifest
from .materialize import materialize
from .split import cells_for_box
from .storage import Storage

__all__ = ["checkpoint_files", "read_fragments", "read_metadata", "needed_cells", "needed_manifest", "tensor_bytes", "whole_manifest"]

FRAGMENT_READERS = 8
"""Fragments read at once: a whole-checkpoint read of 16,384 fragments keeps at most this many requests in flight."""


def read_metadata(data: bytes, where: str) -> Manifest | v2.Index:
    """Decode MANIFEST bytes of either version: a v1 :class:`Manifest` or a v2 :class:`~dist_ckpt.manifest_v2.Index`.

    Raises:
        ManifestError: malformed, or a version other than 1 and 2 (names ``where``).
    """
    try:
        if v2.peek_version(data) == v2.VERSION:
            return v2.decode_index(data)
        return Manifest.from_msgpack(data)
    except ManifestError as e:
        raise type(e)(f"{where}: {e}") from e


def checkpoint_files(meta: Manifest | v2.Index) -> tuple[str, ...]:
    """Every file a MANIFEST names, besides itself: data files, then a v2 checkpoint's fragments (none read)."""
    frags = meta.fragments if isinstance(meta, v2.Index) else ()
    return tuple(meta.files) + tuple(f.name for f in frags if f is not None)


def tensor_bytes(meta: Manifest | v2.Index) -> int:
    """Bytes of tensor data (global and rank-local) a MANIFEST of either version describes: from dtypes and shapes, no fragment read."""
    sections = [t for t, _ in meta.local.values()] if isinstance(meta, v2.Index) else [sec.tensors for sec in meta.local.values()]
    entries = [*meta.tensors.values(), *(e for tensors in sections for e in tensors.values())]
    return sum(math.prod(e.shape) * itemsize(e.dtype) for e in entries)


def read_fragments(storage: Storage, root: str, index: v2.Index, ranks: Iterable[int], threads: int = FRAGMENT_READERS) -> dict[int, v2.Fragment]:
    """Read, check and decode the fragments of ``ranks`` (ranks the index lists without one are skipped).

    Raises:
        FragmentError: a fragment is missing, of the wrong size or xxh3, or its records are
            inconsistent with the index (names the fragment's path).
    """
    todo = sorted({r for r in ranks if 0 <= r < len(index.fragments) and index.fragments[r] is not None})
    if not todo:
        return {}
    # On the calling thread and up to ``threads - 1`` reader threads kept between loads, each taking the
    # next fragment left: a load starts no thread and never waits for one to be scheduled (see kept_pool).
    return dict(zip(todo, drain(lambda r: _read_one(storage, root, index, r), todo, threads)))


def _read_one(storage: Storage, root: str, index: v2.Index, rank: int) -> v2.Fragment:
    ref = index.fragments[rank]
    assert ref is not None
    path = f"{root}/{ref.name}"
    try:
        data = storage.read_bytes(path, max_bytes=ref.nbytes)
    except FileNotFoundError as e:
        raise FragmentError(f"fragment {path} of rank {rank}, listed in {root}/{MANIFEST}, is missing") from e
    except UnsafeFileError as e:  # longer than the index says (refused past max_bytes), a link, not a regular file
        raise FragmentError(f"fragment {path} of rank {rank} is not the file {root}/{MANIFEST} lists: {e}") from e
    # Any other OSError (a failing disk or store: StorageError, DataFileError) propagates as it is: it names the
    # object and is no statement about the checkpoint's metadata.
    v2.check_fragment_bytes(data, ref, path)
    return v2.decode_fragment(data, rank, index, path)


def whole_manifest(storage: Storage, root: str, index: v2.Index) -> Manifest:
    """The whole v1-equivalent manifest: every fragment read (and checked).

    Raises:
        FragmentError: a fragment is missing or bad, or a cell is in none.
    """
    return materialize(index, read_fragments(storage, root, index, range(index.world_size)))


def sorted_distinct(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` of a 1-D array (ascending, each value once), without ``np.unique``.

    *Why*: numpy's first ``np.unique`` call imports ``numpy.ma`` (~25 ms of CPU here; 0.1-0.3 s of a
    restore's first load with 4 ranks sharing 2 busy vCPUs), and a restart's load is its first one.
    """
    s = np.sort(a, kind="stable")
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def needed_cells(index: v2.Index, needs: Sequence[tuple[int, Sequence[int], Sequence[int]]]) -> dict[int, np.ndarray]:
    """``{entry: ascending cells}`` that the boxes ``needs`` (``(entry, offsets, sizes)`` each) touch.

    Entries sharing a split (:attr:`~dist_ckpt.manifest_v2.Index.split_classes`) and a box share the
    lookup and its array: an FSDP rank's thousand boxes are a few dozen lookups.
    """
    memo: dict[tuple, np.ndarray] = {}
    found: dict[int, list[np.ndarray]] = {}
    classes, splits = index.split_classes
    for e, off, siz in needs:
        key = (int(classes[e]), tuple(np.asarray(off, np.int64).reshape(-1).tolist()), tuple(np.asarray(siz, np.int64).reshape(-1).tolist()))
        cells = memo.get(key)
        if cells is None:
            cells = memo[key] = cells_for_box(splits[key[0]], key[1], key[2])
        found.setdefault(e, []).append(cells)
    return {e: c[0] if len(c) == 1 else sorted_distinct(np.concatenate(c)) for e, c in found.items()}  # cells_for_box's ascend already


def needed_manifest(storage: Storage, root: str, index: v2.Index, cells: Mapping[int, np.ndarray]) -> tuple[Manifest, int]:
    """The manifest with only ``cells`` materialised, from only their owners' fragments.

    Returns:
        ``(manifest, fragments read)``.
    """
    owners: set[int] = set()
    classes, splits = index.split_classes
    seen: set[tuple[int, int]] = set()  # (class, cells array): needed_cells shares both across tensors
    for e, c in cells.items():
        if (int(classes[e]), id(c)) not in seen:
            seen.add((int(classes[e]), id(c)))
            owners.update(sorted_distinct(splits[int(classes[e])].owner(c)).tolist())
    frags = read_fragments(storage, root, index, owners)
    return materialize(index, frags, dict(cells)), len(frags)
