"""Which ranks share a node, and which ranks hold each rank's replicas (the node-local tier's map).

Node ids come from the launcher, not from host names: two torchrun agents on
one host are two nodes (each with its own local directory), which is also how
the tests simulate two nodes on one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

NODE_ENV = ("DIST_CKPT_NODE_ID", "GROUP_RANK", "SLURM_NODEID")
"""Environment variables naming this process's node, first set one wins (else node 0)."""
LOCAL_DIR_ENV = "DIST_CKPT_LOCAL_DIR"
"""The node-local tier's directory when the manager is given none."""


def node_id_from_env(env: dict[str, str] | None = None) -> str:
    """This process's node id as the launcher names it (an opaque string; "0" when no launcher says).

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        ``DIST_CKPT_NODE_ID`` if set, else torchrun's ``GROUP_RANK``, else ``SLURM_NODEID``, else ``"0"``.
    """
    env = dict(os.environ) if env is None else env
    for name in NODE_ENV:
        value = env.get(name, "").strip()
        if value:
            return value
    return "0"


LOCAL_RANK_ENV = ("LOCAL_RANK", "SLURM_LOCALID")
"""Where the launcher says a process's index on its node (torchrun, then Slurm)."""


def first_on_node_from_env(env: dict[str, str] | None = None) -> bool:
    """Whether the launcher says this process is the first of its node (local rank 0): its node's leader, if the
    node's ranks are numbered in order (torchrun and Slurm number them so). False when no launcher says.

    Args:
        env: the environment to read (default ``os.environ``).
    """
    env = dict(os.environ) if env is None else env
    for name in LOCAL_RANK_ENV:
        value = env.get(name, "").strip()
        if value:
            return value == "0"
    return False


@dataclass(frozen=True)
class Topology:
    """This rank and the node of every rank (nodes numbered 0..n-1 in order of their first rank).

    Attributes:
        rank: this process's rank.
        node_of_rank: node index per rank.
    """

    rank: int
    node_of_rank: tuple[int, ...]

    @classmethod
    def from_ids(cls, rank: int, ids: list[str]) -> "Topology":
        """Renumber the launcher's node ids (one per rank, :func:`node_id_from_env` on each, exchanged
        by the manager through the process group's store) 0..n-1 in order of first appearance.

        Raises:
            ValueError: ``rank`` is not one of the ranks.
        """
        if not 0 <= rank < len(ids):
            raise ValueError(f"rank {rank} outside a world of {len(ids)}")
        index: dict[str, int] = {}
        return cls(rank, tuple(index.setdefault(i, len(index)) for i in ids))

    @property
    def world(self) -> int:
        return len(self.node_of_rank)

    @property
    def nodes(self) -> int:
        """Number of nodes."""
        return max(self.node_of_rank) + 1

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.node_of_rank[self.rank]

    def ranks_on(self, node: int) -> list[int]:
        """The ranks on ``node``, ascending."""
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def leader(self, node: int) -> int:
        """The lowest rank on ``node``: it publishes the node's MANIFEST and answers for its inventory."""
        return self.ranks_on(node)[0]

    def leaders(self) -> list[int]:
        """Every node's leader, by node."""
        return [self.leader(n) for n in range(self.nodes)]

    def check_replicas(self, replicas: int) -> None:
        """Refuse ``replicas`` that the nodes cannot hold on distinct nodes.

        Raises:
            ValueError: ``replicas`` is negative, or there are fewer than ``replicas + 1`` nodes.
        """
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if self.nodes < replicas + 1:
            raise ValueError(
                f"replicas={replicas} needs at least {replicas + 1} nodes (each copy on another node), but the launcher reports "
                f"{self.nodes} node(s) for {self.world} rank(s) (node ids from {', '.join(NODE_ENV)})"
            )

    def partners(self, r: int, replicas: int) -> list[int]:
        """The ranks holding replicas of rank ``r``'s data: partner k on node ``(node(r) + k) % nodes``.

        Partner k has ``r``'s local index on that node (modulo its rank count), so
        with equal nodes rank r's partners are r + k x ranks-per-node (mod world).

        Raises:
            ValueError: fewer than ``replicas + 1`` nodes.
        """
        self.check_replicas(replicas)
        node = self.node_of_rank[r]
        local = self.ranks_on(node).index(r)
        out = []
        for k in range(1, replicas + 1):
            there = self.ranks_on((node + k) % self.nodes)
            out.append(there[local % len(there)])
        return out

    def holders(self, origin: int, replicas: int) -> list[int]:
        """``origin`` and its partners: every rank whose node holds a copy of ``origin``'s files."""
        return [origin, *self.partners(origin, replicas)]

    def holder_nodes(self, origin: int, replicas: int) -> list[int]:
        """The nodes holding a copy of ``origin``'s files, the origin's own first."""
        return [self.node_of_rank[r] for r in self.holders(origin, replicas)]


def check_tier_args(replicas: int, persist_every: int, local_keep: int) -> None:
    """Refuse bad tier settings before anything starts.

    Raises:
        ValueError: ``replicas`` < 0, ``persist_every`` < 1 or ``local_keep`` < 1.
    """
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    if persist_every < 1:
        raise ValueError(f"persist_every must be >= 1, got {persist_every}")
    if local_keep < 1:
        raise ValueError(f"local_keep must be >= 1 (the step being written counts), got {local_keep}")
