"""Multi-rank saves through the coordinator (gloo on CPU, 2 and 4 ranks)."""

from __future__ import annotations

import os

import pytest
import torch
from dist_helpers import PLACEMENTS, checkpointer_load, dtensor, failing_storage, global_tensor
from launcher import run_ranks

import dist_ckpt as dc

# timeout_s bounds the whole save from the first rank's arrival: 8 s left little for 4 ranks on a loaded machine
FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "3", "DIST_CKPT_TIMEOUT_S": "20"}


def _save_layouts(rank, world, path):
    sd = {
        "layouts": {name: dtensor(global_tensor(name, (8, 12)), world, name) for name in PLACEMENTS if world == 4 or "2d" not in name},
        "uneven": dtensor(global_tensor("uneven", (173, 3)), world, "shard0"),
        "tiny": dtensor(global_tensor("tiny", (2, 5)), world, "shard0"),  # empty shards on ranks 2, 3
        "plain": global_tensor("plain", (16,)),
        "opt": {"state": {0: {"exp_avg": global_tensor("m0", (4,))}, 1: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "rng": dc.rank_local(torch.full((3,), float(rank))),
        "loader_pos": dc.rank_local(100 + rank),
        "step": 42,
    }
    dc.save(sd, path)
    return sorted(os.listdir(path))


def _check_full(path, world):
    full = checkpointer_load(path)
    for name in PLACEMENTS:
        if world == 4 or "2d" not in name:
            assert torch.equal(full["layouts"][name], global_tensor(name, (8, 12))), name
    assert torch.equal(full["uneven"], global_tensor("uneven", (173, 3)))
    assert torch.equal(full["tiny"], global_tensor("tiny", (2, 5)))
    assert torch.equal(full["plain"], global_tensor("plain", (16,)))
    assert list(full["opt"]["state"]) == [0, 1] and full["opt"]["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert full["step"] == 42 and torch.equal(full["rng"], torch.zeros(3)) and full["loader_pos"] == 100


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_saves_and_reads_back(tmp_path, world):
    path = str(tmp_path / "ck")
    out = run_ranks(_save_layouts, world, path, env=FAST)
    assert all(v == ["MANIFEST", "data"] for v in out.values())
    _check_full(path, world)


def _rank_local_back(rank, world, path):
    sd = {"rng": dc.rank_local(torch.zeros(3)), "loader_pos": dc.rank_local(0)}
    dc.load(sd, path, strict=False)
    return sd["rng"].value.tolist(), sd["loader_pos"].value if isinstance(sd["loader_pos"], dc.RankLocal) else sd["loader_pos"]


def test_rank_local_values_come_back_per_rank(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_layouts, 2, path, env=FAST)
    out = run_ranks(_rank_local_back, 2, path, env=FAST)
    assert out[0] == ([0.0] * 3, 100) and out[1] == ([1.0] * 3, 101)


def _save_replicated(rank, world, path):
    dc.save({"a": global_tensor("a", (256, 256)), "b": global_tensor("b", (128, 64)), "s": dtensor(global_tensor("s", (64, 64)), world, "shard0")}, path)


def test_replicated_data_is_written_once(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_replicated, 4, path, env=FAST)
    unique = (256 * 256 + 128 * 64 + 64 * 64) * 4
    on_disk = sum(os.path.getsize(os.path.join(path, "data", f)) for f in os.listdir(os.path.join(path, "data")))
    assert unique <= on_disk <= unique + 16 * 4096  # alignment padding only
    full = checkpointer_load(path)
    assert torch.equal(full["a"], global_tensor("a", (256, 256)))


def _save_failing_storage(rank, world, path, bad_rank):
    broken = failing_storage(5, "Input/output error (injected)") if rank == bad_rank else None
    try:
        dc.save({"w": dtensor(global_tensor("w", (64, 8)), world, "shard0")}, path, storage=broken)
    except dc.CheckpointError as e:
        return str(e), sorted(e.failures)
    return "no error", []


def test_failing_storage_on_one_rank_fails_every_rank(tmp_path):
    path = str(tmp_path / "ck")
    out = run_ranks(_save_failing_storage, 4, path, 2, env=FAST)
    for rank, (msg, failed) in out.items():
        assert failed == [2], (rank, msg)
        assert "rank 2" in msg and "Input/output error" in msg and "phase write" in msg
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []  # the temporary directory is removed too


def _save_one_rank_absent(rank, world, path):
    import time

    marks = os.path.dirname(path)
    if rank == 3:
        # Reaches no save until every other rank has given up on it, so the others can only end
        # through the coordinator's deadline, whatever the machine's speed; had they waited for
        # rank 3 instead, run_ranks' own timeout would fail the test.
        while sum(f.startswith("given-up-") for f in os.listdir(marks)) < world - 1:
            time.sleep(0.05)
        return "absent"
    try:
        dc.save({"w": dtensor(global_tensor("w", (64, 8)), world, "shard0")}, path)
        msg = "no error"
    except dc.CheckpointError as e:
        msg = str(e)
    open(os.path.join(marks, f"given-up-{rank}"), "w").close()
    return msg


def test_rank_that_never_arrives_times_out_naming_it(tmp_path):
    path = str(tmp_path / "ck")
    env = dict(FAST, DIST_CKPT_TIMEOUT_S="4")
    out = run_ranks(_save_one_rank_absent, 4, path, env=env, timeout=60)
    for rank in (0, 1, 2):
        msg = out[rank]
        # names the rank, the phase and the configured deadline (4 s), not some other wait of its own
        assert "rank 3" in msg and "phase plan" in msg and "within 4 s" in msg, msg
    assert out[3] == "absent"
    assert not os.path.exists(path)


def _save_without_collectives(rank, world, path):
    import torch.distributed as dist

    w = dtensor(global_tensor("w", (32, 8)), world, "shard0")
    r = dtensor(global_tensor("r", (4, 4)), world, "replicate")
    names = [
        "all_reduce",
        "all_gather",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "gather",
        "gather_object",
        "scatter",
        "scatter_object_list",
        "reduce",
        "all_to_all",
        "reduce_scatter",
        "monitored_barrier",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
    ]
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def forbidden(*a, **k):
        raise AssertionError("a torch collective was called during a save")

    for n in saved:
        setattr(dist, n, forbidden)
        setattr(dist.distributed_c10d, n, forbidden)
    try:
        dc.save({"w": w, "r": r, "step": 1}, path)
        dc.save({"w": w, "r": r, "step": 2}, path + "2")
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
            setattr(dist.distributed_c10d, n, f)
    return True


def test_save_calls_no_torch_collective(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_without_collectives, 2, path, env=FAST)
    full = checkpointer_load(path + "2")
    assert full["step"] == 2 and torch.equal(full["w"], global_tensor("w", (32, 8)))


def _save_and_load_in_group(rank, world, path):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    group = dist.new_group(list(range(world)))
    dc.save({"w": global_tensor("w", (8,)), "mine": dc.rank_local(torch.full((2,), float(rank)))}, path, process_group=group)
    hello_in_default_store = c10d._get_default_store().check(["dist_ckpt/0/hello"])
    target = {"w": torch.zeros(8), "mine": dc.rank_local(torch.zeros(2))}
    dc.load(target, path, process_group=group)
    return hello_in_default_store, target["mine"].value.tolist(), torch.equal(target["w"], global_tensor("w", (8,)))


def test_save_and_load_take_the_process_group_and_use_its_store(tmp_path):
    """The session's hello goes through the group's own store; load takes process_group like save."""
    out = run_ranks(_save_and_load_in_group, 2, str(tmp_path / "ck"), env=FAST, timeout=120)
    assert out == {r: (False, [float(r)] * 2, True) for r in range(2)}, out
