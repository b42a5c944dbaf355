"""Preemption and time limits: stop every rank at the same step, save, requeue.

A cluster ends a job with a signal and a short grace (Slurm ``--signal=USR2@120``,
``scancel --signal``, SIGTERM before SIGKILL; torchrun forwards SIGTERM and kills
its workers 30 s later). :class:`StopWatch` turns that into one answer that every
rank gives at the same step, without a collective on the training group:

1. Signal handlers only record the signal number (no lock, no I/O, no logging:
   nothing that could deadlock if the signal lands inside such a call); a
   previous Python-level handler is chained, and ``close()`` restores it.
2. The first ``should_stop(s)`` that sees the flag sends ``StopRequest(s)`` to
   the coordinator over the rank's existing ZeroMQ link. The coordinator fixes
   ``stop_at = s + 1`` (first request wins; later ones get the same answer) and
   sends ``StopAt`` to every rank, whose agent thread records it and acks at
   once, whatever the training thread is doing. The requesting rank blocks in
   ``should_stop(s)`` until the coordinator confirms every rank acked
   (``StopReady``), then returns False; every rank returns True at ``stop_at``.

Guarantee: every rank's ``should_stop`` is False before ``stop_at`` and True at
it. Assumption: each step has a collective that no rank can complete before
every rank has entered that step (true for data/FSDP/tensor parallel training),
so ranks are never more than one step apart; then no rank can pass
``should_stop(s + 1)`` before the requester has entered step ``s + 1``, which it
does only after every rank's agent knows ``stop_at``.

Without a signal, ``should_stop`` reads two attributes and, at most every
``check_every_s`` on rank 0 under a Slurm time limit, compares the clock with
the job's end time: next to nothing per call (see benchmarks/bench_should_stop.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import CoordinatorTimeout, RequeueError

log = logging.getLogger(__name__)

#: SIGUSR1 is left alone: NCCL (and some MPI stacks) use it for their own purposes.
DEFAULT_STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR2")
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def parse_signals(names: Sequence[str | int]) -> tuple[signal.Signals, ...]:
    """``("SIGTERM", "USR2", 12)`` -> signal numbers.

    Raises:
        ValueError: an unknown name, or SIGKILL / SIGSTOP (they cannot be caught).
    """
    out = []
    for name in names:
        try:
            sig = signal.Signals(name) if isinstance(name, int) else signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        except (KeyError, ValueError):
            raise ValueError(f"stop_signals: unknown signal {name!r}") from None
        if sig in _UNCATCHABLE:
            raise ValueError(f"stop_signals: {sig.name} cannot be caught")
        out.append(sig)
    return tuple(dict.fromkeys(out))


class SignalFlag:
    """Install handlers for ``signals`` that only record which signal arrived.

    Python runs signal handlers in the main thread between bytecodes, so they
    can only be installed from the main thread; from any other thread nothing
    is installed (a warning says so) and only other ranks' requests and time
    limits stop this rank.

    Args:
        signals: signal names or numbers; empty installs nothing.
    """

    def __init__(self, signals: Sequence[str | int]) -> None:
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        sigs = parse_signals(signals)
        if signal.SIGUSR1 in sigs:
            log.warning("stop_signals includes SIGUSR1, which NCCL uses for its own purposes")
        if sigs and threading.current_thread() is not threading.main_thread():
            log.warning("stop signals %s not handled: signal handlers can only be installed from the main thread", [s.name for s in sigs])
            return
        for sig in sigs:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def installed(self) -> tuple[signal.Signals, ...]:
        """The signals this flag handles now."""
        return tuple(self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        previous = self._previous.get(signal.Signals(signum))
        # SIG_DFL would end the process (the point is to survive it) and SIG_IGN
        # does nothing: only a Python handler someone installed before us is chained.
        if callable(previous):
            previous(signum, frame)

    def close(self) -> None:
        """Restore the previous handlers (main thread only; idempotent)."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous = {}


# -- Slurm ------------------------------------------------------------------------------


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol`` needs: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None outside Slurm."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def parse_squeue_end(text: str) -> float | None:
    """``squeue -o %e`` output (local time, ``2026-12-01T09:30:00``) -> epoch seconds; None for no limit."""
    text = text.strip()
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:  # "N/A", "Unknown", "NONE": no end time
        return None


def slurm_end_time(env: Mapping[str, str] | None = None) -> float | None:
    """When this Slurm job's time limit ends (epoch seconds), or None (no limit / not under Slurm).

    ``SLURM_JOB_END_TIME`` (Slurm >= 23.02) when set, else one ``squeue`` call.
    """
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job, squeue = env.get("SLURM_JOB_ID"), shutil.which("squeue")
    if not job or squeue is None:
        return None
    try:
        r = subprocess.run([squeue, "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot read the time limit of Slurm job %s: %s", job, e)
        return None
    return parse_squeue_end(r.stdout) if r.returncode == 0 else None


def requeue_job(rank: int, env: Mapping[str, str] | None = None) -> bool:
    """(rank 0, under Slurm) ``scontrol requeue`` this job; elsewhere a log line.

    Returns:
        True when rank 0 requeued the job.

    Raises:
        RequeueError: under Slurm, ``scontrol`` is missing or refused (e.g. ``--no-requeue``).
    """
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if job is None:
        log.info("[rank %d] not a Slurm job: nothing to requeue; start the job again to resume", rank)
        return False
    if rank != 0:
        return False
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        raise RequeueError(f"rank 0: cannot requeue Slurm job {job}: scontrol is not on PATH ({env.get('PATH', '')})")
    try:
        r = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RequeueError(f"rank 0: scontrol requeue {job} failed: {e}") from e
    if r.returncode != 0:
        raise RequeueError(f"rank 0: scontrol requeue {job} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    log.warning("[rank 0] requeued Slurm job %s: it resumes from the newest committed step", job)
    return True


class TimeLimit:
    """Rank 0's view of the job's end: time to stop once less than ``needed_s() + margin_s`` remains.

    Args:
        end: epoch seconds the job ends at.
        margin_s: seconds kept free beyond the measured save duration.
        check_every_s: compare with the clock at most this often.
    """

    def __init__(self, end: float, margin_s: float, check_every_s: float = 1.0) -> None:
        self.end, self.margin_s, self.check_every_s = end, margin_s, check_every_s
        self._next = 0.0

    def expired(self, needed_s: float, now: float | None = None) -> bool:
        """True when the remaining time is below ``needed_s + margin_s`` (checked at most every ``check_every_s``)."""
        mono = time.monotonic()
        if mono < self._next:
            return False
        self._next = mono + self.check_every_s
        return self.end - (time.time() if now is None else now) < needed_s + self.margin_s


# -- agreement ----------------------------------------------------------------------------


class StopWatch:
    """``should_stop(step)``: the same answer on every rank at the same step.

    Args:
        agent: this rank's link to the coordinator (``Agent``).
        rank: this rank.
        signals: stop signals (empty: none handled).
        margin_s: (rank 0, Slurm) seconds beyond the last save's duration to keep free.
        save_seconds: the duration of the last save (0 before the first one).
        timeout_s: longest wait for every rank to acknowledge the stop step.
        env: the environment (Slurm variables).
    """

    def __init__(
        self,
        agent: Any,
        rank: int,
        signals: Sequence[str | int],
        margin_s: float,
        save_seconds: Callable[[], float],
        timeout_s: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if margin_s < 0:
            raise ValueError(f"stop_margin_s must be >= 0, got {margin_s}")
        self._agent, self.rank, self._save_seconds, self._timeout_s = agent, rank, save_seconds, timeout_s
        self.flag = SignalFlag(signals)
        self.reason: str | None = None
        self._requested = False
        env = os.environ if env is None else env
        end = slurm_end_time(env) if rank == 0 and slurm_job_id(env) else None
        self.time_limit = TimeLimit(end, margin_s) if end is not None else None
        if rank == 0 and slurm_job_id(env):
            log.info(
                "[rank 0] Slurm job %s, restart count %s, time limit ends %s",
                slurm_job_id(env),
                env.get("SLURM_RESTART_COUNT", "0"),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end)) if end else "never",
            )
        agent.subscribe_stop()

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank was signalled or ran out of time.

        Raises:
            CoordinatorTimeout: (a signalled rank) not every rank acknowledged within ``timeout_s``.
        """
        stop_at = self._agent.stop_at
        if stop_at is None:
            if self.flag.signum is not None:
                self.reason = f"signal {signal.Signals(self.flag.signum).name}"
            elif self.time_limit is not None and self.time_limit.expired(self._save_seconds()):
                self.reason = f"Slurm time limit ({self.time_limit.end - time.time():.0f} s left)"
            else:
                return False
            stop_at = self._agree(step)
        return self._decide(step, stop_at)

    def _agree(self, step: int) -> int:
        """Ask the coordinator to stop; wait until every rank knows the stop step; return it."""
        if not self._requested:
            self._requested = True
            log.warning("[rank %d] %s at step %d: asking every rank to stop", self.rank, self.reason, step)
            self._agent.request_stop(step)
        if not self._agent.wait_stop_ready(self._timeout_s):
            raise CoordinatorTimeout(
                f"rank {self.rank}: not every rank acknowledged the stop requested at step {step} "
                f"within {self._timeout_s:.0f} s (coordinator at {self._agent.endpoint})"
            )
        assert self._agent.stop_at is not None  # StopReady is only accepted for the recorded StopAt
        return self._agent.stop_at

    def _decide(self, step: int, stop_at: int) -> bool:
        if step < stop_at:
            return False
        if step == stop_at:
            why = self.reason or (f"signal {signal.Signals(self.flag.signum).name}" if self.flag.signum is not None else "another rank asked")
            log.warning("[rank %d] stopping at step %d (%s)", self.rank, step, why)
        else:  # only if the assumption above was broken: say so rather than hide it
            log.error("[rank %d] should_stop(%d) after the agreed stop step %d: ranks may stop at different steps", self.rank, step, stop_at)
        return True

    def close(self) -> None:
        """Restore the signal handlers."""
        self.flag.close()
