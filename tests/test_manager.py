"""CheckpointManager: step directories, retention, crash leftovers, resume (one process and 2 gloo ranks)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch
from dist_helpers import checkpointer_load, dtensor, global_tensor
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.config import Config
from dist_ckpt.manager import CheckpointManager, RetentionPolicy, RootListing, stale_entries, step_dir_name

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "3", "DIST_CKPT_TIMEOUT_S": "15"}
CONFIG = Config(timeout_s=15, heartbeat_interval_s=0.2, heartbeat_timeout_s=3)


def state(value: float) -> dict:
    return {"w": torch.full((64, 32), float(value)), "b": torch.arange(10.0) + value, "step": int(value), "meta": {"lr": 0.1}}


def on_disk(root) -> list[str]:
    return sorted(os.listdir(root))


def names(*steps: int) -> list[str]:
    return [step_dir_name(s) for s in steps]


# -- pure decisions -------------------------------------------------------------------


def test_retention_policy_keeps_last_every_and_protected():
    assert RetentionPolicy(keep_last=2).to_delete([1, 2, 3, 4]) == [1, 2]
    assert RetentionPolicy(keep_last=2, keep_every=2).to_delete([1, 2, 3, 4, 5]) == [1, 3]
    assert RetentionPolicy(keep_last=1).to_delete([5, 1, 3], protect=[3]) == [1]
    assert RetentionPolicy(keep_last=None).to_delete([1, 2, 3]) == []
    assert RetentionPolicy(keep_last=3).to_delete([]) == []
    assert RetentionPolicy(keep_last=1, keep_every=10).to_delete([10, 15, 20, 25]) == [15]


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_every": 0}, {"keep_last": -1}])
def test_retention_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RetentionPolicy(**kwargs)


def test_stale_entries_rules():
    listing = RootListing(
        committed=(2, 4, 8),
        incomplete=(6, 10),
        tmp=("step-00000005.tmp-xyz", "step-00000009.tmp-abc-0"),
        old=(("step-00000004.old-q", 4), ("step-00000003.old-r", 3)),
    )
    # .old- of an uncommitted step is the only complete copy; step 10 is newer than the newest committed.
    assert stale_entries(listing) == ["step-00000004.old-q", "step-00000005.tmp-xyz", "step-00000006", "step-00000009.tmp-abc-0"]
    assert stale_entries(RootListing(incomplete=(1,), tmp=("step-00000001.tmp-z",))) == ["step-00000001.tmp-z"]


def test_step_dir_name():
    assert step_dir_name(7) == "step-00000007"
    assert step_dir_name(123456789) == "step-123456789"
    with pytest.raises(ValueError):
        step_dir_name(-1)


# -- one process ------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_keep_last_and_keep_every(tmp_path, async_save):
    root = tmp_path / "ck"
    with CheckpointManager(str(root), keep_last=2, keep_every=3, async_save=async_save, config=CONFIG) as mgr:
        for step in range(1, 8):
            res = mgr.save(step, state(step))
            if async_save:
                stage_f, write_f = res
                stage_f.result()
            else:
                assert res is None and mgr.latest_step() == step  # a sync save returns committed
    assert on_disk(root) == names(3, 6, 7)
    assert [s.step for s in mgr.history] == list(range(1, 8))
    assert mgr.history[3].deleted == (2,)  # removed only after step 4 committed: the newest 2 were 3 and 4
    full = checkpointer_load(str(root / step_dir_name(7)))
    assert full["step"] == 7 and torch.equal(full["w"], torch.full((64, 32), 7.0))


def test_async_save_returns_futures_and_next_save_waits_for_it(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=5, config=CONFIG)
    events: list[str] = []
    write = mgr._ckpt.writer.write
    # The first write is held until the test lets it go, 0.5 s after t0: a fixed 0.5 s sleep in the writer started
    # with the write, so a loaded machine could use it up before the test's own checks ran.
    release = threading.Event()

    def slow_write(path, staged, **kw):
        events.append(f"start {os.path.basename(path)}")
        release.wait(60)
        write(path, staged, **kw)
        events.append(f"end {os.path.basename(path)}")

    mgr._ckpt.writer.write = slow_write
    stage1, write1 = mgr.save(1, state(1))
    stage1.result()
    assert not write1.done()  # save() did not wait for the write
    t0 = time.monotonic()
    threading.Timer(0.5, release.set).start()
    stage2, write2 = mgr.save(2, state(2))
    assert write1.done() and time.monotonic() - t0 > 0.2  # ... but the next save did
    write2.result()
    mgr.close()
    assert events == ["start step-00000001", "end step-00000001", "start step-00000002", "end step-00000002"]
    assert mgr.steps() == [1, 2]


def test_save_logs_one_line_with_figures(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dist_ckpt.manager"):
        with CheckpointManager(str(tmp_path), config=CONFIG) as mgr:
            mgr.save(5, state(5))
    lines = [r.getMessage() for r in caplog.records if r.name == "dist_ckpt.manager" and "checkpoint step" in r.getMessage()]
    assert len(lines) == 1
    assert "step 5" in lines[0] and " ms" in lines[0] and " s," in lines[0] and "GB/s" in lines[0]
    stats = mgr.last_stats
    assert stats.step == 5 and stats.nbytes == (64 * 32 + 10) * 4 and stats.gbps > 0 and stats.total_s > 0 and stats.blocked_ms >= 0


def test_crash_leftovers_are_ignored_then_collected_at_start(tmp_path):
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), keep_last=3, async_save=False, config=CONFIG)
    for step in (2, 4, 8):
        mgr.save(step, state(step))
    # What crashes leave behind: a temporary dir mid-save, a step dir without MANIFEST, old copies.
    (root / "step-00000005.tmp-xyz" / "data").mkdir(parents=True)
    (root / "step-00000005.tmp-xyz" / "data" / "r00000.bin").write_bytes(b"x" * 100)
    (root / "step-00000006" / "data").mkdir(parents=True)
    (root / "step-00000009.tmp-abc-3").mkdir()
    (root / "step-00000010" / "data").mkdir(parents=True)  # newer than the newest committed: kept
    os.rename(root / step_dir_name(2), root / "step-00000003.old-keep")  # the only complete copy of step 3: kept
    (root / "step-00000004.old-gone").mkdir()  # step 4 is committed: its old copy goes
    (root / "notes.txt").write_text("not ours")
    assert mgr.latest_step() == 8 and mgr.steps() == [4, 8]
    mgr.close()

    mgr = CheckpointManager(str(root), keep_last=3, async_save=False, config=CONFIG)
    assert on_disk(root) == ["notes.txt", "step-00000003.old-keep", "step-00000004", "step-00000008", "step-00000010"]
    assert mgr.latest_step() == 8
    mgr.save(10, state(10))  # replaces the incomplete step-00000010
    assert mgr.latest_step() == 10 and mgr.steps() == [4, 8, 10]
    target = state(0)
    assert mgr.load(target) == 10
    assert target["step"] == 10 and torch.equal(target["w"], torch.full((64, 32), 10.0))
    mgr.close()


def test_resume_picks_the_newest_committed_step(tmp_path):
    with CheckpointManager(str(tmp_path), keep_last=10, config=CONFIG) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, state(step))
    (tmp_path / "step-00000040.tmp-crashed").mkdir()  # a crash while saving step 40
    with CheckpointManager(str(tmp_path), keep_last=10, config=CONFIG) as mgr:
        assert mgr.latest_step() == 30 and mgr.steps() == [10, 20, 30]
        target = state(0)
        assert mgr.load(target) == 30
        assert target["step"] == 30 and torch.equal(target["b"], torch.arange(10.0) + 30)
        assert mgr.load(target, step=10) == 10 and target["step"] == 10
        with pytest.raises(dc.CheckpointNotFound):
            mgr.load(target, step=40)
        with pytest.raises(dc.LoadMismatchError):
            mgr.load({"w": torch.zeros(64, 32)})  # strict by default


def test_load_without_any_checkpoint_raises_not_found(tmp_path):
    (tmp_path / "step-00000001").mkdir()  # incomplete: does not count
    with CheckpointManager(str(tmp_path), config=CONFIG) as mgr:
        assert mgr.latest_step() is None and mgr.steps() == []
        with pytest.raises(dc.CheckpointNotFound) as info:
            mgr.load(state(0))
        assert isinstance(info.value, FileNotFoundError) and str(tmp_path) in str(info.value)


def test_failed_save_is_not_counted_and_skips_retention(tmp_path):
    with CheckpointManager(str(tmp_path), keep_last=1, config=CONFIG) as mgr:
        mgr.save(1, state(1))[1].result()
        write = mgr._ckpt.writer.write

        def failing(path, staged, **kw):
            raise OSError(28, "No space left on device (injected)")

        mgr._ckpt.writer.write = failing
        _, write_f = mgr.save(2, state(2))
        with pytest.raises(OSError):
            write_f.result()
        mgr.wait()
        mgr._ckpt.writer.write = write
        assert mgr.steps() == [1] and [s.step for s in mgr.history] == [1]
        mgr.save(3, state(3))[1].result()
    assert on_disk(tmp_path) == names(3)


def test_close_waits_for_the_save_in_flight_and_is_idempotent(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=1, config=CONFIG)
    mgr.save(1, state(1))
    _, write_f = mgr.save(2, state(2))
    mgr.close()
    assert write_f.done() and on_disk(tmp_path) == names(2)  # retention ran before close returned
    mgr.close()
    with pytest.raises(RuntimeError):
        mgr.save(3, state(3))


def test_rejects_bad_retention_before_starting_anything(tmp_path):
    before = threading.active_count()
    with pytest.raises(ValueError):
        CheckpointManager(str(tmp_path), keep_last=0)
    assert threading.active_count() == before


# -- two ranks --------------------------------------------------------------------------


def _train_and_save(rank, world, root, steps):
    mgr = CheckpointManager(root, keep_last=2, keep_every=4)
    w = dtensor(global_tensor("w", (64, 16)), world, "shard0")
    pending = None
    for step in range(1, steps + 1):
        if pending is not None:
            pending[0].result()  # staged: safe to mutate
        w.to_local().add_(1.0)
        pending = mgr.save(step, {"w": w, "step": step, "rng": dc.rank_local(torch.full((4,), float(rank)))})
    mgr.close()
    return mgr.steps(), [(s.step, s.nbytes, s.deleted) for s in mgr.history]


def _resume(rank, world, root):
    mgr = CheckpointManager(root, keep_last=2, keep_every=4)
    target = {"w": dtensor(torch.zeros(64, 16), world, "shard0"), "step": 0, "rng": dc.rank_local(torch.zeros(4))}
    step = mgr.load(target)
    mgr.close()
    expect = global_tensor("w", (64, 16))
    for _ in range(step):  # the same float additions as the saving run
        expect += 1.0
    return step, target["step"], torch.equal(target["w"].full_tensor(), expect), target["rng"].value.tolist()


def test_two_ranks_save_retain_and_resume(tmp_path):
    root = str(tmp_path / "ck")
    out = run_ranks(_train_and_save, 2, root, 6, env=FAST, timeout=90)
    for rank in (0, 1):
        assert out[rank][0] == [4, 5, 6]
    history0, history1 = out[0][1], out[1][1]
    assert [h[0] for h in history0] == [1, 2, 3, 4, 5, 6]
    assert history0[-1][1] == 64 * 16 * 4 + 2 * 4 * 4  # rank 0 reads the committed size: w + both ranks' rng
    assert sorted(s for h in history0 for s in h[2]) == [1, 2, 3]  # deleted by rank 0 only
    assert all(h[1] is None and h[2] == () for h in history1)
    assert on_disk(root) == names(4, 5, 6)
    out = run_ranks(_resume, 2, root, env=FAST, timeout=60)
    for rank in (0, 1):
        assert out[rank] == (6, 6, True, [float(rank)] * 4)


@pytest.mark.parametrize("async_save", [False, True])
def test_unknown_commit_outcome_is_resolved_by_what_is_committed(tmp_path, async_save):
    from dist_ckpt.storage.local import LocalStorage

    cfg = Config(timeout_s=1.0, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)

    class LatePublish(LocalStorage):  # commits, then the coordinator hears of it after every deadline
        def publish(self, target, manifest):
            super().publish(target, manifest)
            time.sleep(cfg.timeout_s + cfg.heartbeat_timeout_s + 1.5)

    with CheckpointManager(str(tmp_path), keep_last=2, async_save=async_save, config=cfg, storage=LatePublish()) as mgr:
        out = mgr.save(1, state(1))
        if async_save:
            out[1].result()  # CommitOutcomeUnknown from the ranks, resolved: the step is committed
        assert mgr.steps() == [1] and [s.step for s in mgr.history] == [1]


# -- what is not ours, and damaged steps --------------------------------------------------


def _dcp_save(path: str) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4)}, checkpoint_id=path, no_dist=True)


def test_dcp_checkpoint_under_the_root_is_left_alone(tmp_path, caplog):
    root = tmp_path / "ck"
    with CheckpointManager(str(root), keep_last=1, async_save=False, config=CONFIG) as mgr:
        for step in (2, 8):
            mgr.save(step, state(step))
    _dcp_save(str(root / "step-00000007"))  # torchtitan names its DCP steps this way
    (root / "step-00000003").mkdir()
    (root / "step-00000003" / "notes.txt").write_text("a user's file")
    dcp_files = sorted(os.listdir(root / "step-00000007"))
    with caplog.at_level(logging.WARNING, logger="dist_ckpt.manager"):
        mgr = CheckpointManager(str(root), keep_last=1, async_save=False, config=CONFIG)
    assert "step-00000007 holds a DCP checkpoint (.metadata), not a dist_ckpt checkpoint: left alone" in caplog.text
    assert on_disk(root) == names(3, 7, 8) and sorted(os.listdir(root / "step-00000007")) == dcp_files
    assert mgr.latest_step() == 8 and mgr.steps() == [8]
    with pytest.raises(FileExistsError, match="step-00000007 holds a DCP checkpoint"):
        mgr.save(7, state(7))
    mgr.save(9, state(9))  # retention: keep_last=1 removes step 8 only
    mgr.close()
    assert on_disk(root) == names(3, 7, 9) and sorted(os.listdir(root / "step-00000007")) == dcp_files


def _save_steps(rank, world, root, steps):
    mgr = CheckpointManager(root, keep_last=2, async_save=False)
    w = dtensor(torch.zeros(64, 16), world, "shard0")
    for step in steps:
        w.to_local().fill_(float(step))
        mgr.save(step, {"w": w, "step": step})
    mgr.close()


def _resume_then_save(rank, world, root):
    mgr = CheckpointManager(root, keep_last=2, async_save=False)
    target = {"w": dtensor(torch.zeros(64, 16), world, "shard0"), "step": 0}
    step = mgr.load(target)
    exact = bool((target["w"].full_tensor() == float(step)).all())
    latest = mgr.latest_step()
    mgr.save(step + 10, target)
    steps = mgr.steps()
    mgr.close()
    return step, target["step"], exact, latest, steps


@pytest.mark.parametrize("damage", ["flipped byte", "truncated MANIFEST"])
def test_resume_falls_back_past_a_damaged_newest_step(tmp_path, damage):
    root = str(tmp_path / "ck")
    run_ranks(_save_steps, 2, root, [1, 2, 3], env=FAST, timeout=90)
    assert on_disk(root) == names(2, 3)
    newest = os.path.join(root, step_dir_name(3))
    if damage == "flipped byte":  # in rank 1's shard: only rank 1 reads it, and only rank 1 sees the ChecksumError
        data = os.path.join(newest, "data", next(n for n in sorted(os.listdir(os.path.join(newest, "data"))) if n.startswith("r00001")))
        with open(data, "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.truncate(os.path.join(newest, "MANIFEST"), 40)
    out = run_ranks(_resume_then_save, 2, root, env=FAST, timeout=90)
    for rank in (0, 1):
        assert out[rank] == (2, 2, True, 2, [2, 12])
    left = on_disk(root)
    assert [n for n in left if ".bad-" not in n] == names(2, 12)  # the step resumed from survived retention
    assert len(left) == 3 and [n for n in left if ".bad-" in n][0].startswith("step-00000003.bad-")


def test_resume_with_every_step_damaged_raises_checkpoint_error_not_not_found(tmp_path):
    with CheckpointManager(str(tmp_path), keep_last=3, async_save=False, config=CONFIG) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step))
        for step in (1, 2):
            os.truncate(tmp_path / step_dir_name(step) / "MANIFEST", 10)
        with pytest.raises(dc.CheckpointError, match=r"steps \[1, 2\] are all damaged") as info:
            mgr.load(state(0))
        assert not isinstance(info.value, dc.CheckpointNotFound)  # a loop starting afresh on "not found" must not start here
        assert mgr.latest_step() is None and len([n for n in on_disk(tmp_path) if ".bad-" in n]) == 2
