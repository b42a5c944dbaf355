#!/usr/bin/env python
"""Side-by-side checkpoint benchmark: dist_ckpt vs DCP vs per-rank torch.save vs the ceilings.

One command launches the multi-rank jobs itself (``torchrun``), on the same
FSDP-like state on every rank, and measures, interleaved within each
repetition (the first contender rotates), with medians over repetitions:

* sync save GB/s: ``dist_ckpt.save``, ``dcp.save`` (FileSystemWriter, fsyncs),
  per-rank ``torch.save`` of the local shards + fsync, and the write ceiling:
  the best of 1, 2 and 4 raw writer threads (one file each) per rank, 16 MiB
  writes with writeback started per piece, fsync, and of one O_DIRECT writer;
* async save: seconds the training thread is blocked until it may mutate the
  state, and seconds until the checkpoint is committed: dist_ckpt's async
  checkpointer (made once, ``prepare``'d once), DCP ``async_save`` default,
  and DCP ``async_save`` with its ``DefaultStager``; against a memcpy of
  every rank's local tensors (the staging ceiling) and blocked + a sync save;
* load GB/s at the same world size (dist_ckpt, DCP, torch.load) and
  resharded at ``--reshard-world`` (a fresh job of that size; dist_ckpt, DCP),
  with the page cache dropped before every cold load when running as root,
  then warm; the cold and warm read ceilings are the best of 1, 2 and 4 raw
  reader threads per rank over each rank's share, read into the load
  target's own tensors (the same reads into one reused 16 MiB buffer, which
  stays in the CPU cache, are printed as information, not as a ceiling);
* peak RSS per rank of every save and load.

With ``--storage s3`` it starts a local S3-API server (moto, as the tests do)
and runs the same state through it, in the same run: sync save, load and
resharded load of dist_ckpt on ``s3://``, of DCP with its fsspec
writer/reader (s3fs) and of AWS's s3torchconnector DCP writer/reader,
against the ceiling of boto3's raw multipart uploads and ranged GETs of each
rank's share (``_bench_s3.py``). That server is the bottleneck there: the
ratios rank the libraries' overheads, not S3's bandwidth.

Usage::

    python benchmarks/bench_checkpoint.py --world 4 --reshard-world 2 --total-mb 512 [--reps 3] [--plot run.png]
    python benchmarks/bench_checkpoint.py --quick
    python benchmarks/bench_checkpoint.py --world 1 --reshard-world "" --total-mb 4096 --no-async   # one process, 4 GiB
    python benchmarks/bench_checkpoint.py --device cuda --world 1 --total-mb 8192   # GPU machine
    python benchmarks/bench_checkpoint.py --storage s3 --world 4 --reshard-world 2 --total-mb 64 --reps 2

Prints a table (each figure beside DCP's and its ceiling, issue 18's targets
marked per row), then ONE JSON line with every figure, the ceilings, the
ratios and the targets. GB/s are 10^9 bytes per second of the state's
logical bytes (each replicated tensor counted once); times are the slowest
rank's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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

sys.path.insert(0, HERE)  # the summary, table and plot modules beside this file (also when imported)
from _bench_report import print_table  # noqa: E402
from _bench_summary import clean, summarize  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=None, help="ranks of the saving job (default 4 on cpu, 1 on cuda)")
    p.add_argument("--reshard-world", default=None, help="world size(s) of the resharded load, e.g. 2 or 2,3 (default 2 on cpu, none on cuda)")
    p.add_argument("--total-mb", type=float, default=None, help="state size across the world, MiB (default 512; 64 with --storage s3)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir beside the repo, same disk as /work)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--storage",
        choices=["file", "s3"],
        default="file",
        help="s3: start a local S3 server (moto) and compare against DCP+s3fs, s3torchconnector and boto3's raw ceiling (needs the test and bench extras)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, 1 rep")
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before loads")
    p.add_argument("--no-async", action="store_true", help="skip the async saves and the memcpy ceiling: the main job holds no second copy of the state")
    p.add_argument(
        "--plot", metavar="FILE.png", default=None, help="also draw the run's figures beside DCP's and the ceilings (needs matplotlib: the bench extra)"
    )
    p.add_argument("--settle", type=float, default=0.3, help="seconds to pause (after a sync) before every timed step")
    p.add_argument("--log-level", default="WARNING", help="worker log level (INFO shows dist_ckpt's per-phase timings)")
    p.add_argument("--verbose", action="store_true", help="echo all worker output")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint dir")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job before it is killed")
    a = p.parse_args(argv)
    if a.total_mb is None:
        a.total_mb = 64 if a.storage == "s3" else 512
    if a.storage == "s3" and (a.dir is not None or a.device != "cpu" or a.plot is not None):
        p.error("--storage s3 runs on cpu against the server it starts itself: no --dir, --device cuda or --plot")
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
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(world),
            WORKER,
            "--mode",
            mode,
            "--dir",
            a.dir,
            "--out",
            out,
            "--total-bytes",
            str(a.total_bytes),
            "--reps",
            str(a.reps),
            "--device",
            a.device,
            "--saved-world",
            str(a.world),
            "--log-level",
            a.log_level,
            "--settle",
            str(a.settle),
        ]
        + ["--storage", a.storage]
        + (["--no-drop-caches"] if a.no_drop_caches else [])
        + (["--no-async"] if a.no_async else [])
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), PYTHONUNBUFFERED="1", **a.job_env)
    # A broken save must fail the benchmark in minutes, not after dist_ckpt's 10-minute default deadline.
    env.setdefault("DIST_CKPT_TIMEOUT_S", str(min(a.timeout, 300)))
    print(f"== {mode} job, world {world}", file=sys.stderr, flush=True)
    with (
        open(log_path, "a") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True) as proc,
    ):
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


# ---------------------------------------------------------------- entry point


def _plotter(a: argparse.Namespace) -> Any:
    """The plot module when ``--plot`` is given, checked before any job runs."""
    if a.plot is None:
        return None
    try:
        import _bench_plot
    except ImportError as e:
        sys.exit(f"--plot needs matplotlib ({e}); install the bench extra: pip install -e '.[bench]'")
    return _bench_plot


def _check_device(a: argparse.Namespace) -> None:
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
        if a.world > torch.cuda.device_count():
            sys.exit(f"--world {a.world} needs {a.world} GPUs, {torch.cuda.device_count()} visible")


def _run_jobs(a: argparse.Namespace, results: str, log_path: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The main job, then one job per resharded world size; their results."""
    main_res = run_job(a, a.world, "main", os.path.join(results, "main.json"), log_path)
    reshard = {m: run_job(a, m, "reshard", os.path.join(results, f"reshard{m}.json"), log_path) for m in a.reshard_worlds}
    return main_res, reshard


def _run_on_disk(a: argparse.Namespace, results: str, log_path: str) -> dict[str, Any]:
    """The jobs on the local filesystem under ``--dir``; the summary."""
    own_dir = a.dir is None
    a.dir = os.path.abspath(a.dir or tempfile.mkdtemp(prefix="dist_ckpt_bench_", dir=os.path.dirname(REPO)))
    os.makedirs(a.dir, exist_ok=True)
    if os.listdir(a.dir):
        sys.exit(f"--dir {a.dir} is not empty; give an empty or new directory")
    try:
        main_res, reshard = _run_jobs(a, results, log_path)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir if own_dir else os.path.join(a.dir, "src"), ignore_errors=True)
            if not own_dir:
                shutil.rmtree(os.path.join(a.dir, "scratch"), ignore_errors=True)
    run = {"device": a.device, "world": a.world, "reshard_worlds": a.reshard_worlds, "reps": a.reps, "dir": a.dir, "no_async": a.no_async}
    return summarize(run, main_res, reshard)


def _moto_server() -> Any:
    """The tests' moto server (``tests/s3_server.py``), started on 127.0.0.1."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    try:
        from s3_server import MotoServer
    except ImportError as e:
        sys.exit(f"--storage s3 needs moto[server], boto3 and pytest ({e}): pip install -e '.[test,bench]'")
    return MotoServer()


def _run_on_s3(a: argparse.Namespace, results: str, log_path: str) -> dict[str, Any]:
    """The jobs against a local S3 server started here (stopped at the end, with everything on it); the summary."""
    from _bench_s3_report import summarize_s3

    server = _moto_server()
    try:
        import moto

        # Only the benchmark's own server: no developer profile or config file may redirect the jobs to a real bucket.
        a.job_env = {**server.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        a.dir = f"s3://{server.create_bucket('bench')}/bench"
        main_res, reshard = _run_jobs(a, results, log_path)
    finally:
        server.stop()
    run = {
        "storage": "s3",
        "server": f"moto {moto.__version__} server on {server.endpoint}",
        "device": a.device,
        "world": a.world,
        "reshard_worlds": a.reshard_worlds,
        "reps": a.reps,
        "dir": a.dir,
    }
    return summarize_s3(run, main_res, reshard)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    plotter = _plotter(a) if a.storage == "file" else None
    _check_device(a)
    a.total_bytes = int(a.total_mb * MiB)
    a.job_env = {}
    results = tempfile.mkdtemp(prefix="dist_ckpt_bench_results_")
    log_path = os.path.join(results, "workers.log")
    t0 = time.monotonic()
    r = _run_on_s3(a, results, log_path) if a.storage == "s3" else _run_on_disk(a, results, log_path)
    r["wall_s"] = time.monotonic() - t0
    if a.storage == "s3":
        from _bench_s3_report import print_s3_table

        print_s3_table(r)
    else:
        print_table(r)
    if plotter is not None:
        plotter.plot(r, a.plot)
        print(f"(figures drawn to {a.plot})")
    print(f"(worker log: {log_path}; wall {r['wall_s']:.0f} s)")
    print(json.dumps(clean(r), separators=(",", ":"), allow_nan=False))
    return 0 if all(r["verified"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
