"""The DCP-style functional API: ``save``, ``async_save``, ``load``, ``verify``.

The functions share one sync and one async checkpointer per process group,
created on first use (every rank calls them together, as with DCP).
"""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import Future
from typing import Any, Mapping

import torch.distributed as dist

from .checkpointer import AsyncCheckpointer, CheckpointReader, CheckpointWriter, DefaultStager, SyncCheckpointer
from .config import Config
from .loader import LoadInfo, load_into
from .session import Session
from .storage import Storage, get_storage

_lock = threading.Lock()
_defaults: dict[tuple, tuple[Session, SyncCheckpointer, AsyncCheckpointer]] = {}


def _default(process_group: dist.ProcessGroup | None = None) -> tuple[Session, SyncCheckpointer, AsyncCheckpointer]:
    initialized = dist.is_available() and dist.is_initialized()
    key = (id(dist.group.WORLD) if initialized else None, id(process_group))
    with _lock:
        if key not in _defaults:
            session = Session(Config.from_env(), process_group)
            writer = CheckpointWriter(session=session)
            reader = CheckpointReader(session.rank_info, session.config)
            sync = SyncCheckpointer(writer, reader)
            stager = DefaultStager(session.rank_info, session.config)
            _defaults[key] = (session, sync, AsyncCheckpointer(stager, writer, reader))
        return _defaults[key]


def save(
    state_dict: Any,
    path: str,
    *,
    overwrite: bool = False,
    allow_pickle: bool | None = None,
    user_meta: Mapping[str, Any] | None = None,
    step: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    storage: Storage | None = None,
) -> None:
    """Save ``state_dict`` to ``path`` on all ranks; returns once committed everywhere.

    Args:
        state_dict: nested dicts/lists/tuples of tensors, DTensors, plain values and
            objects with ``state_dict()``/``load_state_dict()``.
        path: checkpoint directory (must not exist unless ``overwrite``); a plain path or ``file://``.
        overwrite: write the new checkpoint beside the old one and swap them.
        allow_pickle: pickle values that are neither tensors nor msgpack-native
            (None: ``DIST_CKPT_ALLOW_PICKLE``, default off).
        user_meta: msgpack-native metadata stored in the MANIFEST (rank 0's value is kept).
        step: the training step, named in the save's log line.
        process_group: the group whose ranks save together (default: the default group).
        storage: the backend to save through (default: chosen by ``path``'s URL scheme);
            every rank passes its own, rank 0's also commits.

    Raises:
        CheckpointError: any rank failed (the same error on every rank).
        StateDictError: a value or ``user_meta`` cannot be stored (names its key path).
        UnsupportedScheme: ``path`` has a URL scheme without a backend.
        ProcessGroupNotInitialized: launched as one of several ranks (``WORLD_SIZE > 1``)
            without ``init_process_group``.
    """
    get_storage(path, storage)  # an unknown scheme is refused before the session starts
    _, sync, asyn = _default(process_group)
    asyn.wait()  # one save in flight per process: let a pending async save finish first
    sync.save(path, state_dict, overwrite=overwrite, allow_pickle=allow_pickle, user_meta=user_meta, step=step, storage=storage)


def async_save(
    state_dict: Any,
    path: str,
    *,
    overwrite: bool = False,
    allow_pickle: bool | None = None,
    user_meta: Mapping[str, Any] | None = None,
    step: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    storage: Storage | None = None,
) -> tuple[Future, Future]:
    """Start a background save; returns ``(stage_future, write_future)``.

    After ``stage_future.result()`` the caller may modify the tensors;
    ``write_future.result()`` returns once the checkpoint is committed for all
    ranks and raises :class:`CheckpointError` on every rank if any failed.

    Args:
        state_dict, path, overwrite, allow_pickle, user_meta, step, process_group, storage: as for :func:`save`.

    Raises:
        StateDictError, UnsupportedScheme, ProcessGroupNotInitialized: as for :func:`save`, at once.
    """
    get_storage(path, storage)
    _, _, asyn = _default(process_group)
    return asyn.save(path, state_dict, overwrite=overwrite, allow_pickle=allow_pickle, user_meta=user_meta, step=step, storage=storage)


def load(
    state_dict: Any,
    path: str,
    *,
    strict: bool = True,
    allow_pickle: bool | None = None,
    verify_checksums: bool | None = None,
    info: LoadInfo | None = None,
    storage: Storage | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Any:
    """Load ``path`` into ``state_dict`` in place and return it.

    Tensors and DTensor local shards are filled in place (any layout and world
    size); plain values are replaced in the caller's dicts and lists (a
    container the target reaches at two places gets a new one at each);
    objects with ``load_state_dict`` get their loaded state. No collective is called.

    Args:
        strict: Raise on keys missing from the checkpoint or from the target and
            on dtype differences; ``False`` loads what matches and converts
            between floating dtypes.
        info: A :class:`LoadInfo` to fill with what the load did (missing,
            unexpected, kept rank-local and converted keys).
        allow_pickle: accept pickled values (None: ``DIST_CKPT_ALLOW_PICKLE``, default off).
        verify_checksums: check every chunk read in full (None: ``DIST_CKPT_VERIFY_CHECKSUMS``, default on).
        storage: the backend to read through (default: chosen by ``path``'s URL scheme).
        process_group: the group the job saved with (as for :func:`save`): this
            rank's rank-local values are those saved by its rank in that group.

    Raises:
        CheckpointNotFound: no committed checkpoint at ``path``.
        LoadMismatchError: every mismatching key in one error: (strict) missing or
            unexpected keys, shape mismatches, dtype changes that are not float to float.
        ChecksumError: stored bytes do not match their checksum.
    """
    rank = dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0
    config = Config.from_env(allow_pickle=allow_pickle, verify_checksums=verify_checksums)
    return load_into(state_dict, path, rank, config, strict=strict, storage=storage, info=info)


def _close_defaults() -> None:
    with _lock:
        for session, sync, asyn in _defaults.values():
            asyn.close()
            session.close()
        _defaults.clear()


atexit.register(_close_defaults)
