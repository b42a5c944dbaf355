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
    """The benchmark's JSON lines, run on 8 ranks x 5 tensors unless ``args`` say otherwise."""
    env = dict(os.environ, BENCH_RECV_TIMEOUT_S="60")
    size = [] if "--from" in args else ["--ranks", "8", "--tensors", "5", "--procs", "2"]
    out = subprocess.run([sys.executable, str(BENCH), *size, "--dir", str(tmp_path / "runs"), *args], capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("arrival, formats", [("straggler", "both"), ("burst", "2")])
def test_bench_coordinator_smoke(arrival, formats, tmp_path):
    png, jsonl = tmp_path / "scale.png", tmp_path / "runs.jsonl"
    plot = _has_matplotlib()
    results = run_bench(tmp_path, "--arrival", arrival, "--format", formats, "--out", str(jsonl), *(["--plot", str(png)] if plot else []))
    assert [r["format"] for r in results] == ([1, 2] if formats == "both" else [2])
    for result in results:
        for name in FIELDS:
            assert name in result, name
        assert (result["ranks"], result["tensors"]) == (8, 5)
        assert result["chunks"] == expected_chunks(8, 5)
        assert result["dropped"] == {}
        assert sorted(os.listdir(tmp_path / "runs" / f"v{result['format']}-8")) == ["ckpt-0", "ckpt-1"]
        # the saves' growth over the idle, connected coordinator, beside the absolute peak
        assert result["coordinator_base_mb"] <= result["coordinator_idle_mb"] <= result["coordinator_peak_mb"]
        assert abs(result["coordinator_growth_mb"] - (result["coordinator_peak_mb"] - result["coordinator_idle_mb"])) <= 0.11
    v1 = next((r for r in results if r["format"] == 1), None)
    if v1 is not None:  # one MANIFEST read whole: every record
        assert v1["load_plan_records"] == v1["chunks"] and v1["fragments_mb"] == 0 and v1["load_plan_read_mb"] == v1["manifest_mb"]
    v2 = results[-1]
    # the simulated ranks' real fragments make a checkpoint the library reads whole (every fragment read, checked, materialised)
    manifest, _, _ = read_manifest(str(tmp_path / "runs" / "v2-8" / "ckpt-1"))
    assert manifest.version == 2 and sum(f is not None for f in manifest.fragments) == 8
    assert sum(len(e.chunks) for e in manifest.tensors.values()) == v2["chunks"]
    # and one rank's load plan reads only some of them
    assert v2["fragments_mb"] > 0 and 1 <= v2["load_plan_fragments"] < 8 and v2["load_plan_records"] < v2["chunks"]
    assert len(jsonl.read_text().splitlines()) == len(results)
    if not plot:  # the bench extra (matplotlib) is not installed: everything but the picture is tested
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()  # the picture is redrawn from the saved runs alone
    assert run_bench(tmp_path, "--from", str(jsonl), "--plot", str(png)) == [] and png.exists()


def _has_matplotlib() -> bool:
    """``--plot`` needs matplotlib, from the bench extra (``make test`` installs the test extra only)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_coordinator_in_process_smoke(tmp_path):
    """``--in-process``: the coordinator's own handlers, no sockets; the same fields (``mode`` says which) and real checkpoints."""
    png, jsonl = tmp_path / "scale.png", tmp_path / "runs.jsonl"
    plot = _has_matplotlib()
    results = run_bench(tmp_path, "--in-process", "--format", "both", "--out", str(jsonl), *(["--plot", str(png)] if plot else []))
    assert [(r["format"], r["mode"]) for r in results] == [(1, "in-process"), (2, "in-process")]
    for result in results:
        for name in FIELDS + ("plan_us_per_rank", "commit_us_per_rank", "coordinator_kb_per_rank"):
            assert name in result, name
        assert (result["ranks"], result["chunks"], result["dropped"]) == (8, expected_chunks(8, 5), {})
        assert set(result["coordinator_peak_mb_by_phase"]) == {"plan0", "commit0", "plan1", "commit1"}
        assert result["coordinator_idle_mb"] == result["coordinator_base_mb"]  # no connections in-process
        assert abs(result["coordinator_growth_mb"] - (result["coordinator_peak_mb"] - result["coordinator_base_mb"])) <= 0.11
        steps = {name for name, _, _ in result["coordinator_steps_s"]}  # the coordinator's own planning and commit ran
        assert {"plan_save", "write_manifest_fsync", "rename_dir_fsync"} <= steps
        assert ({"plan_cells (v2 splits)", "build_index (v2)"} if result["format"] == 2 else {"build_manifest"}) <= steps
        manifest, _, _ = read_manifest(str(tmp_path / "runs" / f"inproc-v{result['format']}-8" / "ckpt-1"))
        assert manifest.version == result["format"] and sum(len(e.chunks) for e in manifest.tensors.values()) == result["chunks"]
    v2 = results[1]
    assert v2["fragments_mb"] > 0 and 1 <= v2["load_plan_fragments"] < 8 and v2["load_plan_records"] < v2["chunks"]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
