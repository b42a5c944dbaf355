"""Fault tolerance: dead ranks, a dead coordinator, storage errors, corruption, hostile checkpoints."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time

import msgpack
import pytest
import torch
from dist_helpers import checkpointer_load, dtensor, failing_storage, global_tensor
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.commit import MANIFEST
from dist_ckpt.loader import read_manifest

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "3", "DIST_CKPT_TIMEOUT_S": "20"}


def _state(world):
    return {"w": dtensor(global_tensor("w", (64, 32)), world, "shard0"), "step": 1}


def _kill_during_write(rank, world, root, victim):
    import dist_ckpt.saver as saver

    dc.save(_state(world), f"{root}/good")  # a previous checkpoint
    if rank == victim:
        real = saver.write_items

        def die(storage, tmp, r, items, threads=2):
            real(storage, tmp, r, items[:0], threads)
            os.kill(os.getpid(), signal.SIGKILL)

        saver.write_items = die
    t0 = time.monotonic()
    try:
        dc.save(_state(world), f"{root}/bad")
    except dc.DistCkptError as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", 0.0


def test_rank_killed_during_write_fails_the_others_naming_it(tmp_path):
    out = run_ranks(_kill_during_write, 3, str(tmp_path), 2, env=FAST, expect_fail={2}, timeout=90)
    for rank in (0, 1):
        kind, msg, took = out[rank]
        assert kind == "CheckpointError" and "rank 2" in msg and "heartbeat" in msg, (rank, msg)
        assert took < 15
    assert not os.path.exists(tmp_path / "bad")
    full = checkpointer_load(str(tmp_path / "good"))  # the previous checkpoint still loads
    assert torch.equal(full["w"], global_tensor("w", (64, 32)))
    run_ranks(_save_again, 3, str(tmp_path / "bad"), env=FAST)  # a restarted job saves fine
    assert os.path.exists(tmp_path / "bad" / MANIFEST)


def _save_again(rank, world, path):
    dc.save(_state(world), path)


def _kill_coordinator(rank, world, root):
    import dist_ckpt.saver as saver

    if rank == 0:

        def die(storage, tmp, r, items, threads=2):
            os.kill(os.getpid(), signal.SIGKILL)

        saver.write_items = die
    ck = dc.make_async_checkpointer()
    t0 = time.monotonic()
    _, write_f = ck.save(f"{root}/ck", _state(world))
    try:
        write_f.result(timeout=60)
    except dc.DistCkptError as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", 0.0


def test_coordinator_killed_mid_save_fails_every_rank_without_hang(tmp_path):
    out = run_ranks(_kill_coordinator, 3, str(tmp_path), env=FAST, expect_fail={0}, timeout=90)
    for rank in (1, 2):
        kind, msg, took = out[rank]
        assert kind == "CoordinatorTimeout" and "rank 0" in msg and "presumed dead" in msg, (rank, msg)
        assert took < 15
    assert not os.path.exists(tmp_path / "ck")


def _eio_on_write(rank, world, path, errno_, text):
    failing = failing_storage(errno_, text) if rank == 1 else None
    try:
        dc.save(_state(world), path, storage=failing)
    except dc.CheckpointError as e:
        return str(e)


@pytest.mark.parametrize("errno_, text", [(5, "Input/output error"), (28, "No space left on device")])
def test_storage_error_on_one_rank(tmp_path, errno_, text):
    out = run_ranks(_eio_on_write, 2, str(tmp_path / "ck"), errno_, text, env=FAST)
    for rank, msg in out.items():
        assert "rank 1" in msg and text in msg and "data/r00001" in msg, msg
    assert os.listdir(tmp_path) == []  # nothing committed, temporary files removed


def _disk_full(rank, world, path):
    try:
        dc.save({"w": dtensor(torch.ones(4 << 20), world, "shard0")}, path)  # 16 MiB on an 8 MiB tmpfs
    except dc.CheckpointError as e:
        return str(e)
    return "no error"


def test_real_disk_full_on_small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = run_ranks(_disk_full, 2, str(mnt / "ck"), env=FAST)
        for msg in out.values():
            assert "No space left on device" in msg, msg
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# -- corruption on disk (single process) -------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ck")
    dc.save({"a": torch.arange(5000, dtype=torch.float32), "b": torch.ones(100, 100)}, path)
    return path


def _target():
    return {"a": torch.zeros(5000), "b": torch.zeros(100, 100)}


def test_flipped_bit_raises_checksum_error_naming_key_file_offset(saved):
    m, _, _ = read_manifest(saved)
    e = m.tensors[("b",)]
    f = os.path.join(saved, m.files[int(e.chunks.file[0])])
    with open(f, "r+b") as fh:
        fh.seek(int(e.chunks.offset[0]) + 777)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(dc.ChecksumError, match=rf"\bb chunk 0 in .*{os.path.basename(f)} at offset {int(e.chunks.offset[0])}"):
        dc.load(_target(), saved)
    out = dc.load(_target(), saved, verify_checksums=False, strict=True)  # opting out reads the bytes as they are
    assert not torch.equal(out["b"], torch.ones(100, 100))


def test_truncated_data_file_names_the_file(saved):
    m, _, _ = read_manifest(saved)
    f = os.path.join(saved, m.files[0])
    os.truncate(f, 100)
    with pytest.raises(dc.DataFileError, match=rf"{m.files[0]}.*truncated"):
        dc.load(_target(), saved)


def test_missing_data_file_names_the_file(saved):
    m, _, _ = read_manifest(saved)
    os.unlink(os.path.join(saved, m.files[0]))
    with pytest.raises(dc.DataFileError, match=rf"{m.files[0]} is missing"):
        dc.load(_target(), saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "version"])
def test_damaged_manifest_raises_manifest_error(saved, damage):
    p = os.path.join(saved, MANIFEST)
    data = open(p, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = os.urandom(len(data))
    else:
        obj = msgpack.unpackb(data, strict_map_key=False, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})
        obj["version"] = 99
        data = msgpack.packb(obj)
    open(p, "wb").write(data)
    with pytest.raises(dc.ManifestError, match="MANIFEST"):
        dc.load(_target(), saved)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dist_ckpt_pwned",))


def test_checkpoint_with_pickle_payload_does_not_execute_code(saved):
    p = os.path.join(saved, MANIFEST)
    obj = msgpack.unpackb(open(p, "rb").read(), strict_map_key=False, object_pairs_hook=lambda p: {tuple(k) if isinstance(k, list) else k: v for k, v in p})
    obj["objects"][("evil",)] = msgpack.ExtType(1, pickle.dumps(Boom()))
    obj["user_meta"] = {"x": msgpack.ExtType(1, pickle.dumps(Boom()))}
    open(p, "wb").write(msgpack.packb(obj))
    if os.path.exists("/tmp/dist_ckpt_pwned"):
        os.unlink("/tmp/dist_ckpt_pwned")
    with pytest.raises(dc.PickleNotAllowed):
        dc.load({**_target(), "evil": None}, saved)
    dc.load(_target(), saved, strict=False)  # the pickled value is skipped, never unpickled
    with dc.make_sync_checkpointer() as ck:
        ck.reader  # constructing readers never touches it either
    with pytest.raises(dc.PickleNotAllowed):
        dc.CheckpointReader().read(saved)
    assert not os.path.exists("/tmp/dist_ckpt_pwned")


# -- stalls: a frozen rank 0 must not commit a save the others reported failed; a frozen rank is named --------


def _freeze_self(seconds: float) -> None:
    """SIGSTOP this process now and SIGCONT it ``seconds`` later (a helper process does both)."""
    helper = subprocess.Popen(["sh", "-c", f"kill -STOP {os.getpid()}; sleep {seconds}; kill -CONT {os.getpid()}"])
    # Stopped within this wait, and resumed by the CONT just before the helper exits: a fixed sleep here
    # was over before a starved helper even started, and the rank then froze at some later point instead.
    helper.wait(timeout=seconds + 60)


def _freeze_after_write(rank, world, path, victim):
    import dist_ckpt.saver as saver

    if rank == victim:
        real = saver.write_items

        def write_then_freeze(storage, tmp, r, items, threads=2):
            records = real(storage, tmp, r, items, threads)
            _freeze_self(float(FAST["DIST_CKPT_HEARTBEAT_TIMEOUT_S"]) + 2)  # before this rank's Done
            return records

        saver.write_items = write_then_freeze
    try:
        dc.save(_state(world), path)
    except dc.DistCkptError as e:
        return type(e).__name__, str(e)
    return "ok", ""


def test_rank0_frozen_after_its_write_never_commits_a_save_another_rank_reported_failed(tmp_path):
    path = str(tmp_path / "ck")
    out = run_ranks(_freeze_after_write, 2, path, 0, env=FAST, timeout=90)
    committed = os.path.exists(os.path.join(path, MANIFEST))
    for rank, (kind, msg) in out.items():
        assert kind in ("ok", "CommitOutcomeUnknown") or not committed, (rank, kind, msg, "reported failed, yet committed")
    # rank 1 gave up on the frozen coordinator, or (starved itself) was still waiting when rank 0 woke and aborted
    assert (out[1][0] == "CoordinatorTimeout" and "presumed dead" in out[1][1]) or (out[1][0] == "CheckpointError" and "stalled" in out[1][1]), out[1]
    assert not committed and out[0][0] == "CheckpointError" and "rank 0" in out[0][1] and "stalled" in out[0][1], out[0]
    assert os.listdir(tmp_path) == []


def test_rank_frozen_past_the_heartbeat_timeout_is_named_not_the_coordinator(tmp_path):
    path = str(tmp_path / "ck")
    out = run_ranks(_freeze_after_write, 2, path, 1, env=FAST, timeout=90)
    for rank, (kind, msg) in out.items():
        assert kind == "CheckpointError" and "rank 1: sent no heartbeat" in msg, (rank, kind, msg)
        assert "coordinator (rank 0)" not in msg and "presumed dead" in msg, (rank, msg)  # the late rank is the one presumed dead
    assert os.listdir(tmp_path) == []
