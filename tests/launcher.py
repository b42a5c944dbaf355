"""Run a function on N gloo ranks in fresh processes (the multi-rank test helper).

Processes come from a forkserver that has already imported torch and the
modules rank functions use (DTensor, dynamo, DCP, FSDP), so each rank starts
in well under a second, without inheriting the test runner's threads. Every rank's return value or traceback comes back to the test; a
rank that does not finish within ``timeout`` fails the test with its number.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

_CTX = mp.get_context("forkserver")
# What rank functions and their test modules import, so no rank pays for it:
# torch.distributed.tensor (via dist_helpers) costs ~1.5 s, and the first
# DTensor built imports torch._dynamo, another ~1 s, per rank process.
_CTX.set_forkserver_preload(
    [
        "torch",
        "torch.distributed",
        "torch.distributed.tensor",
        "torch.distributed.device_mesh",
        "torch._dynamo",
        "torch.distributed.checkpoint",
        "torch.distributed.checkpoint.state_dict",
        "torch.distributed.fsdp",
        "dist_ckpt",
        "zmq",
        "numpy",
    ]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, env: dict[str, str], results: Any, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env})
    import logging

    import torch
    import torch.distributed as dist

    logging.basicConfig(level=os.environ.get("DIST_CKPT_TEST_LOGLEVEL", "WARNING"), format=f"%(asctime)s r{rank} %(name)s %(message)s")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        value = fn(rank, world, *args)
        # Plain pickle copies tensor bytes; the queue's own pickler would pass
        # file descriptors that die with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:
        results.put((rank, "err", traceback.format_exc()))
    finally:
        try:
            import dist_ckpt.api

            dist_ckpt.api._close_defaults()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


class RankFailure(AssertionError):
    """One or more ranks raised, died or hung."""


def run_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 60.0, env: dict[str, str] | None = None, expect_fail: set[int] | None = None
) -> dict[int, Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return ``{rank: value}``.

    Args:
        fn: a module-level function (it is pickled by reference).
        timeout: seconds for all ranks together.
        env: extra environment variables for the ranks.
        expect_fail: ranks allowed to die or raise (their entry is then the error text).

    Raises:
        RankFailure: a rank outside ``expect_fail`` raised, died, or did not finish.
    """
    results = _CTX.Queue()
    port = free_port()
    procs = [_CTX.Process(target=_entry, args=(fn, r, world, port, env or {}, results, args), daemon=False) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(out) + len(errors) < world and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            for r, p in enumerate(procs):
                if not p.is_alive() and r not in out and r not in errors and p.exitcode not in (0, None):
                    time.sleep(0.2)  # let a last queued result arrive
                    if r not in out and r not in errors and results.empty():
                        errors[r] = f"died with exit code {p.exitcode}"
            continue
        if status == "ok":
            out[rank] = pickle.loads(value)
        else:
            errors[rank] = value
    for r, p in enumerate(procs):
        p.join(timeout=max(0.1, deadline - time.monotonic()) if r in out or r in errors else 0.1)
        if p.is_alive():
            p.kill()
            p.join()
            if r not in out and r not in errors:
                errors[r] = f"did not finish within {timeout:.0f} s"
    unexpected = {r: e for r, e in errors.items() if r not in (expect_fail or set())}
    if unexpected:
        raise RankFailure("\n".join(f"--- rank {r}: {e}" for r, e in sorted(unexpected.items())))
    out.update(errors)
    return out
