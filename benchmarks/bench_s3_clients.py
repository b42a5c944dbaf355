"""Which S3 client library: multipart-upload and ranged-GET throughput, conditional puts.

Every contender moves the same bytes through the same local S3-API server
(moto's server mode, started here on 127.0.0.1, as the tests do), with the
same part size and as many parts in flight as the library lets us set:

- ``boto3/s3transfer``: ``upload_fileobj`` / ``download_fileobj`` (TransferConfig);
- ``dist_ckpt S3Client``: this project's wrapper over boto3
  (``open_writer`` …, ``get_range`` into one destination buffer, N threads);
- ``obstore``: ``put`` (multipart, ``max_concurrency``) / ``get_range`` on N threads;
- ``s3torchconnectorclient``: the CRT client under AWS's s3torchconnector
  (``put_object`` stream / ``get_object`` ranges on N threads); installed
  with ``pip install --no-deps`` since s3torchconnector pins torch.

Every download lands in one caller buffer and is checked against the
uploaded bytes. Then, per client, conditional create (``If-None-Match: *``)
and compare-and-swap (``If-Match: <etag>``) are tried for real, and so is
whether the server lets only one of several racing create-only puts win.

    python benchmarks/bench_s3_clients.py [--mb 256] [--part-mb 16] [--in-flight 8] [--reps 3]

Prints a table, then one JSON line. The local server (pure Python) is the
bottleneck, so the figures rank the clients' overheads, not S3's bandwidth;
the client's own CPU seconds per GiB (this process only, not the server's)
are the figure that carries over to a real store. moto reads the whole
object for every ranged GET, so ranged-GET figures fall with object size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from s3_server import MotoServer  # the tests' server, one definition

MiB = 1 << 20


class Bench:
    """The run's settings, server, bucket and source bytes."""

    def __init__(self, args: argparse.Namespace, server: MotoServer) -> None:
        self.size, self.part, self.n = args.mb * MiB, args.part_mb * MiB, args.in_flight
        self.server, self.bucket = server, server.create_bucket("bench")
        self.data = os.urandom(self.size)
        self.digest = xxhash.xxh3_64_intdigest(self.data)
        self.ranges = [(s, min(self.part, self.size - s)) for s in range(0, self.size, self.part)]

    def check(self, name: str, buf: bytes | bytearray | memoryview) -> None:
        if len(buf) != self.size or xxhash.xxh3_64_intdigest(buf) != self.digest:
            raise SystemExit(f"{name}: downloaded bytes differ from the uploaded ones")


def boto3_client(b: Bench) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=b.n + 4))


# ---- contenders: each returns (upload(key), download(key) -> buffer) ----


def c_s3transfer(b: Bench) -> tuple[Callable[[str], None], Callable[[str], Any]]:
    from boto3.s3.transfer import TransferConfig

    s3 = boto3_client(b)
    cfg = TransferConfig(multipart_threshold=b.part, multipart_chunksize=b.part, max_concurrency=b.n)

    def up(key: str) -> None:
        s3.upload_fileobj(io.BytesIO(b.data), b.bucket, key, Config=cfg)

    def down(key: str) -> Any:
        out = io.BytesIO()
        s3.download_fileobj(b.bucket, key, out, Config=cfg)
        return out.getbuffer()

    return up, down


def c_dist_ckpt(b: Bench) -> tuple[Callable[[str], None], Callable[[str], Any]]:
    from dist_ckpt.storage.s3_client import S3Client

    client = S3Client(b.bucket, max_connections=b.n + 4)
    pool = ThreadPoolExecutor(b.n)

    def up(key: str) -> None:
        with client.open_writer(key, part_size=b.part, max_in_flight=b.n) as w:
            view = memoryview(b.data)
            for s, length in b.ranges:
                w.write(view[s : s + length])
            w.complete()

    def down(key: str) -> Any:
        out = memoryview(bytearray(b.size))
        list(pool.map(lambda r: client.get_range(key, r[0], r[1], out=out[r[0] : r[0] + r[1]]), b.ranges))
        return out

    return up, down


def obstore_store(b: Bench) -> Any:
    from obstore.store import S3Store

    env = b.server.env()
    return S3Store(
        b.bucket,
        endpoint=env["AWS_ENDPOINT_URL"],
        region=env["AWS_REGION"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def c_obstore(b: Bench) -> tuple[Callable[[str], None], Callable[[str], Any]]:
    import obstore

    store = obstore_store(b)
    pool = ThreadPoolExecutor(b.n)

    def up(key: str) -> None:
        obstore.put(store, key, memoryview(b.data), chunk_size=b.part, max_concurrency=b.n)

    def read_range(key: str, out: memoryview, s: int, n: int) -> None:
        out[s : s + n] = memoryview(obstore.get_range(store, key, start=s, length=n))  # into the caller's buffer

    def down(key: str) -> Any:
        # One request per range, N at a time, as for the others: get_ranges
        # would merge adjacent ranges into one request (even with coalesce=0),
        # and moto reads the whole object for every ranged GET, so fewer
        # requests win on moto for a reason S3 does not share.
        out = memoryview(bytearray(b.size))
        list(pool.map(lambda r: read_range(key, out, r[0], r[1]), b.ranges))
        return out

    return up, down


def s3torch_client(b: Bench) -> Any:
    from s3torchconnectorclient._mountpoint_s3_client import MountpointS3Client

    env = b.server.env()
    return MountpointS3Client(env["AWS_REGION"], endpoint=env["AWS_ENDPOINT_URL"], part_size=b.part, force_path_style=True)


def c_s3torch(b: Bench) -> tuple[Callable[[str], None], Callable[[str], Any]]:
    client = s3torch_client(b)
    pool = ThreadPoolExecutor(b.n)

    def up(key: str) -> None:
        stream = client.put_object(b.bucket, key)
        view = memoryview(b.data)
        for s, n in b.ranges:
            stream.write(bytes(view[s : s + n]))  # it takes bytes only: one copy per piece
        stream.close()

    def read_range(key: str, out: memoryview, s: int, n: int) -> None:
        pos = s
        for chunk in client.get_object(b.bucket, key, start=s, end=s + n):
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)

    def down(key: str) -> Any:
        out = memoryview(bytearray(b.size))
        list(pool.map(lambda r: read_range(key, out, r[0], r[1]), b.ranges))
        return out

    return up, down


CONTENDERS = {"boto3/s3transfer": c_s3transfer, "dist_ckpt S3Client (boto3)": c_dist_ckpt, "obstore": c_obstore, "s3torchconnectorclient": c_s3torch}


def measure(b: Bench, reps: int) -> dict[str, dict[str, Any]]:
    """Median seconds of upload and download per contender; the first one rotates per rep."""
    made = {}
    for name, make in CONTENDERS.items():
        try:
            made[name] = make(b)
        except ImportError as e:
            print(f"# {name}: not installed ({e})", file=sys.stderr)
    times: dict[str, dict[str, list[float]]] = {n: {"upload": [], "download": []} for n in made}
    # CPU seconds of this process (all its threads, Rust ones too; not the
    # server's): what a client costs the training job, whatever the server.
    cpu: dict[str, dict[str, list[float]]] = {n: {"upload": [], "download": []} for n in made}
    names = list(made)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            up, down = made[name]
            key = f"rep{rep}/{name.split()[0]}.bin"
            for op, fn in (("upload", up), ("download", down)):
                t, c = time.perf_counter(), time.process_time()
                buf = fn(key)
                times[name][op].append(time.perf_counter() - t)
                cpu[name][op].append(time.process_time() - c)
            b.check(name, buf)
            boto3_client(b).delete_object(Bucket=b.bucket, Key=key)  # keep the server's memory flat
    return {
        n: {
            op: {
                "median_s": statistics.median(v),
                "MBps": b.size / MiB / statistics.median(v),
                "reps": v,
                "client_cpu_s_per_GiB": statistics.median(cpu[n][op]) * (1 << 30) / b.size,
            }
            for op, v in t.items()
        }
        for n, t in times.items()
    }


# ---- conditional puts, tried for real ----


def cond_boto3(b: Bench, key: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    s3 = boto3_client(b)

    def refused(**kw: Any) -> bool:
        try:
            s3.put_object(Bucket=b.bucket, Key=key, Body=b"x", **kw)
            return False
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"] == 412

    first = s3.put_object(Bucket=b.bucket, Key=key, Body=b"v1", IfNoneMatch="*")["ETag"]
    second_refused = refused(IfNoneMatch="*")
    new = s3.put_object(Bucket=b.bucket, Key=key, Body=b"v2", IfMatch=first)["ETag"]
    return {"api": True, "create_only_refuses_second": second_refused, "if_match_replaces": new != first, "if_match_stale_refused": refused(IfMatch=first)}


def cond_obstore(b: Bench, key: str) -> dict[str, Any]:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    store = obstore_store(b)

    def refused(mode: Any) -> bool:
        try:
            obstore.put(store, key, b"x", mode=mode)
            return False
        except (AlreadyExistsError, PreconditionError):
            return True

    first = obstore.put(store, key, b"v1", mode="create")["e_tag"]
    second_refused = refused("create")
    new = obstore.put(store, key, b"v2", mode={"e_tag": first})["e_tag"]
    return {"api": True, "create_only_refuses_second": second_refused, "if_match_replaces": new != first, "if_match_stale_refused": refused({"e_tag": first})}


def cond_s3torch(b: Bench, key: str) -> dict[str, Any]:
    # put_object(bucket, key, storage_class) takes no precondition: nothing to try.
    return {"api": False, "create_only_refuses_second": None, "if_match_replaces": None, "if_match_stale_refused": None}


def racing_creates(b: Bench, racers: int = 8, rounds: int = 20) -> dict[str, int]:
    """Racers put one key create-only at the same moment; count rounds with more than one winner."""
    clients = [boto3_client(b) for _ in range(racers)]
    multi = sum(_race_once(clients, b.bucket, f"race/{r}") > 1 for r in range(rounds))
    return {"racers": racers, "rounds": rounds, "rounds_with_several_winners": multi}


def _race_once(clients: list[Any], bucket: str, key: str) -> int:
    """One round: every client puts ``key`` create-only at once; returns how many succeeded."""
    from botocore.exceptions import ClientError

    gate, wins = threading.Barrier(len(clients)), []

    def race(i: int) -> None:
        gate.wait()
        try:
            clients[i].put_object(Bucket=bucket, Key=key, Body=str(i).encode(), IfNoneMatch="*")
            wins.append(i)
        except ClientError:
            pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(wins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="object size in MiB")
    ap.add_argument("--part-mb", type=int, default=16, help="part (and range) size in MiB")
    ap.add_argument("--in-flight", type=int, default=8, help="parts / ranges in flight")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    server = MotoServer()
    try:
        os.environ.update(server.env())
        b = Bench(args, server)
        figures = measure(b, args.reps)
        cond = {}
        for name, fn in (("boto3", cond_boto3), ("obstore", cond_obstore), ("s3torchconnectorclient", cond_s3torch)):
            try:
                cond[name] = fn(b, f"cond/{name}")
            except ImportError:
                pass
        race = racing_creates(b)
    finally:
        server.stop()
    print(f"{args.mb} MiB, {args.part_mb} MiB parts, {args.in_flight} in flight, median of {args.reps}, local moto server")
    print(f"{'client':30} {'upload MB/s':>12} {'ranged GET MB/s':>16} {'client CPU s/GiB up':>20} {'down':>6}")
    for name, f in figures.items():
        print(
            f"{name:30} {f['upload']['MBps']:12.0f} {f['download']['MBps']:16.0f} "
            f"{f['upload']['client_cpu_s_per_GiB']:20.2f} {f['download']['client_cpu_s_per_GiB']:6.2f}"
        )
    for name, c in cond.items():
        print(f"conditional puts, {name}: {c}")
    print(f"racing create-only puts on moto: {race}")
    print(json.dumps({"settings": vars(args), "figures": figures, "conditional": cond, "race": race}))


if __name__ == "__main__":
    main()
