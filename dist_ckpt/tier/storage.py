"""The two storages of the node-local tier: a local save (with replicas) and a tiered restore.

:class:`LocalTierStorage` is the ``storage=`` of a local-tier save. Call
order (which rank runs each step), as for every backend:

1. (coordinator) ``save_target(path, save_id)``: ``path`` is the same string
   on every rank (``<job_key>/step-N``); the location ``step-N.tmp-<id>``
   is rebuilt by every node in its own local root.
2. (coordinator) ``begin_save``: every node's leader removes the tmp
   directories earlier (failed) saves left; the coordinator creates its own
   node's tmp directory (each rank creates its node's in ``open_stream``).
3. (every rank) ``open_stream`` → a tee: the rank's own file in its node's tmp
   directory and one replica stream to each partner rank
   (:meth:`PeerClient.replica`); ``sync`` returns once the local file is
   fsync'd and every partner acknowledged its fsync. A partner's failure
   fails this rank's save, naming the partner.
4. (coordinator, after every rank synced: every primary and replica written)
   ``publish``: each node's leader commits its node's copy (``MANIFEST`` +
   rename; rank 0's own node directly), in parallel. ``abort``: every node's
   leader removes its tmp directory (an unreachable node's is left for
   :func:`layout.clear_incomplete` at the next start, logged).

:class:`TieredReadStorage` is the ``storage=`` of a restore's ``dc.load``:
each data file is read from the first of its sources (this node's file, a
peer's service, the durable checkpoint), ``mark_bad`` moves a file to its
next source, and the bytes read from each tier are counted.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..errors import PeerError, UnsafeFileError
from ..layout_names import DATA_DIR, MANIFEST, STEP_RE, TMP, sibling
from ..logs import get_logger
from ..storage import MAX_READ_BYTES, ReadHandle, SaveTarget, Storage, WriteStream
from ..storage.local import LocalStorage, LocalWriteStream
from . import layout
from .counting import CountedHandle
from .peer import PeerClient
from .peer_protocol import PIECE_BYTES
from .peer_read import PeerReadHandle

log = get_logger(__name__)

__all__ = ["LocalTierStorage", "TieredReadStorage", "TeeStream", "ReusedWriteStream"]


class TopologyLike(Protocol):
    """What the data plane needs of :class:`dist_ckpt.tier.topology.Topology`."""

    rank: int

    @property
    def nodes(self) -> int: ...

    def leader(self, node: int) -> int: ...

    def partners(self, r: int, replicas: int) -> list[int]: ...


def _step_of(path: str) -> int | None:
    """The step a path's last ``step-N`` component names (``<job_key>/step-N/...``), or None."""
    for part in reversed(path.rstrip("/").split("/")):
        m = STEP_RE.match(part)
        if m:
            return int(m.group(1))
    return None


def _tail(path: str) -> str:
    """What follows the ``step-N`` component of ``path`` ("" for the step itself)."""
    parts = path.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if STEP_RE.match(parts[i]):
            return "/".join(parts[i + 1 :])
    return path


class TeeStream(WriteStream):
    """This rank's file in its node's local tier, and the same bytes to each partner.

    Pieces go to the partners first (they return at once within the credit
    window), then to the local file, so the network and the local write overlap.
    """

    def __init__(self, name: str, primary: WriteStream, replicas: Sequence[WriteStream]) -> None:
        super().__init__(name)
        self._primary, self._replicas = primary, list(replicas)

    def _write(self, data: memoryview, offset: int) -> None:
        for r in self._replicas:
            r.append(data, offset)
        self._primary.append(data, offset)

    def start_writeback(self, offset: int, nbytes: int) -> None:
        self._primary.start_writeback(offset, nbytes)

    def sync(self) -> None:
        self._primary.sync()
        for r in self._replicas:
            r.sync()

    def close(self) -> None:
        for s in (self._primary, *self._replicas):
            s.close()


class ReusedWriteStream(LocalWriteStream):
    """A data file written over the file of the same name of a step retention recycled (:func:`layout.recycle_step`).

    Its pages are overwritten instead of freed and allocated again; the old
    bytes in a gap are zeroed as they are passed, and :meth:`sync` cuts the file at its end.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, truncate=False)
        assert self._fd is not None
        self._old = os.fstat(self._fd).st_size

    def _write(self, view: memoryview, offset: int) -> None:
        assert self._fd is not None, "write on a closed stream"
        layout.zero_stale(self._fd, self.end, offset, self._old)
        super()._write(view, offset)

    def sync(self) -> None:
        assert self._fd is not None
        self._old = layout.cut_stale(self._fd, self.end, self._old)
        super().sync()


class LocalTierStorage(Storage):
    """The ``storage=`` of a local-tier save (see the module docstring for the call order).

    Args:
        local_root: this node's tree for the job (:func:`layout.local_root`).
        topology: ranks per node, partners and leaders (a :class:`~dist_ckpt.tier.topology.Topology`).
        replicas: copies of each rank's files on other nodes (0: none).
        clients: a :class:`PeerClient` per other rank (at least this rank's partners and every node's leader).
    """

    def __init__(self, local_root: str, topology: TopologyLike, replicas: int, clients: Mapping[int, PeerClient]) -> None:
        self.local_root, self.topology, self.replicas, self.clients = local_root, topology, replicas, clients
        self._local = LocalStorage()
        self.partners = topology.partners(topology.rank, replicas) if replicas else []
        missing = [r for r in [*self.partners, *(topology.leader(n) for n in range(topology.nodes))] if r != topology.rank and r not in clients]
        if missing:
            raise ValueError(f"rank {topology.rank}: no PeerClient for rank(s) {sorted(set(missing))} (partners and node leaders need one)")

    def _own(self, path: str) -> str:
        """``path`` (``<job_key>[/...]``, the same string on every rank) in this node's tree.

        Raises:
            ValueError: ``path`` is outside the job's local tree.
        """
        key, p = os.path.basename(self.local_root), path.rstrip("/")
        if p == key or p.startswith(key + "/"):
            return self.local_root + p[len(key) :]
        if p == self.local_root or p.startswith(self.local_root + "/"):
            return p
        raise ValueError(f"{path!r} is not in the node-local tier of this job ({key}/...)")

    # -- a save --------------------------------------------------------------------------

    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        path = path.rstrip("/")
        layout.check_save_id(save_id)
        return SaveTarget(path, sibling(path, TMP, save_id), save_id, overwrite)

    def begin_save(self, target: SaveTarget) -> None:
        """(coordinator) Clear what earlier saves left on every node, then create this node's tmp directory.

        Every rank has asked for this save's plan, so none still writes for an
        earlier one: a failed save's tmp directories (re-created by writers
        that were still going when it was aborted) go now, not at the next start.

        A node that cannot be cleared is only logged: the save fails where
        that node is needed (a replica stream, its commit), naming what failed.

        Raises:
            OSError: this node's tmp directory cannot be created.
        """
        step, save_id = layout.parse_location(target.location)
        failed = self._each_node("sweep", lambda: layout.clear_incomplete(self.local_root, keep=save_id), lambda c: c.sweep(save_id))
        for n, e in sorted(failed.items()):
            log.warning("[rank %d] local step %d: could not clear earlier saves' leftovers on node %d: %s", self.topology.rank, step, n, e)
        os.makedirs(f"{layout.tmp_dir(self.local_root, step, save_id)}/{DATA_DIR}", exist_ok=True)

    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        step, save_id = layout.parse_location(target.location)
        tmp = layout.tmp_dir(self.local_root, step, save_id)
        os.makedirs(f"{tmp}/{DATA_DIR}", exist_ok=True)
        replicas: list[WriteStream] = []
        try:
            for p in self.partners:
                replicas.append(self.clients[p].replica(step, save_id, name))
            path = f"{tmp}/{name}"
            return TeeStream(name, ReusedWriteStream(path) if layout.reuse_file(tmp, name) else LocalWriteStream(path), replicas)
        except BaseException:
            for r in replicas:
                r.close()
            raise

    def _each_node(self, what: str, local: Any, remote: Any) -> dict[int, BaseException]:
        """Run ``local()`` for this rank's node and ``remote(client)`` for every other node's leader, in parallel.

        Returns:
            node -> the error it raised, for the nodes that failed.
        """
        leaders = {n: self.topology.leader(n) for n in range(self.topology.nodes)}
        with ThreadPoolExecutor(min(16, len(leaders)), thread_name_prefix=f"dist_ckpt-tier-{what}") as pool:
            futs = {n: pool.submit(local) if r == self.topology.rank else pool.submit(remote, self.clients[r]) for n, r in leaders.items()}
        failed = {}
        for n, f in futs.items():
            e = f.exception()
            if e is not None:
                failed[n] = e
        return failed

    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        step, save_id = layout.parse_location(target.location)

        def local() -> None:
            tmp = layout.tmp_dir(self.local_root, step, save_id)
            os.makedirs(tmp, exist_ok=True)  # a node whose ranks wrote no file holds just the manifest
            self._local.write_atomic(f"{tmp}/{MANIFEST}", manifest)
            layout.commit_step(self.local_root, step, save_id)

        failed = self._each_node("publish", local, lambda c: c.publish(step, save_id, manifest))
        if failed:
            text = "; ".join(f"node {n} (leader rank {self.topology.leader(n)}): {e}" for n, e in sorted(failed.items()))
            first = failed[min(failed)]
            rank = first.rank if isinstance(first, PeerError) else self.topology.rank
            raise PeerError(rank, f"step {step}", f"committing the local step failed on {len(failed)} of {self.topology.nodes} node(s): {text}")

    def abort(self, target: SaveTarget) -> None:
        step, save_id = layout.parse_location(target.location)
        failed = self._each_node("abort", lambda: self._remove_tmp(step, save_id), lambda c: c.abort(step, save_id))
        for n, e in sorted(failed.items()):
            if not isinstance(e, PeerError):
                raise e
            log.warning("[rank %d] local step %d: node %d's half-written copy stays until its next start: %s", self.topology.rank, step, n, e)

    def _remove_tmp(self, step: int, save_id: str) -> None:
        self._local.abort(self._local.save_target(layout.step_dir(self.local_root, step), save_id, True))

    # -- un-committing, listing: this node's tree ------------------------------------------

    def uncommit(self, path: str) -> None:
        """Remove the node-local step ``path`` names on every node (each node's leader), this node's copy included.

        Raises:
            PeerError: a node could not remove its copy.
            OSError: this node's copy could not be removed.
        """
        step = _step_of(path)
        if step is None:
            raise ValueError(f"{path!r} names no local step")
        failed = self._each_node("remove", lambda: layout.remove_step(self.local_root, step), lambda c: c.remove(step))
        if failed:
            raise next(iter(failed.values()))

    def set_aside(self, path: str) -> str:
        return self._local.set_aside(self._own(path))

    def open_read(self, path: str) -> ReadHandle:
        return self._local.open_read(self._own(path))

    def open_in(self, root: str, name: str) -> ReadHandle:
        return self._local.open_in(self._own(root), name)

    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        return self._local.read_bytes(self._own(path), max_bytes)

    def makedirs(self, path: str) -> None:
        self._local.makedirs(self._own(path))

    def remove_tree(self, path: str) -> None:
        self._local.remove_tree(self._own(path))

    def exists(self, path: str) -> bool:
        return self._local.exists(self._own(path))

    def listdir(self, path: str) -> list[str]:
        return self._local.listdir(self._own(path))


# -- restore --------------------------------------------------------------------------------

Source = Any  # "local" | ("peer", rank) | "durable"


class TieredReadStorage(Storage):
    """The ``storage=`` of a restore of local step ``step``: each file from the first of its sources.

    Read-only: a save through it raises. Paths are taken by their ``step-N``
    component and what follows it, whatever comes before (the load's path is
    the same string on every rank).

    Args:
        step: the local step being restored.
        local_root: this node's tree for the job.
        sources: data file name -> where to read it, best first: ``"local"``
            (this node's copy), ``("peer", rank)`` (that rank's node, through
            its service), ``"durable"``. A file not listed is read locally.
        clients: a :class:`PeerClient` per rank named in ``sources``.
        durable: ``(storage, checkpoint path)`` of the same step in the durable tier, or None.

    Attributes:
        bytes_local, bytes_peer, bytes_durable: data and manifest bytes read from each tier so far.
    """

    def __init__(
        self,
        step: int,
        local_root: str,
        sources: Mapping[str, Sequence[Source]],
        clients: Mapping[int, PeerClient],
        durable: tuple[Storage, str] | None,
    ) -> None:
        self.step, self.local_root, self.clients, self.durable = step, local_root, clients, durable
        self.sources = {name: [self._check(s) for s in srcs] for name, srcs in sources.items()}
        self.bytes_local = self.bytes_peer = self.bytes_durable = 0
        self._local = LocalStorage()
        self._lock = threading.Lock()

    def _check(self, source: Source) -> Source:
        if source in ("local", "durable") and (source == "local" or self.durable is not None):
            return source
        if isinstance(source, tuple) and len(source) == 2 and source[0] == "peer" and source[1] in self.clients:
            return source
        raise ValueError(f"source {source!r} is not 'local', ('peer', rank with a client) or 'durable' (with a durable copy)")

    def _count(self, tier: str, n: int) -> None:
        with self._lock:
            setattr(self, f"bytes_{tier}", getattr(self, f"bytes_{tier}") + n)

    def mark_bad(self, name: str) -> bool:
        """Drop the first source of ``name`` (its copy failed: missing, checksum, peer gone).

        Returns:
            True if another source is left (a retry reads from it).
        """
        with self._lock:
            srcs = self.sources.setdefault(name, ["local"])
            if srcs:
                srcs.pop(0)
            return bool(srcs)

    def _sources_of(self, name: str) -> list[Source]:
        if name != MANIFEST:
            with self._lock:
                return list(self.sources.get(name, ["local"]))
        # The manifest: this node's, then any peer named for a file (each holds the step), then durable.
        peers = list(dict.fromkeys(s for srcs in self.sources.values() for s in srcs if isinstance(s, tuple)))
        return ["local", *peers, *(["durable"] if self.durable is not None else [])]

    def _open(self, source: Source, name: str) -> tuple[ReadHandle, str]:
        if source == "local":
            return self._local.open_in(layout.step_dir(self.local_root, self.step), name), "local"
        if source == "durable":
            assert self.durable is not None
            storage, path = self.durable
            return storage.open_in(path, name), "durable"
        return PeerReadHandle(self.clients[source[1]], self.step, name), "peer"

    def open_in(self, root: str, name: str) -> ReadHandle:
        """Open ``name`` at its first source.

        Raises:
            FileNotFoundError: no source is left for it.
            OSError: the first source cannot be opened (a peer's is only contacted on the first read).
        """
        srcs = self._sources_of(layout.check_name(name))
        if not srcs:
            raise FileNotFoundError(errno.ENOENT, f"local step {self.step}: no copy of {name} is left to read")
        handle, tier = self._open(srcs[0], name)
        return CountedHandle(handle, functools.partial(self._count, tier))

    def open_read(self, path: str) -> ReadHandle:
        return self.open_in("", _tail(path))

    def read_bytes(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """A whole file of the step (the loader reads ``MANIFEST``): from the first source that has it.

        Raises:
            FileNotFoundError: no source has it.
            UnsafeFileError: it is larger than ``max_bytes``.
        """
        name = layout.check_name(_tail(path))
        errors = []
        for source in self._sources_of(name):
            try:
                data, tier = self._whole(source, name, max_bytes)
            except OSError as e:  # this copy is missing, unsafe (a link) or its holder gone: the next one
                if isinstance(e, UnsafeFileError) and e.errno == errno.EFBIG:
                    raise  # every copy is the same size: never read one that large
                errors.append(f"{source}: {e}")
                continue
            self._count(tier, len(data))
            return data
        raise FileNotFoundError(errno.ENOENT, f"local step {self.step}: no copy of {name} could be read ({'; '.join(errors) or 'no source'})")

    def _whole(self, source: Source, name: str, max_bytes: int) -> tuple[bytes, str]:
        if source == "local":
            return self._local.read_bytes(f"{layout.step_dir(self.local_root, self.step)}/{name}", max_bytes), "local"
        if source == "durable":
            assert self.durable is not None
            storage, path = self.durable
            return storage.read_bytes(f"{path}/{name}", max_bytes), "durable"
        return self._whole_from_peer(source[1], name, max_bytes), "peer"

    def _whole_from_peer(self, rank: int, name: str, max_bytes: int) -> bytes:
        """A whole file from ``rank``'s node: one read of a piece (a MANIFEST is smaller), else its size, then all of it.

        Raises:
            UnsafeFileError: (EFBIG) it is larger than ``max_bytes``.
            PeerError: the peer failed, or the file changed while read.
        """
        client = self.clients[rank]
        ask = min(max_bytes + 1, PIECE_BYTES)  # a full answer: the file may go on (or, at max_bytes + 1, is too large)
        buf = np.empty(ask, np.uint8)  # not zeroed: only the bytes read are kept
        n = client.read(self.step, name, 0, buf.data)
        if n < ask:
            return bytes(buf.data[:n])  # the whole file in one request
        size = client.size(self.step, name) if ask <= max_bytes else ask
        if size > max_bytes:
            raise UnsafeFileError(errno.EFBIG, f"{name} of local step {self.step} on rank {rank} is {size} bytes, more than the {max_bytes} a reader accepts")
        whole = bytearray(size)
        n = client.read(self.step, name, 0, memoryview(whole))
        if n != size:
            raise PeerError(rank, name, f"read {n} of its {size} bytes (changed while read)")
        return bytes(whole)

    def exists(self, path: str) -> bool:
        """Whether the step (or a file of it) can be read: locally, or (``MANIFEST``) from any other source."""
        tail = _tail(path)
        if os.path.lexists(f"{layout.step_dir(self.local_root, self.step)}/{tail}".rstrip("/")):
            return True
        return tail in ("", MANIFEST) and len(self._sources_of(MANIFEST)) > 1

    def listdir(self, path: str) -> list[str]:
        return self._local.listdir(f"{layout.step_dir(self.local_root, self.step)}/{_tail(path)}".rstrip("/"))

    # -- read-only ------------------------------------------------------------------------------

    def save_target(self, path: str, save_id: str, overwrite: bool) -> SaveTarget:
        raise _read_only()

    def begin_save(self, target: SaveTarget) -> None:
        raise _read_only()

    def open_stream(self, target: SaveTarget, name: str) -> WriteStream:
        raise _read_only()

    def publish(self, target: SaveTarget, manifest: bytes) -> None:
        raise _read_only()

    def abort(self, target: SaveTarget) -> None:
        raise _read_only()

    def uncommit(self, path: str) -> None:
        raise _read_only()

    def set_aside(self, path: str) -> str:
        raise _read_only()

    def makedirs(self, path: str) -> None:
        raise _read_only()

    def remove_tree(self, path: str) -> None:
        raise _read_only()


def _read_only() -> OSError:
    return OSError(errno.EROFS, "a tiered restore's storage is read-only")
