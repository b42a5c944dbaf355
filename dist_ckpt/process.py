"""``CheckpointProcess``: the writer in a subprocess, fed through shared memory.

Process mode moves file writing and hashing out of the training process (no
GIL contention, no page-cache pressure accounting against the trainer). The
subprocess is spawned once per rank and attaches the staging arena (named
POSIX shared memory) by name: no tensor bytes cross the pipe; it re-attaches
only when the arena grows. The channel carries typed messages (small
dataclasses, pickled by the queues): the parent sends :class:`AttachArena`,
:class:`WriteRequest` (``[(tag, arena offset, nbytes)]``, and the storage only
when one was injected, then pickled) and :class:`Stop`;
the child answers :class:`Ready`, :class:`Written` (the chunk records) or
:class:`WriteFailed` (the error's type, text and errno, so that a failed
write is the same ``StorageError`` with the same ``errno`` as in thread
mode). Planning, ``Done`` and the wait for ``Committed`` stay in the parent's
save thread, which owns the coordinator connection.
"""

from __future__ import annotations

import ast
import logging
import queue
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Callable, Sequence, Union

import torch
import torch.multiprocessing as tmp

from .errors import CheckpointProcessError, StorageError
from .logs import get_logger
from .session import RankInfo
from .storage import SaveTarget, Storage
from .writer import WriteRecord

log = get_logger(__name__)


# -- the channel: parent -> child ---------------------------------------------


@dataclass(frozen=True)
class AttachArena:
    """Attach the staging arena: named shared memory ``name``, the first ``size`` bytes."""

    name: str
    size: int


@dataclass(frozen=True)
class WriteRequest:
    """Write ``items`` (tag, arena byte offset, nbytes) into ``tmp_path`` of the checkpoint at ``path``."""

    tmp_path: str
    path: str
    items: list[tuple[int, int, int]]
    threads: int
    storage: Storage | None = None  # an injected backend (pickled); None: chosen by the path's scheme


@dataclass(frozen=True)
class Stop:
    """Detach and exit."""


# -- the channel: child -> parent ---------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The child started (its init function returned)."""


@dataclass(frozen=True)
class Written:
    """The records of a :class:`WriteRequest`'s chunks (``WriteRecord`` fields)."""

    records: list[tuple]


@dataclass(frozen=True)
class WriteFailed:
    """A step in the child raised ``type_name(message)``; ``errno``/``strerror`` when it was an ``OSError``."""

    type_name: str
    message: str
    errno: int | None
    strerror: str | None
    traceback: str

    @staticmethod
    def of(e: BaseException) -> "WriteFailed":
        if isinstance(e, OSError):
            return WriteFailed(type(e).__name__, str(e), e.errno, e.strerror, traceback.format_exc())
        return WriteFailed(type(e).__name__, str(e), None, None, traceback.format_exc())

    def error(self, rank: int, what: str) -> Exception:
        """The parent's error: a ``StorageError`` with the same errno for an ``OSError``, else ``CheckpointProcessError``."""
        if self.errno is not None:
            return StorageError(self.errno, f"{self.strerror or self.message} (rank {rank}, in the checkpoint process, during {what})")
        return CheckpointProcessError(f"rank {rank}: {self.type_name}: {self.message} (in the checkpoint process, during {what})")


Request = Union[AttachArena, WriteRequest, Stop]
Response = Union[Ready, Written, WriteFailed]


def require_main_guard() -> None:
    """Refuse process mode when the main script has no ``if __name__ == "__main__":`` guard.

    The writer subprocess is started with ``spawn``, which imports the main
    script again in the child. Without the guard that re-runs the training
    script there (under ``torchrun`` it blocks in ``init_process_group``),
    and the writer never answers. Read the script's syntax tree instead,
    here, in milliseconds. Scripts without a file (``python -c``, a notebook)
    are not re-imported, so they pass; so does an unreadable file (nothing
    can be decided from it).

    Raises:
        CheckpointProcessError: the main script runs code at import time
            without the guard; names the script and the fix.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return
    if not any(_is_main_guard(node) for node in tree.body):
        raise CheckpointProcessError(
            f'make_async_checkpointer(mode="process") from {path}, which has no `if __name__ == "__main__":` guard: '
            "the writer subprocess is spawned, which imports the main script again and would re-run the training there. "
            'Put the script\'s top-level code under `if __name__ == "__main__":` (or use mode="thread")'
        )


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1 or not isinstance(node.test.ops[0], ast.Eq):
        return False
    sides = [node.test.left, node.test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]


def _main(rank: int, requests: Any, responses: Any, init_fn: Callable[..., None] | None, init_args: tuple) -> None:
    """The child: serve :class:`Request`s until :class:`Stop`; every failure goes back as :class:`WriteFailed`."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank} writer-process] %(message)s")
    try:
        if init_fn is not None:
            init_fn(*init_args)
        responses.put(Ready())
    except BaseException as e:
        responses.put(WriteFailed.of(e))
        return
    arena = _Attached()
    while True:
        msg: Request = requests.get()
        if isinstance(msg, Stop):
            arena.detach()
            return
        if isinstance(msg, AttachArena):
            arena.attach(msg.name, msg.size)
            continue
        try:
            responses.put(Written(_write(rank, arena, msg)))
        except BaseException as e:  # surfaces in the parent's write future
            responses.put(WriteFailed.of(e))


class _Attached:
    """(child) The staging arena as this process sees it."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None
        self.view: memoryview | None = None

    def attach(self, name: str, size: int) -> None:
        from .buffers import tensor_memoryview

        self.detach()
        self.shm = shared_memory.SharedMemory(name=name)
        self.view = tensor_memoryview(torch.frombuffer(self.shm.buf, dtype=torch.uint8)[:size])

    def detach(self) -> None:
        self.view = None
        if self.shm is not None:
            self.shm.close()
            self.shm = None


def _write(rank: int, arena: _Attached, req: WriteRequest) -> list[tuple]:
    from . import storage as storage_mod  # looked up per write, so an init_fn may swap the backend
    from .writer import WriteItem, write_items

    view = arena.view
    if view is None:
        raise CheckpointProcessError("no staging arena received before a write")
    work = [WriteItem(tag, view[off : off + n]) for tag, off, n in req.items]
    storage, path = storage_mod.get_storage(req.path, req.storage)
    records = write_items(storage, SaveTarget(path.rstrip("/"), req.tmp_path), rank, work, req.threads)
    return [(r.tag, r.file, r.offset, r.nbytes, r.xxh3, r.blocks) for r in records]


class CheckpointProcess:
    """One writer subprocess for this rank.

    Args:
        rank_info: this rank.
        subprocess_init_fn: called in the subprocess before it serves (e.g. logging setup).
        subprocess_init_args: its arguments.
        init_timeout_s: how long to wait for the subprocess to start.
    """

    def __init__(
        self, rank_info: RankInfo, subprocess_init_fn: Callable[..., None] | None = None, subprocess_init_args: tuple = (), init_timeout_s: float = 60.0
    ) -> None:
        self.rank = rank_info.global_rank
        ctx = tmp.get_context("spawn")
        self._requests, self._responses = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(
            target=_main,
            args=(self.rank, self._requests, self._responses, subprocess_init_fn, subprocess_init_args),
            daemon=True,
            name=f"dist_ckpt-writer-{self.rank}",
        )
        self._proc.start()
        self._arena: tuple[str, int] | None = None
        self._receive("start", init_timeout_s)
        log.debug("[rank %d] checkpoint process %d started", self.rank, self._proc.pid)

    def _receive(self, what: str, timeout: float | None = None) -> Response:
        waited = 0.0
        while True:
            try:
                msg: Response = self._responses.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if not self._proc.is_alive():
                    raise CheckpointProcessError(f"rank {self.rank}: checkpoint process died (exit code {self._proc.exitcode}) during {what}") from None
                if timeout is not None and waited >= timeout:
                    raise CheckpointProcessError(f"rank {self.rank}: checkpoint process did not answer within {timeout:.0f} s ({what})") from None
        if isinstance(msg, WriteFailed):
            log.error("[rank %d] checkpoint process failed during %s:\n%s", self.rank, what, msg.traceback)
            raise msg.error(self.rank, what)
        return msg

    def write(
        self, shm_name: str, size: int, tmp_path: str, path: str, items: Sequence[tuple[int, int, int]], threads: int, storage: Storage | None = None
    ) -> list[WriteRecord]:
        """Write ``items`` (tag, arena byte offset, nbytes) from the shared arena ``shm_name``; returns records.

        ``storage`` (an injected backend) is pickled to the subprocess; None: chosen there by the path's scheme.
        """
        if self._arena != (shm_name, size):
            self._requests.put(AttachArena(shm_name, size))  # the subprocess attaches by name
            self._arena = (shm_name, size)
        self._requests.put(WriteRequest(tmp_path, path, list(items), threads, storage))
        reply = self._receive("write")
        if not isinstance(reply, Written):
            raise CheckpointProcessError(f"rank {self.rank}: checkpoint process answered a write with {type(reply).__name__}")
        return [WriteRecord(*r) for r in reply.records]

    def close(self) -> None:
        """Stop the subprocess (waits for it, then kills it if it hangs)."""
        if self._proc.is_alive():
            self._requests.put(Stop())
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        for q in (self._requests, self._responses):
            q.close()
            q.join_thread()
