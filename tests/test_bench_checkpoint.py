"""The side-by-side benchmark: its raw read shares, and a tiny end-to-end run (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_checkpoint.py"


@pytest.fixture(scope="module")
def worker():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import _bench_worker
    finally:
        sys.path.remove(str(BENCH.parent))
    return _bench_worker


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_raw_read_shares_cover_every_byte_once(worker, tmp_path, world, monkeypatch):
    monkeypatch.setattr(worker, "IO_PIECE", 1000)  # several reads per share, with a short last one
    worker._read_buffer.cache_clear()
    sizes = [4096, 4100, 10, 5000]
    for i, n in enumerate(sizes):
        (tmp_path / f"rank{i:05d}.bin").write_bytes(os.urandom(n))
    got = [worker.raw_read_share(str(tmp_path), r, world) for r in range(world)]
    worker._read_buffer.cache_clear()
    assert sum(got) == sum(sizes)
    assert max(got) - min(got) <= 1  # an even split, as a resharded load splits the bytes


@pytest.mark.timeout(300)
def test_bench_checkpoint_tiny_run(tmp_path):
    """Both jobs run, every load verifies, and the JSON line has every figure and ratio the README quotes."""
    out = subprocess.run(
        [sys.executable, str(BENCH), "--world", "2", "--reshard-world", "3", "--total-mb", "2", "--reps", "1", "--settle", "0",
         "--no-drop-caches", "--dir", str(tmp_path / "bench"), "--timeout", "240"],
        capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["world"] == 2 and r["reshard_worlds"] == [3]
    loads = [f"{step}_{k}" for step in ("load", "load_warm") for k in ("dist_ckpt", "dcp", "torch_load")]
    loads += [f"{step}_{k}" for step in ("reshard_2to3", "reshard_2to3_warm") for k in ("dist_ckpt", "dcp")]
    assert r["verified"] == dict.fromkeys(loads, True)
    f = r["figures"]
    for contender in ("dist_ckpt", "dcp", "torch_save", "disk"):
        assert f["save_GBps"][contender] > 0, contender
    for contender in ("dist_ckpt", "dcp", "torch_load", "disk"):
        assert f["load_GBps"][contender] > 0 and f["load_warm_GBps"][contender] > 0, contender
    for contender in ("dist_ckpt", "dcp", "disk"):
        assert f["reshard_load_GBps"]["2to3"][contender] > 0 and f["reshard_load_warm_GBps"]["2to3"][contender] > 0, contender
    for key in ("save_vs_dcp", "save_vs_disk", "load_vs_dcp", "load_warm_vs_dcp", "reshard_load_vs_dcp", "reshard_load_vs_dcp_2to3",
                "reshard_load_warm_vs_dcp_2to3", "reshard_load_vs_disk_2to3", "async_block_vs_dcp"):
        assert r["ratios"][key] is not None and r["ratios"][key] > 0, key
    assert r["page_cache_dropped"] is False  # --no-drop-caches is reported, not hidden
    assert not os.path.exists(tmp_path / "bench" / "src")  # checkpoints removed at the end
