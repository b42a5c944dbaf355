#!/usr/bin/env python
"""Side-by-side checkpoint benchmark: dist_ckpt vs DCP vs per-rank torch.save vs the disk.

One command launches the multi-rank jobs itself (``torchrun``), on the same
FSDP-like state on every rank, and measures, interleaved within each
repetition (the first contender rotates), with medians over repetitions:

* sync save GB/s: ``dist_ckpt.save``, ``dcp.save`` (FileSystemWriter, fsyncs),
  per-rank ``torch.save`` of the local shards + fsync, and the disk ceiling
  (``--world`` parallel writers, 16 MiB writes, fsync; also with O_DIRECT);
* async save: seconds the training thread is blocked until it may mutate the
  state, and seconds until the checkpoint is committed: dist_ckpt's async
  checkpointer (made once, ``prepare``'d once), DCP ``async_save`` default,
  and DCP ``async_save`` with its ``DefaultStager``;
* load GB/s at the same world size (dist_ckpt, DCP, torch.load, disk read) and
  resharded at ``--reshard-world`` (a fresh job of that size; dist_ckpt, DCP),
  with the page cache dropped before every load when running as root;
* peak RSS per rank of every save and load.

Usage::

    python benchmarks/bench_checkpoint.py --world 4 --reshard-world 2 --total-mb 512 [--reps 3]
    python benchmarks/bench_checkpoint.py --quick
    python benchmarks/bench_checkpoint.py --device cuda --world 1 --total-mb 8192   # GPU machine

Prints a table, then ONE JSON line with every figure and the ratios.
GB/s are 10^9 bytes per second of the state's logical bytes (each replicated
tensor counted once); times are the slowest rank's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_bench_worker.py")
MiB = 1 << 20

# DESIGN §7 targets: (ratio key, comparison, bound)
TARGETS = {
    "save_vs_dcp": (">=", 1.5),
    "save_vs_disk": (">=", 0.8),
    "load_vs_dcp": (">=", 1.5),
    "reshard_load_vs_dcp": (">=", 1.5),
    "async_block_vs_dcp": ("<=", 0.5),
    "staging_vs_pinned": (">=", 0.8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=None, help="ranks of the saving job (default 4 on cpu, 1 on cuda)")
    p.add_argument("--reshard-world", default=None, help="world size(s) of the resharded load, e.g. 2 or 2,3 (default 2 on cpu, none on cuda)")
    p.add_argument("--total-mb", type=float, default=512, help="state size across the world, MiB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir beside the repo, same disk as /work)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, 1 rep")
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before loads")
    p.add_argument("--settle", type=float, default=0.3, help="seconds to pause (after a sync) before every timed step")
    p.add_argument("--log-level", default="WARNING", help="worker log level (INFO shows dist_ckpt's per-phase timings)")
    p.add_argument("--verbose", action="store_true", help="echo all worker output")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint dir")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job before it is killed")
    a = p.parse_args(argv)
    if a.quick:
        a.total_mb, a.reps = min(a.total_mb, 32), 1
    if a.world is None:
        a.world = 4 if a.device == "cpu" else 1
    if a.reshard_world is None:
        a.reshard_world = "2" if a.device == "cpu" else ""
    a.reshard_worlds = [int(x) for x in str(a.reshard_world).split(",") if x.strip()]
    if a.reps < 1 or a.world < 1 or any(w < 1 for w in a.reshard_worlds):
        p.error("--reps, --world and --reshard-world must be positive")
    return a


# ---------------------------------------------------------------- running the jobs


def _kill_job(proc: subprocess.Popen, log_path: str, killed: threading.Event) -> None:
    """Kill a job that ran past ``--timeout``: torchrun and all its ranks (their own session)."""
    killed.set()
    with open(log_path, "a") as log:
        log.write(f"[bench] job ran past --timeout; killing process group {proc.pid}\n")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_job(a: argparse.Namespace, world: int, mode: str, out: str, log_path: str) -> dict[str, Any]:
    """Launch one torchrun job of ``world`` ranks; return rank 0's results."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), WORKER,
        "--mode", mode, "--dir", a.dir, "--out", out, "--total-bytes", str(a.total_bytes), "--reps", str(a.reps),
        "--device", a.device, "--saved-world", str(a.world), "--log-level", a.log_level, "--settle", str(a.settle),
    ] + (["--no-drop-caches"] if a.no_drop_caches else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), PYTHONUNBUFFERED="1")
    # A broken save must fail the benchmark in minutes, not after dist_ckpt's 10-minute default deadline.
    env.setdefault("DIST_CKPT_TIMEOUT_S", str(min(a.timeout, 300)))
    print(f"== {mode} job, world {world}", file=sys.stderr, flush=True)
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True) as proc:
        killed = threading.Event()
        watchdog = threading.Timer(a.timeout, _kill_job, (proc, log_path, killed))
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if a.verbose or line.startswith("[bench]"):
                    sys.stderr.write(line)
            rc = proc.wait()
        finally:
            watchdog.cancel()
    if rc != 0 or not os.path.exists(out):
        with open(log_path) as f:
            tail = f.read()[-6000:]
        why = f"was killed after --timeout {a.timeout:.0f} s" if killed.is_set() else f"failed with exit code {rc}"
        sys.exit(f"{tail}\n\n{mode} job (world {world}) {why}; full log: {log_path}")
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------- figures


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gbps(reps: list[dict[str, float]], nbytes: int) -> list[float]:
    """GB/s of each repetition (a rep's own byte count wins: the disk items write whole pieces)."""
    return [r.get("bytes", nbytes) / r["s"] / 1e9 for r in reps]


def ratio(x: float, y: float) -> float:
    return x / y if y and y == y and x == x else float("nan")


def paired(xs: list[float], ys: list[float]) -> float:
    """Median of per-repetition ratios: each pair ran back to back, so drift cancels."""
    return med([ratio(x, y) for x, y in zip(xs, ys)])


def _per_rep(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int) -> dict[str, Any]:
    """Every repetition's figure: GB/s for saves and loads, seconds for async saves."""
    n = main["total_bytes"]
    return {
        "save_GBps": {k: gbps(v, n) for k, v in main["sync"].items()},
        "load_GBps": {k: gbps(v, n) for k, v in main["load"].items()},
        "load_warm_GBps": {k: gbps(v, n) for k, v in main.get("load_warm", {}).items()},
        "async_blocked_s": {k: [r["blocked_s"] for r in v] for k, v in main["async"].items()},
        "async_total_s": {k: [r["total_s"] for r in v] for k, v in main["async"].items()},
        "reshard_load_GBps": {f"{world}to{m}": {k: gbps(v, n) for k, v in r["load"].items()} for m, r in reshard.items()},
        "reshard_load_warm_GBps": {f"{world}to{m}": {k: gbps(v, n) for k, v in r.get("load_warm", {}).items()} for m, r in reshard.items()},
    }


def _memory(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int, field: str) -> dict[str, dict[str, float]]:
    """Max over repetitions of ``field`` (peak RSS or its growth) per step and contender."""
    steps = {"save": main["sync"], "async_save": main["async"], "load": main["load"]}
    steps.update({f"reshard_load_{world}to{m}": r["load"] for m, r in reshard.items()})
    return {step: {k: max(r[field] for r in v) for k, v in items.items() if not k.startswith("disk")} for step, items in steps.items()}


def _ratios(fig: dict[str, Any], reps: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, float]]:
    """(ratios of the medians, medians of the per-repetition ratios); dist_ckpt is the numerator."""
    s, l, b, t = fig["save_GBps"], fig["load_GBps"], fig["async_blocked_s"], fig["async_total_s"]
    lw, nan = fig["load_warm_GBps"], float("nan")
    q: dict[str, float | None] = {
        "save_vs_dcp": ratio(s["dist_ckpt"], s["dcp"]),
        "save_vs_torch_save": ratio(s["dist_ckpt"], s["torch_save"]),
        "save_vs_disk": ratio(s["dist_ckpt"], s["disk"]),
        "save_vs_disk_direct": ratio(s["dist_ckpt"], s["disk_direct"]),
        "load_vs_dcp": ratio(l["dist_ckpt"], l["dcp"]),
        "load_vs_torch_load": ratio(l["dist_ckpt"], l["torch_load"]),
        "load_vs_disk": ratio(l["dist_ckpt"], l["disk"]),
        "load_warm_vs_dcp": ratio(lw.get("dist_ckpt", nan), lw.get("dcp", nan)),
        "load_warm_vs_page_cache": ratio(lw.get("dist_ckpt", nan), lw.get("disk", nan)),
        "async_block_vs_dcp": ratio(b["dist_ckpt"], b["dcp"]),
        "async_block_vs_dcp_stager": ratio(b["dist_ckpt"], b.get("dcp_stager", float("nan"))),
        "async_total_vs_dcp": ratio(t["dist_ckpt"], t["dcp"]),
    }
    r = reps
    paired_q = {
        "save_vs_dcp": paired(r["save_GBps"]["dist_ckpt"], r["save_GBps"]["dcp"]),
        "save_vs_disk": paired(r["save_GBps"]["dist_ckpt"], r["save_GBps"]["disk"]),
        "load_vs_dcp": paired(r["load_GBps"]["dist_ckpt"], r["load_GBps"]["dcp"]),
        "async_block_vs_dcp": paired(r["async_blocked_s"]["dist_ckpt"], r["async_blocked_s"]["dcp"]),
    }
    worst = float("nan")
    for key, d in fig["reshard_load_GBps"].items():
        q[f"reshard_load_vs_dcp_{key}"] = ratio(d["dist_ckpt"], d["dcp"])
        q[f"reshard_load_vs_disk_{key}"] = ratio(d["dist_ckpt"], d.get("disk", nan))
        paired_q[f"reshard_load_vs_dcp_{key}"] = paired(r["reshard_load_GBps"][key]["dist_ckpt"], r["reshard_load_GBps"][key]["dcp"])
        worst = min(worst, q[f"reshard_load_vs_dcp_{key}"]) if worst == worst else q[f"reshard_load_vs_dcp_{key}"]
        w = fig["reshard_load_warm_GBps"].get(key, {})
        q[f"reshard_load_warm_vs_dcp_{key}"] = ratio(w.get("dist_ckpt", nan), w.get("dcp", nan))
    q["reshard_load_vs_dcp"] = worst  # the worst resharded world size (NaN → null when none ran)
    return q, paired_q


def summarize(a: argparse.Namespace, main: dict[str, Any], reshard: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Medians, ratios, peak RSS and verification from the jobs' per-repetition results."""
    n, reps = main["total_bytes"], _per_rep(main, reshard, a.world)
    fig: dict[str, Any] = {
        "save_GBps": {k: med(v) for k, v in reps["save_GBps"].items()},
        "load_GBps": {k: med(v) for k, v in reps["load_GBps"].items()},
        "load_warm_GBps": {k: med(v) for k, v in reps["load_warm_GBps"].items()},
        "reshard_load_GBps": {w: {k: med(v) for k, v in d.items()} for w, d in reps["reshard_load_GBps"].items()},
        "reshard_load_warm_GBps": {w: {k: med(v) for k, v in d.items()} for w, d in reps["reshard_load_warm_GBps"].items()},
        "async_blocked_s": {k: med(v) for k, v in reps["async_blocked_s"].items()},
        "async_blocked_first_s": {k: v[0] for k, v in reps["async_blocked_s"].items()},
        "async_total_s": {k: med(v) for k, v in reps["async_total_s"].items()},
        "async_total_GBps": {k: n / med(v) / 1e9 for k, v in reps["async_total_s"].items()},
        "dc_prepare_s": main.get("dc_prepare_s"),
        "peak_rss_mb": _memory(main, reshard, a.world, "peak_rss_mb"),
        "rss_growth_mb": _memory(main, reshard, a.world, "rss_growth_mb"),
    }
    ratios, paired_ratios = _ratios(fig, reps)
    if "staging_ceiling" in main:  # CUDA: staging of the first save after prepare() against pinned D2H
        local = main["local_bytes_rank0"]
        fig["staging_ceiling_GBps"] = main["staging_ceiling"]
        fig["dc_staging_first_GBps"] = local / fig["async_blocked_first_s"]["dist_ckpt"] / 1e9
        fig["dcp_staging_first_GBps"] = local / fig["async_blocked_first_s"]["dcp"] / 1e9
        ratios["staging_vs_pinned"] = ratio(fig["dc_staging_first_GBps"], main["staging_ceiling"]["d2h_pinned_GBps"])
    loads = {"load": main["load"], "load_warm": main.get("load_warm", {})}
    loads.update({f"reshard_{a.world}to{m}": r["load"] for m, r in reshard.items()})
    loads.update({f"reshard_{a.world}to{m}_warm": r.get("load_warm", {}) for m, r in reshard.items()})
    verified = {f"{step}_{k}": all(x.get("verified", 1) for x in v) for step, items in loads.items() for k, v in items.items() if k != "disk"}
    return {
        "bench": "dist_ckpt", "device": a.device, "world": a.world, "reshard_worlds": a.reshard_worlds, "reps": a.reps,
        "total_bytes": n, "n_tensors": main.get("n_tensors"), "dir": a.dir,
        "page_cache_dropped": bool(main.get("dropped_caches")) and all(r.get("dropped_caches") for r in reshard.values()),
        "dcp_stager_error": main.get("dcp_stager_error"),
        "figures": fig, "ratios": ratios, "paired_ratios": paired_ratios, "verified": verified,
        "targets_met": {k: _meets(ratios.get(k), *v) for k, v in TARGETS.items() if k in ratios},
        "reps_raw": reps,
    }


def _clean(x: Any) -> Any:
    """NaN → None, so the JSON line stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _meets(value: float | None, op: str, bound: float) -> bool | None:
    if value is None or value != value:
        return None
    return value >= bound if op == ">=" else value <= bound


# ---------------------------------------------------------------- the table

WIDTH = 105


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def _mark(*oks: bool | None) -> str:
    return "".join("" if ok is None else ("  ok" if ok else "  BELOW TARGET") for ok in oks)


def _row(label: str, cells: list[Any], ratios: list[Any], marks: str = "", spec: str = ".2f") -> str:
    cells = list(cells) + [""] * (4 - len(cells))
    return f"{label:34}" + "".join(f"{_f(c, spec) if c != '' else '':>10}" for c in cells) + "   " + "".join(f"{_f(x) if x != '' else '':>9}" for x in ratios) + marks


WARM = "  page cache warm (info)"


def _print_throughput(r: dict[str, Any]) -> None:
    f, q, t, w = r["figures"], r["ratios"], r["targets_met"], r["world"]
    nan = float("nan")
    s, l = f["save_GBps"], f["load_GBps"]
    print(f"{'GB/s (higher is better)':34}{'dist_ckpt':>10}{'DCP':>10}{'torch':>10}{'disk':>10}   {'dc/DCP':>9}{'dc/torch':>9}{'dc/disk':>9}")
    print("-" * WIDTH)
    print(_row("sync save", [s["dist_ckpt"], s["dcp"], s["torch_save"], s["disk"]], [q["save_vs_dcp"], q["save_vs_torch_save"], q["save_vs_disk"]],
               _mark(t.get("save_vs_dcp"), t.get("save_vs_disk"))))
    print(_row("  disk with O_DIRECT (info)", ["", "", "", s["disk_direct"]], ["", "", q["save_vs_disk_direct"]]))
    print(_row(f"load {w}->{w}", [l["dist_ckpt"], l["dcp"], l["torch_load"], l["disk"]], [q["load_vs_dcp"], q["load_vs_torch_load"], q["load_vs_disk"]],
               _mark(t.get("load_vs_dcp"))))
    lw = f["load_warm_GBps"]
    if lw:
        print(_row(WARM, [lw.get("dist_ckpt"), lw.get("dcp"), lw.get("torch_load"), lw.get("disk")],
                   [q["load_warm_vs_dcp"], ratio(lw.get("dist_ckpt", nan), lw.get("torch_load", nan)), q["load_warm_vs_page_cache"]]))
    for key, d in f["reshard_load_GBps"].items():
        x = q[f"reshard_load_vs_dcp_{key}"]
        print(_row(f"resharded load {w}->{key.split('to')[1]}", [d["dist_ckpt"], d["dcp"], "", d.get("disk")], [x, "", q[f"reshard_load_vs_disk_{key}"]],
                   _mark(_meets(x, *TARGETS["reshard_load_vs_dcp"]))))
        dw = f["reshard_load_warm_GBps"].get(key)
        if dw:
            print(_row(WARM, [dw.get("dist_ckpt"), dw.get("dcp"), "", dw.get("disk")], [q[f"reshard_load_warm_vs_dcp_{key}"], "", ratio(dw.get("dist_ckpt", nan), dw.get("disk", nan))]))


def _print_async(r: dict[str, Any]) -> None:
    f, q, t = r["figures"], r["ratios"], r["targets_met"]
    b, first, tot = f["async_blocked_s"], f["async_blocked_first_s"], f["async_total_s"]
    print(f"{'async save, s (lower is better)':34}{'dist_ckpt':>10}{'DCP dflt':>10}{'DCP stgr':>10}{'':>10}   {'dc/DCP':>9}{'dc/stgr':>9}")
    print("-" * WIDTH)
    print(_row("blocked (median)", [b["dist_ckpt"], b["dcp"], b.get("dcp_stager")], [q["async_block_vs_dcp"], q["async_block_vs_dcp_stager"]],
               _mark(t.get("async_block_vs_dcp")), ".3f"))
    print(_row("blocked (first save)", [first["dist_ckpt"], first["dcp"], first.get("dcp_stager")], [], "", ".3f"))
    print(_row("until committed (median)", [tot["dist_ckpt"], tot["dcp"], tot.get("dcp_stager")], [q["async_total_vs_dcp"]], "", ".3f"))
    if r.get("dcp_stager_error"):
        print(f"  DCP DefaultStager not measured: {r['dcp_stager_error']}")
    print(f"  dist_ckpt prepare() (staging arena allocation, once, before the first save): {_f(f['dc_prepare_s'], '.3f')} s")
    if "staging_ceiling_GBps" in f:
        c = f["staging_ceiling_GBps"]
        print(f"  staging ceiling: pinned D2H {_f(c['d2h_pinned_GBps'])} GB/s (pageable {_f(c['d2h_pageable_GBps'])}); first save stages at "
              f"{_f(f['dc_staging_first_GBps'])} GB/s = {_f(q['staging_vs_pinned'])} of pinned{_mark(t.get('staging_vs_pinned'))}; "
              f"DCP default {_f(f['dcp_staging_first_GBps'])} GB/s")


def _print_memory(r: dict[str, Any]) -> None:
    f, w = r["figures"], r["world"]
    rss, grow = f["peak_rss_mb"], f["rss_growth_mb"]

    def cell(step: str, k: str) -> str:
        v, g = rss.get(step, {}).get(k), grow.get(step, {}).get(k)
        return "" if v is None else f"{v:.0f} ({g:+.0f})"

    print(f"{'peak RSS per rank, MB (growth)':34}{'dist_ckpt':>14}{'DCP':>14}{'torch':>14}{'DCP stager':>14}")
    print("-" * WIDTH)
    rows = [("sync save", "save", "torch_save"), ("async save", "async_save", None), (f"load {w}->{w}", "load", "torch_load")]
    rows += [(f"load {w}->{key.split('to')[1]}", f"reshard_load_{key}", None) for key in f["reshard_load_GBps"]]
    for label, step, torch_key in rows:
        cells = [cell(step, "dist_ckpt"), cell(step, "dcp"), cell(step, torch_key) if torch_key else "", cell(step, "dcp_stager")]
        print(f"{label:34}" + "".join(f"{c:>14}" for c in cells))
    print("  (peak includes the state, the load target and arenas kept from earlier steps; growth is over the RSS at the step's start)")


def print_table(r: dict[str, Any]) -> None:
    print(f"\ndist_ckpt benchmark: {r['device']}, world {r['world']}, {r['total_bytes'] / MiB:.0f} MiB state ({r['n_tensors']} tensors), "
          f"{r['reps']} rep(s), medians; page cache dropped before loads: {'yes' if r['page_cache_dropped'] else 'NO'}")
    print(f"checkpoints under {r['dir']}\n")
    _print_throughput(r)
    print()
    _print_async(r)
    print()
    _print_memory(r)
    print("\npaired per-repetition ratios (median): " + ", ".join(f"{k} {_f(v)}" for k, v in r["paired_ratios"].items()))
    bad = [k for k, v in r["verified"].items() if not v]
    print(f"loaded values verified: {'all ok' if not bad else 'FAILED: ' + ', '.join(bad)}\n")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
        if a.world > torch.cuda.device_count():
            sys.exit(f"--world {a.world} needs {a.world} GPUs, {torch.cuda.device_count()} visible")
    a.total_bytes = int(a.total_mb * MiB)
    own_dir = a.dir is None
    a.dir = os.path.abspath(a.dir or tempfile.mkdtemp(prefix="dist_ckpt_bench_", dir=os.path.dirname(REPO)))
    os.makedirs(a.dir, exist_ok=True)
    if os.listdir(a.dir):
        sys.exit(f"--dir {a.dir} is not empty; give an empty or new directory")
    results = tempfile.mkdtemp(prefix="dist_ckpt_bench_results_")
    log_path = os.path.join(results, "workers.log")
    t0 = time.monotonic()
    try:
        main_res = run_job(a, a.world, "main", os.path.join(results, "main.json"), log_path)
        reshard = {m: run_job(a, m, "reshard", os.path.join(results, f"reshard{m}.json"), log_path) for m in a.reshard_worlds}
    finally:
        if not a.keep:
            shutil.rmtree(a.dir if own_dir else os.path.join(a.dir, "src"), ignore_errors=True)
            if not own_dir:
                shutil.rmtree(os.path.join(a.dir, "scratch"), ignore_errors=True)
    r = summarize(a, main_res, reshard)
    r["wall_s"] = time.monotonic() - t0
    print_table(r)
    print(f"(worker log: {log_path}; wall {r['wall_s']:.0f} s)")
    print(json.dumps(_clean(r), separators=(",", ":"), allow_nan=False))
    return 0 if all(r["verified"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
