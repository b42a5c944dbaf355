"""Smoke run of the coordinator benchmark: real coordinator, real sockets, tiny job (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coordinator.py"
FIELDS = ("ranks", "tensors", "plan_s", "plan_cached_s", "commit_s", "manifest_mb", "coordinator_peak_mb", "load_plan_s")


def expected_chunks(world: int, tensors: int) -> int:
    """Every rank's non-empty shard of each sharded tensor, and each replicated tensor once."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench_coordinator import Layout
    finally:
        sys.path.remove(str(BENCH.parent))
    import numpy as np

    layout = Layout.make(world, tensors)
    _, sizes = layout.boxes(np.arange(world))
    return int((layout.nbytes(sizes)[:, : layout.n_sharded] > 0).sum()) + len(layout.schema) - layout.n_sharded


@pytest.mark.parametrize("arrival", ["straggler", "burst"])
def test_bench_coordinator_smoke(arrival, tmp_path):
    env = dict(os.environ, BENCH_RECV_TIMEOUT_S="60")
    out = subprocess.run(
        [sys.executable, str(BENCH), "--ranks", "8", "--tensors", "5", "--procs", "2", "--arrival", arrival, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name in FIELDS:
        assert name in result, name
    assert (result["ranks"], result["tensors"]) == (8, 5)
    assert result["chunks"] == expected_chunks(8, 5)
    assert result["dropped"] == {}
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0", "ckpt-1"]
