"""Async saves: stager snapshot, background writer, commit barrier (thread and process modes)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from dist_helpers import checkpointer_load, dtensor, failing_storage, global_tensor
from launcher import run_ranks

import dist_ckpt as dc

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "30"}
MODES = ["thread", "process"]


def _mutate_after_stage(rank, world, path, mode):
    ck = dc.make_async_checkpointer(mode=mode)
    try:
        w = dtensor(global_tensor("w", (64, 16)), world, "shard0")
        sd = {"w": w, "r": global_tensor("r", (8,)), "step": 1}
        stage_f, write_f = ck.save(path, sd)
        stage_f.result(timeout=30)
        w.to_local().add_(1000.0)  # the optimizer step after staging
        sd["r"].zero_()
        write_f.result(timeout=60)
        stage_f2, write_f2 = ck.save(path + "-b", sd)  # back to back: the second sees the mutation
        write_f2.result(timeout=60)
    finally:
        ck.close()
    return True


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [2, 4])
def test_checkpoint_holds_values_from_stage_time(tmp_path, mode, world):
    path = str(tmp_path / "ck")
    run_ranks(_mutate_after_stage, world, path, mode, env=FAST, timeout=120)
    full = checkpointer_load(path)
    assert torch.equal(full["w"], global_tensor("w", (64, 16))) and torch.equal(full["r"], global_tensor("r", (8,)))
    second = checkpointer_load(path + "-b")
    assert torch.equal(second["w"], global_tensor("w", (64, 16)) + 1000.0) and torch.equal(second["r"], torch.zeros(8))


def _failing_background_write(rank, world, path, mode):
    # Rank 1 writes through a full disk; in process mode the storage is pickled to its writer subprocess.
    full = failing_storage(28, "No space left on device (injected)") if rank == 1 else None
    ck = dc.make_async_checkpointer(mode=mode, storage=full)
    try:
        stage_f, write_f = ck.save(path, {"w": dtensor(global_tensor("w", (64, 16)), world, "shard0")})
        stage_f.result(timeout=30)
        try:
            write_f.result(timeout=60)
        except dc.CheckpointError as e:
            return sorted(e.failures), str(e)
        return [], "no error"
    finally:
        ck.close()


def _errno_of_failed_process_write(rank, world, path):
    full = failing_storage(28, "No space left on device (injected)") if rank == 1 else None  # pickled to the subprocess
    ck = dc.make_async_checkpointer(mode="process", storage=full)
    try:
        _, write_f = ck.save(path, {"w": dtensor(global_tensor("w", (64, 16)), world, "shard0")})
        try:
            write_f.result(timeout=60)
        except dc.CheckpointError as e:
            cause = e.__cause__
            return str(e), (type(cause).__name__, cause.errno) if isinstance(cause, OSError) else None
        return "no error", None
    finally:
        ck.close()


def test_failed_process_write_keeps_its_errno_on_every_rank(tmp_path):
    """The writer subprocess's OSError comes back typed: the same StorageError with errno 28, named by every rank."""
    out = run_ranks(_errno_of_failed_process_write, 2, str(tmp_path / "ck"), env=FAST, timeout=120)
    for rank, (msg, _) in out.items():
        assert "rank 1: StorageError: [Errno 28]" in msg and "No space left on device" in msg, (rank, msg)
    assert out[1][1] == ("StorageError", 28), out[1]


@pytest.mark.parametrize("mode", MODES)
def test_background_write_failure_surfaces_on_every_rank(tmp_path, mode):
    path = str(tmp_path / "ck")
    out = run_ranks(_failing_background_write, 2, path, mode, env=FAST, timeout=120)
    for rank, (failed, msg) in out.items():
        assert failed == [1] and "No space left on device" in msg, (rank, msg)
    assert not os.path.exists(path)


def _rss_over_saves(rank, world, root, n):
    import gc

    import psutil

    proc = psutil.Process()
    ck = dc.make_async_checkpointer()
    sd = {"w": dtensor(global_tensor("w", (1024, 256)), world, "shard0"), "m": dtensor(global_tensor("m", (1024, 256)), world, "shard0"), "step": 0}
    ck.prepare(sd)
    rss = []
    try:
        for i in range(n):
            sd["step"] = i
            _, write_f = ck.save(f"{root}/s{i}", sd)
            write_f.result(timeout=60)
            gc.collect()
            rss.append(proc.memory_info().rss)
        allocations = ck.stager.arena.allocations
    finally:
        ck.close()
    return rss, allocations


def test_host_memory_stays_flat_over_30_async_saves(tmp_path):
    out = run_ranks(_rss_over_saves, 2, str(tmp_path), 30, env=FAST, timeout=240)
    for rank, (rss, allocations) in out.items():
        assert allocations == 1, "the staging arena must be allocated once and reused"
        assert rss[-1] <= rss[1] * 1.05, (rank, rss[1], rss[-1])


def _late_stager_on_rank_1(rank, world, path):
    """Rank 1's staging finishes 1 s late; each rank notes when it staged and when it began writing."""
    import time
    from concurrent.futures import Future

    import dist_ckpt.saver as saver
    from dist_ckpt.stager import StagingArena

    stamps = {}
    stage, write_here = StagingArena.stage, saver.write_here

    def late_stage(self, tensors):
        dst, done = stage(self, tensors)
        late: Future = Future()

        def finish():
            done.result()
            if rank == 1:
                time.sleep(1.0)
            stamps["staged"] = time.time()
            late.set_result(None)

        threading.Thread(target=finish, daemon=True).start()
        return dst, late

    def noted_write(*args):
        stamps.setdefault("write", time.time())
        return write_here(*args)

    StagingArena.stage, saver.write_here = late_stage, noted_write
    ck = dc.make_async_checkpointer()
    try:
        _, write_f = ck.save(path, {"w": dtensor(global_tensor("w", (64, 16)), world, "shard0")})
        write_f.result(timeout=60)
    finally:
        ck.close()
    return stamps


def test_no_rank_writes_before_every_rank_has_staged(tmp_path):
    """Writers on a shared host slow the other ranks' staging, which the training thread waits for."""
    out = run_ranks(_late_stager_on_rank_1, 2, str(tmp_path / "ck"), env=FAST, timeout=120)
    assert out[0]["write"] >= out[1]["staged"], out
    full = checkpointer_load(str(tmp_path / "ck"))
    assert torch.equal(full["w"], global_tensor("w", (64, 16)))


def _staging_fails_on_rank_1(rank, world, path):
    from concurrent.futures import Future

    from dist_ckpt.errors import CheckpointError
    from dist_ckpt.stager import StagingArena

    if rank == 1:

        def failing_stage(self, tensors):
            failed: Future = Future()
            failed.set_exception(RuntimeError("CUDA error: an illegal memory access (injected)"))
            return self.views(tensors), failed

        StagingArena.stage = failing_stage
    ck = dc.make_async_checkpointer()
    try:
        stage_f, write_f = ck.save(path, {"w": dtensor(global_tensor("w", (64, 16)), world, "shard0")})
        try:
            write_f.result(timeout=60)
        except CheckpointError as e:
            return e.failures, stage_f.exception() is not None
        return "saved", stage_f.exception() is not None
    finally:
        ck.close()


def test_staging_failure_on_one_rank_fails_every_rank_naming_it(tmp_path):
    out = run_ranks(_staging_fails_on_rank_1, 2, str(tmp_path / "ck"), env=FAST, timeout=120)
    for rank, (failures, stage_failed) in out.items():
        assert failures == {1: "RuntimeError: CUDA error: an illegal memory access (injected) (phase stage)"}, (rank, failures)
        assert stage_failed == (rank == 1)
    assert not os.path.exists(tmp_path / "ck")


def _close_leaves_nothing(rank, world, path, mode):
    before = {t.name for t in threading.enumerate()}
    ck = dc.make_async_checkpointer(mode=mode)
    _, write_f = ck.save(path, {"w": global_tensor("w", (32, 4))})
    ck.close()  # waits for the save in flight
    assert write_f.done() and write_f.exception() is None
    left = {t.name for t in threading.enumerate()} - before
    import multiprocessing

    return sorted(left), [p.name for p in multiprocessing.active_children()]


@pytest.mark.parametrize("mode", MODES)
def test_close_waits_and_leaves_nothing_running(tmp_path, mode):
    out = run_ranks(_close_leaves_nothing, 2, str(tmp_path / "ck"), mode, env=FAST, timeout=120)
    for rank, (threads, children) in out.items():
        assert threads == [] and not [c for c in children if c.startswith("dist_ckpt")], (rank, threads, children)
    assert os.path.exists(tmp_path / "ck" / "MANIFEST")


def test_single_process_async_functional_api(tmp_path):
    t = torch.arange(10.0)
    stage_f, write_f = dc.async_save({"t": t}, str(tmp_path / "ck"))
    stage_f.result()
    t.zero_()
    write_f.result(timeout=60)
    dc.save({"t": t}, str(tmp_path / "ck2"))  # a sync save after an async one in the same process
    assert torch.equal(dc.load({"t": torch.empty(10)}, str(tmp_path / "ck"))["t"], torch.arange(10.0))
    assert torch.equal(dc.load({"t": torch.empty(10)}, str(tmp_path / "ck2"))["t"], torch.zeros(10))


def test_cpu_state_is_staged_before_save_returns(tmp_path):
    """A CPU state is copied on the caller's thread: the stage future is done on return, so the
    caller may mutate at once, and the checkpoint still holds the values of the save call."""
    big = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB: a copy handed to a thread is still running on return
    small = global_tensor("s", (33,))
    with dc.make_async_checkpointer() as ck:
        stage_f, write_f = ck.save(str(tmp_path / "ck"), {"big": big, "small": small})
        done_on_return = stage_f.done()
        big.fill_(-1.0)  # mutate before anything waits on the stage future
        small.zero_()
        write_f.result(timeout=60)
        assert done_on_return and stage_f.exception() is None
        full = ck.load(str(tmp_path / "ck"))
    assert torch.equal(full["big"], torch.arange(16 << 20, dtype=torch.float32)) and torch.equal(full["small"], global_tensor("s", (33,)))


def test_staging_copy_failure_surfaces_on_the_stage_future():
    """A copy made on the caller's thread that fails (a meta tensor has no bytes) fails the stage future,
    as a failure in the stager thread did, instead of escaping from ``stage``."""
    from dist_ckpt.stager import StagingArena

    arena = StagingArena(pin_memory=False)
    try:
        _, fut = arena.stage([torch.ones(4), torch.empty(4, device="meta")])
        assert fut.done() and "meta" in str(fut.exception())
    finally:
        arena.close()


def test_arena_views_are_reused_for_an_unchanged_layout_and_recut_after_growth():
    from dist_ckpt.stager import StagingArena

    arena = StagingArena(pin_memory=False)
    try:
        state = [torch.arange(6.0).reshape(2, 3), torch.ones(5, dtype=torch.int64)]
        first, _ = arena.stage(state)
        again, fut = arena.stage([t + 1 for t in state])  # same dtypes and shapes, new values
        assert all(a is b for a, b in zip(first, again)) and fut.exception() is None
        assert torch.equal(again[0], state[0] + 1) and torch.equal(again[1], state[1] + 1)
        arena.stage([torch.zeros(1 << 16)])  # grows the arena: every view is cut anew in the new buffer
        assert arena.allocations == 2
        after, _ = arena.stage(state)
        base, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.capacity
        assert all(base <= v.data_ptr() < end for v in after) and not any(a is b for a, b in zip(first, after))
        assert torch.equal(after[0], state[0]) and torch.equal(after[1], state[1])
    finally:
        arena.close()
