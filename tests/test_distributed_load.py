"""Shard-aware restore across world sizes and layouts (gloo on CPU)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import wait

import pytest
import torch
from dist_helpers import CountingStorage, dtensor, global_tensor
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.errors import FragmentError
from dist_ckpt.fragments import FRAGMENT_READERS
from dist_ckpt.kept_pool import kept_pool

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "20"}
SHAPES = {"w": (37, 12), "v": (16, 9), "b": (23,)}


def _state(world, layout_2d: bool = False, dim: int = 0):
    sd = {}
    for name, shape in SHAPES.items():
        t = global_tensor(name, shape)
        if layout_2d and len(shape) == 2:
            sd[name] = dtensor(t, world, "shard0_shard1_2d")
        else:
            layout = "shard1" if dim == 1 and len(shape) == 2 else "shard0"
            sd[name] = dtensor(t, world, layout)
    sd["step"] = 11
    return sd


def _save(rank, world, path, layout_2d=False, dim=0):
    dc.save(_state(world, layout_2d, dim), path)


def _zeroed(world, layout_2d=False, dim=0):
    sd = _state(world, layout_2d, dim)
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            v.to_local().zero_()
    sd["step"] = 0
    return sd


def _load_and_check(rank, world, path, layout_2d=False, dim=0):
    sd = _zeroed(world, layout_2d, dim)
    dc.load(sd, path)
    for name, shape in SHAPES.items():
        assert torch.equal(sd[name].full_tensor(), global_tensor(name, shape)), name
    assert sd["step"] == 11
    return True


@pytest.mark.parametrize("save_world, load_world", [(4, 1), (4, 2), (4, 3), (4, 4), (2, 4)])
def test_save_on_n_load_on_m(tmp_path, save_world, load_world):
    path = str(tmp_path / "ck")
    run_ranks(_save, save_world, path, env=FAST)
    run_ranks(_load_and_check, load_world, path, env=FAST)


def test_shard0_to_shard1_and_back(tmp_path):
    run_ranks(_save, 2, str(tmp_path / "a"), False, 0, env=FAST)
    run_ranks(_load_and_check, 3, str(tmp_path / "a"), False, 1, env=FAST)
    run_ranks(_save, 3, str(tmp_path / "b"), False, 1, env=FAST)
    run_ranks(_load_and_check, 2, str(tmp_path / "b"), False, 0, env=FAST)


def test_2d_mesh_save_1d_load_and_back(tmp_path):
    run_ranks(_save, 4, str(tmp_path / "a"), True, env=FAST)
    run_ranks(_load_and_check, 2, str(tmp_path / "a"), False, env=FAST)
    run_ranks(_save, 2, str(tmp_path / "b"), False, 1, env=FAST)
    run_ranks(_load_and_check, 4, str(tmp_path / "b"), True, env=FAST)


def _load_counting(rank, world, path):
    storage = CountingStorage()
    sd = _zeroed(world, dim=1)
    # Verified partial reads also read the rest of each 1 MiB block they touch (test_block_checksums.py
    # pins that); with checks off a load must read exactly the bytes of its boxes.
    dc.load(sd, path, verify_checksums=False, storage=storage)
    need = sum(v.to_local().numel() * v.to_local().element_size() for v in sd.values() if isinstance(v, torch.Tensor))
    return storage.counted[0], need


def test_load_reads_only_the_needed_bytes(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save, 4, path, env=FAST)
    for rank, (read, need) in run_ranks(_load_counting, 3, path, env=FAST).items():
        assert read == need, (rank, read, need)


def _late_loader(rank, world, path):
    sd = _zeroed(world)  # building the device mesh synchronises the ranks; the load must not
    loaded = os.path.join(os.path.dirname(path), "rank-0-loaded")
    if rank == 1:
        # Starts only once rank 0 has loaded (or after 45 s, so a load that waits for this rank fails the assertion, not
        # the run): a fixed 3 s head start was shorter than rank 0's load on a loaded machine.
        deadline = time.monotonic() + 45
        while not os.path.exists(loaded) and time.monotonic() < deadline:
            time.sleep(0.05)
    t0 = time.monotonic()
    dc.load(sd, path)
    assert sd["step"] == 11
    end = time.monotonic()  # before the mark: rank 1 starts after both
    if rank == 0:
        open(loaded, "w").close()
    return end, end - t0


def test_ranks_load_at_different_times_without_waiting(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save, 2, path, env=FAST)
    out = run_ranks(_late_loader, 2, path, env=FAST, timeout=120)
    # rank 0 finished its load before rank 1 even started (rank 1 waited for it first)
    assert out[0][0] < out[1][0] - out[1][1]


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _trained_fsdp(rank):
    """The FSDP2 model and Adam after two steps on this rank's data (the same on every world size)."""
    torch.manual_seed(0)
    model, opt = _fsdp_model()
    for _ in range(2):
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fsdp_train_save(rank, world, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _trained_fsdp(rank)
    msd, osd = get_state_dict(model, opt)
    dc.save({"model": msd, "optim": osd}, path)
    full = {k: v.full_tensor() for k, v in msd.items()}
    moments = {(fqn, m): s[m].full_tensor() for fqn, s in osd["state"].items() for m in ("exp_avg", "exp_avg_sq")}
    return full, moments


def _fsdp_load_train(rank, world, path, full, moments):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model, opt = _fsdp_model()
    model(torch.randn(4, 16)).sum().backward()
    opt.step()  # materialise optimizer state so it can be loaded into
    opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dc.load(sd, path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    msd2, osd2 = get_state_dict(model, opt)
    for k, v in msd2.items():
        assert torch.equal(v.full_tensor(), full[k]), k
    for (fqn, m), ref in moments.items():
        assert torch.equal(osd2["state"][fqn][m].full_tensor(), ref), (fqn, m)
    model(torch.randn(4, 16)).sum().backward()  # and training goes on
    opt.step()
    return True


def test_fsdp2_model_and_adam_save_on_4_load_on_2(tmp_path):
    path = str(tmp_path / "ck")
    out = run_ranks(_fsdp_train_save, 4, path, env=FAST, timeout=120)
    full, moments = out[0]
    run_ranks(_fsdp_load_train, 2, path, full, moments, env=FAST, timeout=120)


def test_load_without_target_returns_full_tensors_on_map_location(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save, 2, path, env=FAST)
    ck = dc.make_sync_checkpointer()
    try:
        full = ck.load(path, default_map_location="meta")
    finally:
        ck.close()
    assert full["w"].device.type == "meta" and full["w"].shape == SHAPES["w"]


def _rank_local_state(rank, value):
    return {
        "w": torch.full((4,), 7.0),
        "rng": dc.rank_local(torch.full((3,), float(value))),
        "pos": dc.rank_local(value),
        "nested": {"seed": dc.rank_local(1000 + value)},
    }


def _save_rank_local(rank, world, path):
    dc.save(_rank_local_state(rank, rank), path)


def _load_rank_local(rank, world, path):
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("dist_ckpt.loader").addHandler(Keep())
    sd = _rank_local_state(rank, -1)
    info = dc.LoadInfo()
    dc.load(sd, path, info=info)  # strict: a rank the saving job did not have is not a mismatch
    assert all(isinstance(sd[k], dc.RankLocal) for k in ("rng", "pos")) and isinstance(sd["nested"]["seed"], dc.RankLocal)
    return sd["rng"].value.tolist(), sd["pos"].value, sd["nested"]["seed"].value, sorted(info.kept_rank_local), records, sd["w"].tolist()


def test_rank_local_values_on_scale_up_2_to_4(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_rank_local, 2, path, env=FAST)
    out = run_ranks(_load_rank_local, 4, path, env=FAST)
    for rank in (0, 1):
        rng, pos, seed, kept, records, w = out[rank]
        assert (rng, pos, seed, kept, w) == ([float(rank)] * 3, rank, 1000 + rank, [], [7.0] * 4)
        assert not records
    for rank in (2, 3):
        rng, pos, seed, kept, records, w = out[rank]
        assert (rng, pos, seed, w) == ([-1.0] * 3, -1, 999, [7.0] * 4)  # the target's values, kept
        assert kept == [("nested", "seed"), ("pos",), ("rng",)]
        assert len(records) == 1 and "saved by 2 rank(s)" in records[0] and "rng" in records[0] and "nested.seed" in records[0]


def _sequential_lr(seed_steps):
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    const = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=100)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, const], milestones=[3])
    for _ in range(seed_steps):
        opt.step()
        sched.step()
    return sched


def _save_sched(rank, world, path):
    dc.save({"sched": _sequential_lr(5).state_dict(), "sched_obj": _sequential_lr(5)}, path)


def _load_sched(rank, world, path):
    fresh, fresh_obj = _sequential_lr(0), _sequential_lr(0)
    sd = {"sched": fresh.state_dict(), "sched_obj": fresh_obj}  # a fresh SequentialLR shares _last_lr with its first child
    dc.load(sd, path)
    fresh.load_state_dict(sd["sched"])
    return fresh.get_last_lr(), fresh_obj.get_last_lr(), [s.get_last_lr() for s in fresh._schedulers], _sequential_lr(5).get_last_lr()


def test_sequential_lr_resumes_its_last_lr_on_2_ranks(tmp_path):
    path = str(tmp_path / "ck")
    run_ranks(_save_sched, 2, path, env=FAST)
    for last, last_obj, children, want in run_ranks(_load_sched, 2, path, env=FAST).values():
        assert last == want and last_obj == want
        assert children == [s.get_last_lr() for s in _sequential_lr(5)._schedulers]


def _fsdp_save_stateful(rank, world, path):
    model, opt = _trained_fsdp(rank)
    dc.save({"model": model, "optim": opt}, path)
    return {(i, m): s[m].full_tensor() for i, s in opt.state_dict()["state"].items() for m in ("exp_avg", "exp_avg_sq")}


def _fsdp_load_fresh(rank, world, path, moments):
    torch.manual_seed(123)
    model, opt = _fsdp_model()  # a fresh optimizer: no state until its first step
    dc.load({"model": model, "optim": opt}, path)
    state = opt.state_dict()["state"]
    for (i, m), ref in moments.items():
        assert type(state[i][m]).__name__ == "DTensor" and torch.equal(state[i][m].full_tensor(), ref), (i, m)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return True


def test_fresh_fsdp2_optimizer_loads_directly_on_another_world_size(tmp_path):
    path = str(tmp_path / "ck")
    moments = run_ranks(_fsdp_save_stateful, 2, path, env=FAST, timeout=120)[0]
    run_ranks(_fsdp_load_fresh, 4, path, moments, env=FAST, timeout=120)


def _threads_started_by(fn) -> int:
    """Threads started (by ``threading``) while ``fn`` runs: each new thread calls the trace hook once."""
    started = []

    def hook(frame, event, arg):
        started.append(1)  # in the new thread, before its run(); no tracing: returns None

    threading.settrace(hook)
    try:
        fn()
    finally:
        threading.settrace(None)
    return len(started)


@pytest.fixture(scope="module")
def two_fragments(tmp_path_factory):
    """A v2 checkpoint saved by 2 ranks: a whole-tensor load reads both fragments."""
    path = str(tmp_path_factory.mktemp("two_fragments") / "ck")
    run_ranks(_save, 2, path, env=FAST)
    return path


def _whole_target():
    return {name: torch.zeros(shape) for name, shape in SHAPES.items()} | {"step": 0}


def _check_whole(sd):
    for name, shape in SHAPES.items():
        assert torch.equal(sd[name], global_tensor(name, shape)), name
    assert sd["step"] == 11


def test_a_second_load_of_several_fragments_starts_no_thread(two_fragments):
    """A load reads the fragments (and the data) on reader threads kept between loads: a thread start waits until it runs."""
    sd, info = _whole_target(), dc.LoadInfo()
    dc.load(sd, two_fragments, info=info)  # whole tensors: every rank's fragment, the data on the default 2 reader threads
    assert info.fragments_read == 2
    sd = _whole_target()
    assert _threads_started_by(lambda: dc.load(sd, two_fragments)) == 0
    _check_whole(sd)


def test_fragments_are_read_by_the_calling_thread_while_every_kept_reader_is_busy(two_fragments, monkeypatch):
    """The calling thread takes fragments until none is left: it never waits for a reader thread to be scheduled."""
    monkeypatch.setenv("DIST_CKPT_READER_THREADS", "1")  # the data on the calling thread: only the fragments could use the pool
    dc.load(_whole_target(), two_fragments)  # the kept pool exists, at the size loads use
    gate = threading.Event()
    pool = kept_pool(FRAGMENT_READERS)
    blockers = [pool.submit(gate.wait) for _ in range(4 * FRAGMENT_READERS)]  # more than it has threads: all of them wait
    release = threading.Timer(30, gate.set)  # without the fix the load waits for the pool, i.e. for this
    release.start()
    try:
        sd, info = _whole_target(), dc.LoadInfo()
        dc.load(sd, two_fragments, info=info)
        finished_while_busy = not gate.is_set()
    finally:
        gate.set()
        release.cancel()
        wait(blockers)
    assert finished_while_busy and info.fragments_read == 2
    _check_whole(sd)


def test_a_missing_fragment_among_several_is_named_whichever_thread_reads_it(two_fragments, tmp_path):
    path = str(tmp_path / "ck")
    shutil.copytree(two_fragments, path)
    os.remove(f"{path}/data/r00001.frag")
    with pytest.raises(FragmentError, match=r"r00001\.frag of rank 1.*is missing"):
        dc.load(_whole_target(), path)
