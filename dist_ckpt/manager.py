"""CheckpointManager: numbered checkpoints for a training loop, with retention.

Layout under ``root`` (classified by :mod:`dist_ckpt.root_scan`, shared with the CLI)::

    step-00000100/            a committed checkpoint (it has a MANIFEST)
    step-00000200.tmp-<id>/   a save in flight, or left behind by a crash
    step-00000100.old-<id>/   the old copy during an overwrite's swap
    step-00000300.bad-<id>/   a step a resume could not load, set aside
    step-00000007/            foreign (e.g. a DCP checkpoint): never counted, never removed

Call order and which rank runs each step (every rank calls the public methods
together, in the same order; the manager itself calls no torch collective)::

    __init__   (all ranks) create the checkpointer session (the store hands out
               the coordinator's endpoint); (rank 0) collect what crashed runs
               left behind: see :func:`stale_entries`
    save       (all ranks) wait for the previous save and its retention;
               (rank 0) remove an incomplete ``step-N`` the save would collide with;
               (all ranks) start the save through the checkpointer
    commit     (rank 0, after ``write_future`` completes, in the writer thread)
               read the committed size, apply retention; every rank logs its figures
    load       (all ranks) wait for the save in flight, read the newest (or given)
               committed step; without a given step, agree through the store on
               each attempt and fall back past damaged steps; (rank 0) set each
               skipped one aside as ``step-N.bad-*``
    close      (all ranks) wait for the save in flight, close the checkpointer

With ``local_dir`` (the node-local tier) ``save`` and ``load()`` without a step
go through :mod:`dist_ckpt.tier.manager_tier` instead (local saves with
replicas, every ``persist_every``-th also here; restart from the newest step
complete over all tiers); the root, its retention and clean-up stay as above.

Only rank 0 creates or removes directories, and only at points where no other
rank can be reading what it removes: stale entries at start (before any save
of this job), incomplete ones before the save that replaces them, and old
steps strictly after a commit. A step removed by retention goes through the
storage's one un-commit path, :meth:`Storage.uncommit
<dist_ckpt.storage.Storage.uncommit>` (the local backend first renames it to
``step-N.tmp-delete-*``), which un-commits it atomically: a crash half-way
through a delete never leaves a MANIFEST beside missing data. Retention runs
in the background on rank 0, so other ranks may already have moved on: load
an older step explicitly only if the policy keeps it (e.g. ``keep_every``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .checkpointer import AsyncCheckpointer, SyncCheckpointer, done_future, make_async_checkpointer, make_sync_checkpointer
from .config import Config
from .errors import CheckpointError, CheckpointExists, CheckpointNotFound, ChecksumError, CommitOutcomeUnknown, DataFileError, ManifestError
from .fragments import tensor_bytes
from .layout_names import MANIFEST
from .loader import read_manifest, read_metadata_at
from .logs import get_logger
from .manifest import Manifest
from .preempt import DEFAULT_STOP_SIGNALS, StopWatch, requeue_job
from .root_scan import FOREIGN, INCOMPLETE, RootListing, classify, scan, stale_entries, step_dir_name
from .session import _store
from .storage import Storage, get_storage, strip_scheme
from .tier.restore import RestoreInfo
from .tier.topology import LOCAL_DIR_ENV, check_tier_args

if TYPE_CHECKING:
    from .tier.manager_tier import LocalTier

__all__ = ["CheckpointManager", "RestoreInfo", "RetentionPolicy", "RootListing", "SaveStats", "scan", "stale_entries", "step_dir_name"]

log = get_logger(__name__)

DAMAGE = (ChecksumError, ManifestError, DataFileError, CheckpointNotFound)
"""What a resume treats as a damaged step (fall back to an older one) rather than a mismatch of the target."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed steps to keep.

    Attributes:
        keep_last: keep the newest ``keep_last`` committed steps (None: keep all).
        keep_every: also keep, forever, every step divisible by ``keep_every``.
    """

    keep_last: int | None = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {self.keep_every}")

    def to_delete(self, committed: Iterable[int], protect: Iterable[int] = ()) -> list[int]:
        """Committed steps to remove; the newest and every step in ``protect`` are always kept."""
        steps = sorted(set(committed))
        if self.keep_last is None or not steps:
            return []
        keep = set(steps[-self.keep_last :]) | {steps[-1]} | set(protect)
        if self.keep_every is not None:
            keep |= {s for s in steps if s % self.keep_every == 0}
        return [s for s in steps if s not in keep]


# -- figures ---------------------------------------------------------------------


@dataclass(frozen=True)
class SaveStats:
    """Figures of one committed save, as seen by this rank.

    Attributes:
        step: the training step saved.
        blocked_ms: from ``save()`` being called until the state was staged and the
            caller may mutate it (``waited_ms`` included).
        waited_ms: of which waiting for the previous save to commit.
        total_s: from the start of this save until it was committed for all ranks.
        nbytes: bytes of tensor data in the checkpoint (rank 0, read from the
            MANIFEST; None on other ranks).
        deleted: steps removed by retention after this commit (rank 0).
        tier: ``"durable"`` (committed under the root) or ``"local"`` (the node-local tier).
    """

    step: int
    blocked_ms: float
    waited_ms: float
    total_s: float
    nbytes: int | None = None
    deleted: tuple[int, ...] = field(default=())
    tier: str = "durable"

    @property
    def gbps(self) -> float | None:
        """Checkpoint bytes over total seconds, in GB/s (None without ``nbytes``)."""
        if self.nbytes is None or self.total_s <= 0:
            return None
        return self.nbytes / self.total_s / 1e9

    def line(self) -> str:
        size = ""
        if self.nbytes is not None:
            size = f", {self.nbytes / 1e9:.2f} GB" if self.nbytes >= 1e9 else f", {self.nbytes / 1e6:.1f} MB"
            size += f" at {self.gbps:.3f} GB/s"
        gone = f"; retention removed {list(self.deleted)}" if self.deleted else ""
        waited = f" ({self.waited_ms:.1f} ms waiting for the previous save)" if self.waited_ms >= 1 else ""
        where = "local step" if self.tier == "local" else "step"
        return f"{where} {self.step}: blocked {self.blocked_ms:.1f} ms{waited}, total {self.total_s:.3f} s{size}{gone}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "blocked_ms": self.blocked_ms,
            "waited_ms": self.waited_ms,
            "total_s": self.total_s,
            "nbytes": self.nbytes,
            "gbps": self.gbps,
            "deleted": list(self.deleted),
            "tier": self.tier,
        }


def checkpoint_bytes(path: str) -> int:
    """Bytes of tensor data (global and rank-local) in the committed checkpoint at ``path``.

    Read from the MANIFEST alone: after every save rank 0 logs this figure, and a
    version-2 checkpoint's fragments (one per rank) are not needed for it.
    """
    return tensor_bytes(read_metadata_at(path)[0])


# -- the manager -------------------------------------------------------------------


class CheckpointManager:
    """Save every N steps to ``root/step-<8 digits>``, resume from the newest, keep a few.

    Every rank constructs it and calls ``save``/``load``/``close`` together, in
    the same order. One manager per root per job: at construction rank 0
    removes temporary directories under ``root`` (see :func:`stale_entries`).

    Args:
        root: directory holding the step directories (created on rank 0; ``file://`` allowed).
        keep_last: keep the newest ``keep_last`` committed steps (None: all).
        keep_every: also keep every step divisible by this forever.
        async_save: ``save`` returns ``(stage_future, write_future)`` at once; otherwise it
            blocks until the checkpoint is committed and returns None.
        config: checkpointer settings (default: :meth:`Config.from_env`).
        stop_signals: signals that make :meth:`should_stop` turn True on every rank
            (handlers installed from the main thread only, restored on ``close``); ``()``: none.
            SIGUSR1 is not in the default: NCCL uses it.
        stop_margin_s: (Slurm) stop once the job's remaining time is below the last
            save's duration plus this.
        storage: the backend for the root, its saves, loads, retention and clean-up
            (None: chosen by ``root``'s URL scheme).
        local_dir: node-local directory of the node-local tier (e.g. ``/dev/shm/dist_ckpt``;
            None: ``DIST_CKPT_LOCAL_DIR``, else no local tier and the manager behaves as without one).
            With it every save goes to the local tier (plus ``replicas`` copies on other nodes),
            every ``persist_every``-th also to ``root``, and ``load`` restores the newest step
            complete over all tiers (see :mod:`dist_ckpt.tier.manager_tier`).
        replicas: copies of each rank's local files on other nodes (needs ``replicas + 1`` nodes).
        persist_every: every this-many-th save of this manager also goes to ``root``.
        local_keep: local steps kept per node, the one being written included.

    Raises:
        ValueError: a bad ``keep_last`` / ``keep_every`` / ``stop_signals`` / ``stop_margin_s`` /
            tier setting, or fewer nodes than ``replicas + 1``.
    """

    def __init__(
        self,
        root: str,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        config: Config | None = None,
        stop_signals: Iterable[str | int] = DEFAULT_STOP_SIGNALS,
        stop_margin_s: float = 60.0,
        storage: Storage | None = None,
        local_dir: str | None = None,
        replicas: int = 1,
        persist_every: int = 10,
        local_keep: int = 2,
    ) -> None:
        self.policy = RetentionPolicy(keep_last, keep_every)
        local_dir = local_dir or os.environ.get(LOCAL_DIR_ENV) or None
        self.local_dir = local_dir  # the node-local tier's directory, None without one
        if local_dir:
            check_tier_args(replicas, persist_every, local_keep)
        self.root = root.rstrip("/")
        self._storage, self._root = get_storage(self.root, storage)
        self.async_save = async_save
        self._ckpt: AsyncCheckpointer | SyncCheckpointer = (
            make_async_checkpointer(config, storage=storage) if async_save else make_sync_checkpointer(config, storage=storage)
        )
        self.rank = self._ckpt.writer.session.rank
        self._ckpt.writer.announce_saves = False  # _after_write's line carries the save's summary
        self.history: list[SaveStats] = []
        self._pending: Future = done_future()
        self._lock = threading.Lock()
        self._closed = False
        session = self._ckpt.writer.session
        self._stop = StopWatch(session.agent, self.rank, tuple(stop_signals), stop_margin_s, self._last_save_s, session.config.heartbeat_timeout_s)
        # Steps a resume skipped: never counted again by this manager, even where setting them aside failed,
        # so retention can only remove the step resumed from for steps this job committed itself.
        self._unloadable: set[int] = set()
        self._loads = 0  # load() calls so far: names this call's keys in the store
        self._world = self._ckpt.writer.session.world_size
        if self.rank == 0:
            self._storage.makedirs(self._root)
            listing = scan(self._storage, self._root)
            self._remove(stale_entries(listing), "stale entries left by an earlier run")
            self._collect_garbage()
            for name, what in listing.foreign:
                log.warning("[rank 0] %s/%s holds %s, not a dist_ckpt checkpoint: left alone and never counted as a step", self.root, name, what)
        self.last_restore: RestoreInfo | None = None  # this rank's view of the last load (with a local tier)
        self._tier: LocalTier | None = None
        if local_dir:
            from .tier.manager_tier import LocalTier  # the peer plane (zmq service thread) only with a local tier

            try:
                self._tier = LocalTier(session, self.root, local_dir, replicas, persist_every, local_keep)
            except BaseException:
                self._stop.close()
                self._ckpt.close()
                raise

    # -- queries (any rank, no communication) --

    def path_for(self, step: int) -> str:
        """The directory of ``step`` (committed or not)."""
        return f"{self.root}/{step_dir_name(step)}"

    def steps(self) -> list[int]:
        """Committed steps, ascending (steps a resume found unloadable are left out)."""
        return [s for s in scan(self._storage, self._root).committed if s not in self._unloadable]

    def latest_step(self) -> int | None:
        """The newest committed step, or None; temporary and incomplete directories never count."""
        committed = self.steps()
        return committed[-1] if committed else None

    def manifest(self, step: int | None = None) -> Manifest:
        """The validated MANIFEST of ``step`` (newest committed when None): world size, keys, user_meta.

        Raises:
            CheckpointNotFound: no such committed step.
        """
        return read_manifest(f"{self._root}/{step_dir_name(self._committed_or_latest(step))}", self._storage)[0]

    def _committed_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFound(f"no committed checkpoint under {self.root} (no step-<N> directory with a {MANIFEST})")
        return step

    @property
    def last_stats(self) -> SaveStats | None:
        """Figures of the newest committed save of this manager."""
        return self.history[-1] if self.history else None

    # -- saving --

    def prepare(self, state_dict: Any) -> None:
        """(async) Allocate staging memory for ``state_dict`` now, so the first save is as fast as later ones."""
        if isinstance(self._ckpt, AsyncCheckpointer):
            self._ckpt.prepare(state_dict)

    def save(self, step: int, state_dict: Any, *, overwrite: bool = False, user_meta: Mapping[str, Any] | None = None) -> tuple[Future, Future] | None:
        """Save ``state_dict`` as ``step``; first waits for the previous save (and its retention).

        Args:
            step: the training step (the directory's number, and named in the save's log line).
            overwrite: replace a committed ``step``.
            user_meta: msgpack-native metadata for the MANIFEST (rank 0's value is kept);
                read it back with ``manifest(step).user_meta``.

        Returns:
            async: ``(stage_future, write_future)``: mutate the state only after
            ``stage_future.result()``; ``write_future.result()`` returns once the step
            is committed for all ranks. sync: None, once committed.

        Raises:
            CheckpointError: (sync) the save failed on some rank (the same error on every rank).
            RuntimeError: the manager is closed.
        """
        t_call = time.perf_counter()
        with self._lock:
            if self._closed:
                raise RuntimeError("save() on a closed CheckpointManager")
            self._pending.result()
            if self._tier is not None:
                return self._tier.save(self, step, state_dict, overwrite, user_meta, t_call)
            path = self.path_for(step)
            self._refuse_foreign(step)
            if self.rank == 0:
                self._clear_incomplete(step)
            t_start = time.perf_counter()
            if isinstance(self._ckpt, SyncCheckpointer):
                try:
                    self._ckpt.save(path, state_dict, overwrite=overwrite, user_meta=user_meta, step=step)
                except Exception as e:
                    if self._resolve(path, e) is not None:
                        self._after_write(step, path, t_call, t_start, time.perf_counter(), e)
                        raise
                self._after_write(step, path, t_call, t_start, time.perf_counter(), None)
                return None
            return self._start_async(step, path, state_dict, overwrite, user_meta, t_call, t_start)

    def _start_async(
        self, step: int, path: str, state_dict: Any, overwrite: bool, user_meta: Mapping[str, Any] | None, t_call: float, t_start: float
    ) -> tuple[Future, Future]:
        stage_f, write_f = self._ckpt.save(path, state_dict, overwrite=overwrite, user_meta=user_meta, step=step)  # type: ignore[misc]
        staged_at: list[float] = []
        stage_f.add_done_callback(lambda _: staged_at.append(time.perf_counter()))
        pending: Future = Future()
        self._pending = pending
        resolved: Future = Future()  # write_f with an unknown commit outcome resolved

        def on_written(f: Future) -> None:  # runs in the writer thread once the save is decided
            error = self._resolve(path, f.exception())
            try:
                self._after_write(step, path, t_call, t_start, staged_at[0] if staged_at else time.perf_counter(), error)
            finally:  # resolved first: a save waiting on pending may assume the caller's future is done
                if error is not None:
                    resolved.set_exception(error)
                else:
                    resolved.set_result(None if f.exception() is not None else f.result())
                pending.set_result(None)

        write_f.add_done_callback(on_written)
        return stage_f, resolved

    def _resolve(self, path: str, error: BaseException | None) -> BaseException | None:
        """The save's error, unless it is an unknown commit outcome and ``path`` turns out committed."""
        if isinstance(error, CommitOutcomeUnknown) and self._storage.exists(f"{strip_scheme(path)}/{MANIFEST}"):
            log.warning("[rank %d] the outcome of the save to %s was unknown (%s); its MANIFEST is there, so it is committed", self.rank, path, error)
            return None
        return error

    def _after_write(self, step: int, path: str, t_call: float, t_start: float, t_staged: float, error: BaseException | None) -> None:
        """Record and log the save's figures; (rank 0, committed only) apply retention. Never raises:
        a failed size read or delete must not break the training loop."""
        if error is not None:
            log.error("[rank %d] checkpoint step %d failed; retention skipped: %s", self.rank, step, error)
            return
        total_s = time.perf_counter() - t_start
        nbytes: int | None = None
        deleted: tuple[int, ...] = ()
        if self.rank == 0:
            try:
                nbytes = checkpoint_bytes(path)
            except Exception as e:
                log.warning("[rank 0] checkpoint step %d: cannot read its size from the manifest: %s", step, e)
            try:
                deleted = tuple(self._apply_retention(step))
            except Exception:
                log.exception("[rank 0] retention after step %d failed; the next commit retries it", step)
        stats = SaveStats(step, (t_staged - t_call) * 1e3, (t_start - t_call) * 1e3, total_s, nbytes, deleted)
        self.history.append(stats)
        # The one INFO line of the save, on rank 0: this manager's figures and every rank's phases.
        summary = self._ckpt.writer.last_summary
        phases = f"; {summary.phases()}" if summary is not None else ""
        log.log(logging.INFO if self.rank == 0 else logging.DEBUG, "[rank %d] checkpoint %s%s", self.rank, stats.line(), phases)

    def _apply_retention(self, just_committed: int) -> list[int]:
        """(rank 0, after a commit) Remove committed steps the policy does not keep."""
        doomed = self.policy.to_delete(self.steps(), protect=(just_committed,))
        for step in doomed:
            self._storage.uncommit(f"{self._root}/{step_dir_name(step)}")  # atomically un-committed first (see the module docstring)
        return doomed

    def _refuse_foreign(self, step: int) -> None:
        """(every rank, before saving ``step``) Refuse a ``step-N`` this library did not write.

        Every rank decides from the same directory, so all refuse together
        before any rank starts a save that could only fail at commit.
        """
        entry = classify(self._storage, self._root, step_dir_name(step))
        if entry is not None and entry.kind == FOREIGN:
            raise CheckpointExists(
                f"cannot save step {step}: {self.root}/{entry.name} holds {entry.detail}, not a dist_ckpt checkpoint; move it away or save under another root"
            )

    def _clear_incomplete(self, step: int) -> None:
        """(rank 0, before saving ``step``) Remove an incomplete ``step-N`` (our layout, no MANIFEST) the save would collide with."""
        entry = classify(self._storage, self._root, step_dir_name(step))
        if entry is not None and entry.kind == INCOMPLETE:
            self._remove([entry.name], f"an incomplete directory in the way of saving step {step}")

    def _collect_garbage(self) -> None:
        """(rank 0, at start) The backend's own garbage (S3: objects no MANIFEST references); a failure is logged, not raised."""
        try:
            removed = self._storage.collect_garbage(self._root)
        except Exception:
            log.exception("[rank 0] collecting garbage under %s failed; `dist-ckpt gc` retries it", self.root)
            return
        if removed:
            log.info(
                "[rank 0] removed %d unreferenced objects under %s: %s", len(removed), self.root, ", ".join(removed[:10]) + (" …" if len(removed) > 10 else "")
            )

    def _remove(self, names: list[str], why: str) -> None:
        if not names:
            return
        for name in names:
            self._storage.remove_tree(f"{self._root}/{name}")
        log.info("[rank 0] removed %d %s under %s: %s", len(names), why, self.root, ", ".join(names[:10]) + (" …" if len(names) > 10 else ""))

    # -- preemption and time limits (see preempt.py) --

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a stop signal or (Slurm) ran out of time.

        Call it once per step on every rank; without a signal it costs about a microsecond or less
        (benchmarks/bench_should_stop.py).

        Raises:
            CoordinatorTimeout: (a signalled rank) not every rank acknowledged the stop in time.
        """
        return self._stop.should_stop(step)

    def requeue(self) -> bool:
        """After the emergency save: wait for its commit, then (rank 0, Slurm) ``scontrol requeue`` the job.

        Returns:
            True on the rank that requeued the job; elsewhere False (outside Slurm: a log line).

        Raises:
            RequeueError: under Slurm, ``scontrol`` is missing or refused.
        """
        self.wait()
        if self.rank == 0 and self.last_stats is None:
            log.warning("[rank 0] requeue without a committed save by this job: the requeued job resumes from %s", self.latest_step())
        return requeue_job(self.rank)

    def _last_save_s(self) -> float:
        return self.last_stats.total_s if self.last_stats is not None else 0.0

    def wait(self) -> None:
        """Block until the save in flight is decided and (rank 0) its retention is done."""
        with self._lock:
            self._pending.result()

    # -- loading --

    def load(self, state_dict: Any, step: int | None = None, *, strict: bool = True) -> int:
        """Load ``step`` (when None: the newest committed step that loads) into ``state_dict`` in place.

        Waits for the save in flight first. With ``step=None`` a damaged step
        (checksum, manifest or data-file error on any rank) is skipped for the
        next older one: every rank logs why, the ranks agree through the
        process group's store (a key-value store, not a collective) so all
        load the same step, and rank 0 renames each skipped step to
        ``step-N.bad-*`` so that :meth:`latest_step` and retention stop
        counting it: retention then removes the step loaded only for steps this
        job commits itself.

        With a node-local tier (``local_dir``) and ``step=None``: the newest step complete over
        all tiers (local, then peers' replicas, then ``root``); ``last_restore`` says where this
        rank's bytes came from. An explicit ``step`` reads ``root``.

        Returns:
            The step loaded.

        Raises:
            CheckpointNotFound: no committed checkpoint under ``root`` (or ``step`` is not committed;
                with a local tier: nor a complete local step).
            LoadMismatchError: (strict) keys, shapes or dtypes differ from the checkpoint.
            ChecksumError, ManifestError, DataFileError: the given ``step`` is damaged.
            CheckpointError: (``step=None``) every committed step is damaged, or another
                rank failed to load for a reason other than damage.
        """
        self.wait()
        if step is not None:
            step = self._committed_or_latest(step)
            self._ckpt.load(self.path_for(step), state_dict, strict=strict)
            return step
        if self._tier is not None:
            return self._tier.load(self, state_dict, strict)
        self._loads += 1
        candidates = self.steps()
        if not candidates:
            self._committed_or_latest(None)  # raises CheckpointNotFound naming the root
        for attempt, candidate in enumerate(reversed(candidates)):
            if self._try_load(attempt, candidate, state_dict, strict):
                return candidate
        raise self._all_damaged(candidates)

    def _try_load(self, attempt: int, step: int, state_dict: Any, strict: bool, storage: Storage | None = None) -> bool:
        """Load ``step`` on every rank (through ``storage`` when given); True when all ranks did, False when any found it damaged."""
        error: BaseException | None = None
        try:
            self._ckpt.load(self.path_for(step), state_dict, strict=strict, storage=storage)
        except Exception as e:  # noqa: BLE001 (every rank's outcome is exchanged first; non-damage is re-raised below)
            error = e
        outcomes = self._agree(attempt, error)
        if all(text == "" for text in outcomes.values()):
            return True
        if any(text and not text.startswith("damaged: ") for text in outcomes.values()):
            failures = {r: t for r, t in outcomes.items() if t}
            if error is not None and not isinstance(error, DAMAGE):
                raise error
            raise CheckpointError(f"loading step {step} from {self.root} failed on rank(s) {sorted(failures)}", failures)
        why = "; ".join(f"rank {r}: {t[len('damaged: ') :]}" for r, t in sorted(outcomes.items()) if t)
        log.warning("[rank %d] resume: skipping step %d of %s, it cannot be loaded (%s); trying the next older step", self.rank, step, self.root, why)
        self._unloadable.add(step)
        if self.rank == 0:
            self._set_aside(step)
        return False

    def _agree(self, attempt: int, error: BaseException | None) -> dict[int, str]:
        """Every rank's outcome of load attempt ``attempt`` ("" ok, "damaged: …" or another error's text).

        Goes through the process group's store: each rank publishes its own and
        reads the others' (blocking until all have published).
        """
        mine = "" if error is None else ("damaged: " if isinstance(error, DAMAGE) else "") + f"{type(error).__name__}: {error}"
        if self._world == 1:
            return {0: mine}
        store = _store(None)  # the session's store: the default group's
        prefix = f"dist_ckpt/{self._ckpt.writer.session.job}/resume/{self._loads}/{attempt}"
        store.set(f"{prefix}/{self.rank}", mine)
        return {r: store.get(f"{prefix}/{r}").decode() for r in range(self._world)}

    def _set_aside(self, step: int) -> None:
        """(rank 0) Rename an unloadable ``step-N`` to ``step-N.bad-*``: kept for a post-mortem, no longer a step."""
        name = step_dir_name(step)
        try:
            aside = self._storage.set_aside(f"{self._root}/{name}").rsplit("/", 1)[-1]
            log.warning("[rank 0] resume: set %s/%s aside as %s", self.root, name, aside)
        except OSError as e:
            log.warning("[rank 0] resume: could not set %s/%s aside (%s); this manager ignores it", self.root, name, e)

    def _all_damaged(self, candidates: list[int]) -> Exception:
        # Not CheckpointNotFound: a caller that starts afresh on "not found" must not do so over damaged data.
        return CheckpointError(f"no committed step under {self.root} can be loaded: steps {candidates} are all damaged (see the warnings above)")

    def close(self) -> None:
        """Wait for the save in flight (and its retention), then close the checkpointer; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.result()
            self._stop.close()
            if self._tier is not None:
                self._tier.close()
            self._ckpt.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
