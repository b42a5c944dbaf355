"""Checkpointer classes with the names and call shapes of
``torch.distributed.checkpoint._experimental``, backed by dist_ckpt's stager,
writer, coordinator and reader.

Which thread runs what (per rank)::

    caller thread      expand Stateful → describe → launch staging copies      (no I/O)
    stager thread      CPU copies / wait for the CUDA event → stage future done
    writer thread      plan request → write own files → Done → wait Committed → write future done
    agent thread       ZeroMQ I/O and heartbeats
    coordinator thread (rank 0) plan, merge, commit
"""

from __future__ import annotations

import abc
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .config import Config
from .describe import Described, describe
from .flatten import expand_stateful, format_path
from .loader import LoadInfo, load_full, load_into
from .process import CheckpointProcess
from .saver import WriteFn, report_failure, run_save
from .session import RankInfo, Session
from .stager import Stager
from .writer import WriteRecord

log = logging.getLogger(__name__)

STATE_DICT = dict[str, Any]


class WriterHook(abc.ABC):  # noqa: B024 - both hooks are optional
    """Called on every rank around the commit of each save."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """After this rank's files are written, before it reports Done."""

    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the coordinator committed the checkpoint for all ranks."""


@dataclass
class StagedState:
    """A state dict after staging: its description and the host tensors to write."""

    described: Described
    host: list[torch.Tensor]
    ready: Future
    arena: torch.Tensor | None = None  # the stager's buffer holding ``host``
    shm_name: str | None = None  # its shared-memory name (process mode)


class CheckpointStager(abc.ABC):
    """Copies a state dict off the device; ``stage`` returns at once with a future."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> StagedState: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class DefaultStager(CheckpointStager):
    """Reusable (pinned when CUDA is present) host arena; see :mod:`dist_ckpt.stager`.

    Args:
        rank_info: this rank.
        config: settings (``allow_pickle``).
        pin_memory: force pinned (True) or pageable (False) memory; default: pinned iff CUDA.
    """

    def __init__(self, rank_info: RankInfo | None = None, config: Config | None = None, pin_memory: bool | None = None, shared_memory: bool = False) -> None:
        self._rank = rank_info.global_rank if rank_info else (dist.get_rank() if dist.is_initialized() else 0)
        self._config = config or Config.from_env()
        self.stager = Stager(pin_memory, shared_memory)

    def describe(self, state_dict: STATE_DICT) -> Described:
        expanded, _ = expand_stateful(state_dict)
        return describe(expanded, self._rank, self._config.allow_pickle)

    def prepare(self, state_dict: STATE_DICT) -> None:
        """Allocate the host arena for ``state_dict`` now, so the first save is as fast as later ones."""
        self.stager.prepare(self.describe(state_dict).tensors)

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> StagedState:
        described = self.describe(state_dict)
        host, ready = self.stager.stage(described.tensors)
        return StagedState(described, host, ready, self.stager.arena, self.stager.shm.name if self.stager.shm else None)

    def close(self) -> None:
        self.stager.close()


class CheckpointWriter:
    """Writes this rank's part of a save and waits for the global commit.

    Args:
        config: settings.
        rank_info: this rank (taken from the session when omitted).
        barrier: unused; the coordinator's commit is the barrier. Kept for call-shape compatibility.
        commit_hook: :class:`WriterHook` called around the commit.
        session: the session to save through (created when omitted).
        process: write staged saves in this :class:`CheckpointProcess` instead of writer threads.
    """

    def __init__(self, config: Config | None = None, rank_info: RankInfo | None = None, barrier: Any = None, commit_hook: WriterHook | None = None, session: Session | None = None, process: CheckpointProcess | None = None) -> None:
        self.session = session or Session(config or Config.from_env())
        self.rank_info = self.session.rank_info
        self.commit_hook = commit_hook
        self.process = process
        self._owns_session = session is None

    def write(self, path: str, state: STATE_DICT | StagedState, *, ckpt: str | None = None, overwrite: bool = False, **kwargs: Any) -> None:
        """Save ``state`` (a state dict, or a :class:`StagedState`) to ``path``; blocks until committed."""
        ckpt = ckpt if ckpt is not None else self.session.next_save_id()
        if not isinstance(state, StagedState):
            try:
                expanded, _ = expand_stateful(state)
                described = describe(expanded, self.session.rank, self.session.config.allow_pickle)
            except Exception as e:
                report_failure(self.session, ckpt, "describe", e)
                raise
            state = StagedState(described, described.tensors, _done_future())
        write = self._process_write(state) if self.process is not None and state.shm_name is not None else None
        run_save(self.session, ckpt, path, state.described, state.host, overwrite, ready=state.ready.result, hook=self.commit_hook, write=write)

    def _process_write(self, state: StagedState) -> WriteFn:
        process, arena = self.process, state.arena
        assert process is not None and arena is not None
        base = arena.data_ptr()

        def write(tmp_path: str, path: str, rank: int, assigned: Sequence[int], host: Sequence[torch.Tensor], threads: int) -> list[WriteRecord]:
            items = [(i, host[i].data_ptr() - base, host[i].numel() * host[i].element_size()) for i in assigned]
            return process.write(state.shm_name, arena.numel(), tmp_path, path, items, threads)

        return write

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
        if self._owns_session:
            self.session.close()


class CheckpointReader:
    """Reads checkpoints for one rank (no communication with other ranks)."""

    def __init__(self, rank_info: RankInfo | None = None, config: Config | None = None) -> None:
        self.rank = rank_info.global_rank if rank_info else (dist.get_rank() if dist.is_initialized() else 0)
        self.config = config or Config.from_env()

    def read(self, path: str, state_dict: STATE_DICT | None = None, *, map_location: Any = None, strict: bool = True, **kwargs: Any) -> tuple[Any, list[str]]:
        """Load ``path`` into ``state_dict`` (in place), or as full tensors when None.

        Args:
            strict: Raise on keys missing from the checkpoint or the target (as :func:`dist_ckpt.load`).
            info: A :class:`~dist_ckpt.loader.LoadInfo` to fill (keyword).

        Returns:
            ``(state_dict, not restored)``: the target keys (formatted) that still
            hold the caller's value: missing ones (``strict=False``) and rank-local
            ones this rank has no saved value for.
        """
        if state_dict is None:
            return load_full(path, self.rank, self.config, map_location), []
        info = kwargs.get("info") or LoadInfo()
        out = load_into(state_dict, path, self.rank, self.config, strict=strict, info=info)
        return out, [format_path(k) for k in info.not_restored]

    def close(self) -> None:
        pass


def _done_future() -> Future:
    f: Future = Future()
    f.set_result(None)
    return f


class Checkpointer(abc.ABC):
    """Save and load checkpoints; ``save`` returns ``(stage_future, write_future)`` or None."""

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None: ...

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None, strict: bool = True, info: LoadInfo | None = None, **kwargs: Any) -> Any:
        """Load ``path`` into ``state_dict`` in place (or return full tensors when None).

        Strict by default, like :func:`dist_ckpt.load` and :meth:`CheckpointManager.load`.
        """
        return self.reader.read(path, state_dict, map_location=default_map_location, strict=strict, info=info)[0]

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

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        self.writer.write(path, state_dict, **kwargs)
        return None

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class AsyncCheckpointer(Checkpointer):
    """Background saves: ``save`` returns ``(stage_future, write_future)`` at once.

    ``stage_future`` completes once the state is copied off the device (the caller may then
    mutate it); ``write_future`` once the checkpoint is committed for all ranks, or fails on
    every rank with :class:`~dist_ckpt.errors.CheckpointError`. A new save first waits for the
    previous one (the staging arena is reused).
    """

    def __init__(self, checkpoint_stager: DefaultStager, checkpoint_process: "CheckpointWriter | Any", reader: CheckpointReader) -> None:
        self.stager, self.writer, self.reader = checkpoint_stager, checkpoint_process, reader
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dist_ckpt-writer")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self, state_dict: STATE_DICT) -> None:
        """Allocate staging memory for ``state_dict`` ahead of the first save."""
        self.stager.prepare(state_dict)

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future]:
        with self._lock:
            if self._closed:
                raise RuntimeError("save() on a closed checkpointer")
            self._wait_previous()
            ckpt = self.writer.session.next_save_id()
            try:
                staged = self.stager.stage(state_dict)
            except Exception as e:
                report_failure(self.writer.session, ckpt, "describe", e)
                raise
            write = self._executor.submit(self.writer.write, path, staged, ckpt=ckpt, **kwargs)
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
        """Wait for the save in flight, then stop the writer thread, sockets and buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wait_previous()
            self._executor.shutdown(wait=True)
            self.writer.close()
            self.stager.close()
            self.reader.close()


def make_sync_checkpointer(config: Config | None = None, rank_info: RankInfo | None = None, commit_hook: WriterHook | None = None) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer` with its own session (all ranks must call this together)."""
    writer = CheckpointWriter(config, rank_info, commit_hook=commit_hook)
    return SyncCheckpointer(writer, CheckpointReader(writer.rank_info, writer.session.config))


def make_async_checkpointer(
    config: Config | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
    pin_memory: bool | None = None,
    mode: str = "thread",
    subprocess_init_fn: Callable[..., None] | None = None,
    subprocess_init_args: tuple = (),
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer` with its own session (all ranks must call this together).

    Args:
        mode: ``"thread"`` (writer threads in this process) or ``"process"`` (a
            :class:`CheckpointProcess` per rank, fed through a shared-memory arena).
        subprocess_init_fn: process mode: called in the subprocess at start.
    """
    if mode not in ("thread", "process"):
        raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
    writer = CheckpointWriter(config, rank_info, commit_hook=commit_hook)
    if mode == "process":
        writer.process = CheckpointProcess(writer.rank_info, subprocess_init_fn=subprocess_init_fn, subprocess_init_args=subprocess_init_args)
    stager = DefaultStager(writer.rank_info, writer.session.config, pin_memory, shared_memory=mode == "process")
    return AsyncCheckpointer(stager, writer, CheckpointReader(writer.rank_info, writer.session.config))
