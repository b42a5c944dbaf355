"""The restart choice of the node-local tier: which local step to load, and where each rank reads each file.

Every rank computes the same answer from the same input: every node's
inventory (exchanged through the process group's store, see
:mod:`dist_ckpt.tier.manager_tier`) and the newest durable step. Nothing here
does I/O.

A node's inventory says, per committed local step, which data files the node
holds (primaries of its ranks and replicas of its partners), which files the
step's MANIFEST names, and a digest of that MANIFEST (so copies of two
different saves of one step number are never mixed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..layout_names import DATA_FILE_RE
from .topology import Topology

Source = Any  # "local" | ("peer", rank) | "durable": the spelling TieredReadStorage takes

MAX_INVENTORY_STEPS = 64  # a node keeps local_keep steps; more in an inventory is refused as malformed
FILE_IN_TEXT = re.compile(r"data/r\d{5}(?:-t\d{1,3})?\.bin")
"""A data file name inside an error's text (checksum and data-file errors name the file)."""


@dataclass(frozen=True)
class StepCopy:
    """One node's committed copy of one local step.

    Attributes:
        held: data file name -> size, the files this node holds.
        needed: the data files the step's MANIFEST names.
        digest: hex digest of the MANIFEST bytes.
    """

    held: Mapping[str, int]
    needed: tuple[str, ...]
    digest: str


NodeInventory = dict[int, StepCopy]  # step -> this node's copy


def encode_inventory(inv: NodeInventory) -> dict[str, Any]:
    """The inventory as msgpack-native values (for the store)."""
    return {str(s): {"held": dict(c.held), "needed": list(c.needed), "digest": c.digest} for s, c in inv.items()}


def decode_inventory(obj: Any, where: str) -> NodeInventory:
    """Parse an inventory read from the (unauthenticated) store; refuses anything malformed.

    Raises:
        ValueError: not the shape :func:`encode_inventory` writes (names ``where``).
    """
    if not isinstance(obj, dict) or len(obj) > MAX_INVENTORY_STEPS:
        raise ValueError(f"{where}: inventory is not a map of at most {MAX_INVENTORY_STEPS} steps")
    out: NodeInventory = {}
    for s, c in obj.items():
        if not (isinstance(s, str) and s.isdigit() and isinstance(c, dict)):
            raise ValueError(f"{where}: bad step entry {s!r:.40}")
        held, needed, digest = c.get("held"), c.get("needed"), c.get("digest")
        if not isinstance(held, dict) or not isinstance(needed, list) or not isinstance(digest, str) or len(digest) > 64:
            raise ValueError(f"{where}: step {s}: malformed copy")
        names = [*held, *needed]
        if not all(isinstance(n, str) and DATA_FILE_RE.match(n) for n in names) or not all(isinstance(v, int) and v >= 0 for v in held.values()):
            raise ValueError(f"{where}: step {s}: a file name is not a data file name or a size is not a count")
        out[int(s)] = StepCopy(dict(held), tuple(needed), digest)
    return out


@dataclass(frozen=True)
class Candidate:
    """A local step complete over the surviving nodes.

    Attributes:
        step: the step.
        digest: the MANIFEST digest the chosen copies share.
        holders: file name -> nodes holding a copy with that digest.
        durable: whether ``step`` is also committed in the durable tier (its last source).
    """

    step: int
    digest: str
    holders: Mapping[str, tuple[int, ...]]
    durable: bool


def candidates(inventories: Mapping[int, NodeInventory], durable_steps: Sequence[int]) -> list[Candidate]:
    """Local steps to try, newest first: complete over the nodes and not older than the newest durable step.

    Args:
        inventories: node -> that node's inventory (a wiped node has an empty one).
        durable_steps: committed durable steps.

    Returns:
        The candidates, newest first.
    """
    newest_durable = max(durable_steps, default=-1)
    steps = sorted({s for inv in inventories.values() for s in inv if s >= newest_durable}, reverse=True)
    out = []
    for step in steps:
        copies = {node: inv[step] for node, inv in inventories.items() if step in inv}
        found = _complete(step, copies, step in set(durable_steps))
        if found is not None:
            out.append(found)
    return out


def _complete(step: int, copies: Mapping[int, StepCopy], durable: bool) -> Candidate | None:
    """The step's copies of one MANIFEST (the one most nodes hold first) that together hold every file, if any.

    Copies with different digests come from different saves of one step number: never mixed.
    """
    counts: dict[str, int] = {}
    for c in copies.values():
        counts[c.digest] = counts.get(c.digest, 0) + 1
    for digest in sorted(counts, key=lambda d: (-counts[d], d)):
        chosen = {node: c for node, c in copies.items() if c.digest == digest}
        needed = next(iter(chosen.values())).needed
        holders = {name: tuple(sorted(n for n, c in chosen.items() if name in c.held)) for name in needed}
        if needed and all(holders.values()):
            return Candidate(step, digest, holders, durable)
    return None


def sources(candidate: Candidate, topology: Topology) -> dict[str, list[Source]]:
    """Where this rank reads each file of ``candidate``: its own node, then the other holders, then durable.

    Other nodes are tried in ring order from this node; on each, the rank with
    this rank's local index serves (spreads the peer reads over the node's services).
    """
    me, nodes = topology.node, topology.nodes
    local_index = topology.ranks_on(me).index(topology.rank)
    out: dict[str, list[Source]] = {}
    for name, holders in candidate.holders.items():
        srcs: list[Source] = []
        for node in sorted(holders, key=lambda n: (n - me) % nodes):
            if node == me:
                srcs.append("local")
            else:
                there = topology.ranks_on(node)
                srcs.append(("peer", there[local_index % len(there)]))
        if candidate.durable:
            srcs.append("durable")
        out[name] = srcs
    return out


def file_named_in(error: BaseException) -> str | None:
    """The data file an error's text names (checksum, data-file and peer errors name it), or None."""
    m = FILE_IN_TEXT.search(str(error))
    return m.group(0) if m else None


@dataclass(frozen=True)
class RestoreInfo:
    """Where this rank's restore came from (``CheckpointManager.last_restore``).

    Attributes:
        step: the step loaded.
        tier: ``"local"`` (every byte from this node), ``"peer"`` (some from other nodes' local tiers)
            or ``"durable"`` (some or all from ``root``).
        seconds: from ``load()`` being called until the state was filled on this rank.
        bytes_local, bytes_peer, bytes_durable: data bytes this rank read from each tier.
    """

    step: int
    tier: str
    seconds: float
    bytes_local: int = 0
    bytes_peer: int = 0
    bytes_durable: int = 0

    def line(self) -> str:
        return (
            f"restored step {self.step} from the {self.tier} tier in {self.seconds:.3f} s "
            f"(bytes: local {self.bytes_local}, peer {self.bytes_peer}, durable {self.bytes_durable})"
        )
