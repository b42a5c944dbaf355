#!/usr/bin/env python
"""Node-local tier vs durable tier, side by side in one run, on the same state.

Launches ``--world`` gloo ranks on this machine as ``--world / --per-node``
simulated nodes (each with its own local directory under ``--local-dir``, the
node id from ``DIST_CKPT_NODE_ID``), builds one FSDP-like state (DTensors
sharded over all ranks, ``--total-mb`` in all), and measures, medians over
``--saves`` async saves, the slowest rank's:

* durable save (``CheckpointManager(root)`` on ``--durable-dir``, a disk):
  seconds blocked (until the state may change) and until committed;
* local-tier save (``local_dir`` on tmpfs, ``replicas=1``, no durable save in
  between): blocked and until committed on every node (replicas included);
  and with ``persist_every=1`` (each save local, then durable from the same
  staged bytes): blocked, and until both tiers are committed;
* restore from the local tier (every node intact), from peers (the last node's
  local directory wiped: its ranks read their replicas over ZeroMQ), and from
  the durable tier cold (page cache of its files dropped: fadvise DONTNEED,
  and drop_caches when root).

Usage::

    python benchmarks/bench_tiers.py --world 4 --per-node 2 --total-mb 256 --saves 3

Prints a table with the issue's targets (local commit >= 3x faster than
durable, local restore >= 3x faster than a cold durable restore, peer restore
within 1.5x of local), then ONE JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--per-node", type=int, default=2, help="ranks per simulated node")
    p.add_argument("--total-mb", type=float, default=256, help="state size over all ranks (MiB)")
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--local-dir", default="/dev/shm", help="where the simulated nodes' local directories go (tmpfs)")
    p.add_argument("--durable-dir", default=None, help="where the durable roots go (a disk; default: the system's temp dir)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--base", default="", help=argparse.SUPPRESS)
    p.add_argument("--local-base", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- one rank ------------------------------------------------------------------------------


def _state(a: argparse.Namespace, world: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    cols = 1024
    rows = max(world, int(a.total_mb * (1 << 20) / 4 / cols / a.tensors) // world * world)
    g = torch.Generator().manual_seed(0)
    full = [torch.rand(rows, cols, generator=g) for _ in range(a.tensors)]
    return {f"layer{i}": distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for i, t in enumerate(full)}


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed_saves(mgr: Any, sd: dict[str, Any], first: int, n: int) -> dict[str, float]:
    import torch.distributed as dist

    mgr.prepare(sd)
    blocked, total = [], []
    for i in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        stage_f, write_f = mgr.save(first + i, sd)
        stage_f.result()
        t1 = time.perf_counter()
        write_f.result()
        t2 = time.perf_counter()
        blocked.append(_slowest(t1 - t0))
        total.append(_slowest(t2 - t0))
    return {"blocked_s": statistics.median(blocked), "committed_s": statistics.median(total)}


def _timed_load(make: Callable[[], Any], sd: dict[str, Any], before: Callable[[], None] = lambda: None) -> dict[str, Any]:
    import torch.distributed as dist

    mgr = make()
    before()
    dist.barrier()
    t0 = time.perf_counter()
    step = mgr.load(sd)
    mine = time.perf_counter() - t0
    info = mgr.last_restore
    mgr.close()
    tiers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(tiers, info.tier if info else "durable")
    return {"seconds": _slowest(mine), "step": step, "tiers": tiers}


def _drop_cache(root: str) -> None:
    """Drop the page cache of every file under ``root`` (no root needed), and all caches when root."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError:
            pass


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import dist_ckpt as dc
    from dist_ckpt.tier import layout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = rank // a.per_node
    local_dir = f"{a.local_base}/node{node}"
    durable_root, tier_root = f"{a.base}/durable", f"{a.base}/durable-of-tier"
    sd = _state(a, world)
    nbytes = sum(t.to_local().numel() * 4 for t in sd.values())
    out: dict[str, Any] = {}
    with dc.CheckpointManager(durable_root, keep_last=2) as mgr:
        out["durable_save"] = _timed_saves(mgr, sd, 1, a.saves)

    def tiered() -> Any:
        return dc.CheckpointManager(tier_root, keep_last=2, local_dir=local_dir, replicas=1, persist_every=10**9, local_keep=2)

    with tiered() as mgr:
        out["local_save"] = _timed_saves(mgr, sd, 1, a.saves)
    both = f"{a.base}/durable-every-save"  # persist_every=1: each save local, then durable from the same staged bytes
    with dc.CheckpointManager(both, keep_last=2, local_dir=f"{local_dir}-both", replicas=1, persist_every=1, local_keep=2) as mgr:
        out["local_and_durable_save"] = _timed_saves(mgr, sd, 1, a.saves)
    out["local_restore"] = _timed_load(tiered, sd)
    last_node = (world - 1) // a.per_node
    wipe = (lambda: shutil.rmtree(layout.local_root(local_dir, tier_root))) if node == last_node and rank % a.per_node == 0 else (lambda: None)
    dist.barrier()
    wipe()  # a replaced node: its ranks read their files from the partner node
    out["peer_restore"] = _timed_load(tiered, sd)
    out["durable_restore_cold"] = _timed_load(lambda: dc.CheckpointManager(durable_root, keep_last=2), sd, lambda: _drop_cache(durable_root))
    if rank == 0:
        out["bytes_per_rank"] = nbytes
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


# -- the driver ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a: argparse.Namespace, base: str, local_base: str, out: str) -> None:
    port = _free_port()
    procs = []
    for rank in range(a.world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(a.world), LOCAL_RANK=str(rank % a.per_node), MASTER_ADDR="127.0.0.1")
        env.update(
            MASTER_PORT=str(port), DIST_CKPT_NODE_ID=str(rank // a.per_node), OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", "")
        )
        args = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--base", base, "--local-base", local_base]
        args += ["--per-node", str(a.per_node), "--total-mb", str(a.total_mb), "--tensors", str(a.tensors), "--saves", str(a.saves)]
        procs.append(subprocess.Popen(args, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_tiers: a rank failed (exit codes {codes})")


def report(a: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    ds, ls = r["durable_save"], r["local_save"]
    lr, pr, dr = r["local_restore"], r["peer_restore"], r["durable_restore_cold"]
    ratios = {
        "commit_speedup": ds["committed_s"] / ls["committed_s"],
        "restore_speedup": dr["seconds"] / lr["seconds"],
        "peer_over_local": pr["seconds"] / lr["seconds"],
    }
    targets = {"commit_speedup": (">=", 3.0), "restore_speedup": (">=", 3.0), "peer_over_local": ("<=", 1.5)}
    met = {k: (ratios[k] >= v if op == ">=" else ratios[k] <= v) for k, (op, v) in targets.items()}
    mb = r["bytes_per_rank"] * a.world / 1e6
    print(f"bench_tiers: {a.world} ranks as {a.world // a.per_node} nodes, {mb:.0f} MB state, medians of {a.saves} saves (slowest rank)")
    print(f"  {'':34} {'blocked s':>10} {'committed s':>12}")
    print(f"  {'durable save (disk)':34} {ds['blocked_s']:10.3f} {ds['committed_s']:12.3f}")
    print(f"  {'local-tier save (tmpfs, 1 replica)':34} {ls['blocked_s']:10.3f} {ls['committed_s']:12.3f}")
    lds = r["local_and_durable_save"]
    print(f"  {'local, then durable (persist 1)':34} {lds['blocked_s']:10.3f} {lds['committed_s']:12.3f}")
    print(f"  {'restore':34} {'seconds':>10}   tier")
    for name, x in (("local (every node intact)", lr), ("peer (last node wiped)", pr), ("durable, cold", dr)):
        print(f"  {name:34} {x['seconds']:10.3f}   {'/'.join(x['tiers'])} (per rank)")
    for k, (op, v) in targets.items():
        print(f"  {k:34} {ratios[k]:10.2f}   target {op} {v}: {'met' if met[k] else 'MISSED'}")
    return {**r, "ratios": ratios, "targets_met": met, "world": a.world, "per_node": a.per_node, "total_mb": mb}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.world % a.per_node or a.world // a.per_node < 2:
        raise SystemExit("--world must be a multiple of --per-node, with at least 2 nodes (one replica)")
    base = tempfile.mkdtemp(prefix="bench-tiers-", dir=a.durable_dir)
    local_base = tempfile.mkdtemp(prefix="bench-tiers-", dir=a.local_dir)
    out = f"{base}/result.json"
    try:
        launch(a, base, local_base, out)  # the local dirs on tmpfs, the durable roots on disk
        with open(out) as f:
            result = report(a, json.load(f))
    finally:
        shutil.rmtree(local_base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    line = json.dumps(result)
    print(line)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
