"""The ``--storage s3`` jobs of the benchmark: the same state, saved and loaded through a local S3-API server.

Run by ``_bench_worker.py`` (one rank) when ``bench_checkpoint.py --storage s3``
started a moto server and pointed the job at it (``AWS_ENDPOINT_URL`` and
test credentials in the environment, ``--dir s3://bucket/prefix``). Every
rank times, interleaved within each repetition (the first contender rotates):

* ``dist_ckpt``: ``dc.save`` / ``dc.load`` on the ``s3://`` path;
* ``dcp_s3fs``: ``dcp.save`` / ``dcp.load`` with DCP's ``FsspecWriter`` /
  ``FsspecReader`` (s3fs underneath), default settings but ``sync_files=False``
  (there is nothing to fsync on S3: its default falls back to ``os.sync()`` of
  the local machine);
* ``s3torchconnector``: AWS's DCP ``S3StorageWriter`` / ``S3StorageReader``
  (the CRT client), pointed at the same server;
* the ceilings, boto3 without a checkpoint format: each rank's share of the
  bytes uploaded as one multipart upload by s3transfer (8 parts in flight;
  8 and 16 MiB parts), and read back as ranged GETs on 8 threads into one
  buffer (16 MiB ranges, or one GET per object piece). A ceiling is the best
  of its variants (names starting with ``raw_``).

Every timed save goes to a fresh prefix, deleted after its step; the loads
read sources written afterwards, untimed, and every library load is verified.
There is no page cache to drop (moto keeps objects in its own memory).
"""

from __future__ import annotations

import functools
import importlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bench_job import Bench, built_state, progress, rotate, sd_mesh
from _bench_state import build_state, verify_state, zero_state

import dist_ckpt as dc
from dist_ckpt.storage.s3_client import S3Client, parse_s3_url

MiB = 1 << 20
IN_FLIGHT = 8  # parts (uploads) or ranges (reads) in flight per rank for the ceilings
UPLOADS = {"raw_put_16m": 16 * MiB, "raw_put_8m": 8 * MiB}  # ceiling variant -> multipart part size
GETS = {"raw_get_16m": 16 * MiB, "raw_get_whole": 0}  # ceiling variant -> range size (0: one GET per object piece)
LIBRARIES = ["dist_ckpt", "dcp_s3fs", "s3torchconnector"]
SAVES = [*LIBRARIES, *UPLOADS]
LOADS = [*LIBRARIES, *GETS]


def missing_peers() -> dict[str, str]:
    """The peer libraries that cannot run here, with why (they are left out of the run, and the table says so)."""
    out = {}
    for name, module in (("dcp_s3fs", "s3fs"), ("s3torchconnector", "s3torchconnector.dcp")):
        try:
            importlib.import_module(module)
        except ImportError as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _s3tc_fs() -> Any:
    """s3torchconnector's DCP filesystem on the benchmark's server.

    Its writer and reader take only a region: the CRT client reads no
    ``AWS_ENDPOINT_URL``, so the endpoint goes in through the filesystem's
    ``s3_client`` argument (path-style addressing, as a local server needs).
    """
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client as CrtClient
    from s3torchconnector.dcp import S3FileSystem

    client = CrtClient(_region(), endpoint=os.environ["AWS_ENDPOINT_URL"], s3client_config=S3ClientConfig(force_path_style=True))
    return S3FileSystem(_region(), s3_client=client)


def _s3tc_writer(path: str) -> Any:
    from s3torchconnector.dcp import S3StorageWriter

    writer = S3StorageWriter(_region(), path)
    writer.fs = _s3tc_fs()
    return writer


def _s3tc_reader(path: str) -> Any:
    from s3torchconnector.dcp import S3StorageReader

    reader = S3StorageReader(_region(), path)
    reader.fs = _s3tc_fs()  # same reader constructor (dcp_optimized); only the client changes
    return reader


def _fsspec(kind: str, path: str) -> Any:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecWriter(path, sync_files=False) if kind == "writer" else FsspecReader(path)


@functools.lru_cache(maxsize=1)
def _share_bytes(n: int) -> bytes:
    """This rank's share of random bytes for the upload ceiling, made once outside any timed step."""
    return os.urandom(n)


class S3Store:
    """This rank's handle on the benchmark's bucket: the raw ceilings and the cleanup between steps."""

    def __init__(self, root: str) -> None:
        self.url = parse_s3_url(root)
        self.client = S3Client(self.url.bucket, max_connections=IN_FLIGHT + 4)
        self.pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="bench-s3")

    def key(self, path: str) -> str:
        """The object key prefix of ``s3://bucket/<key>``."""
        return parse_s3_url(path).prefix

    def upload_share(self, path: str, rank: int, nbytes: int, part: int) -> int:
        """Upload ``nbytes`` as ``path/rank{rank}.bin`` with s3transfer (multipart, ``IN_FLIGHT`` parts at once); returns bytes."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=IN_FLIGHT)
        self.client.raw.upload_fileobj(io.BytesIO(_share_bytes(nbytes)), self.url.bucket, f"{self.key(path)}/rank{rank:05d}.bin", Config=cfg)
        return nbytes

    def read_share(self, path: str, rank: int, world: int, piece: int, out: memoryview) -> int:
        """Read this rank's 1/``world`` of the raw objects under ``path`` (taken end to end) as ranged GETs into ``out``.

        ``piece`` 0 reads each object's part of the share in one GET. Returns bytes read.
        """
        objects = sorted((o.key, o.size) for o in self.client.list(self.key(path) + "/rank"))
        total = sum(size for _, size in objects)
        lo, hi = total * rank // world, total * (rank + 1) // world
        ranges, base = [], 0
        for key, size in objects:
            start, end = max(lo, base), min(hi, base + size)
            step = piece or max(end - start, 1)
            ranges += [(key, s - base, min(step, end - s), s - lo) for s in range(start, end, step)]
            base += size
        list(self.pool.map(lambda r: self.client.get_range(r[0], r[1], r[2], out=out[r[3] : r[3] + r[2]]), ranges))
        return hi - lo

    def remove(self, path: str) -> None:
        """Delete every object under ``path`` (rank 0 calls it)."""
        self.client.delete_many(o.key for o in self.client.list(self.key(path) + "/"))

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


class S3Phase:
    """Every contender's saves and loads on one rank, against ``<dir>/scratch`` and ``<dir>/src``."""

    def __init__(self, b: Bench, total: int) -> None:
        self.b, self.total = b, total
        self.root = b.args.dir.rstrip("/")
        self.src = f"{self.root}/src"
        self.store = S3Store(self.root)
        self.share = -(-total // b.world)
        self.missing = missing_peers()
        self.libraries = [n for n in LIBRARIES if n not in self.missing]
        self.saves = [n for n in SAVES if n not in self.missing]
        self.loads = [n for n in LOADS if n not in self.missing]

    def save(self, sd: dict[str, Any], name: str, path: str) -> dict[str, float] | None:
        """One rank's part of contender ``name``'s save to ``path``."""
        if name == "dist_ckpt":
            dc.save(sd, path)
        elif name == "dcp_s3fs":
            dcp.save(sd, storage_writer=_fsspec("writer", path))
        elif name == "s3torchconnector":
            dcp.save(sd, storage_writer=_s3tc_writer(path))
        else:
            return {"bytes": self.store.upload_share(path, self.b.rank, self.share, UPLOADS[name])}
        return None

    def load(self, target: dict[str, Any], name: str, buf: memoryview) -> dict[str, float] | None:
        """Load contender ``name``'s source checkpoint into ``target`` (the ceilings read into ``buf``)."""
        path = f"{self.src}/{'raw' if name in GETS else name}"
        if name == "dist_ckpt":
            dc.load(target, path)
        elif name == "dcp_s3fs":
            dcp.load(target, storage_reader=_fsspec("reader", path))
        elif name == "s3torchconnector":
            dcp.load(target, storage_reader=_s3tc_reader(path))
        else:
            return {"bytes": self.store.read_share(path, self.b.rank, self.b.world, GETS[name], buf)}
        return None

    def remove(self, path: str) -> None:
        dist.barrier()
        if self.b.rank == 0:
            self.store.remove(path)
        dist.barrier()


def run_saves(b: Bench, sd: dict[str, Any], phase: S3Phase, res: dict[str, Any]) -> None:
    """Each contender's save once per repetition (first one rotating), each deleted after its step; then the load sources."""
    for rep in range(b.args.reps):
        for name in rotate(phase.saves, rep):
            path = f"{phase.root}/scratch/{name}-{rep}"
            r = b.timed(lambda: phase.save(sd, name, path))
            if "bytes" in r:
                r["bytes"] *= b.world
            res["sync"].setdefault(name, []).append(r)
            phase.remove(path)
            progress(b, f"rep {rep + 1}/{b.args.reps} s3 save {name:<16} {r['s']:.3f} s")
    for name in phase.libraries:
        phase.save(sd, name, f"{phase.src}/{name}")
    phase.save(sd, "raw_put_16m", f"{phase.src}/raw")
    dist.barrier()


def run_loads(b: Bench, target: dict[str, Any], phase: S3Phase) -> dict[str, list[dict[str, float]]]:
    """Each contender's load once per repetition (first one rotating); every library load verified."""
    out: dict[str, list[dict[str, float]]] = {}
    buf = memoryview(bytearray(-(-phase.total // b.world) + 1))  # the ceilings' destination, allocated before timing
    for rep in range(b.args.reps):
        for name in rotate(phase.loads, rep):
            raw = name in GETS
            if not raw:
                zero_state(target)
            r = b.timed(lambda: phase.load(target, name, buf))
            if raw:
                r["bytes"] = phase.total  # every rank read its share of the same bytes
            else:
                r["verified"] = -b.max_over_ranks([-float(verify_state(target, b.args.total_bytes))])[0]
            out.setdefault(name, []).append(r)
            bad = "" if r.get("verified", 1) else "  VERIFY FAILED"
            progress(b, f"rep {rep + 1}/{b.args.reps} s3 load {b.args.saved_world}->{b.world} {name:<16} {r['s']:.3f} s{bad}")
    return out


def run_main(b: Bench) -> dict[str, Any]:
    """The main job on S3: saves, then loads at the same world size; leaves ``<dir>/src`` for the resharded jobs."""
    sd, sizes = built_state(b, fill=True)
    phase = S3Phase(b, sizes["total_bytes"])
    res: dict[str, Any] = {"sync": {}, "missing": phase.missing, **sizes}
    run_saves(b, sd, phase, res)
    mesh = sd_mesh(sd)
    del sd
    target = build_state(b.args.total_bytes, mesh, b.device, fill=False)
    res["load"] = run_loads(b, target, phase)
    phase.store.close()
    return res


def run_reshard(b: Bench) -> dict[str, Any]:
    """A resharded job on S3: this world size's own layout, loaded from ``<dir>/src``."""
    sd, sizes = built_state(b, fill=False)
    phase = S3Phase(b, sizes["total_bytes"])
    res = {"load": run_loads(b, sd, phase), **sizes}
    phase.store.close()
    return res
