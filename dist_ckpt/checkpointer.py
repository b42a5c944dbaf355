"""Checkpointer classes with the names and call shapes of
``torch.distributed.checkpoint._experimental``, backed by dist_ckpt's staging
arena, save steps (:mod:`dist_ckpt.saver`), coordinator and reader.

"Writer" means what writes this rank's bytes into its data files
(:mod:`dist_ckpt.writer`'s threads, or the :class:`CheckpointProcess`);
:class:`CheckpointWriter` (the torch name) drives one rank's whole save on the
*save thread*, which calls the writer.

Which thread runs what (per rank)::

    caller thread      expand Stateful → describe → launch device copies, CPU copies   (no I/O)
    stager thread      (device tensors) wait for the CUDA event → stage future done
    save thread        plan request → writer writes own files → Done → wait Committed → write future done
    agent thread       ZeroMQ I/O and heartbeats
    coordinator thread (rank 0) plan, merge, commit
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from .config import Config
from .describe import LocalState, describe
from .flatten import expand_stateful, format_path
from .loader import LoadInfo, load_full, load_into
from .logs import SaveSummary
from .process import CheckpointProcess, require_main_guard
from .saver import WriteFn, WriterHook, report_failure, run_save, write_here
from .session import RankInfo, Session
from .stager import StagingArena
from .storage import Storage, get_storage
from .user_meta import check_user_meta
from .wire import Phase
from .writer import WriteRecord

STATE_DICT = dict[str, Any]


@dataclass
class StagedState:
    """A state dict after staging: its description and the host tensors to write."""

    described: LocalState
    host: list[torch.Tensor]
    ready: Future
    arena: torch.Tensor | None = None  # the staging arena's buffer holding ``host``
    shm_name: str | None = None  # its shared-memory name (process mode)


class CheckpointStager(abc.ABC):
    """Copies a state dict off the device; ``stage`` returns with a future (done once every copy is)."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, *, allow_pickle: bool | None = None) -> StagedState: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class DefaultStager(CheckpointStager):
    """Describes a state dict and stages it into a :class:`~dist_ckpt.stager.StagingArena` (``self.arena``:
    reusable host memory, pinned when CUDA is present).

    Args:
        rank_info: this rank.
        config: settings (``allow_pickle``).
        pin_memory: force pinned (True) or pageable (False) memory; default: pinned iff CUDA.
    """

    def __init__(self, rank_info: RankInfo | None = None, config: Config | None = None, pin_memory: bool | None = None, shared_memory: bool = False) -> None:
        self._rank = rank_info.global_rank if rank_info else (dist.get_rank() if dist.is_initialized() else 0)
        self._config = config or Config.from_env()
        self.arena = StagingArena(pin_memory, shared_memory)

    def describe(self, state_dict: STATE_DICT, allow_pickle: bool | None = None) -> LocalState:
        """Expand ``Stateful`` values and describe the state (``allow_pickle`` None: the config's)."""
        expanded, _ = expand_stateful(state_dict)
        return describe(expanded, self._rank, self._config.allow_pickle if allow_pickle is None else allow_pickle)

    def prepare(self, state_dict: STATE_DICT) -> None:
        """Allocate the host arena for ``state_dict`` now, so the first save is as fast as later ones."""
        self.arena.prepare(self.describe(state_dict).tensors)

    def stage(self, state_dict: STATE_DICT, *, allow_pickle: bool | None = None) -> StagedState:
        """Describe ``state_dict`` and stage its tensors into the arena (CPU copies done, device copies launched).

        Raises:
            StateDictError: a value cannot be stored (names its key path).
        """
        described = self.describe(state_dict, allow_pickle)
        host, ready = self.arena.stage(described.tensors)
        return StagedState(described, host, ready, self.arena.buffer, self.arena.shm.name if self.arena.shm else None)

    def close(self) -> None:
        self.arena.close()


class CheckpointWriter:
    """Writes this rank's part of a save and waits for the global commit.

    Args:
        config: settings.
        barrier: unused; the coordinator's commit is the barrier. Kept for call-shape compatibility.
        commit_hook: :class:`WriterHook` called around the commit.
        session: the session to save through (created when omitted).
        process: write staged saves in this :class:`CheckpointProcess` instead of writer threads.
        storage: the backend every save goes through (None: chosen by each path's URL scheme).
    """

    def __init__(
        self,
        config: Config | None = None,
        barrier: Any = None,
        commit_hook: WriterHook | None = None,
        session: Session | None = None,
        process: CheckpointProcess | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.session = session or Session(config or Config.from_env())
        self.storage = storage
        self.rank_info = self.session.rank_info  # the session decides the rank (from the process group)
        self.commit_hook = commit_hook
        self.process = process
        self._owns_session = session is None
        # Rank 0 logs each save's summary at INFO unless the owner logs it in its own line
        # (the manager adds its figures); the summary of the last save is kept either way.
        self.announce_saves = True
        self.last_summary: SaveSummary | None = None

    def write(
        self,
        path: str,
        state: STATE_DICT | StagedState,
        *,
        ckpt: str | None = None,
        overwrite: bool = False,
        allow_pickle: bool | None = None,
        user_meta: Mapping[str, Any] | None = None,
        step: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        """Save ``state`` (a state dict, or a :class:`StagedState`) to ``path``; blocks until committed.

        Args:
            ckpt: save id (the next one of the session when None).
            overwrite: replace a committed checkpoint at ``path``.
            allow_pickle: pickle values that are not msgpack-native (None: the config's setting).
            user_meta: msgpack-native metadata stored in the MANIFEST (rank 0's value is kept).
            step: the training step, named in the save's log line.
            storage: the backend for this save (None: the writer's, else by URL scheme); every rank passes one.

        Raises:
            UnsupportedScheme: ``path`` has a URL scheme without a backend (before anything is sent).
            StateDictError: a value or ``user_meta`` cannot be stored (names its key path).
            CheckpointError: this or another rank failed (the same error on every rank).
        """
        ckpt = ckpt if ckpt is not None else self.session.next_save_id()
        storage = storage if storage is not None else self.storage
        try:
            state, meta = self._check(path, state, allow_pickle, user_meta, storage)
        except Exception as e:
            report_failure(self.session, ckpt, Phase.DESCRIBE, e, path)
            raise
        if storage is not None:
            self.session.use_storage(path, storage)  # rank 0's coordinator commits through it too
        if self.process is not None and state.shm_name is not None:
            write: WriteFn | None = self._process_write(state, storage)
        else:
            write = None if storage is None else functools.partial(write_here, storage=storage)
        self.last_summary = None
        run_save(
            self.session,
            ckpt,
            path,
            state.described,
            state.host,
            overwrite,
            ready=state.ready.result,
            hook=self.commit_hook,
            write=write,
            user_meta=meta,
            step=step,
            announce=self.announce_saves,
            storage=storage,
        )
        coordinator = self.session.coordinator
        self.last_summary = coordinator.summary(ckpt) if coordinator is not None else None

    def _check(
        self, path: str, state: STATE_DICT | StagedState, allow_pickle: bool | None, user_meta: Mapping[str, Any] | None, storage: Storage | None
    ) -> tuple[StagedState, dict[str, Any]]:
        """Everything a save can refuse before it starts: the path's scheme, ``user_meta``, the state's values."""
        get_storage(path, storage)
        meta = check_user_meta(user_meta)
        if not isinstance(state, StagedState):
            expanded, _ = expand_stateful(state)
            described = describe(expanded, self.session.rank, self.session.config.allow_pickle if allow_pickle is None else allow_pickle)
            state = StagedState(described, described.tensors, done_future())
        return state, meta

    def _process_write(self, state: StagedState, storage: Storage | None) -> WriteFn:
        process, arena, shm_name = self.process, state.arena, state.shm_name
        assert process is not None and arena is not None and shm_name is not None
        base = arena.data_ptr()

        def write(tmp_path: str, path: str, rank: int, assigned: Sequence[int], host: Sequence[torch.Tensor], threads: int) -> list[WriteRecord]:
            items = [(i, host[i].data_ptr() - base, host[i].numel() * host[i].element_size()) for i in assigned]
            return process.write(shm_name, arena.numel(), tmp_path, path, items, threads, storage)

        return write

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
        if self._owns_session:
            self.session.close()


class CheckpointReader:
    """Reads checkpoints for one rank (no communication with other ranks).

    Args:
        rank_info: this rank (the process group's when omitted).
        config: settings.
        storage: the backend every load reads through (None: chosen by each path's URL scheme).
    """

    def __init__(self, rank_info: RankInfo | None = None, config: Config | None = None, storage: Storage | None = None) -> None:
        self.rank = rank_info.global_rank if rank_info else (dist.get_rank() if dist.is_initialized() else 0)
        self.config = config or Config.from_env()
        self.storage = storage

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        allow_pickle: bool | None = None,
        verify_checksums: bool | None = None,
        info: LoadInfo | None = None,
        storage: Storage | None = None,
    ) -> tuple[Any, list[str]]:
        """Load ``path`` into ``state_dict`` (in place), or as full tensors when None.

        Args:
            storage: the backend for this load (None: the reader's, else by URL scheme).
            allow_pickle, verify_checksums: override the config's setting for this load (None: keep it).
            strict: Raise on keys missing from the checkpoint or the target (as :func:`dist_ckpt.load`).
            info: A :class:`~dist_ckpt.loader.LoadInfo` to fill.

        Returns:
            ``(state_dict, not restored)``: the target keys (formatted) that still
            hold the caller's value: missing ones (``strict=False``) and rank-local
            ones this rank has no saved value for.
        """
        overrides: dict[str, Any] = {k: v for k, v in (("allow_pickle", allow_pickle), ("verify_checksums", verify_checksums)) if v is not None}
        config = dataclasses.replace(self.config, **overrides) if overrides else self.config
        storage = storage if storage is not None else self.storage
        if state_dict is None:
            return load_full(path, self.rank, config, map_location, storage=storage), []
        info = info or LoadInfo()
        out = load_into(state_dict, path, self.rank, config, strict=strict, storage=storage, info=info)
        return out, [format_path(k) for k in info.not_restored]

    def close(self) -> None:
        pass


def done_future() -> Future:
    """A future that has already completed (a save with nothing left to wait for)."""
    f: Future = Future()
    f.set_result(None)
    return f


class Checkpointer(abc.ABC):
    """Save and load checkpoints; ``save`` returns ``(stage_future, write_future)`` or None."""

    @abc.abstractmethod
    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        overwrite: bool = False,
        allow_pickle: bool | None = None,
        user_meta: Mapping[str, Any] | None = None,
        step: int | None = None,
        storage: Storage | None = None,
    ) -> tuple[Future, Future] | None:
        """Save ``state_dict`` to ``path`` (all ranks together); see :meth:`CheckpointWriter.write` for the arguments."""

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = True,
        allow_pickle: bool | None = None,
        verify_checksums: bool | None = None,
        info: LoadInfo | None = None,
        storage: Storage | None = None,
    ) -> Any:
        """Load ``path`` into ``state_dict`` in place (or return full tensors when None).

        Strict by default, like :func:`dist_ckpt.load` and :meth:`CheckpointManager.load`.
        ``allow_pickle`` / ``verify_checksums`` / ``storage`` override the checkpointer's for this load.
        """
        return self.reader.read(
            path,
            state_dict,
            map_location=default_map_location,
            strict=strict,
            allow_pickle=allow_pickle,
            verify_checksums=verify_checksums,
            info=info,
            storage=storage,
        )[0]

    @abc.abstractmethod
    def close(self) -> None: ...

    reader: CheckpointReader

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCheckpointer(Checkpointer):
    """Blocking saves: ``save`` returns once the checkpoint is committed for all ranks."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self.writer, self.reader = writer, reader

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        overwrite: bool = False,
        allow_pickle: bool | None = None,
        user_meta: Mapping[str, Any] | None = None,
        step: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        """Save and return once committed for all ranks (arguments: :meth:`CheckpointWriter.write`)."""
        self.writer.write(path, state_dict, overwrite=overwrite, allow_pickle=allow_pickle, user_meta=user_meta, step=step, storage=storage)
        return None

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class AsyncCheckpointer(Checkpointer):
    """Background saves: ``save`` returns ``(stage_future, write_future)`` once the CPU copies are made (device copies: launched).

    ``stage_future`` completes once the state is copied off the device (the caller may then
    mutate it); ``write_future`` once the checkpoint is committed for all ranks, or fails on
    every rank with :class:`~dist_ckpt.errors.CheckpointError`. A new save first waits for the
    previous one (the staging arena is reused).
    """

    def __init__(self, checkpoint_stager: DefaultStager, checkpoint_process: "CheckpointWriter | Any", reader: CheckpointReader) -> None:
        self.stager, self.writer, self.reader = checkpoint_stager, checkpoint_process, reader
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dist_ckpt-save")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self, state_dict: STATE_DICT) -> None:
        """Allocate staging memory for ``state_dict`` ahead of the first save."""
        self.stager.prepare(state_dict)

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        overwrite: bool = False,
        allow_pickle: bool | None = None,
        user_meta: Mapping[str, Any] | None = None,
        step: int | None = None,
        storage: Storage | None = None,
    ) -> tuple[Future, Future]:
        """Stage and start the save; returns ``(stage_future, write_future)`` (arguments: :meth:`CheckpointWriter.write`).

        A CPU state is copied before this returns (``stage_future`` is then done); device copies are only launched.

        Raises:
            UnsupportedScheme, StateDictError: refused before anything is staged (on every rank alike).
            RuntimeError: the checkpointer is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("save() on a closed checkpointer")
            self._wait_previous()
            ckpt = self.writer.session.next_save_id()
            try:
                get_storage(path, storage)
                meta = check_user_meta(user_meta)
                staged = self.stager.stage(state_dict, allow_pickle=allow_pickle)
            except Exception as e:
                report_failure(self.writer.session, ckpt, Phase.DESCRIBE, e, path)
                raise
            write = self._executor.submit(self.writer.write, path, staged, ckpt=ckpt, overwrite=overwrite, user_meta=meta, step=step, storage=storage)
            self._pending = write
            return staged.ready, write

    def _wait_previous(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # already delivered to the caller through that save's future
                pass
            self._pending = None

    def wait(self) -> None:
        """Block until the save in flight (if any) has finished."""
        with self._lock:
            self._wait_previous()

    def close(self) -> None:
        """Wait for the save in flight, then stop the save thread, the writer, sockets and buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wait_previous()
            self._executor.shutdown(wait=True)
            self.writer.close()
            self.stager.close()
            self.reader.close()


def make_sync_checkpointer(
    config: Config | None = None, rank_info: RankInfo | None = None, commit_hook: WriterHook | None = None, storage: Storage | None = None
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer` with its own session (all ranks must call this together).

    ``rank_info`` is accepted for torch's call shape only: the session takes the
    rank from the process group. ``storage``: the backend its saves and loads go
    through (None: by each path's URL scheme).
    """
    writer = CheckpointWriter(config, commit_hook=commit_hook, storage=storage)
    return SyncCheckpointer(writer, CheckpointReader(writer.rank_info, writer.session.config, storage))


def make_async_checkpointer(
    config: Config | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
    pin_memory: bool | None = None,
    mode: str = "thread",
    subprocess_init_fn: Callable[..., None] | None = None,
    subprocess_init_args: tuple = (),
    storage: Storage | None = None,
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer` with its own session (all ranks must call this together).

    Args:
        rank_info: accepted for torch's call shape only; the session takes the rank from the process group.
        mode: ``"thread"`` (writer threads in this process) or ``"process"`` (a
            :class:`CheckpointProcess` per rank, fed through a shared-memory arena).
        subprocess_init_fn: process mode: called in the subprocess at start.
        storage: the backend its saves and loads go through (None: by each path's URL scheme);
            process mode pickles it to the writer subprocess.

    Raises:
        ValueError: an unknown ``mode``.
        CheckpointProcessError: process mode from a script without an
            ``if __name__ == "__main__":`` guard (the writer would re-run it).
        ProcessGroupNotInitialized: launched as one of several ranks without a process group.
    """
    if mode not in ("thread", "process"):
        raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
    if mode == "process":
        require_main_guard()  # before the session: every rank refuses alike, nothing to undo
    writer = CheckpointWriter(config, commit_hook=commit_hook, storage=storage)
    if mode == "process":
        writer.process = CheckpointProcess(writer.rank_info, subprocess_init_fn=subprocess_init_fn, subprocess_init_args=subprocess_init_args)
    stager = DefaultStager(writer.rank_info, writer.session.config, pin_memory, shared_memory=mode == "process")
    return AsyncCheckpointer(stager, writer, CheckpointReader(writer.rank_info, writer.session.config, storage))
