"""A session: this rank's place in the job and its link to the coordinator.

Created once per checkpointer (or once for the functional API). Rank 0 starts
the coordinator; the endpoint and a fresh per-job secret reach the other
ranks through the process group's store, once, here — never during a save.
Without a process group the session is a world of one with a local
coordinator.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from dataclasses import dataclass

import torch.distributed as dist

from .agent import Agent
from .config import Config
from .coordinator import Coordinator
from .errors import ProcessGroupNotInitialized
from .logs import get_logger, set_rank
from .storage import get_storage

log = get_logger(__name__)
_counter = itertools.count()


@dataclass
class RankInfo:
    """This process's rank and the world size (mirrors torch's ``_experimental.RankInfo``)."""

    global_rank: int
    global_world_size: int


def job_interface(master_addr: str | None) -> str:
    """The local IP address that routes towards ``master_addr`` (the job's network).

    Binding there rather than on every interface keeps the coordinator off
    networks the job does not use. Falls back to loopback.
    """
    if not master_addr or master_addr in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(master_addr), 9))  # UDP connect sends nothing
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def require_process_group_if_launched() -> bool:
    """Whether a process group is initialised; refuse a launched job that has none.

    Under ``torchrun`` (or any launcher setting ``WORLD_SIZE > 1``) a save
    before ``init_process_group`` would make every rank a world of one that
    believes it is rank 0: one commits a checkpoint holding only its own
    values, the others collide with it. Every rank checks this on its own, so
    every rank refuses, at once.

    Returns:
        True when a default process group is initialised.

    Raises:
        ProcessGroupNotInitialized: ``WORLD_SIZE`` (or ``RANK``) says this is one rank of several and
            no process group is initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    world, rank = os.environ.get("WORLD_SIZE", "1").strip(), os.environ.get("RANK", "0").strip()
    if (world.isdigit() and int(world) > 1) or (rank.isdigit() and int(rank) > 0):
        raise ProcessGroupNotInitialized(
            f"rank {rank} of WORLD_SIZE={world} (from the environment): no torch.distributed process group is initialised; "
            "call torch.distributed.init_process_group() on every rank before creating a checkpointer or saving "
            "(or pass process_group=...), otherwise every rank would save as rank 0 of 1"
        )
    return False


class Session:
    """Rank info, the agent, and (rank 0) the coordinator.

    Args:
        config: settings.
        process_group: group whose store carries the endpoint and secret; default group when None.

    Raises:
        ProcessGroupNotInitialized: launched as one of several ranks without a process group.
    """

    def __init__(self, config: Config, process_group: dist.ProcessGroup | None = None) -> None:
        self.config = config
        distributed = require_process_group_if_launched()
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.coordinator: Coordinator | None = None
        self._closed = False
        self._seq = itertools.count()
        n = next(_counter)
        if self.rank == 0:
            secret, job = os.urandom(32), uuid.uuid4().hex
            bind = config.coordinator or f"tcp://{job_interface(os.environ.get('MASTER_ADDR'))}:0"
            self.coordinator = Coordinator(self.world_size, job, secret, bind, get_storage, config)
            endpoint = self.coordinator.endpoint
            if self.world_size > 1:
                store = _store(process_group)
                store.set(f"dist_ckpt/{n}/hello", f"{endpoint}|{job}".encode())
                store.set(f"dist_ckpt/{n}/secret", secret)
        else:
            store = _store(process_group)
            endpoint, job = store.get(f"dist_ckpt/{n}/hello").decode().split("|")
            secret = store.get(f"dist_ckpt/{n}/secret")
        self.job = job
        self.agent = Agent(endpoint, secret, job, self.rank, config)
        self.rank_info = RankInfo(self.rank, self.world_size)
        set_rank(self.rank)

    def next_save_id(self) -> str:
        """Id of the next save; every rank calls saves in the same order, so ids agree."""
        return str(next(self._seq))

    def close(self) -> None:
        """Close the agent and (rank 0) the coordinator; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.agent.close()
        if self.coordinator is not None:
            self.coordinator.close()


def _store(process_group: dist.ProcessGroup | None) -> dist.Store:
    # The default store is a plain key-value TCP store: using it is not a collective.
    return dist.distributed_c10d._get_default_store()
