"""The order of a save's steps on one rank, shared by every save API.

``describe`` (caller thread) → ``stage`` (async only) → :func:`run_save`:
wait for staging → plan request → write own chunks → Done → wait for
Committed. Sync and async saves call the same :func:`run_save`; they differ
only in which thread runs it and whether the bytes come from the staging
arena or the tensors themselves. No step calls a torch collective.
"""

from __future__ import annotations

import abc
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import wire
from .buffers import tensor_memoryview
from .commit import encode_objects, encode_records
from .describe import LocalState
from .errors import CheckpointError, CoordinatorTimeout
from .index_build import write_fragment
from .logs import RankStats, get_logger
from .plan import SavePlan
from .session import Session
from .storage import SaveTarget, Storage, get_storage
from .wire import Phase
from .writer import WriteItem, WriteRecord, write_items

log = get_logger(__name__)


class WriterHook(abc.ABC):  # noqa: B024 - both hooks are optional
    """Called on every rank around the commit of each save (by :func:`run_save`)."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """After this rank's files are written, before it reports Done."""

    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the coordinator committed the checkpoint for all ranks."""


def host_bytes(t: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """A contiguous CPU version of ``t`` (no copy when it already is one) and its bytes."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    return t, tensor_memoryview(t)


WriteFn = Callable[[str, str, int, Sequence[int], Sequence[torch.Tensor], int], list[WriteRecord]]


def write_here(
    tmp_path: str, path: str, rank: int, assigned: Sequence[int], host: Sequence[torch.Tensor], threads: int, storage: Storage | None = None
) -> list[WriteRecord]:
    """Write ``host[i]`` for every assigned ``i`` with writer threads in this process (through ``storage`` if given)."""
    storage, path = get_storage(path, storage)
    keep = [host_bytes(host[i]) for i in assigned]  # keeps any contiguous copies alive while writing
    return write_items(storage, SaveTarget(path.rstrip("/"), tmp_path), rank, [WriteItem(i, mv) for i, (_, mv) in zip(assigned, keep)], threads)


def report_failure(session: Session, ckpt: str, phase: Phase, error: BaseException, path: str = "") -> None:
    """Tell the coordinator this rank cannot take part in save ``ckpt`` to ``path`` (others then abort at once)."""
    log.error("[rank %d] save %s to %s failed in phase %s: %s", session.rank, ckpt, path, phase, error)
    session.agent.send(wire.Failed(session.job, ckpt, session.rank, phase, f"{type(error).__name__}: {error}", path))


def run_save(
    session: Session,
    ckpt: str,
    path: str,
    described: LocalState,
    host: Sequence[torch.Tensor],
    overwrite: bool = False,
    ready: Callable[[], object] | None = None,
    hook: WriterHook | None = None,
    write: "WriteFn | None" = None,
    user_meta: Mapping[str, Any] | None = None,
    step: int | None = None,
    announce: bool = True,
    storage: Storage | None = None,
) -> str:
    """Save this rank's part of checkpoint ``ckpt`` and wait until it is committed.

    The steps, each named once (:class:`~dist_ckpt.wire.Phase`): wait for
    staging (``ready``) → :func:`_request_plan` → :func:`_write_and_report`
    (write, ``pre_commit``, Done) → wait for Committed (``post_commit``).
    A step that raises is reported to the coordinator with its phase
    (:func:`_step`), so every rank aborts at once.

    Args:
        session: this rank's session (agent, rank, config).
        ckpt: save id, the same on every rank.
        path: final checkpoint directory.
        described: this rank's state, described (its description, tensors and objects).
        host: tensors aligned with ``described.tensors`` whose bytes are written
            (staged copies, or the originals for a sync save).
        overwrite: replace an existing checkpoint at ``path``.
        ready: called before the plan request (an async save waits for its
            staging here); an exception from it fails the save. Since the
            plan needs every rank's request, no rank starts writing while
            another is still staging: on shared hosts writers (page-cache
            copies, hashing) slowed the last ranks' staging, which is what
            the training thread waits for.
        hook: ``pre_commit(path)`` before reporting Done, ``post_commit(path)`` after Committed.
        write: writes the assigned chunks and returns their records; default
            :func:`write_here` (writer threads in this process).
        user_meta: checked metadata for the MANIFEST (rank 0's is stored).
        step: the training step, for the log line (the save id otherwise).
        storage: the storage the data goes through (None: by the path's scheme); a format-version-2
            save writes this rank's fragment through it too.
        announce: (rank 0) log the save's summary at INFO; False: at DEBUG
            (the caller logs it in its own line).

    Returns:
        ``path``, once the coordinator has committed the checkpoint for all ranks.

    Raises:
        CheckpointError: this or another rank failed; lists every failed rank.
        CoordinatorTimeout: the coordinator went silent or the deadline passed.
    """
    agent = session.agent
    t0 = time.perf_counter()
    agent.open(ckpt)
    try:
        with _step(session, ckpt, path, Phase.STAGE):
            if ready is not None:
                ready()  # no heartbeats yet: the coordinator learns of this save from the PlanRequest
        t_staged = time.perf_counter()
        with _step(session, ckpt, path, Phase.PLAN):
            tmp_path, assigned, cells = _request_plan(session, ckpt, path, described, overwrite)
        t_plan = time.perf_counter()
        with _step(session, ckpt, path, Phase.WRITE):
            records = (write or write_here)(tmp_path, path, session.rank, assigned, host, session.config.writer_threads)
            if cells is None:
                payload = encode_records(records)
            else:  # format version 2: the records go into this rank's fragment, beside its data; Done names it
                payload = _write_fragment(tmp_path, path, session.rank, assigned, records, cells, storage)
            if hook is not None:
                hook.pre_commit(path)
            stats = RankStats(t_staged - t0, t_plan - t_staged, time.perf_counter() - t_plan, sum(r.nbytes for r in records))
            _report_done(session, ckpt, described, payload, user_meta, stats)
        agent.begin(ckpt, Phase.COMMIT)
        agent.wait(ckpt, wire.Committed, Phase.COMMIT, _backstop(session))
        if hook is not None:
            hook.post_commit(path)
        _log_committed(session, ckpt, path, step, stats, time.perf_counter() - t0, announce)
        return path
    finally:
        agent.end(ckpt)


def _backstop(session: Session) -> float:
    """How long a rank waits for the coordinator before it gives up on it.

    The coordinator enforces the deadlines and names the late ranks; a rank's
    own wait is only the backstop for a coordinator that cannot answer.
    """
    return session.config.timeout_s + session.config.heartbeat_timeout_s


@contextmanager
def _step(session: Session, ckpt: str, path: str, phase: Phase) -> Iterator[None]:
    """Run one step of save ``ckpt`` in ``phase``; if it raises, report it and wait for everyone's outcome.

    A failure that already is everyone's (``CheckpointError``, the
    coordinator's silence) passes through. Any other error is reported as
    ``Failed`` with ``phase``; the coordinator's ``Aborted`` (listing every
    failed rank) is then raised, or this rank's own failure if none comes.
    """
    if phase is not Phase.STAGE:  # heartbeats start with the PlanRequest
        session.agent.begin(ckpt, phase)
    try:
        yield
    except (CheckpointError, CoordinatorTimeout):
        raise
    except Exception as e:
        report_failure(session, ckpt, phase, e, path)
        try:
            session.agent.wait(ckpt, wire.Committed, Phase.ABORT, session.config.heartbeat_timeout_s * 2)
        except CheckpointError as everyone:
            raise everyone from e
        raise CheckpointError(f"save {ckpt} failed on rank {session.rank}", {session.rank: f"{type(e).__name__}: {e}"}) from e


def _request_plan(
    session: Session, ckpt: str, path: str, described: LocalState, overwrite: bool
) -> tuple[str, tuple[int, ...], tuple[np.ndarray, np.ndarray] | None]:
    """Send this rank's description; returns the tmp dir to write into, the indices of the tensors this rank
    writes and, for a format-version-2 save, their (entries, cells)."""
    desc = described.desc
    session.agent.send(wire.PlanRequest(session.job, ckpt, session.rank, path, session.world_size, wire.UInt64(desc.digest()), desc.to_msgpack(), overwrite))
    reply = session.agent.wait(ckpt, wire.PlanReply, Phase.PLAN, _backstop(session))
    assigned, cells = SavePlan.parse_rank_plan_v2(reply.plan, len(desc.tensors), desc.columns())  # v2: cells derived from its own boxes
    log.debug("[rank %d] save %s: %s plan, %d of %d tensors to write", session.rank, ckpt, "cached" if reply.same else "new", len(assigned), len(desc.tensors))
    return reply.tmp_path, assigned, cells


def _write_fragment(
    tmp_path: str, path: str, rank: int, assigned: Sequence[int], records: list[WriteRecord], cells: tuple[np.ndarray, np.ndarray], storage: Storage | None
) -> bytes:
    """Write this rank's fragment (its records by (entry, cell)) through the storage its data went through; returns the Done payload."""
    storage, path = get_storage(path, storage)
    at = {t: i for i, t in enumerate(assigned)}
    order = [at[r.tag] for r in records]  # the writer reports each assigned tensor once, tagged with its index
    if sorted(order) != list(range(len(assigned))):
        raise CheckpointError(f"rank {rank}: the writer reported tensors {sorted(r.tag for r in records)[:8]}, not the assigned {list(assigned)[:8]}")
    entries, cell = cells
    return write_fragment(storage, SaveTarget(path.rstrip("/"), tmp_path), rank, records, entries[order], cell[order])


def _report_done(session: Session, ckpt: str, described: LocalState, payload: bytes, user_meta: Mapping[str, Any] | None, stats: RankStats) -> None:
    """Send Done: this rank's chunk records (v2: its fragment's name, size, hash) and its objects
    (replicated values, structure and user_meta from rank 0 only)."""
    first = session.rank == 0
    objects = encode_objects(
        described.objects if first else {}, described.local_objects, described.structure if first else None, user_meta if first else None, stats
    )
    session.agent.send(wire.Done(session.job, ckpt, session.rank, payload, objects))


def _log_committed(session: Session, ckpt: str, path: str, step: int | None, stats: RankStats, total_s: float, announce: bool) -> None:
    """Rank 0: the one INFO line of the save (every rank's figures); every rank: its own at DEBUG."""
    log.debug(
        "[rank %d] save %s committed at %s: wrote %.1f MB; staging wait %.3f s, plan %.3f s, write %.3f s, total %.3f s",
        session.rank,
        ckpt,
        path,
        stats.nbytes / 1e6,
        stats.stage_s,
        stats.plan_s,
        stats.write_s,
        total_s,
    )
    coordinator = getattr(session, "coordinator", None)  # rank 0's, in this process
    summary = coordinator.summary(ckpt) if coordinator is not None else None
    if summary is not None:
        log.log(logging.INFO if announce else logging.DEBUG, "[rank %d] %s", session.rank, summary.line(step, path, total_s))
