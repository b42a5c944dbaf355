"""The benchmark's state: an FSDP-like state dict with a position-dependent pattern, and its checks.

Every rank of ``_bench_worker.py`` builds the same state (DTensor ``Shard(0)``
parameters and two Adam moments, one replicated plain tensor, plain values);
shapes depend on the state's size only, so a checkpoint saved by N ranks
loads into the state built by M ranks, and every load is verified against
the pattern, not against a second copy kept in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

MiB = 1 << 20
LOG = logging.getLogger("bench")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter (its two Adam moments have the same shape and dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# (share of the parameter bytes, columns, dtype); a 1-D entry has columns 0.
_LAYOUT = [
    (0.24, 4096, torch.float32),
    (0.18, 1024, torch.float32),
    (0.14, 2048, torch.float32),
    (0.12, 1024, torch.bfloat16),
    (0.10, 512, torch.float32),
    (0.08, 4096, torch.float32),
    (0.07, 1024, torch.float32),
    (0.07, 2048, torch.float32),
]
_SMALL = 12  # 1-D norm/bias vectors of 1024..12288 elements: per-tensor overhead matters too


def state_spec(total_bytes: int) -> tuple[list[ParamSpec], tuple[int, int]]:
    """Parameters and the replicated tensor's shape for a state of about ``total_bytes``.

    Depends on ``total_bytes`` only, never on the world size, so a checkpoint
    saved by N ranks loads into the state built by M ranks.
    """
    replicated = (max(1, total_bytes // 64 // (4 * 1024)), 1024)  # ~1.6 %, e.g. a RoPE cache
    small = [ParamSpec(f"layers.{i}.norm.weight", (1024 * (1 + i),), torch.float32) for i in range(_SMALL)]
    rest = total_bytes - replicated[0] * 1024 * 4 - 3 * sum(math.prod(p.shape) * 4 for p in small)
    per_param_bytes = max(rest // 3, 0)
    big = []
    for i, (share, cols, dtype) in enumerate(_LAYOUT):
        item = torch.empty(0, dtype=dtype).element_size()
        rows = max(1, int(per_param_bytes * share) // (cols * item))
        big.append(ParamSpec(f"layers.{i}.proj.weight", (rows, cols), dtype))
    return big + small, replicated


def _pattern(offset: int, shape: tuple[int, ...], global_cols: int, salt: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic values of a block starting at global row ``offset`` (exact in ``dtype``)."""
    mod = 251 if dtype == torch.bfloat16 else 1_000_003
    rows = torch.arange(offset, offset + shape[0], dtype=torch.int64)
    if len(shape) == 1:
        return ((rows * 7 + salt) % mod).to(dtype)
    cols = torch.arange(shape[1], dtype=torch.int64)
    return ((rows[:, None] * (global_cols + 1) + cols[None, :] + salt) % mod).to(dtype)


def _fill(t: torch.Tensor, row0: int, global_cols: int, salt: int) -> None:
    """Fill ``t`` (a row block) with the pattern, in slabs to bound the int64 temporary."""
    slab = max(1, (8 * MiB) // max(1, (t.shape[1] if t.dim() == 2 else 1) * 8))
    for r in range(0, t.shape[0], slab):
        block = t[r : r + slab]
        block.copy_(_pattern(row0 + r, tuple(block.shape), global_cols, salt, t.dtype))


def _check(t: torch.Tensor, row0: int, global_cols: int, salt: int) -> bool:
    slab = max(1, (8 * MiB) // max(1, (t.shape[1] if t.dim() == 2 else 1) * 8))
    host = t.cpu()
    for r in range(0, host.shape[0], slab):
        block = host[r : r + slab]
        if not torch.equal(block, _pattern(row0 + r, tuple(block.shape), global_cols, salt, t.dtype)):
            return False
    return True


def _row0(dt: DTensor) -> int:
    return int(dt.__create_chunk_list__()[0].offsets[0])


def _sharded(spec: ParamSpec, mesh: DeviceMesh, device: str) -> DTensor:
    full = torch.empty(spec.shape, dtype=spec.dtype, device=device)  # never touched: pages stay virtual
    return distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)


def build_state(total_bytes: int, mesh: DeviceMesh, device: str, fill: bool) -> dict[str, Any]:
    """The FSDP-like state dict: ``fill`` writes the pattern, else zeros (a load target)."""
    params, rep_shape = state_spec(total_bytes)
    model, optim = {}, {}
    for i, p in enumerate(params):
        tensors = {}
        for j, slot in enumerate(("param", "exp_avg", "exp_avg_sq")):
            dt = _sharded(p, mesh, device)
            local = dt.to_local()
            if fill:
                _fill(local, _row0(dt), p.shape[-1] if len(p.shape) == 2 else 0, 97 * i + 31 * j)
            else:
                local.zero_()
            tensors[slot] = dt
        model[p.name] = tensors.pop("param")
        optim[p.name] = tensors
    rep = torch.empty(rep_shape, dtype=torch.float32, device=device)
    if fill:
        _fill(rep, 0, rep_shape[1], 12345)
    else:
        rep.zero_()
    return {
        "model": model,
        "optim": {"state": optim, "param_groups": [{"lr": 3e-4 if fill else 0.0, "weight_decay": 0.1 if fill else 0.0}]},
        "extra": {"rope_cache": rep, "step": 1234 if fill else 0, "lr": 3e-4 if fill else 0.0},
    }


def verify_state(sd: dict[str, Any], total_bytes: int) -> bool:
    """True when every tensor and plain value of ``sd`` holds what ``build_state(fill=True)`` put there."""
    params, rep_shape = state_spec(total_bytes)
    for i, p in enumerate(params):
        cols = p.shape[-1] if len(p.shape) == 2 else 0
        slots = [sd["model"][p.name], sd["optim"]["state"][p.name]["exp_avg"], sd["optim"]["state"][p.name]["exp_avg_sq"]]
        for j, dt in enumerate(slots):
            if not _check(dt.to_local(), _row0(dt), cols, 97 * i + 31 * j):
                LOG.error("verify: %s slot %d differs", p.name, j)
                return False
    extra = sd["extra"]
    if not _check(extra["rope_cache"], 0, rep_shape[1], 12345):
        LOG.error("verify: rope_cache differs")
        return False
    ok = extra["step"] == 1234 and extra["lr"] == 3e-4 and sd["optim"]["param_groups"][0]["lr"] == 3e-4
    if not ok:
        LOG.error("verify: plain values differ: step=%r lr=%r param_groups=%r", extra["step"], extra["lr"], sd["optim"]["param_groups"])
    return ok


def zero_state(sd: dict[str, Any]) -> None:
    """Reset a load target so a load that writes nothing is caught by :func:`verify_state`."""
    for t in tensors(sd):
        (t.to_local() if isinstance(t, DTensor) else t).zero_()
    sd["extra"]["step"], sd["extra"]["lr"] = 0, 0.0
    sd["optim"]["param_groups"] = [{"lr": 0.0, "weight_decay": 0.0}]


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def state_nbytes(sd: dict[str, Any]) -> tuple[int, int]:
    """``(logical bytes of the whole state, bytes this rank holds)``."""
    total = local = 0
    for t in tensors(sd):
        total += t.numel() * t.element_size()
        lt = t.to_local() if isinstance(t, DTensor) else t
        local += lt.numel() * lt.element_size()
    return total, local


def local_state(obj: Any) -> Any:
    """The state with every DTensor replaced by its local shard (what per-rank torch.save writes)."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [local_state(v) for v in obj]
    return obj


def copy_into(dst: Any, src: Any) -> None:
    """Copy a torch.load'ed local state into the target state (tensors in place, values replaced)."""
    for k, v in src.items():
        if isinstance(v, dict):
            copy_into(dst[k], v)
        elif isinstance(v, torch.Tensor):
            (dst[k].to_local() if isinstance(dst[k], DTensor) else dst[k]).copy_(v)
        else:
            dst[k] = v
