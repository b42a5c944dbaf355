"""The node-local tier of a :class:`~dist_ckpt.CheckpointManager`: saves, the restart choice, retention.

What a :class:`LocalTier` adds to the manager (every rank holds one; every
rank calls its methods together, through the manager's ``save``/``load``)::

    __init__  (every rank) start this rank's PeerService; exchange node ids and
              service addresses through the process group's store; refuse
              fewer nodes than replicas + 1; (each node's leader) remove local
              saves a crash left half-written
    save      (each node's leader) drop old local steps so that, with the one
              being written, at most local_keep remain (the newest of them is
              recycled: its files are written over by this save, not freed and
              allocated again); (every rank) save to
              the local tier (own node + replicas on partner nodes); every
              persist_every-th save then also to the durable root, from the
              same staged host bytes, in the save thread
    load      (every rank) exchange the nodes' inventories; try the complete
              local steps not older than the newest durable step, newest first
              (every rank reads through TieredReadStorage: own node, partner
              nodes, then the durable copy of the same step); the ranks agree
              on each attempt; finally the durable tier as without the tier

The store is a plain unauthenticated key-value store: what comes through it
(node ids, service addresses, inventories) is checked for shape, and only
chooses where to read; every byte read is still checked against the
MANIFEST's checksums, and peers are CURVE-authenticated.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Mapping

import msgpack
import xxhash

from ..checkpointer import AsyncCheckpointer
from ..errors import CheckpointError, CheckpointNotFound, ChecksumError, DataFileError, ManifestError, PeerError
from ..fragments import checkpoint_files, read_metadata
from ..layout_names import MANIFEST, save_tag, step_dir_name
from ..logs import get_logger
from ..saver import report_failure
from ..session import Session, _store, job_interface
from ..storage.local import LocalStorage
from ..user_meta import check_user_meta
from ..wire import Phase
from . import layout
from .counting import CountingReads
from .peer import PeerClient, PeerService
from .restore import Candidate, NodeInventory, RestoreInfo, StepCopy, candidates, decode_inventory, encode_inventory, file_named_in, sources
from .storage import LocalTierStorage, TieredReadStorage
from .topology import Topology, check_tier_args, first_on_node_from_env, node_id_from_env

if TYPE_CHECKING:
    from ..manager import CheckpointManager

log = get_logger(__name__)

TIER_SCHEME = "tier"
"""Scheme of the local tier's save path ``tier://<job_key>/step-N``: one string on every rank, whatever each node's local_dir."""
ADDRESS_RE = re.compile(r"^tcp://[A-Za-z0-9.\-:\[\]]{1,255}:\d{1,5}$")
MAX_ENTRY_BYTES = 16 << 20  # one rank's entry in the store (an inventory of a few steps is kilobytes)
RETRYABLE = (ChecksumError, DataFileError, PeerError, OSError, ManifestError)
"""A local attempt's errors that the next copy of a file (or the next candidate) may cure."""


class LocalTier:
    """One rank's part of the node-local tier (see the module docstring).

    Args:
        session: the manager's checkpointer session (rank, world, job id, secret).
        root: the durable root (its URL names the job's local directory: :func:`layout.job_key`).
        local_dir: the node-local directory (e.g. ``/dev/shm/dist_ckpt``).
        replicas: copies of each rank's files on other nodes.
        persist_every: every this-many-th save also goes to ``root``.
        local_keep: local steps kept per node, the one being written included.

    Raises:
        ValueError: fewer nodes than ``replicas + 1``, or a bad setting.
    """

    def __init__(self, session: Session, root: str, local_dir: str, replicas: int, persist_every: int, local_keep: int) -> None:
        check_tier_args(replicas, persist_every, local_keep)
        self.session = session
        self.rank, self.world = session.rank, session.world_size
        self.replicas, self.persist_every, self.local_keep = replicas, persist_every, local_keep
        self.job_key = layout.job_key(root)
        self.local_root = layout.local_root(local_dir, root)
        self._saves = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dist_ckpt-tier")
        timeout = session.config.heartbeat_timeout_s  # a peer silent that long is dead, as a rank is to the coordinator
        try:
            os.makedirs(self.local_root, exist_ok=True)
            encrypt = session.config.peer_encryption
            self.service = PeerService(self.local_root, session.secret, self.rank, self.world, job_interface(os.environ.get("MASTER_ADDR")), encrypt)
        except Exception as e:  # the other ranks wait for this rank's hello: tell them why instead of letting them hang
            self._exchange("hello", {"error": f"{type(e).__name__}: {e}"[:2000]}, wait=False)
            raise
        try:
            # A node's first local rank (its leader, as launchers number ranks) sends the node's inventory with its
            # hello: a restart's first load then needs no round of its own for it (see inventories()).
            inventory = encode_inventory(self.node_inventory()) if first_on_node_from_env() else None
            hello = self._exchange("hello", {"node": node_id_from_env(), "address": self.service.address, "inventory": inventory})
            ids, addresses = self._check_hello(hello)
            self.topology = Topology.from_ids(self.rank, ids)
            self.topology.check_replicas(replicas)
            self.clients = {r: PeerClient(addresses[r], session.secret, self.rank, timeout, r, encrypt) for r in range(self.world) if r != self.rank}
        except BaseException:
            self.service.close()
            raise
        self.is_leader = self.topology.leader(self.topology.node) == self.rank
        leaders = self.topology.leaders()
        self._start_inventories = [hello[r].get("inventory") for r in leaders] if all(hello[r].get("inventory") is not None for r in leaders) else None
        if self.is_leader:  # before this rank's first plan request: no save of this job can be writing here yet
            layout.clear_incomplete(self.local_root)
        self.save_storage = LocalTierStorage(self.local_root, self.topology, replicas, self.clients)  # type: ignore[arg-type]  # until TopologyLike.rank is a property
        if self.rank == 0:
            log.info(
                "[rank 0] node-local tier: %d node(s) of %s rank(s), %d replica(s), durable every %d save(s), %d local step(s) kept, under %s/%s",
                self.topology.nodes,
                [len(self.topology.ranks_on(n)) for n in range(self.topology.nodes)],
                replicas,
                persist_every,
                local_keep,
                local_dir,
                self.job_key,
            )

    # -- the store exchange -------------------------------------------------------

    def _exchange(self, name: str, value: Any, wait: bool = True) -> list[Any]:
        """Every rank's ``value`` (msgpack-native) for exchange ``name``; blocks until all have published
        (``wait=False``: only publishes this rank's, and returns ``[]``)."""
        if self.world == 1:
            return [value]
        store = _store(None)
        prefix = f"dist_ckpt/{self.session.job}/tier/{name}"
        store.set(f"{prefix}/{self.rank}", msgpack.packb(value))  # type: ignore[arg-type]  # takes bytes too
        if not wait:
            return []
        out = []
        for r in range(self.world):
            raw = store.get(f"{prefix}/{r}")
            try:
                if len(raw) > MAX_ENTRY_BYTES:
                    raise ValueError(f"{len(raw)} bytes, more than {MAX_ENTRY_BYTES}")
                out.append(msgpack.unpackb(raw, raw=False))
            except Exception as e:  # noqa: BLE001 (any decoding failure of untrusted bytes is this one error)
                raise CheckpointError(f"[rank {self.rank}] node-local tier: rank {r}'s {name} entry in the store is malformed: {e}") from e
        return out

    def _check_hello(self, hello: list[Any]) -> tuple[list[str], list[str]]:
        ids, addresses = [], []
        failed = {r: h["error"] for r, h in enumerate(hello) if isinstance(h, dict) and isinstance(h.get("error"), str)}
        if failed:
            raise CheckpointError(f"[rank {self.rank}] node-local tier: rank(s) {sorted(failed)} could not start their peer service", failed)
        for r, h in enumerate(hello):
            node, address = (h.get("node"), h.get("address")) if isinstance(h, dict) else (None, None)
            if not (isinstance(node, str) and 0 < len(node) <= 128 and isinstance(address, str) and ADDRESS_RE.match(address)):
                raise CheckpointError(f"[rank {self.rank}] node-local tier: rank {r}'s hello in the store is malformed ({h!r:.120}); was it tampered with?")
            ids.append(node)
            addresses.append(address)
        return ids, addresses

    # -- saving -------------------------------------------------------------------------

    def path_for(self, step: int) -> str:
        """The local tier's save path of ``step``, the same string on every rank."""
        return f"{TIER_SCHEME}://{self.job_key}/{step_dir_name(step)}"

    def local_steps(self) -> list[int]:
        """Committed local steps on this node, ascending."""
        return sorted(layout.committed_steps(self.local_root))

    def prune(self, step: int, save_id: str | None = None) -> list[int]:
        """(each node's leader, in the save thread, before its plan request for ``step``) Remove this node's old local steps.

        Keeps the newest ``local_keep - 1`` others, so with ``step`` being written at most
        ``local_keep`` are here; a committed copy of ``step`` itself goes too (it is being replaced).
        The previous save is done, and every restore's reads were agreed on: nobody reads them.
        With ``save_id``, the newest of them is not deleted but recycled into that save's tmp
        directory (:func:`layout.recycle_step`): a rename here, and the save writes over its
        files' pages instead of this thread freeing them (on tmpfs about as costly as the write).

        Returns:
            The steps removed.
        """
        if not self.is_leader:
            return []
        others = [s for s in self.local_steps() if s != step]
        keep = set(others[len(others) - (self.local_keep - 1) :]) if self.local_keep > 1 else set()
        doomed = [s for s in self.local_steps() if s not in keep]
        recycled = None
        # into the tmp directory the coordinator will name for this save
        if doomed and save_id is not None and layout.recycle_step(self.local_root, doomed[-1], step, save_tag(self.session.job, save_id)):
            recycled = doomed[-1]
        for s in doomed:
            if s != recycled:
                layout.remove_step(self.local_root, s)
        if doomed:
            log.info(
                "[rank %d] node-local tier: removed local step(s) %s of node %d (local_keep=%d)%s",
                self.rank,
                doomed,
                self.topology.node,
                self.local_keep,
                f"; step {recycled}'s files are reused by step {step}" if recycled is not None else "",
            )
        return doomed

    def save(
        self, mgr: CheckpointManager, step: int, state_dict: Any, overwrite: bool, user_meta: Mapping[str, Any] | None, t_call: float
    ) -> tuple[Future, Future] | None:
        """Save ``step`` to the local tier, and (every ``persist_every``-th save) then to the durable root.

        Async (the manager's checkpointer stages): returns ``(stage_future, write_future)``;
        ``write_future`` completes once every tier of this save is committed. Sync: returns None then.

        Raises:
            StateDictError: a value cannot be stored (before anything is written).
            CheckpointError: (sync) a tier's save failed on some rank.
        """
        self._saves += 1
        persist = self._saves % self.persist_every == 0
        t_start = time.perf_counter()
        ckpt = mgr._ckpt
        if not isinstance(ckpt, AsyncCheckpointer):
            self._write_tiers(mgr, step, state_dict, None, user_meta, overwrite, persist, (t_call, t_start, lambda: t_start))
            return None
        session = ckpt.writer.session
        save_id = session.next_save_id()
        try:
            meta = check_user_meta(user_meta)
            staged = ckpt.stager.stage(state_dict)
        except Exception as e:
            report_failure(session, save_id, Phase.DESCRIBE, e, self.path_for(step))
            raise
        staged_at: list[float] = []
        staged.ready.add_done_callback(lambda _: staged_at.append(time.perf_counter()))
        pending: Future = Future()
        result: Future = Future()
        mgr._pending = pending

        def run() -> None:
            try:
                times = (t_call, t_start, lambda: staged_at[0] if staged_at else time.perf_counter())
                self._write_tiers(mgr, step, staged, save_id, meta, overwrite, persist, times)
                result.set_result(None)
            except BaseException as e:  # delivered on the caller's future; _write_tiers logged it
                result.set_exception(e)
            finally:
                pending.set_result(None)

        self._executor.submit(run)
        return staged.ready, result

    def _write_tiers(
        self,
        mgr: CheckpointManager,
        step: int,
        state: Any,
        save_id: str | None,
        meta: Mapping[str, Any] | None,
        overwrite: bool,
        persist: bool,
        times: tuple[float, float, Callable[[], float]],
    ) -> None:
        """(save thread) Local retention, the local save, then (``persist``) the durable one from the same staged bytes.

        A leader prunes before its own plan request, and no rank's data for this save reaches a
        node before every rank's plan request: so the step being written always counts.
        """
        t_call, t_start, t_staged = times
        writer = mgr._ckpt.writer
        save_id = save_id if save_id is not None else writer.session.next_save_id()  # its tmp directory takes a recycled step
        try:  # here, not on the training thread (a step's recycling falls back to removing it, which costs about as much as writing it)
            self.prune(step, save_id)
        except OSError as e:  # retention must not fail the save (this rank alone would miss it); the next save retries
            log.error("[rank %d] node-local tier: removing old local steps before step %d failed: %s", self.rank, step, e)
        try:
            writer.write(self.path_for(step), state, ckpt=save_id, user_meta=meta, step=step, storage=self.save_storage)
        except Exception as e:
            log.error("[rank %d] local-tier save of step %d failed%s: %s", self.rank, step, "; its durable save skipped" if persist else "", e)
            raise
        self._record(mgr, step, t_call, t_start, t_staged())
        if not persist:
            return
        path = mgr.path_for(step)
        mgr._refuse_foreign(step)
        if self.rank == 0:
            mgr._clear_incomplete(step)
        try:
            writer.write(path, state, overwrite=overwrite, user_meta=meta, step=step)
        except Exception as e:
            error = mgr._resolve(path, e)
            if error is not None:
                mgr._after_write(step, path, t_call, t_start, t_staged(), error)
                raise
        mgr._after_write(step, path, t_call, t_start, t_staged(), None)

    def _record(self, mgr: CheckpointManager, step: int, t_call: float, t_start: float, t_staged: float) -> None:
        """Append and log the local commit's figures (as the manager does for a durable one)."""
        from ..manager import SaveStats, checkpoint_bytes

        nbytes = None
        if self.rank == 0:
            try:
                nbytes = checkpoint_bytes(layout.step_dir(self.local_root, step))
            except Exception as e:  # a figure only: the save is committed
                log.warning("[rank 0] local step %d: cannot read its size from the manifest: %s", step, e)
        stats = SaveStats(step, (t_staged - t_call) * 1e3, (t_start - t_call) * 1e3, time.perf_counter() - t_start, nbytes, tier="local")
        mgr.history.append(stats)
        log.log(20 if self.rank == 0 else 10, "[rank %d] checkpoint (node-local tier, %d replica(s)) %s", self.rank, self.replicas, stats.line())

    # -- the restart -------------------------------------------------------------------------

    def node_inventory(self) -> NodeInventory:
        """(a node's leader) This node's committed local steps: files held, files needed, MANIFEST digest."""
        out: NodeInventory = {}
        reader = LocalStorage()
        for step, held in layout.committed_steps(self.local_root).items():
            where = f"{layout.step_dir(self.local_root, step)}/{MANIFEST}"
            try:
                data = reader.read_bytes(where)
                needed = checkpoint_files(read_metadata(data, where))
            except (OSError, ManifestError) as e:
                log.warning("[rank %d] node-local tier: local step %d is not usable on this node: %s", self.rank, step, e)
                continue
            out[step] = StepCopy(dict(held), tuple(needed), xxhash.xxh3_128_hexdigest(data))
        return out

    def inventories(self, tag: int) -> dict[int, NodeInventory]:
        """Every node's inventory, by node (its leader's report; a malformed one counts as empty).

        Until this manager's first save, the inventories every leader sent with its hello (when every
        leader sent one: each node's first local rank was its leader): the same on every rank, and
        nothing since changed a node's committed steps (only a save does: its retention, its commit).
        Otherwise, or after a save, a round through the store (``tag`` names its keys).
        """
        if self._saves == 0 and self._start_inventories is not None:
            values = dict(zip(self.topology.leaders(), self._start_inventories))
        else:
            mine = encode_inventory(self.node_inventory()) if self.is_leader else None
            values = dict(enumerate(self._exchange(f"inventory/{tag}", mine)))
        out: dict[int, NodeInventory] = {}
        for node in range(self.topology.nodes):
            leader = self.topology.leader(node)
            try:
                out[node] = decode_inventory(values[leader], f"rank {leader}'s inventory of node {node}")
            except ValueError as e:
                log.warning("[rank %d] node-local tier: ignoring node %d's local steps: %s", self.rank, node, e)
                out[node] = {}
        return out

    def load(self, mgr: CheckpointManager, state_dict: Any, strict: bool) -> int:
        """Restore the newest step complete over all tiers (see the module docstring); sets ``mgr.last_restore``.

        Returns:
            The step loaded.

        Raises:
            CheckpointNotFound: no complete local step on any node and no durable step.
            LoadMismatchError: (strict) the state does not match the checkpoint.
            CheckpointError: every candidate failed.
        """
        t0 = time.perf_counter()
        mgr._loads += 1
        tag = mgr._loads
        durable = mgr.steps()
        found = candidates(self.inventories(tag), durable)
        if self.rank == 0:
            log.info(
                "[rank 0] resume: complete local steps %s, newest durable step %s",
                [c.step for c in found],
                durable[-1] if durable else None,
            )
        for attempt, cand in enumerate(found):
            info = self._try_local(mgr, tag, attempt, cand, state_dict, strict, t0)
            if info is not None:
                mgr.last_restore = info
                log.info("[rank %d] resume: %s", self.rank, info.line())
                return cand.step
        return self._load_durable(mgr, state_dict, strict, t0, [c.step for c in found])

    def _try_local(self, mgr: CheckpointManager, tag: int, attempt: int, cand: Candidate, state_dict: Any, strict: bool, t0: float) -> RestoreInfo | None:
        """Load local ``cand`` on every rank: the RestoreInfo when all ranks did, None when any could not."""
        srcs = sources(cand, self.topology)
        self._connect_ahead(cand.step, srcs)
        durable = (mgr._storage, f"{mgr._root}/{step_dir_name(cand.step)}") if cand.durable else None
        reader = TieredReadStorage(cand.step, self.local_root, srcs, self.clients, durable)
        error = self._load_with_retries(mgr, cand.step, reader, state_dict, strict, sum(len(s) for s in srcs.values()))
        outcomes = self._agree(tag, attempt, error)
        if all(text == "" for text in outcomes.values()):
            b_local, b_peer, b_durable = reader.bytes_local, reader.bytes_peer, reader.bytes_durable
            tier = "durable" if b_durable else "peer" if b_peer else "local"
            return RestoreInfo(cand.step, tier, time.perf_counter() - t0, b_local, b_peer, b_durable)
        failures = {r: t for r, t in outcomes.items() if t}
        if any(t.startswith("fatal: ") for t in failures.values()):
            if error is not None and not isinstance(error, RETRYABLE):
                raise error
            raise CheckpointError(f"loading local step {cand.step} failed on rank(s) {sorted(failures)}", failures)
        why = "; ".join(f"rank {r}: {t[len('damaged: ') :]}" for r, t in sorted(failures.items()))
        log.warning("[rank %d] resume: local step %d cannot be loaded (%s); trying the next candidate", self.rank, cand.step, why)
        return None

    def _connect_ahead(self, step: int, srcs: Mapping[str, list[Any]]) -> None:
        """Start opening the connections this rank's load of ``step`` will read peers over, in parallel, before it needs them.

        One per reader thread (at most one per file) to each peer that is a file's first source,
        and one more to the first peer when this node has no copy of the MANIFEST (it is read first).
        """
        want = Counter(s[0][1] for s in srcs.values() if s and isinstance(s[0], tuple))  # peer rank -> files it serves first
        threads = self.session.config.reader_threads
        ahead = {rank: min(threads, files) for rank, files in want.items()}
        peers = list(dict.fromkeys(s[1] for ss in srcs.values() for s in ss if isinstance(s, tuple)))  # the MANIFEST's order
        if peers and not os.path.isfile(f"{layout.step_dir(self.local_root, step)}/{MANIFEST}"):
            ahead[peers[0]] = ahead.get(peers[0], 0) + 1
        for rank, n in ahead.items():
            self.clients[rank].warm(n)

    def _load_with_retries(
        self, mgr: CheckpointManager, step: int, reader: TieredReadStorage, state_dict: Any, strict: bool, tries: int
    ) -> BaseException | None:
        """This rank's load of local ``step``; after an error naming a file, again from that file's next copy."""
        for _ in range(max(1, tries)):
            try:
                mgr._ckpt.load(self.path_for(step), state_dict, strict=strict, storage=reader)
                return None
            except RETRYABLE as e:
                name = file_named_in(e)
                if name is None or not reader.mark_bad(name):
                    return e
                log.warning("[rank %d] resume: local step %d: %s; reading %s from its next copy", self.rank, step, e, name)
            except Exception as e:  # noqa: BLE001 (exchanged with the other ranks, re-raised there)
                return e
        return CheckpointError(f"[rank {self.rank}] local step {step}: every copy failed")

    def _agree(self, tag: int, attempt: int, error: BaseException | None) -> dict[int, str]:
        """Every rank's outcome of local attempt ``attempt``: "" ok, "damaged: …" (try the next), "fatal: …"."""
        mine = "" if error is None else ("damaged: " if isinstance(error, RETRYABLE + (CheckpointError,)) else "fatal: ") + f"{type(error).__name__}: {error}"
        values = self._exchange(f"restore/{tag}/{attempt}", mine[:4096])
        return {r: v if isinstance(v, str) else "fatal: malformed outcome" for r, v in enumerate(values)}

    def _load_durable(self, mgr: CheckpointManager, state_dict: Any, strict: bool, t0: float, failed_local: list[int]) -> int:
        """The durable tier, as the manager loads without a local tier (newest first, damaged ones skipped).

        Raises:
            CheckpointNotFound: nothing in any tier.
            CheckpointError: local steps were there but none loaded, and nothing durable either
                (not "not found": a loop that starts afresh on that must not do so over damaged data).
        """
        steps = mgr.steps()
        if not steps and failed_local:
            raise CheckpointError(f"no committed step under {mgr.root}, and local steps {failed_local} could not be loaded (see the warnings above)")
        if not steps:
            raise CheckpointNotFound(f"no committed checkpoint under {mgr.root} and no complete local step under {self.local_root} (or on its peers)")
        counting = CountingReads(mgr._storage)
        for attempt, step in enumerate(reversed(steps)):
            if mgr._try_load(attempt, step, state_dict, strict, storage=counting):
                mgr.last_restore = RestoreInfo(step, "durable", time.perf_counter() - t0, 0, 0, counting.nbytes)
                log.info("[rank %d] resume: %s", self.rank, mgr.last_restore.line())
                return step
        raise mgr._all_damaged(steps)

    def close(self) -> None:
        """Stop the save thread (after the save in flight), the peer clients and this rank's PeerService."""
        self._executor.shutdown(wait=True)
        for c in self.clients.values():
            c.close()
        self.service.close()
