"""What ``CheckpointManager.should_stop(step)`` costs a training step.

One process (a world of one, with its real coordinator and agent):

* ``no_signal_ns``: a call without any signal, outside Slurm (the common case);
* ``slurm_ns``: the same on rank 0 of a Slurm job with a far time limit
  (``SLURM_JOB_END_TIME`` set), where the clock is compared with the end at
  most once a second;
* ``empty_call_ns``: an empty Python method call, for scale;
* ``agree_ms``: once signalled, the ``should_stop`` call that asks the
  coordinator and waits until every rank acknowledged (one round trip here).

Run::

    python benchmarks/bench_should_stop.py [--calls 1000000]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time


class _Empty:
    def call(self, step: int) -> bool:
        return False


def per_call_ns(fn, calls: int) -> float:
    """Best of 3 runs of ``calls`` calls, in ns per call."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for step in range(calls):
            fn(step)
        best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1_000_000)
    args = p.parse_args(argv)
    from dist_ckpt.manager import CheckpointManager

    out: dict[str, float] = {"calls": args.calls, "empty_call_ns": per_call_ns(_Empty().call, args.calls)}
    with tempfile.TemporaryDirectory() as d:
        with CheckpointManager(f"{d}/plain") as mgr:
            out["no_signal_ns"] = per_call_ns(mgr.should_stop, args.calls)
            os.kill(os.getpid(), signal.SIGUSR2)
            t0 = time.perf_counter()
            assert mgr.should_stop(10) is False and mgr.should_stop(11) is True
            out["agree_ms"] = (time.perf_counter() - t0) * 1e3
        os.environ.update(SLURM_JOB_ID="1", SLURM_JOB_END_TIME=str(int(time.time()) + 86400))
        with CheckpointManager(f"{d}/slurm") as mgr:
            out["slurm_ns"] = per_call_ns(mgr.should_stop, args.calls)
    print(json.dumps({k: round(v, 2) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
