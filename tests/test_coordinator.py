"""The coordinator in one process with real ZeroMQ sockets: plan, cache, merge, abort, hostile peers."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import msgpack
import pytest
import torch
import zmq

from dist_ckpt import wire
from dist_ckpt.agent import Agent
from dist_ckpt.config import Config
from dist_ckpt.coordinator import Coordinator
from dist_ckpt.describe import describe
from dist_ckpt.errors import CheckpointError, CommitOutcomeUnknown
from dist_ckpt.loader import load_full
from dist_ckpt.saver import run_save
from dist_ckpt.storage import get_storage
from dist_ckpt.storage.local import LocalStorage
from dist_ckpt.transport import secure_client

pytestmark = pytest.mark.timeout(60)
SECRET = os.urandom(32)
CFG = Config(heartbeat_interval_s=0.1, heartbeat_timeout_s=1.5, timeout_s=5.0)


@dataclass
class Job:
    coordinator: Coordinator
    ranks: list[SimpleNamespace]

    def close(self) -> None:
        for r in self.ranks:
            r.agent.close()
        self.coordinator.close()


@pytest.fixture
def job():
    jobs = []

    def make(world: int = 2, config: Config = CFG, storage_for=get_storage) -> Job:
        coord = Coordinator(world, "job1", SECRET, "tcp://127.0.0.1:0", storage_for, config)
        ranks = [
            SimpleNamespace(agent=Agent(coord.endpoint, SECRET, "job1", r, config), config=config, rank=r, world_size=world, job="job1") for r in range(world)
        ]
        jobs.append(Job(coord, ranks))
        return jobs[-1]

    yield make
    for j in jobs:
        j.close()


def shards(world: int, value: float = 1.0) -> list[dict]:
    """Row shards of one (4*world, 3) tensor plus a replicated tensor, as plain per-rank state."""
    out = []
    for r in range(world):
        out.append({"rows": torch.full((4, 3), value + r), "rep": torch.arange(5.0), "step": 3})
    return out


def described(rank: int, world: int, sd: dict):
    d = describe(sd, rank)
    # make "rows" a row shard of a (4*world, 3) global tensor
    tensors = tuple(t if t.key != ("rows",) else type(t)(t.key, t.dtype, (4 * world, 3), (4 * rank, 0), (4, 3), None) for t in d.desc.tensors)
    d.desc = type(d.desc)(rank, tensors)
    return d


def save_all(job: Job, path: str, ckpt: str, states: list[dict]) -> list[object]:
    results: list[object] = [None] * len(job.ranks)

    def one(r: int) -> None:
        try:
            d = described(r, len(job.ranks), states[r])
            results[r] = run_save(job.ranks[r], ckpt, path, d, d.tensors)
        except Exception as e:  # collected and asserted by the test
            results[r] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(job.ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_plan_write_merge_commit(job, tmp_path):
    j = job(2)
    path = str(tmp_path / "ck")
    assert save_all(j, path, "0", shards(2)) == [path, path]
    full = load_full(path, 0, CFG)
    assert torch.equal(full["rows"], torch.cat([torch.full((4, 3), 1.0), torch.full((4, 3), 2.0)]))
    assert torch.equal(full["rep"], torch.arange(5.0)) and full["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_plan_is_cached_while_descriptions_are_unchanged(job, tmp_path, caplog):
    j = job(2)
    caplog.set_level("DEBUG", logger="dist_ckpt.coordinator")  # the plan line is per-rank-0 detail: DEBUG
    save_all(j, str(tmp_path / "a"), "0", shards(2))
    save_all(j, str(tmp_path / "b"), "1", shards(2, value=5.0))  # same boxes, new values
    states = shards(2)
    states[1]["extra"] = torch.zeros(2)  # rank 1's description changes
    save_all(j, str(tmp_path / "c"), "2", states)
    plans = [r.getMessage() for r in caplog.records if "plan for save" in r.getMessage()]
    assert ["new" in plans[0], "cached" in plans[1], "new" in plans[2]] == [True, True, True], plans


def test_replicated_tensor_written_by_one_rank(job, tmp_path):
    j = job(2)
    path = str(tmp_path / "ck")
    save_all(j, path, "0", shards(2))
    from dist_ckpt.loader import read_manifest

    m, _, _ = read_manifest(path)
    assert len(m.tensors[("rep",)].chunks) == 1


def test_failed_rank_aborts_the_save_on_every_rank(job, tmp_path):
    j = job(2)
    path = str(tmp_path / "ck")
    j.ranks[1].agent.begin("0", "plan")
    d0 = described(0, 2, shards(2)[0])
    errs: list[object] = []
    t = threading.Thread(target=lambda: errs.append(_catch(lambda: run_save(j.ranks[0], "0", path, d0, d0.tensors))))
    t.start()
    j.ranks[1].agent.send(wire.Failed("job1", "0", 1, "stage", "CUDA error: out of memory"))
    t.join(20)
    (e,) = errs
    assert isinstance(e, CheckpointError) and e.failures == {1: "CUDA error: out of memory (phase stage)"}
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def _wait_until(condition, seconds: float = 30.0) -> None:
    """Poll ``condition()`` until it holds or ``seconds`` pass (the caller's assertions then say what was missing).

    The coordinator counts what it hears on its own thread, and a CURVE handshake comes first:
    a fixed sleep can end before either happened on a loaded machine.
    """
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _catch(fn):
    try:
        return fn()
    except Exception as e:
        return e


def test_silent_rank_aborts_after_heartbeat_timeout(job, tmp_path):
    j = job(2)
    path = str(tmp_path / "ck")
    d1 = described(1, 2, shards(2)[1])
    # rank 1 asks for a plan, then dies: its agent stops (no heartbeats, no Done)
    j.ranks[1].agent.send(wire.PlanRequest("job1", "0", 1, path, 2, d1.desc.digest(), d1.desc.to_msgpack(), False))
    # close drops what the agent has not sent yet (LINGER 0): only once the request arrived is rank 1 "dead mid-save"
    _wait_until(lambda: "0" in j.coordinator._saves and 1 in j.coordinator._saves["0"].last_seen)
    j.ranks[1].agent.close()
    j.ranks = j.ranks[:1]
    d0 = described(0, 2, shards(2)[0])
    t0 = time.monotonic()
    e = _catch(lambda: run_save(j.ranks[0], "0", path, d0, d0.tensors))
    assert isinstance(e, CheckpointError) and 1 in e.failures and "no heartbeat" in e.failures[1], e
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(path)


def _raw_peer(endpoint: str, identity: bytes | None = None, curve_rank: int | None = 1) -> zmq.Socket:
    """A hand-driven socket. By default it holds rank 1's CURVE key (an insider that passed
    the transport: only such a peer's bytes reach the coordinator's message checks);
    ``curve_rank=None``: no key at all (see tests/test_transport.py)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    if curve_rank is not None:
        secure_client(s, SECRET, curve_rank, 1 << 30)
    s.connect(endpoint)
    return s


def test_hostile_peers_are_dropped_and_counted_and_the_save_succeeds(job, tmp_path):
    j = job(2)
    coord = j.coordinator
    path = str(tmp_path / "ck")
    assert save_all(j, str(tmp_path / "first"), "0", shards(2)) == [str(tmp_path / "first")] * 2
    evil = _raw_peer(coord.endpoint)
    d = described(0, 2, shards(2)[0])
    good_done = wire.encode(wire.Done("job1", "0", 0, b"x", b"y"), SECRET)
    attacks = [
        [b"garbage"],  # one frame
        [b"\x93\x01\x02", b"\x00" * 32],  # not authenticated
        wire.encode(wire.Heartbeat("job1", "0", 0, "write"), os.urandom(32)),  # wrong secret
        [b"h" * (1 << 21), b"\x00" * 32],  # oversized header
        wire.encode(wire.Done("other-job", "0", 1, b"", b""), SECRET),  # another job
        good_done,  # a Done for rank 0 from a peer that is not rank 0's socket
        [*wire.encode(wire.Heartbeat("job1", "1", 0, "plan"), SECRET)[:1], b"\x01" * 32],  # tampered MAC
    ]
    for frames in attacks:
        evil.send_multipart(frames)
    # confused (or replaying) real peers: a Done of the finished save "0", a Done for an unknown save
    j.ranks[0].agent.send(wire.Done("job1", "0", 0, b"x", b"y"))
    j.ranks[1].agent.send(wire.Done("job1", "99", 1, b"", b""))
    # out-of-range rank: signed correctly but rank 7 of a 2-rank job
    hdr = msgpack.packb({"v": 1, "t": "hb", "job": "job1", "ckpt": "1", "rank": 7, "phase": "plan"})
    import hashlib
    import hmac as hmac_mod

    mac = hmac_mod.new(SECRET, len(hdr).to_bytes(8, "little") + hdr, hashlib.sha256).digest()
    evil.send_multipart([hdr, mac])
    # a second process claiming rank 0 (authenticated: it knows the secret)
    impostor = _raw_peer(coord.endpoint, b"impostor")
    impostor.send_multipart(wire.encode(wire.PlanRequest("job1", "1", 0, path, 2, d.desc.digest(), d.desc.to_msgpack(), False), SECRET))
    reasons = ("mac", "frames", "size", "stale", "unknown-save", "job", "identity", "rank")
    # every attack heard (its own socket's handshake first) before the save they must not disturb
    _wait_until(lambda: sum(coord.dropped.values()) >= 10 and all(any(reason in k for k in coord.dropped) for reason in reasons))
    assert save_all(j, path, "1", shards(2)) == [path, path]
    dropped = dict(coord.dropped)
    for reason in reasons:
        assert any(reason in k for k in dropped), (reason, dropped)
    assert sum(dropped.values()) >= 10
    evil.close()
    impostor.close()


def test_a_coordinator_bug_aborts_the_save_at_once(job, tmp_path, monkeypatch):
    j = job(2)
    import dist_ckpt.coordinator as coordinator_mod

    def broken(*a, **k):
        raise TypeError("injected planner bug")

    monkeypatch.setattr(coordinator_mod, "plan_save", broken)
    t0 = time.monotonic()
    results = save_all(j, str(tmp_path / "ck"), "0", shards(2))
    for e in results:
        assert isinstance(e, CheckpointError) and "injected planner bug" in str(e), e
    assert time.monotonic() - t0 < 5


class SlowStorage(LocalStorage):
    """Local storage whose save preparation and manifest write each take ``delay`` seconds (a slow disk)."""

    def __init__(self, delay: float, after_rename: float = 0.0) -> None:
        self.delay, self.after_rename = delay, after_rename

    def begin_save(self, target):
        time.sleep(self.delay)
        super().begin_save(target)

    def write_atomic(self, path, data):
        time.sleep(self.delay)
        super().write_atomic(path, data)

    def publish(self, target, manifest):
        super().publish(target, manifest)
        time.sleep(self.after_rename)  # committed, but the coordinator hears of it late


def test_commit_slower_than_the_heartbeat_timeout_still_commits_and_no_rank_is_dead(job, tmp_path):
    slow = SlowStorage(CFG.heartbeat_timeout_s + 0.7)
    # The prepare's delay counts against timeout_s (the whole save's deadline), which this test is not about: 30 s, not
    # CFG's 5 s, which left a loaded machine under 3 s for the plan and the writes.
    j = job(2, config=dataclasses.replace(CFG, timeout_s=30.0), storage_for=lambda p: (slow, p))
    path = str(tmp_path / "ck")
    assert save_all(j, path, "0", shards(2)) == [path, path]  # no CoordinatorTimeout, no rank presumed dead
    assert torch.equal(load_full(path, 0, CFG)["rep"], torch.arange(5.0))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_commit_that_outlasts_every_deadline_is_reported_as_unknown_not_failed(job, tmp_path):
    cfg = Config(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5, timeout_s=1.0)
    slow = SlowStorage(0.0, after_rename=cfg.timeout_s + cfg.heartbeat_timeout_s + 1.5)
    j = job(2, config=cfg, storage_for=lambda p: (slow, p))
    path = str(tmp_path / "ck")
    results = save_all(j, path, "0", shards(2))
    for e in results:
        assert isinstance(e, CommitOutcomeUnknown) and "may or may not be committed" in str(e), e
    assert os.path.exists(os.path.join(path, "MANIFEST"))  # it did commit: no rank said it failed


def test_tmp_dir_whose_removal_fails_is_removed_later_and_the_ranks_hear_the_abort(tmp_path):
    import errno

    from dist_ckpt.storage.local import LocalStorage

    class OutOfDescriptorsOnce(LocalStorage):
        """Removal fails once, as rmtree does when the process has no descriptors left."""

        failures = 1

        def remove_tree(self, path: str) -> None:
            if path.rsplit("/", 1)[-1].startswith("ck.tmp-") and os.path.exists(path) and OutOfDescriptorsOnce.failures:
                OutOfDescriptorsOnce.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            super().remove_tree(path)

    storage = OutOfDescriptorsOnce()
    coord = Coordinator(2, "job1", SECRET, "tcp://127.0.0.1:0", lambda p: (storage, p), CFG)
    ranks = [SimpleNamespace(agent=Agent(coord.endpoint, SECRET, "job1", r, CFG), config=CFG, rank=r, world_size=2, job="job1") for r in range(2)]
    j = Job(coord, ranks)
    try:
        path = str(tmp_path / "ck")
        d1 = described(1, 2, shards(2)[1])
        ranks[1].agent.begin("0", "write")
        ranks[1].agent.send(wire.PlanRequest("job1", "0", 1, path, 2, d1.desc.digest(), d1.desc.to_msgpack(), False))
        d0 = described(0, 2, shards(2)[0])
        errs: list[object] = []
        t = threading.Thread(target=lambda: errs.append(_catch(lambda: run_save(ranks[0], "0", path, d0, d0.tensors))))
        t.start()
        ranks[1].agent.wait("0", wire.PlanReply, "plan", 10)  # the tmp dir exists now
        ranks[1].agent.send(wire.Failed("job1", "0", 1, "write", "OSError: disk on fire"))
        t.join(20)
        (e,) = errs
        assert isinstance(e, CheckpointError) and 1 in e.failures, e
        deadline = time.monotonic() + 20
        while os.listdir(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)  # retried on the coordinator thread
        assert os.listdir(tmp_path) == [] and OutOfDescriptorsOnce.failures == 0
    finally:
        j.close()


def test_a_peer_speaks_only_for_the_rank_of_its_key_and_a_second_socket_with_it_is_dropped(job, tmp_path):
    j = job(2)
    coord = j.coordinator
    holder_of_1 = _raw_peer(coord.endpoint, b"holder-of-1", curve_rank=1)
    second_0 = _raw_peer(coord.endpoint, b"second-0", curve_rank=0)
    try:
        # Before rank 0 ever spoke: rank 1's key must not let a socket pin rank 0.
        holder_of_1.send_multipart(wire.encode(wire.Heartbeat("job1", "0", 0, "plan"), SECRET))
        _wait_until(lambda: coord.dropped["identity"] >= 1)
        first = str(tmp_path / "first")
        assert save_all(j, first, "0", shards(2)) == [first, first]
        # rank 0's key on a second socket: the first socket keeps the rank
        second_0.send_multipart(wire.encode(wire.Heartbeat("job1", "1", 0, "plan"), SECRET))
        _wait_until(lambda: coord.dropped["identity"] >= 2)  # a deadline of its own: the first wait and save may have used up a shared one
        path = str(tmp_path / "ck")
        assert save_all(j, path, "1", shards(2)) == [path, path]
        assert coord.dropped["identity"] == 2, dict(coord.dropped)
    finally:
        holder_of_1.close()
        second_0.close()
