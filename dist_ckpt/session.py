"""A session: this rank's place in the job and its link to the coordinator.

Created once per checkpointer (or once for the functional API). Rank 0 starts
the coordinator; its endpoint and the session's job id reach the other ranks
through the process group's store, once, here — never during a save. The
store is unauthenticated, so nothing secret goes through it: each rank gets
the session secret from ``DIST_CKPT_SECRET`` or from the 0600 key file rank 0
writes (:mod:`dist_ckpt.trust`). Without a process group the session is a
world of one with a local coordinator.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import torch.distributed as dist

from . import trust
from .agent import Agent
from .config import Config
from .coordinator import Coordinator
from .errors import ProcessGroupNotInitialized, TransportError
from .logs import get_logger, set_rank
from .storage import Storage, get_storage

log = get_logger(__name__)
_counter = itertools.count()
# Sessions not closed yet, closed at interpreter exit (after the functional
# API's shared ones, whose atexit hook is registered later and so runs first).
# Held strongly: a dropped session's agent thread would run on regardless.
_open: dict[int, "Session"] = {}
_open_lock = threading.Lock()


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
        process_group: the ranks that save together, and whose store carries the
            coordinator's endpoint and the job id (never the secret); the default group when None.

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
        self.key_file: str | None = None  # rank 0: the key file while ranks may still need it
        self._storages: collections.OrderedDict[str, Storage] = collections.OrderedDict()  # (rank 0) injected, by save path
        n = next(_counter)
        if self.rank == 0:
            job = uuid.uuid4().hex
            secret = self._new_secret(job)
            bind = config.coordinator or f"tcp://{job_interface(os.environ.get('MASTER_ADDR'))}:0"
            try:
                self.coordinator = Coordinator(self.world_size, job, secret, bind, self.storage_for, config, on_connected=self._remove_key_file)
            except BaseException:
                self._remove_key_file()
                raise
            endpoint = self.coordinator.endpoint
            if self.world_size > 1:  # public material only
                _store(process_group).set(f"dist_ckpt/{n}/hello", f"{endpoint}|{job}".encode())  # type: ignore[arg-type]  # takes bytes too; torch's stub says str
        else:
            endpoint, job = _parse_hello(_store(process_group).get(f"dist_ckpt/{n}/hello"))
            secret = trust.env_secret(job) or trust.read_key_file(trust.key_dir(), job, min(config.timeout_s, 60.0))
        self.job = job
        #: The session secret, for services of the same job that authenticate like the control plane
        #: (the node-local tier's peer services derive their own keys from it). Never sent anywhere.
        self.secret = secret
        self.agent = Agent(endpoint, secret, job, self.rank, config)
        self.rank_info = RankInfo(self.rank, self.world_size)
        set_rank(self.rank)
        with _open_lock:
            _open[id(self)] = self

    def _new_secret(self, job: str) -> bytes:
        """(rank 0) The session secret: from the environment, else random and written to a key file."""
        secret = trust.env_secret(job)
        if secret is None:
            secret = os.urandom(trust.KEY_BYTES)
            if self.world_size > 1:
                self.key_file = trust.write_key_file(trust.key_dir(), job, secret)
        return secret

    def _remove_key_file(self) -> None:
        """(rank 0) Every rank has authenticated (or the session ends): nobody needs the key file."""
        path, self.key_file = self.key_file, None
        if path is not None:
            trust.remove_key_file(path)

    def use_storage(self, path: str, storage: Storage) -> None:
        """(rank 0, before its PlanRequest) Have the coordinator commit saves to ``path`` through ``storage``.

        Rank 0 registers before it sends its own PlanRequest and the plan waits
        for every rank's, so the coordinator never resolves ``path`` before this.
        Other ranks have no coordinator; the call does nothing there.
        """
        if self.coordinator is None:
            return
        self._storages[path] = storage
        self._storages.move_to_end(path)
        while len(self._storages) > 64:  # a manager saves to a new path every step
            self._storages.popitem(last=False)

    def storage_for(self, path: str) -> tuple[Storage, str]:
        """(the coordinator) The storage for ``path``: the one injected for it, else by URL scheme.

        Raises:
            UnsupportedScheme: nothing was injected and the scheme has no backend.
        """
        return get_storage(path, self._storages.get(path))

    def next_save_id(self) -> str:
        """Id of the next save; every rank calls saves in the same order, so ids agree."""
        return str(next(self._seq))

    def close(self) -> None:
        """Close the agent and (rank 0) the coordinator; idempotent."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open.pop(id(self), None)
        self.agent.close()
        if self.coordinator is not None:
            self.coordinator.close()
        self._remove_key_file()


def close_open_sessions() -> None:
    """Close every session nobody closed (a checkpointer left open); run at interpreter exit.

    Without it their agent and coordinator threads run into the interpreter's
    teardown: replies still queued are lost, and a heartbeat thread starved by
    the teardown logs that this process "was unresponsive".
    """
    with _open_lock:
        sessions = list(_open.values())
    for session in sessions:
        try:
            session.close()
        except Exception:  # one session's failure must not keep the others open; exit goes on
            log.exception("[rank %d] closing session %s at exit failed", session.rank, session.job)


def _forget_open_sessions() -> None:
    """In a forked child: the parent's sessions (their threads and sockets) are not this process's to close."""
    global _open_lock
    _open_lock = threading.Lock()  # a parent's thread may have held it at the fork
    _open.clear()


atexit.register(close_open_sessions)
os.register_at_fork(after_in_child=_forget_open_sessions)


def _parse_hello(value: bytes) -> tuple[str, str]:
    """``(endpoint, job)`` from the store's hello; the store is untrusted, so check its shape.

    Raises:
        TransportError: the value is not ``tcp://host:port|<32 hex digits>``.
    """
    endpoint, _, job = value.decode("utf-8", "replace").partition("|")
    if not endpoint.startswith("tcp://") or not trust.valid_job_id(job):
        raise TransportError(f"the launcher's store holds a malformed dist_ckpt hello {value[:100]!r}; was it tampered with?")
    return endpoint, job


def _store(process_group: dist.ProcessGroup | None) -> dist.Store:
    """The store of ``process_group`` (the default group's when None).

    A plain key-value store: using it is not a collective. A group made by
    ``new_group`` has its own prefixed view of the default store, so two groups
    saving at once do not read each other's hello. torch has no public
    accessor for it: ``_get_process_group_store`` is the one ``new_group``
    itself uses; a group it does not know falls back to the default store.
    """
    c10d = dist.distributed_c10d
    if process_group is not None and process_group in c10d._world.pg_map:
        return c10d._get_process_group_store(process_group)
    return c10d._get_default_store()
