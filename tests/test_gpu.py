"""GPU paths of the stager (skipped without CUDA; run on a GPU machine)."""

from __future__ import annotations

import time

import pytest
import torch

import dist_ckpt as dc

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_staging_sees_the_kernel_queued_just_before_save(tmp_path):
    ck = dc.make_async_checkpointer()
    try:
        x = torch.zeros(64 << 20, device="cuda")  # 256 MiB
        ck.prepare({"x": x})
        torch.cuda._sleep(50_000_000)  # a long kernel ahead of the write on the current stream
        x.fill_(3.0)  # queued, not yet run, when save() is called
        stage_f, write_f = ck.save(str(tmp_path / "ck"), {"x": x})
        stage_f.result()
        x.fill_(7.0)  # after staging: must not reach the checkpoint
        write_f.result()
    finally:
        ck.close()
    out = dc.load({"x": torch.empty(64 << 20)}, str(tmp_path / "ck"))
    assert bool((out["x"] == 3.0).all())


def test_staging_bandwidth_from_the_first_save_is_near_pinned_copy_speed(tmp_path):
    n = 1 << 30  # 1 GiB here; the benchmark's --device cuda mode measures 8 GiB
    x = torch.ones(n // 4, device="cuda")
    host = torch.empty(n // 4, pin_memory=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    pinned = n / (time.perf_counter() - t0)
    ck = dc.make_async_checkpointer()
    try:
        ck.prepare({"x": x})
        t0 = time.perf_counter()
        stage_f, write_f = ck.save(str(tmp_path / "ck"), {"x": x})
        stage_f.result()
        staging = n / (time.perf_counter() - t0)
        write_f.result()
    finally:
        ck.close()
    print(f"pinned D2H {pinned / 1e9:.1f} GB/s, first staging {staging / 1e9:.1f} GB/s ({staging / pinned:.0%})")
    # the figure is printed, not asserted (timing is the benchmark's job); the content is checked
    out = dc.load({"x": torch.empty(n // 4)}, str(tmp_path / "ck"))
    assert bool((out["x"] == 1.0).all())
