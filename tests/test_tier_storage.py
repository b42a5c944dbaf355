"""The node-local tier's storages on real ranks: a local save with replicas, a restore from peers.

Two simulated nodes of two gloo ranks each (a local directory per node),
every rank running its PeerService; faults at the boundary: a node's
directory wiped, a flipped byte in a local primary, a partner's service
SIGKILLed during a save.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from unittest.mock import ANY

import pytest
import torch
import torch.distributed as dist
from dist_helpers import dtensor, global_tensor, rank_files
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt.tier import layout
from dist_ckpt.tier.peer import PeerClient, PeerService
from dist_ckpt.tier.storage import LocalTierStorage, ReusedWriteStream, TieredReadStorage

pytestmark = pytest.mark.timeout(120)
FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "20"}
ROOT = "/durable/root/of/the/job"
SECRET_FOR_TESTS = bytes(range(32))
KEY = layout.job_key(ROOT)


@dataclass(frozen=True)
class Nodes:
    """The partner rule of tiers.md on ``node_of_rank`` (the manager's Topology computes the same)."""

    rank: int
    node_of_rank: tuple[int, ...]

    @property
    def nodes(self) -> int:
        return max(self.node_of_rank) + 1

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def leader(self, node: int) -> int:
        return self.ranks_on(node)[0]

    def partners(self, r: int, replicas: int) -> list[int]:
        node = self.node_of_rank[r]
        index = self.ranks_on(node).index(r)
        return [(there := self.ranks_on((node + k) % self.nodes))[index % len(there)] for k in range(1, replicas + 1)]


def _state(rank: int, world: int) -> dict:
    return {"w": dtensor(global_tensor("w", (64, 40)), world, "shard0"), "b": dtensor(global_tensor("b", (10, 3)), world, "shard0"), "step": 5}


def _empty(world: int) -> dict:
    return {"w": dtensor(torch.zeros(64, 40), world, "shard0"), "b": dtensor(torch.zeros(10, 3), world, "shard0"), "step": 0}


def _start(rank: int, world: int, tmp: str, node_of_rank: tuple[int, ...]):
    """This rank's checkpointer, node-local root, PeerService and clients to every other rank."""
    ck = dc.make_sync_checkpointer()
    secret = ck.writer.session.secret
    root = layout.local_root(f"{tmp}/node{node_of_rank[rank]}", ROOT)
    service = PeerService(root, secret, rank, world, "127.0.0.1")
    addresses: list = [None] * world
    dist.all_gather_object(addresses, service.address)
    # timeout_s bounds one reply, here from a peer among 4 ranks on a loaded machine
    clients = {r: PeerClient(addresses[r], secret, rank, timeout_s=15, peer=r) for r in range(world) if r != rank}
    return ck, root, service, clients


def _full_values(sd: dict) -> bool:
    return torch.equal(sd["w"].full_tensor(), global_tensor("w", (64, 40))) and torch.equal(sd["b"].full_tensor(), global_tensor("b", (10, 3)))


def _save_then_restore(rank, world, tmp, node_of_rank):
    ck, root, service, clients = _start(rank, world, tmp, node_of_rank)
    topo = Nodes(rank, node_of_rank)
    ck.save(f"{KEY}/step-00000005", _state(rank, world), storage=LocalTierStorage(root, topo, 1, clients))
    held = layout.committed_steps(root)
    dist.barrier()
    if rank == 3:  # node 1 is replaced: its local directory is gone
        shutil.rmtree(f"{tmp}/node1")
    dist.barrier()
    node = node_of_rank[rank]
    here = layout.committed_steps(root)
    other_leader = topo.leader((node + 1) % topo.nodes)
    sources = {name: (["local"] if name in here.get(5, {}) else []) + [("peer", other_leader)] for name in held[5]}
    reader = TieredReadStorage(5, root, sources, clients, None)
    sd = _empty(world)
    ck.load(f"{KEY}/step-00000005", sd, storage=reader)
    out = {"held": held, "exact": _full_values(sd) and sd["step"] == 5, "bytes": (reader.bytes_local, reader.bytes_peer, reader.bytes_durable)}
    # the replaced node takes part in the next save; then a bit flip in every rank's own primary:
    # the load names the file, mark_bad moves it to the partner's replica
    storage = LocalTierStorage(root, topo, 1, clients)
    ck.save(f"{KEY}/step-00000006", _state(rank, world), storage=storage)
    name = f"data/r{rank:05d}.bin"
    with open(f"{layout.step_dir(root, 6)}/{name}", "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x40]))
    dist.barrier()
    reader = TieredReadStorage(6, root, {name: ["local", ("peer", topo.partners(rank, 1)[0])]}, clients, None)
    sd, out["first"] = _empty(world), "no error"
    try:
        ck.load(f"{KEY}/step-00000006", sd, storage=reader)
    except dc.ChecksumError as e:
        out["first"] = str(e)
        assert reader.mark_bad(name)
        ck.load(f"{KEY}/step-00000006", sd, storage=reader)
    out["exact_after_flip"] = _full_values(sd)
    for c in clients.values():
        c.close()
    service.close()
    return out


def test_local_save_replicates_to_the_partner_node_and_a_wiped_node_or_a_flipped_byte_reads_from_peers(tmp_path):
    nodes = (0, 0, 1, 1)
    out = run_ranks(_save_then_restore, 4, str(tmp_path), nodes, env=FAST)
    files = rank_files(range(4))  # every rank's data file (and, in version 2, its fragment)
    for r in range(4):
        assert set(out[r]["held"]) == {5} and set(out[r]["held"][5]) == files, r  # own primaries + the partners' replicas
        assert out[r]["exact"] and out[r]["exact_after_flip"], r
    assert out[0]["held"] == out[2]["held"]  # replicas are byte-for-byte the primaries' size
    for r in (0, 1):
        local, peer, durable = out[r]["bytes"]
        assert local > 0 and peer == 0 and durable == 0, (r, out[r]["bytes"])
    for r in (2, 3):  # node 1 lost everything: the manifest and every byte from node 0
        local, peer, durable = out[r]["bytes"]
        assert local == 0 and peer > 0 and durable == 0, (r, out[r]["bytes"])
    for r in range(4):
        assert f"data/r{r:05d}.bin" in out[r]["first"] and "checksum" in out[r]["first"].lower(), out[r]["first"]
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "node0" / KEY))


CHILD = textwrap.dedent(
    """
    import sys, time
    from dist_ckpt.tier.peer import PeerService
    svc = PeerService(sys.argv[1], bytes.fromhex(sys.stdin.readline().strip()), rank=1, world=2, host="127.0.0.1")
    print(svc.address, flush=True)
    time.sleep(120)
    """
)


def _partner_killed(rank, world, tmp):
    ck = dc.make_sync_checkpointer()
    secret = ck.writer.session.secret
    root = layout.local_root(f"{tmp}/node{rank}", ROOT)
    if rank == 1:  # node 1's service lives in a process of its own, SIGKILLed below
        child = subprocess.Popen([sys.executable, "-c", CHILD, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        child.stdin.write(secret.hex() + "\n")
        child.stdin.flush()
        address = child.stdout.readline().strip()
    else:
        service = PeerService(root, secret, rank, world, "127.0.0.1")
        address = service.address
    addresses: list = [None] * world
    dist.all_gather_object(addresses, address)
    # the dead peer fails at once (a lost or refused connection): the 10 s (was 2) are for the live one's replies under load
    clients = {r: PeerClient(addresses[r], secret, rank, timeout_s=10, peer=r) for r in range(world) if r != rank}
    storage = LocalTierStorage(root, Nodes(rank, (0, 1)), 1, clients)
    ck.save(f"{KEY}/step-00000001", _state(rank, world), storage=storage)
    dist.barrier()
    if rank == 1:
        child.send_signal(signal.SIGKILL)
        child.wait()
    dist.barrier()
    errors = []
    for step, replicas in ((2, 1), (3, 0)):  # a replica stream to the dead service; then only node 1's commit
        try:
            ck.save(f"{KEY}/step-{step:08d}", _state(rank, world), storage=LocalTierStorage(root, Nodes(rank, (0, 1)), replicas, clients))
            errors.append("no error")
        except dc.CheckpointError as e:
            errors.append(str(e))
    dist.barrier()
    ck.close()  # rank 0: the coordinator finishes the aborts (every node's tmp directory) first
    if rank == 0:
        service.close()
    return errors, sorted(os.listdir(root))


def test_a_partner_sigkilled_fails_the_save_naming_it_and_keeps_the_previous_step(tmp_path):
    out = run_ranks(_partner_killed, 2, str(tmp_path), env=FAST)
    for rank, (errors, _) in out.items():
        replica, commit = errors
        assert "rank 0" in replica and "peer rank 1 (data/r00000.bin)" in replica and "connection" in replica, (rank, replica)
        assert "node 1 (leader rank 1)" in commit and "refused the connection" in commit, (rank, commit)
    # the previous local step is intact, the failed save removed; node 0 committed its copy of step 3 (a restart
    # checks completeness over the nodes); node 1, whose service is gone, keeps its halves for clear_incomplete
    assert out[0][1] == ["step-00000001", "step-00000003"]
    assert out[1][1][0] == "step-00000001" and [n.split(".tmp-")[0] for n in out[1][1][1:]] == ["step-00000002", "step-00000003"]
    assert layout.committed_steps(str(tmp_path / "node0" / KEY)) == {1: dict.fromkeys(rank_files((0, 1)), ANY), 3: dict.fromkeys(rank_files((0,)), ANY)}


# -- the layout, in one process ---------------------------------------------------------


def test_job_key_names_one_root_however_it_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert layout.job_key("ckpt") == layout.job_key("./ckpt/") == layout.job_key(str(tmp_path / "ckpt"))
    assert layout.job_key("S3://bucket/run/") == layout.job_key("s3://bucket/run") != layout.job_key("s3://bucket/run2")
    assert layout.local_root("/dev/shm/x/", "ckpt") == f"/dev/shm/x/{layout.job_key('ckpt')}" and len(layout.job_key("ckpt")) == 16


def test_a_save_location_parses_back_to_step_and_save_id_and_nothing_else_does():
    assert layout.parse_location(f"{KEY}/step-00000012.tmp-abcd1234-7") == (12, "abcd1234-7")
    for bad in (f"{KEY}/step-00000012", f"{KEY}/step-00000012.old-x", "step-12.tmp-x", f"{KEY}/step-00000001.tmp-a.b", "step-00000001.tmp-"):
        with pytest.raises(ValueError):
            layout.parse_location(bad)


def test_committed_steps_count_only_regular_files_of_steps_with_a_manifest(tmp_path):
    root = str(tmp_path)
    step = tmp_path / "step-00000003"
    (step / "data").mkdir(parents=True)
    (step / "MANIFEST").write_bytes(b"m")
    (step / "data" / "r00001.bin").write_bytes(b"x" * 5)
    (step / "data" / "notes.txt").write_bytes(b"?")
    os.symlink("/etc/passwd", step / "data" / "r00002.bin")
    (tmp_path / "step-00000004" / "data").mkdir(parents=True)  # no MANIFEST: not committed
    (tmp_path / "step-00000005").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "step-00000005" / "MANIFEST")  # a link is no MANIFEST
    (tmp_path / "step-00000006.tmp-s-1").mkdir()
    (tmp_path / "step-00000006.old-s-0").mkdir()
    assert layout.committed_steps(root) == {3: {"data/r00001.bin": 5}}
    assert sorted(layout.clear_incomplete(root)) == ["step-00000006.old-s-0", "step-00000006.tmp-s-1"]
    assert sorted(os.listdir(root)) == ["step-00000003", "step-00000004", "step-00000005"]
    layout.remove_step(root, 3)
    assert layout.committed_steps(root) == {} and not (tmp_path / "step-00000003").exists()
    assert layout.committed_steps(str(tmp_path / "absent")) == {}


def test_commit_step_needs_the_manifest_and_replaces_an_older_copy(tmp_path):
    root = str(tmp_path)
    tmp = layout.tmp_dir(root, 2, "s-1")
    os.makedirs(f"{tmp}/data")
    with pytest.raises(FileNotFoundError):
        layout.commit_step(root, 2, "s-1")
    open(f"{tmp}/MANIFEST", "wb").close()
    layout.commit_step(root, 2, "s-1")
    tmp2 = layout.tmp_dir(root, 2, "s-2")
    os.makedirs(f"{tmp2}/data")
    open(f"{tmp2}/data/r00000.bin", "wb").close()
    open(f"{tmp2}/MANIFEST", "wb").close()
    layout.commit_step(root, 2, "s-2")
    assert os.listdir(root) == ["step-00000002"] and layout.committed_steps(root) == {2: {"data/r00000.bin": 0}}


def test_a_recycled_step_becomes_the_saves_tmp_directory_and_its_files_are_written_over_in_place(tmp_path):
    root = str(tmp_path)
    step = tmp_path / "step-00000001"
    (step / "data").mkdir(parents=True)
    (step / "MANIFEST").write_bytes(b"m")
    (step / "data" / "r00000.bin").write_bytes(b"\xff" * (3 * 4096))
    inode = os.stat(step / "data" / "r00000.bin").st_ino
    assert not layout.recycle_step(root, 5, 2, "s-2")  # nothing committed there
    os.symlink(step, tmp_path / "step-00000003")
    assert not layout.recycle_step(root, 3, 2, "s-2")  # a link is never taken for a step
    os.unlink(tmp_path / "step-00000003")
    assert layout.recycle_step(root, 1, 2, "s-2")
    tmp = layout.tmp_dir(root, 2, "s-2")
    assert layout.committed_steps(root) == {} and sorted(os.listdir(tmp)) == ["data", "recycled"]  # un-committed: its MANIFEST went first
    assert not layout.recycle_step(root, 1, 2, "s-2")
    assert not layout.reuse_file(tmp, "data/r00001.bin") and not layout.reuse_file(tmp, "MANIFEST")
    assert layout.reuse_file(tmp, "data/r00000.bin")
    stream = ReusedWriteStream(f"{tmp}/data/r00000.bin")
    stream.append(memoryview(b"a" * 10), 0)
    stream.append(memoryview(b"b" * 10), 8192)
    stream.sync()
    stream.close()
    with open(f"{tmp}/data/r00000.bin", "rb") as f:
        assert f.read() == b"a" * 10 + bytes(8192 - 10) + b"b" * 10  # the gap reads as zeros, the old tail is cut
    assert os.stat(f"{tmp}/data/r00000.bin").st_ino == inode
    with open(f"{tmp}/MANIFEST", "wb") as f:
        f.write(b"m2")
    layout.commit_step(root, 2, "s-2")
    assert sorted(os.listdir(layout.step_dir(root, 2))) == ["MANIFEST", "data"] and layout.committed_steps(root) == {2: {"data/r00000.bin": 8202}}


def test_local_tier_paths_name_this_nodes_tree_and_nothing_outside_it(tmp_path):
    root = layout.local_root(str(tmp_path / "node0"), ROOT)
    storage = LocalTierStorage(root, Nodes(0, (0,)), 0, {})
    assert storage._own(f"{KEY}/step-00000001/MANIFEST") == f"{root}/step-00000001/MANIFEST" and storage._own(KEY) == root
    for bad in ("/etc", "otherjob/step-00000001", f"{KEY}x/step-1"):
        with pytest.raises(ValueError):
            storage._own(bad)
    with pytest.raises(ValueError, match="no PeerClient for rank"):
        LocalTierStorage(root, Nodes(0, (0, 1)), 1, {})


def test_beginning_a_save_clears_what_failed_saves_left_on_every_node(tmp_path):
    roots = [layout.local_root(str(tmp_path / f"node{n}"), ROOT) for n in (0, 1)]
    services = [PeerService(roots[n], SECRET_FOR_TESTS, n, 2, "127.0.0.1") for n in (0, 1)]
    try:
        client = PeerClient(services[1].address, SECRET_FOR_TESTS, 0, timeout_s=10, peer=1)
        for root in roots:
            os.makedirs(f"{root}/step-00000003.tmp-old-1/data")  # a failed save's late writers re-created it
            os.makedirs(f"{root}/step-00000004/data")
            open(f"{root}/step-00000004/MANIFEST", "wb").close()
        storage = LocalTierStorage(roots[0], Nodes(0, (0, 1)), 1, {1: client})
        target = storage.save_target(f"{KEY}/step-00000005", "new-2", False)
        storage.begin_save(target)
        assert sorted(os.listdir(roots[0])) == ["step-00000004", "step-00000005.tmp-new-2"]
        assert sorted(os.listdir(roots[1])) == ["step-00000004"]
        client.close()
    finally:
        for s in services:
            s.close()
