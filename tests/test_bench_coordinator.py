"""Smoke run of the coordinator benchmark: real coordinator, real sockets, tiny job (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ckpt.loader import read_manifest

pytestmark = pytest.mark.timeout(180)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coordinator.py"
FIELDS = ("ranks", "tensors", "plan_s", "plan_cached_s", "commit_s", "manifest_mb", "coordinator_peak_mb", "load_plan_s")
FIELDS += ("format", "load_plan_read_mb", "manifest_index_mb", "fragments_mb", "load_plan_fragments", "load_plan_records")


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


def run_bench(tmp_path: Path, *args: str) -> list[dict]:
    env = dict(os.environ, BENCH_RECV_TIMEOUT_S="60")
    cmd = [sys.executable, str(BENCH), "--ranks", "8", "--tensors", "5", "--procs", "2", "--dir", str(tmp_path / "runs"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("arrival", ["straggler", "burst"])
def test_bench_coordinator_smoke(arrival, tmp_path):
    (result,) = run_bench(tmp_path, "--arrival", arrival, "--format", "1")
    for name in FIELDS:
        assert name in result, name
    assert (result["format"], result["ranks"], result["tensors"]) == (1, 8, 5)
    assert result["chunks"] == result["load_plan_records"] == expected_chunks(8, 5)
    assert result["dropped"] == {} and result["fragments_mb"] == 0 and result["load_plan_read_mb"] == result["manifest_mb"]
    assert sorted(os.listdir(tmp_path / "runs" / "v1-8")) == ["ckpt-0", "ckpt-1"]


def test_bench_coordinator_both_formats_and_plot(tmp_path):
    """Version 2: the simulated ranks' real fragments make a checkpoint the library reads whole; one rank's load plan reads few."""
    png, jsonl = tmp_path / "scale.png", tmp_path / "runs.jsonl"
    v1, v2 = run_bench(tmp_path, "--format", "both", "--out", str(jsonl), "--plot", str(png))
    assert (v1["format"], v2["format"]) == (1, 2) and v2["dropped"] == {}
    assert v2["chunks"] == v1["chunks"] == expected_chunks(8, 5)
    manifest, _, _ = read_manifest(str(tmp_path / "runs" / "v2-8" / "ckpt-1"))  # every fragment read, checked and materialised
    assert manifest.version == 2 and sum(f is not None for f in manifest.fragments) == 8
    assert sum(len(e.chunks) for e in manifest.tensors.values()) == v1["chunks"]
    assert v2["fragments_mb"] > 0 and 1 <= v2["load_plan_fragments"] < 8 and v2["load_plan_records"] < v1["load_plan_records"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(jsonl.read_text().splitlines()) == 2
    # and the picture can be redrawn from the saved runs alone
    png.unlink()
    assert run_bench(tmp_path, "--from", str(jsonl), "--plot", str(png)) == [] and png.exists()
