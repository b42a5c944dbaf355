"""The node-local tier's topology and restart choice as pure functions (no ranks, no I/O)."""

from __future__ import annotations

import pytest

from dist_ckpt.tier.restore import Candidate, StepCopy, candidates, decode_inventory, encode_inventory, file_named_in, sources
from dist_ckpt.tier.topology import Topology, node_id_from_env

FILES = tuple(f"data/r{r:05d}.bin" for r in range(4))


def copy(held: tuple[str, ...], digest: str = "d") -> StepCopy:
    return StepCopy({name: 100 for name in held}, FILES, digest)


def test_topology_partners_and_leaders() -> None:
    t = Topology.from_ids(1, ["b", "b", "a", "a", "c", "c"])  # launcher ids renumbered in order of first rank
    assert t.node_of_rank == (0, 0, 1, 1, 2, 2) and t.nodes == 3 and t.node == 0
    assert t.partners(1, 2) == [3, 5] and t.holders(4, 1) == [4, 0] and t.leaders() == [0, 2, 4]
    uneven = Topology.from_ids(0, ["x", "x", "x", "y"])
    assert uneven.partners(2, 1) == [3] and uneven.partners(3, 1) == [0]
    with pytest.raises(ValueError, match="replicas=2 needs at least 3 nodes"):
        uneven.partners(0, 2)


def test_node_id_from_the_launcher_environment() -> None:
    assert node_id_from_env({"DIST_CKPT_NODE_ID": "n7", "GROUP_RANK": "1", "SLURM_NODEID": "2"}) == "n7"
    assert node_id_from_env({"GROUP_RANK": "1", "SLURM_NODEID": "2"}) == "1"
    assert node_id_from_env({"SLURM_NODEID": "2"}) == "2" and node_id_from_env({}) == "0"


def test_candidates_newest_complete_and_not_older_than_durable() -> None:
    inv = {
        0: {3: copy(FILES[:3]), 2: copy(FILES), 1: copy(FILES)},
        1: {3: copy(FILES[:2]), 2: copy(FILES[2:])},
    }
    # step 3 lacks r00003 on every node; step 1 is older than the durable step 2
    assert [c.step for c in candidates(inv, [2])] == [2]
    assert [c.step for c in candidates(inv, [])] == [2, 1]
    assert candidates(inv, [5]) == []
    (c,) = candidates(inv, [2])
    assert c.durable and c.holders["data/r00003.bin"] == (0, 1)


def test_a_stale_copy_with_another_manifest_is_never_mixed_in() -> None:
    inv = {0: {4: copy(FILES[:2], "new")}, 1: {4: copy(FILES[2:], "new")}, 2: {4: copy(FILES, "old")}}
    (c,) = candidates(inv, [])
    assert c.digest == "new" and c.holders["data/r00000.bin"] == (0,)
    inv[1][4] = copy(FILES[2:], "other")  # "new" is no longer complete: the complete "old" copy, alone
    (c,) = candidates(inv, [])
    assert c.digest == "old" and set(c.holders.values()) == {(2,)}
    inv[2][4] = copy(FILES[:1], "old")
    assert candidates(inv, []) == []


def test_sources_own_node_first_then_ring_order_then_durable() -> None:
    t = Topology.from_ids(3, ["a", "a", "b", "b", "c", "c"])  # rank 3: node 1, local index 1
    c = Candidate(7, "d", {"data/r00000.bin": (0, 1, 2), "data/r00005.bin": (2,)}, durable=True)
    assert sources(c, t) == {"data/r00000.bin": ["local", ("peer", 5), ("peer", 1), "durable"], "data/r00005.bin": [("peer", 5), "durable"]}


def test_inventory_from_the_store_is_checked() -> None:
    inv = {5: copy(FILES)}
    assert decode_inventory(encode_inventory(inv), "x") == inv
    for bad in ({"5": {"held": {"../etc/passwd": 1}, "needed": [], "digest": "d"}}, {"x": {}}, [], {"5": {"held": {}, "needed": "no", "digest": "d"}}):
        with pytest.raises(ValueError):
            decode_inventory(bad, "rank 3's inventory")


def test_the_file_an_error_names() -> None:
    assert file_named_in(ValueError("checksum mismatch for w chunk 0 in /x/step-00000003/data/r00002-t1.bin at offset 0")) == "data/r00002-t1.bin"
    assert file_named_in(ValueError("nothing here")) is None
