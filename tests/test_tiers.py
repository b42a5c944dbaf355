"""The node-local tier's failure matrix (after SCR's test script): two simulated nodes of two gloo ranks.

Each "node" is a separate local directory and a node id (DIST_CKPT_NODE_ID, the
variable the launcher's GROUP_RANK / SLURM_NODEID stand in for) for its ranks;
peers talk over real CURVE-authenticated ZeroMQ sockets on loopback. Faults are
injected at the boundary: a wiped or edited local directory, a flipped byte, a
SIGKILLed node, a crafted durable step.

One save job (``template``) writes steps 1-3 with ``persist_every=2``: local
steps 2 and 3 on both nodes (``local_keep=2``; each node holds its ranks'
primaries and its partners' replicas), durable step 2. Each restore test starts
from a fresh copy of it at the same paths (the local tier is keyed by the root's URL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from dist_helpers import CountingStorage, dtensor, rank_files
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.layout_names import STEP_RE
from dist_ckpt.tier import layout

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "4", "DIST_CKPT_TIMEOUT_S": "30"}
TWO_NODES = (0, 0, 1, 1)  # node of each rank: 2 nodes x 2 ranks
SHAPE = (12, 40)


def _full(step: int) -> torch.Tensor:
    return torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE) * 0.5 + step


class _Probe:
    """A Stateful whose ``state_dict`` (called while a save is being staged, before its local retention)
    records how many local steps this node holds, and can SIGKILL its rank at a given step."""

    def __init__(self, local_root: str, rank: int, kill_at: int | None = None) -> None:
        self.local_root, self.rank, self.kill_at = local_root, rank, kill_at
        self.step = 0
        self.seen: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        if self.kill_at is not None and self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the node dies in the middle of a save the other node has started
        self.seen.append(_steps_here(self.local_root))
        return {"step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = sd["step"]


def _steps_here(local_root: str) -> int:
    """Local steps in this node's tree: committed ``step-N`` and ``step-N.tmp-*`` being written."""
    entries = os.listdir(local_root) if os.path.isdir(local_root) else []
    return sum(1 for e in entries if STEP_RE.match(e.split(".", 1)[0]) and ".old-" not in e)


class _Watch:
    """Samples this node's tree while the saves run (a thread) and keeps the most local steps seen at once."""

    def __init__(self, local_root: str) -> None:
        self.local_root, self.most = local_root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            with contextlib.suppress(OSError):  # an entry renamed or removed while listed
                self.most = max(self.most, _steps_here(self.local_root))

    def __enter__(self) -> "_Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _manager(base: str, rank: int, nodes: tuple[int, ...], local_rank: str | None = None, **kw: Any) -> tuple[dc.CheckpointManager, str]:
    os.environ["DIST_CKPT_NODE_ID"] = f"node{nodes[rank]}"
    os.environ["LOCAL_RANK"] = str(nodes[:rank].count(nodes[rank])) if local_rank is None else local_rank  # as torchrun numbers a node's ranks
    local_dir = f"{base}/local{nodes[rank]}"
    args: dict[str, Any] = {"keep_last": 3, "local_dir": local_dir, "replicas": 1, "persist_every": 2, "local_keep": 2, **kw}
    return dc.CheckpointManager(f"{base}/root", **args), layout.local_root(local_dir, f"{base}/root")


def _save_job(
    rank: int, world: int, base: str, nodes: tuple[int, ...], steps: list[int], kill: tuple[int, tuple[int, ...]] | None, async_save: bool = True
) -> Any:
    mgr, local_root = _manager(base, rank, nodes, async_save=async_save)
    kill_at = kill[0] if kill is not None and rank in kill[1] else None
    probe = _Probe(local_root, rank, kill_at)
    outcome: list[str] = []
    watch = _Watch(local_root)
    with mgr, watch:
        for step in steps:
            probe.step = step
            try:
                futures = mgr.save(step, {"w": dtensor(_full(step), world, "shard0"), "step": step, "probe": probe})
                if futures is not None:  # async: committed in every tier once write_future is done
                    futures[1].result()
                outcome.append("ok")
            except dc.CheckpointError as e:
                outcome.append(f"{type(e).__name__}: {e}")
                break
        tiers = [s.tier for s in mgr.history]
    leader = rank == min(r for r, n in enumerate(nodes) if n == nodes[rank])
    return {"seen": probe.seen if leader else None, "most": watch.most, "outcome": outcome, "tiers": tiers}


def _load_job(rank: int, world: int, base: str, nodes: tuple[int, ...], count_root: bool) -> dict[str, Any]:
    storage = CountingStorage() if count_root else None
    mgr, local_root = _manager(base, rank, nodes, storage=storage)
    with mgr:
        target = {"w": dtensor(torch.zeros(SHAPE), world, "shard0"), "step": -1, "probe": _Probe(local_root, rank)}
        step = mgr.load(target)
        full = target["w"].full_tensor()  # type: ignore[attr-defined]
        info = mgr.last_restore
    return {
        "step": step,
        "value_step": target["step"],
        "exact": torch.equal(full, _full(target["step"])),  # type: ignore[arg-type]
        "info": dataclasses.asdict(info) if info is not None else None,
        "root_read": storage.counted[0] if storage is not None else None,
    }


# -- the matrix run: one 4-rank job saves, then restores after each fault in turn ----------------


def _local_root(work: Path, node: int) -> Path:
    return Path(layout.local_root(str(work / f"local{node}"), str(work / "root")))


def _lose_rank1(steps: tuple[int, ...]) -> Callable[[Path], None]:
    def lose(work: Path) -> None:
        for step in steps:
            for node in (0, 1):
                (_local_root(work, node) / f"step-{step:08d}" / "data" / "r00001.bin").unlink()

    return lose


def _flip(work: Path, node: int = 0, step: int = 3) -> None:
    path = _local_root(work, node) / f"step-{step:08d}" / "data" / "r00000.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x40  # inside the first chunk of rank 0's tensor data
    path.write_bytes(bytes(data))


def _damage_both_copies_of_durable_step(work: Path) -> None:
    for node in (0, 1):
        _flip(work, node, 2)
        shutil.rmtree(_local_root(work, node) / "step-00000003")


def _damage_everything(work: Path) -> None:
    for node in (0, 1):
        for step in (2, 3):
            _flip(work, node, step)
    shutil.rmtree(work / "root")


FAULTS: dict[str, Callable[[Path], None]] = {
    "intact": lambda work: None,
    "wiped_node": lambda work: shutil.rmtree(work / "local1"),  # a replaced node: empty local disk
    "lost_newest": _lose_rank1((3,)),  # both copies of rank 1's step-3 file
    "lost_all_local": _lose_rank1((3, 2)),
    "flipped": _flip,
    # a crafted durable step 4 (a copy of step 2, renamed) is newer than every local step
    "durable_newer": lambda work: shutil.copytree(work / "root" / "step-00000002", work / "root" / "step-00000004"),
    "every_copy_damaged": _damage_everything,  # and no durable step
    "both_copies_flipped": _damage_both_copies_of_durable_step,  # step 2 is also durable; step 3 gone
}


def _listing(work: Path) -> dict[str, Any]:
    return {
        "root": sorted(p.name for p in (work / "root").iterdir() if STEP_RE.match(p.name)),
        "local": [sorted(os.listdir(_local_root(work, n))) for n in (0, 1)],
        "data3": [sorted(os.listdir(_local_root(work, n) / "step-00000003" / "data")) for n in (0, 1)],
    }


def _matrix_job(rank: int, world: int, base: str) -> dict[str, Any]:
    import torch.distributed as dist

    work, template = Path(base) / "work", Path(base) / "template"
    out: dict[str, Any] = {"saved": _save_job(rank, world, str(work), TWO_NODES, [1, 2, 3], None)}
    dist.barrier()
    if rank == 0:
        out["listing"] = _listing(work)
        shutil.copytree(work, template, symlinks=True)
    for name, fault in FAULTS.items():
        dist.barrier()
        if rank == 0:  # every fault on a fresh copy of the saved tiers, at the same paths (the tier is keyed by the root)
            shutil.rmtree(work)
            shutil.copytree(template, work, symlinks=True)
            fault(work)
        dist.barrier()
        try:
            out[name] = _load_job(rank, world, str(work), TWO_NODES, count_root=name == "intact")
        except Exception as e:  # every rank fails alike (the ranks agree on each attempt): the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def matrix_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiers")


@pytest.fixture(scope="module")
def matrix(matrix_base: Path) -> dict[int, dict[str, Any]]:
    return run_ranks(_matrix_job, 4, str(matrix_base), env=FAST, timeout=240)


def _assert_exact(out: dict[int, dict[str, Any]], step: int) -> None:
    for r, o in out.items():
        assert "error" not in o and (o["step"], o["value_step"], o["exact"]) == (step, step, True), (r, o)


def _case(matrix: dict[int, dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    return {r: m[name] for r, m in matrix.items()}


# -- the saves --------------------------------------------------------------------------------


def test_local_saves_replicas_and_persist_every(matrix: dict[int, dict[str, Any]]) -> None:
    saved, listing = _case(matrix, "saved"), matrix[0]["listing"]
    assert all(o["outcome"] == ["ok", "ok", "ok"] for o in saved.values())
    assert saved[0]["tiers"] == ["local", "local", "durable", "local"]  # the 2nd save also went to root, after its local commit
    assert listing["root"] == ["step-00000002"]
    assert listing["local"] == [["step-00000002", "step-00000003"]] * 2
    # primaries of the node's ranks and replicas of the other node's: every file on both nodes
    assert listing["data3"] == [sorted(f.removeprefix("data/") for f in rank_files(range(4)))] * 2  # (v2: and every rank's fragment)


def test_8_local_tier_never_holds_more_than_local_keep(matrix: dict[int, dict[str, Any]]) -> None:
    saved = _case(matrix, "saved")
    for leader in (0, 2):
        # steps held when each save starts (before its retention): 0, 1, then local_keep
        assert saved[leader]["seen"] == [0, 1, 2], leader
    # sampled all along the three saves on every rank: never more than local_keep, the step being written included
    assert all(o["most"] == 2 for o in saved.values()), {r: o["most"] for r, o in saved.items()}
    assert matrix[0]["listing"]["local"] == [["step-00000002", "step-00000003"]] * 2


def _recycling_job(rank: int, world: int, base: str) -> list[bool]:
    mgr, local_root = _manager(base, rank, (0, 1), async_save=False)
    names = [f"data/r{r:05d}.bin" for r in range(world)]  # each node holds its rank's primary and its partner's replica
    probe = _Probe(local_root, rank)  # the state _load_job restores into has one
    with mgr:
        for step in (1, 2, 3):
            probe.step = step
            if step == 3:  # a second name for step 1's files: they keep step 1's bytes unless step 3 is written over them
                for i, name in enumerate(names):
                    os.link(f"{local_root}/step-00000001/{name}", f"{base}/kept-{rank}-{i}")
            mgr.save(step, {"w": dtensor(_full(step), world, "shard0"), "step": step, "probe": probe})
    return [os.path.samefile(f"{base}/kept-{rank}-{i}", f"{local_root}/step-00000003/{name}") for i, name in enumerate(names)]


def test_retention_hands_the_removed_steps_files_to_the_next_save_to_write_over(tmp_path: Path) -> None:
    # local_keep=2: the save of step 3 removes step 1, whose pages it reuses instead of freeing and allocating them again
    out = run_ranks(_recycling_job, 2, str(tmp_path), env=FAST, timeout=120)
    assert out == {0: [True, True], 1: [True, True]}, out
    for node in (0, 1):
        assert sorted(os.listdir(_local_root(tmp_path, node))) == ["step-00000002", "step-00000003"]
    _assert_exact(run_ranks(_load_job, 2, str(tmp_path), (0, 1), False, env=FAST, timeout=120), 3)


# -- the failure matrix ------------------------------------------------------------------


def test_1_intact_local_tiers_restore_locally_without_reading_root(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "intact")
    _assert_exact(out, 3)
    for r, o in out.items():
        assert o["info"]["tier"] == "local" and o["info"]["bytes_local"] > 0, (r, o)
        assert (o["info"]["bytes_peer"], o["info"]["bytes_durable"], o["root_read"]) == (0, 0, 0), (r, o)


def test_2_wiped_node_restores_from_replicas(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "wiped_node")
    _assert_exact(out, 3)
    assert [out[r]["info"]["tier"] for r in range(4)] == ["local", "local", "peer", "peer"]
    for r in (2, 3):
        assert out[r]["info"]["bytes_peer"] > 0 and out[r]["info"]["bytes_local"] == 0 and out[r]["info"]["bytes_durable"] == 0


def test_3_both_copies_of_a_rank_lost_falls_back_to_an_older_local_step(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "lost_newest")
    _assert_exact(out, 2)
    assert {o["info"]["tier"] for o in out.values()} == {"local"}


def test_3_both_copies_lost_in_every_local_step_falls_back_to_durable(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "lost_all_local")
    _assert_exact(out, 2)
    assert all(o["info"]["tier"] == "durable" and o["info"]["bytes_durable"] > 0 and o["info"]["bytes_local"] == 0 for o in out.values())


def test_4_flipped_byte_in_a_primary_uses_the_replica(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "flipped")
    _assert_exact(out, 3)
    info = out[0]["info"]
    assert info["tier"] == "peer" and info["bytes_peer"] > 0 and info["bytes_durable"] == 0, info


def test_7_durable_tier_used_when_no_local_step_is_newer(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "durable_newer")
    for r, o in out.items():
        assert "error" not in o and (o["step"], o["value_step"], o["exact"]) == (4, 2, True), (r, o)
        assert o["info"]["tier"] == "durable" and o["info"]["bytes_local"] == 0 and o["info"]["bytes_durable"] > 0


def test_4_both_local_copies_damaged_reads_the_file_from_the_durable_copy(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "both_copies_flipped")
    _assert_exact(out, 2)
    info = out[0]["info"]  # rank 0's file: its own copy, then the replica, then root's copy of the same step
    assert info["tier"] == "durable" and info["bytes_durable"] > 0 and info["bytes_local"] > 0, info
    assert all(out[r]["info"]["tier"] == "local" for r in (1, 2, 3)), out


def test_every_local_copy_damaged_and_nothing_durable_is_an_error_not_a_fresh_start(matrix: dict[int, dict[str, Any]]) -> None:
    out = _case(matrix, "every_copy_damaged")
    for r, o in out.items():  # CheckpointNotFound would make a resume-or-start loop start afresh over damaged data
        assert o.get("error", "").startswith("CheckpointError: no committed step under"), (r, o)
        assert "local steps [3, 2] could not be loaded" in o["error"], (r, o)


# -- runs of their own: a killed node, other world sizes -------------------------------------------


def test_5_node_killed_during_a_local_save(tmp_path: Path) -> None:
    nodes = (0, 1)  # one rank per node keeps this run small; sync saves (the matrix's are async)
    # Rank 1 (all of node 1) dies as it starts the save of step 2; rank 0 is already in it (waiting for its plan).
    env = {**FAST, "DIST_CKPT_TIMEOUT_S": "6"}  # how long the coordinator waits for a rank to reach a save
    saved = run_ranks(_save_job, 2, str(tmp_path), nodes, [1, 2], (2, (1,)), False, env=env, timeout=120, expect_fail={1})  # sync saves
    assert saved[0]["outcome"][0] == "ok" and saved[0]["outcome"][1] != "ok", saved[0]
    out = run_ranks(_load_job, 2, str(tmp_path), nodes, False, env=FAST, timeout=120)
    _assert_exact(out, 1)
    assert {o["info"]["tier"] for o in out.values()} == {"local"}
    for node in (0, 1):  # the crashed save's temporary directories are gone (cleared at start)
        assert sorted(os.listdir(_local_root(tmp_path, node))) == ["step-00000001"]


def _inventory_rounds_job(rank: int, world: int, base: str) -> dict[str, Any]:
    from dist_ckpt.session import _store

    nodes = (0, 1)

    def state(step: int) -> dict[str, Any]:
        return {"w": dtensor(_full(step), world, "shard0"), "step": step}

    def load(mgr: dc.CheckpointManager) -> tuple[int, int, str, bool]:
        target = state(-1)
        step = mgr.load(target)
        key = f"dist_ckpt/{mgr._ckpt.writer.session.job}/tier/inventory/{mgr._loads}/{rank}"
        assert mgr.last_restore is not None
        return step, target["step"], mgr.last_restore.tier, _store(None).check([key])

    mgr, _ = _manager(base, rank, nodes, persist_every=100, async_save=False)
    with mgr:
        mgr.save(1, state(1))
    out = {}
    for name, local_rank in (("restart", None), ("restart_unnumbered", "")):  # "": the launcher does not say which rank is first on its node
        mgr, _ = _manager(base, rank, nodes, local_rank, persist_every=100, async_save=False)
        with mgr:
            out[name] = load(mgr)
            if name == "restart":
                mgr.save(2, state(2))
                out["after_save"] = load(mgr)
    return out


def test_a_restarts_first_load_takes_the_inventories_sent_with_the_hello(tmp_path: Path) -> None:
    out = run_ranks(_inventory_rounds_job, 2, str(tmp_path), env=FAST, timeout=120)
    for o in out.values():
        assert o["restart"] == (1, 1, "local", False), o  # no inventory round of its own through the store
        assert o["after_save"] == (2, 2, "local", True), o  # a save changed the local tiers: a round, and the new step
        assert o["restart_unnumbered"] == (2, 2, "local", True), o  # no leader known before the hello: a round, as before


@pytest.mark.parametrize("nodes", [(0, 1), (0, 0, 1)], ids=["2ranks", "3ranks_node1_wiped"])
def test_6_resharded_restart_from_the_local_tier(matrix: dict[int, dict[str, Any]], matrix_base: Path, nodes: tuple[int, ...]) -> None:
    work = matrix_base / "work"
    shutil.rmtree(work)
    shutil.copytree(matrix_base / "template", work, symlinks=True)  # the matrix's saved tiers (4 ranks, Shard(0))
    shutil.rmtree(work / "root")  # nothing durable: every byte from the local tier
    if len(nodes) == 3:
        shutil.rmtree(work / "local1")  # rank 2, alone on node 1, reads its new rows from node 0
    out = run_ranks(_load_job, len(nodes), str(work), nodes, False, env=FAST, timeout=120)
    _assert_exact(out, 3)
    assert all(o["info"]["bytes_durable"] == 0 for o in out.values())
    assert [o["info"]["tier"] for _, o in sorted(out.items())] == (["local", "local"] if len(nodes) == 2 else ["local", "local", "peer"])


# -- settings and topology ----------------------------------------------------------------


def test_fewer_nodes_than_replicas_plus_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_CKPT_NODE_ID", "only")  # one process, one node
    with pytest.raises(ValueError, match="replicas=1 needs at least 2 nodes"):
        dc.CheckpointManager(str(tmp_path / "root"), local_dir=str(tmp_path / "local"), replicas=1)
    with pytest.raises(ValueError, match="local_keep must be >= 1"):
        dc.CheckpointManager(str(tmp_path / "root"), local_dir=str(tmp_path / "local"), replicas=0, local_keep=0)
    with dc.CheckpointManager(str(tmp_path / "root"), replicas=1) as mgr:  # no local_dir: no tier, as before
        assert mgr.local_dir is None and mgr.last_restore is None


def _broken_local_dir_job(rank: int, world: int, base: str) -> str:
    try:
        _manager(base, rank, (0, 1))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "constructed"


def test_a_rank_whose_local_dir_cannot_be_used_fails_every_rank_at_once(tmp_path: Path) -> None:
    (tmp_path / "local1").write_text("a file where node 1's local directory should be")
    out = run_ranks(_broken_local_dir_job, 2, str(tmp_path), env=FAST, timeout=60)  # the other rank used to wait for it forever
    assert out[1].startswith(("NotADirectoryError", "FileExistsError")), out
    assert out[0].startswith("CheckpointError") and "rank(s) [1] could not start their peer service" in out[0], out


def test_a_restarts_first_load_imports_no_numpy_ma(tmp_path: Path) -> None:
    # numpy's first np.unique imports numpy.ma (~25 ms of CPU, 0.1-0.3 s of a 4-rank restore on 2 busy vCPUs)
    dc.save({"w": _full(1), "b": torch.arange(7)}, str(tmp_path / "ckpt"))
    code = (
        "import sys, torch, dist_ckpt as dc\n"
        "sd = {'w': torch.zeros(12, 40), 'b': torch.zeros(7, dtype=torch.int64)}\n"
        f"dc.load(sd, {str(tmp_path / 'ckpt')!r})\n"
        "assert torch.equal(sd['b'], torch.arange(7))\n"
        "print('numpy.ma' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
