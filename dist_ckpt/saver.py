"""The order of a save's steps on one rank, shared by every save API.

``describe`` (caller thread) → ``stage`` (async only) → :func:`run_save`:
wait for staging → plan request → write own chunks → Done → wait for
Committed. Sync and async saves call the same :func:`run_save`; they differ
only in which thread runs it and whether the bytes come from the stager's
arena or the tensors themselves. No step calls a torch collective.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from . import wire
from .buffers import tensor_memoryview
from .commit import encode_objects, encode_records
from .describe import LocalState
from .errors import CheckpointError, CoordinatorTimeout
from .logs import RankStats, get_logger
from .plan import SavePlan
from .session import Session
from .storage import get_storage
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


def write_here(tmp_path: str, path: str, rank: int, assigned: Sequence[int], host: Sequence[torch.Tensor], threads: int) -> list[WriteRecord]:
    """Write ``host[i]`` for every assigned ``i`` with writer threads in this process."""
    storage, _ = get_storage(path)
    keep = [host_bytes(host[i]) for i in assigned]  # keeps any contiguous copies alive while writing
    return write_items(storage, tmp_path, rank, [WriteItem(i, mv) for i, (_, mv) in zip(assigned, keep)], threads)


def report_failure(session: Session, ckpt: str, phase: str, error: BaseException, path: str = "") -> None:
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
) -> str:
    """Save this rank's part of checkpoint ``ckpt`` and wait until it is committed.

    Args:
        session: this rank's session (agent, rank, config).
        ckpt: save id, the same on every rank.
        path: final checkpoint directory.
        described: metadata of this rank's state.
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
        announce: (rank 0) log the save's summary at INFO; False: at DEBUG
            (the caller logs it in its own line).

    Returns:
        ``path``, once the coordinator has committed the checkpoint for all ranks.

    Raises:
        CheckpointError: this or another rank failed; lists every failed rank.
        CoordinatorTimeout: the coordinator went silent or the deadline passed.
    """
    agent, cfg, rank = session.agent, session.config, session.rank
    # The coordinator enforces the deadlines and names the late ranks; a rank's
    # own wait is only the backstop for a coordinator that cannot answer.
    backstop = cfg.timeout_s + cfg.heartbeat_timeout_s
    phase = "stage"
    t0 = time.perf_counter()
    agent.open(ckpt)
    try:
        try:
            if ready is not None:
                ready()  # no heartbeats yet: the coordinator learns of this save from the PlanRequest
            t_staged = time.perf_counter()
            phase = "plan"
            agent.begin(ckpt, phase)
            blob = described.desc.to_msgpack()
            agent.send(wire.PlanRequest(session.job, ckpt, rank, path, session.world_size, described.desc.digest(), blob, overwrite))
            reply = agent.wait(ckpt, wire.PlanReply, phase, backstop)
            assigned = SavePlan.parse_rank_plan(reply.plan, len(described.desc.tensors))
            t_plan = time.perf_counter()
            phase = "write"
            agent.begin(ckpt, phase)
            records = (write or write_here)(reply.tmp_path, path, rank, assigned, host, cfg.writer_threads)
            if hook is not None:
                hook.pre_commit(path)
            stats = RankStats(t_staged - t0, t_plan - t_staged, time.perf_counter() - t_plan, sum(r.nbytes for r in records))
            first = rank == 0  # replicated values, the structure and user_meta are kept from rank 0
            objects = encode_objects(described.objects if first else {}, described.local_objects, described.structure if first else None, user_meta if first else None, stats)
            agent.send(wire.Done(session.job, ckpt, rank, encode_records(records), objects))
        except (CheckpointError, CoordinatorTimeout):
            raise
        except Exception as e:
            report_failure(session, ckpt, phase, e, path)
            try:
                agent.wait(ckpt, wire.Committed, "abort", cfg.heartbeat_timeout_s * 2)
            except CheckpointError as everyone:
                raise everyone from e
            raise CheckpointError(f"save {ckpt} failed on rank {rank}", {rank: f"{type(e).__name__}: {e}"}) from e
        phase = "commit"
        agent.begin(ckpt, phase)
        agent.wait(ckpt, wire.Committed, phase, backstop)
        if hook is not None:
            hook.post_commit(path)
        _log_committed(session, ckpt, path, step, stats, time.perf_counter() - t0, announce)
        return path
    finally:
        agent.end(ckpt)


def _log_committed(session: Session, ckpt: str, path: str, step: int | None, stats: RankStats, total_s: float, announce: bool) -> None:
    """Rank 0: the one INFO line of the save (every rank's figures); every rank: its own at DEBUG."""
    log.debug("[rank %d] save %s committed at %s: wrote %.1f MB; staging wait %.3f s, plan %.3f s, write %.3f s, total %.3f s",
              session.rank, ckpt, path, stats.nbytes / 1e6, stats.stage_s, stats.plan_s, stats.write_s, total_s)
    coordinator = getattr(session, "coordinator", None)  # rank 0's, in this process
    summary = coordinator.summary(ckpt) if coordinator is not None else None
    if summary is not None:
        log.log(logging.INFO if announce else logging.DEBUG, "[rank %d] %s", session.rank, summary.line(step, path, total_s))
