"""Operator logs: every line names its rank; rank 0 logs one summary line per save.

Modules take their logger from :func:`get_logger`: its filter prefixes
``[rank N]`` to any line that does not name a rank already, N being this
process's rank (set by the :class:`~dist_ckpt.session.Session`; before that,
the launcher's ``RANK``). Per-rank figures are DEBUG. At INFO a save logs one
line on rank 0, built by :func:`summarize` from the phase timings every rank
reports in its Done message (:class:`RankStats`), e.g.::

    [rank 0] step 100 saved to /ckpt/step-00000100: 1.07 GB in 1.234 s (0.87 GB/s) by 4 ranks;
    stage 0.012 s, plan 0.020 s, write 1.150 s (0.93 GB/s), commit 0.031 s; slowest rank 3 (write 1.150 s, 268.4 MB)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

_rank: int | None = None


def set_rank(rank: int) -> None:
    """Record this process's rank for the prefix (the session calls this)."""
    global _rank
    _rank = rank


def current_rank() -> int:
    """This process's rank: the session's, else ``RANK`` from the launcher, else 0."""
    if _rank is not None:
        return _rank
    raw = os.environ.get("RANK", "0").strip()
    return int(raw) if raw.isdigit() else 0


class RankPrefix(logging.Filter):
    """Prefix ``[rank N]`` to a record's message unless it names its rank itself.

    Lines that carry an explicit ``[rank N]`` keep it: in-process tests run
    several ranks' agents in one process, where the process rank would be wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith("[rank "):
            record.msg = f"[rank {current_rank()}] {record.msg}"
        return True


_PREFIX = RankPrefix()


def get_logger(name: str) -> logging.Logger:
    """The module logger ``name`` with the rank prefix attached (idempotent)."""
    logger = logging.getLogger(name)
    if _PREFIX not in logger.filters:
        logger.addFilter(_PREFIX)
    return logger


@dataclass(frozen=True)
class RankStats:
    """One rank's part of a save, reported in its Done payload.

    Attributes:
        stage_s: waiting for staging (async) before the plan request.
        plan_s: plan request until the plan arrived.
        write_s: writing this rank's files (and the pre-commit hook).
        nbytes: bytes this rank wrote.
    """

    stage_s: float
    plan_s: float
    write_s: float
    nbytes: int

    def to_msgpack(self) -> dict[str, float | int]:
        return asdict(self)

    @staticmethod
    def from_msgpack(obj: Any) -> "RankStats":
        """Raises ValueError unless ``obj`` is exactly the four figures, non-negative."""
        if not isinstance(obj, dict) or set(obj) != {"stage_s", "plan_s", "write_s", "nbytes"}:
            raise ValueError("stats must be a map of stage_s, plan_s, write_s, nbytes")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in obj.values()) or not isinstance(obj["nbytes"], int):
            raise ValueError("stats figures must be non-negative numbers (nbytes an int)")
        return RankStats(float(obj["stage_s"]), float(obj["plan_s"]), float(obj["write_s"]), obj["nbytes"])


@dataclass(frozen=True)
class SaveSummary:
    """(coordinator) The figures of one committed save over all ranks."""

    ranks: int
    nbytes: int
    stage_s: float  # slowest rank's, per phase: the phases end at a barrier
    plan_s: float
    write_s: float
    commit_s: float
    slowest: int  # the rank that took longest to write
    slowest_write_s: float
    slowest_nbytes: int

    def line(self, step: int | None, path: str, total_s: float) -> str:
        """The save of ``step`` (None: not known) to ``path``, with every phase's figures."""
        what = f"step {step} saved to {path}" if step is not None else f"saved {path}"
        return f"{what}: {_size(self.nbytes)} in {total_s:.3f} s ({_gbps(self.nbytes, total_s)}) by {self.ranks} rank{'s' if self.ranks != 1 else ''}; {self.phases()}"

    def phases(self) -> str:
        """Each phase's seconds (the slowest rank's), write throughput, and the slowest writer."""
        return (
            f"stage {self.stage_s:.3f} s, plan {self.plan_s:.3f} s, write {self.write_s:.3f} s ({_gbps(self.nbytes, self.write_s)}), "
            f"commit {self.commit_s:.3f} s; slowest rank {self.slowest} (write {self.slowest_write_s:.3f} s, {_size(self.slowest_nbytes)})"
        )


def summarize(stats: Mapping[int, RankStats], commit_s: float) -> SaveSummary:
    """The save's summary from every rank's :class:`RankStats` (at least one)."""
    slowest = max(stats, key=lambda r: (stats[r].write_s, -r))
    return SaveSummary(
        ranks=len(stats),
        nbytes=sum(s.nbytes for s in stats.values()),
        stage_s=max(s.stage_s for s in stats.values()),
        plan_s=max(s.plan_s for s in stats.values()),
        write_s=stats[slowest].write_s,
        commit_s=commit_s,
        slowest=slowest,
        slowest_write_s=stats[slowest].write_s,
        slowest_nbytes=stats[slowest].nbytes,
    )


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _gbps(n: int, s: float) -> str:
    return f"{n / max(s, 1e-9) / 1e9:.2f} GB/s"
