"""The README's demo: train on 4 ranks with checkpoints, then resume the same run on 2.

1. ``torchrun --standalone --nproc-per-node 4 launch/train.py`` trains the
   example model for ``--steps1`` steps, checkpointing every ``--ckpt-every``.
2. The same command on 2 ranks with ``--steps2`` resumes from the newest
   committed step (the sharded checkpoint is re-cut for 2 ranks on load),
   checks that the parameters and optimizer state it loaded equal the saved
   full tensors, and trains on.

Prints a short summary and exits non-zero if either run fails, the second
does not resume from the first's last step, or the loaded state differs.

    .venv/bin/python launch/demo.py            # or: make demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(nproc: int, ckpt_dir: str, steps: int, ckpt_every: int, summary: str, extra: list[str]) -> tuple[int, float]:
    """Run launch/train.py under torchrun on ``nproc`` local ranks; returns ``(exit code, seconds)``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        os.path.join(HERE, "train.py"),
        "--ckpt-dir",
        ckpt_dir,
        "--steps",
        str(steps),
        "--ckpt-every",
        str(ckpt_every),
        "--summary-json",
        summary,
        *extra,
    ]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    return rc, time.perf_counter() - t0


def load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checks(first: dict[str, Any] | None, second: dict[str, Any] | None, args: argparse.Namespace) -> list[str]:
    """What went wrong, as sentences (empty: the demo passed)."""
    if first is None or second is None:
        return ["a run wrote no summary"]
    problems = []
    if args.steps1 not in first["committed_steps"]:
        problems.append(f"run 1 did not commit step {args.steps1} (committed: {first['committed_steps']})")
    if second["resumed_from"] != args.steps1:
        problems.append(f"run 2 resumed from {second['resumed_from']}, expected {args.steps1}")
    elif not (second["resume_check"] or {}).get("equal"):
        problems.append(f"run 2 loaded state that differs from the saved one: {second['resume_check']}")
    if not second["committed_steps"] or second["committed_steps"][-1] != args.steps2:
        problems.append(f"run 2 did not commit step {args.steps2} (committed: {second['committed_steps']})")
    if not second["final_loss"] < first["final_loss"]:
        problems.append(f"the loss did not go down after resuming ({first['final_loss']:.4f} -> {second['final_loss']:.4f})")
    return problems


def describe_checkpoints(summary: dict[str, Any]) -> str:
    cks = summary["checkpoints"]
    if not cks:
        return "no checkpoints"
    mean_blocked = sum(c["blocked_ms"] for c in cks) / len(cks)
    mean_total = sum(c["total_s"] for c in cks) / len(cks)
    size = cks[-1]["nbytes"] or 0
    rates = [c["gbps"] for c in cks if c["gbps"]]
    return (
        f"{len(cks)} checkpoints of {size / 1e6:.1f} MB: blocked {mean_blocked:.0f} ms, committed after {mean_total:.2f} s"
        f" on average ({max(rates, default=0):.3f} GB/s best)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description="Train on N ranks with checkpoints, then resume on M ranks.")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--resume-nproc", type=int, default=2)
    p.add_argument("--steps1", type=int, default=30, help="steps of the first run")
    p.add_argument("--steps2", type=int, default=50, help="total steps after the resumed run")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--ckpt-dir", default=None, help="checkpoint root (default: a temporary directory, removed afterwards)")
    args, extra = p.parse_known_args()  # anything else goes to train.py
    if args.steps2 <= args.steps1:
        p.error("--steps2 must be larger than --steps1")
    work = tempfile.mkdtemp(prefix="dist_ckpt_demo_")
    ckpt_dir = args.ckpt_dir or os.path.join(work, "ckpt")
    t0 = time.perf_counter()
    try:
        rc1, t1 = run_job(args.nproc, ckpt_dir, args.steps1, args.ckpt_every, os.path.join(work, "run1.json"), extra)
        first = load(os.path.join(work, "run1.json"))
        if rc1 != 0:
            print(f"\nDEMO FAILED: the {args.nproc}-rank run exited with {rc1}", file=sys.stderr)
            return 1
        rc2, t2 = run_job(args.resume_nproc, ckpt_dir, args.steps2, args.ckpt_every, os.path.join(work, "run2.json"), extra)
        second = load(os.path.join(work, "run2.json"))
        problems = [f"the {args.resume_nproc}-rank run exited with {rc2}"] if rc2 != 0 else checks(first, second, args)
        print("\n== dist_ckpt demo ==")
        if first:
            print(f"run 1: {args.nproc} ranks, steps 0..{args.steps1} in {t1:.1f} s, loss {first['final_loss']:.3f}; {describe_checkpoints(first)}")
        if second:
            check = second["resume_check"] or {}
            print(
                f"run 2: {args.resume_nproc} ranks, resumed from step {second['resumed_from']}, steps {second['first_step']}..{args.steps2} in {t2:.1f} s,"
                f" loss {second['final_loss']:.3f}; {describe_checkpoints(second)}"
            )
            print(f"resumed state equals the saved one: {check.get('equal')} ({check.get('tensors', 0)} tensors: parameters and AdamW state)")
            where = ckpt_dir if args.ckpt_dir else "a temporary directory (pass --ckpt-dir to keep it)"
            print(f"committed steps in {where}: {second['committed_steps']}")
        print(f"total {time.perf_counter() - t0:.1f} s")
        if problems:
            print("DEMO FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        print("DEMO OK")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
