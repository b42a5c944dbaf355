"""The example training job: a small transformer LM, FSDP2, checkpointed by dist_ckpt.

A few-layer causal transformer learns synthetic arithmetic sequences
(``x[t+1] = (x[t] + stride) % vocab``, one random stride per sequence). Its
parameters are sharded with FSDP2 (``fully_shard``; gloo on CPU, NCCL on GPU),
trained with AdamW, and checkpointed every ``--ckpt-every`` steps through
:class:`dist_ckpt.manager.CheckpointManager`: model and optimizer (sharded
DTensors from ``get_state_dict``), the step, and each rank's RNG state
(``dist_ckpt.rank_local``). At start the job resumes from the newest committed
step, on any number of ranks; it then compares the parameters it loaded with
the saved full tensors (rank 0) and records whether they are equal.

The global batch of every step depends only on ``--seed`` and the step, and is
split across ranks, so a run resumed on a different world size trains on the
same data.

Run (any of)::

    python -m torch.distributed.run --standalone --nproc-per-node 4 launch/train.py --ckpt-dir /tmp/ck --steps 40
    launch/torchrun.sh --ckpt-dir /tmp/ck --steps 40          # single or multi-node
    sbatch launch/slurm/train.sbatch --ckpt-dir /shared/ck    # Slurm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import xxhash
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dist_ckpt
from dist_ckpt.manager import CheckpointManager, SaveStats

log = logging.getLogger("train")


# -- model and data ------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int, dropout: float) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def batch_for(step: int, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step ``step``'s global batch (the same for any world size)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    start = torch.randint(0, args.vocab, (args.global_batch, 1), generator=g)
    stride = torch.randint(1, 8, (args.global_batch, 1), generator=g)
    seq = (start + stride * torch.arange(args.seq_len + 1)) % args.vocab
    per = args.global_batch // world
    mine = seq[rank * per : (rank + 1) * per].to(device)
    return mine[:, :-1], mine[:, 1:]


# -- checkpointed state ----------------------------------------------------------------


class TrainState:
    """Model and optimizer as one Stateful: sharded DTensors in, ``set_state_dict`` out."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def full_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (model or optimizer) state dict as a full CPU tensor, by dotted path.

    All ranks must call it together: a DTensor's ``full_tensor()`` is a collective.
    """
    out: dict[str, torch.Tensor] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, DTensor):
            out[name] = v.full_tensor().cpu()
        elif isinstance(v, torch.Tensor):
            out[name] = v.detach().cpu()
        else:
            out.update(full_tensors(v, name))
    return out


def resume_check(state: TrainState, path: str, rank: int) -> dict[str, Any]:
    """Compare the live model and optimizer with the saved full tensors (read on rank 0).

    Returns (rank 0): ``{"equal", "tensors", "mismatched"}``; other ranks: ``{}``.
    """
    live = full_tensors(state.state_dict())  # collective: all ranks
    if rank != 0:
        return {}
    saved = full_tensors(dist_ckpt.CheckpointReader().read(path)[0]["train"])
    mismatched = sorted(k for k in live.keys() | saved.keys() if k not in live or k not in saved or not torch.equal(live[k], saved[k]))
    return {"equal": not mismatched, "tensors": len(live), "mismatched": mismatched[:20]}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = xxhash.xxh3_64()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- the job -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="checkpoint root (shared by every node)")
    p.add_argument("--steps", type=int, default=40, help="train until this many steps in total (a resumed run continues to it)")
    p.add_argument("--ckpt-every", type=int, default=10, help="save every N steps (and after the last)")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--keep-every", type=int, default=None, help="also keep every step divisible by this forever")
    p.add_argument("--sync", action="store_true", help="blocking saves instead of async")
    p.add_argument(
        "--local-dir",
        default=os.environ.get("DIST_CKPT_LOCAL_DIR"),
        help="node-local checkpoint tier (e.g. /dev/shm/dist_ckpt or $TMPDIR/dist_ckpt), one per node; every save goes there (default: $DIST_CKPT_LOCAL_DIR; none: root only)",
    )
    p.add_argument("--replicas", type=int, default=1, help="(--local-dir) copies of each rank's local files on other nodes")
    p.add_argument("--persist-every", type=int, default=10, help="(--local-dir) every N-th save also goes to --ckpt-dir")
    p.add_argument("--local-keep", type=int, default=2, help="(--local-dir) local steps kept per node")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all ranks (divisible by the world size)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--summary-json", default=None, help="rank 0 writes the run's summary here")
    p.add_argument("--verbose", action="store_true", help="dist_ckpt's own per-phase and per-rank (DEBUG) logs too")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("dist_ckpt").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.getLogger("dist_ckpt.manager").setLevel(logging.INFO)
    logging.getLogger("dist_ckpt.preempt").setLevel(logging.INFO)  # Slurm restart count, stop requests
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    return rank, world, device


def build(args: argparse.Namespace, world: int, device: torch.device) -> TrainState:
    torch.manual_seed(args.seed)  # the same initial weights on every rank, before sharding
    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads, args.seq_len, args.dropout).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    return TrainState(model, optim)


def resume(mgr: CheckpointManager, state: TrainState, rank: int, device: torch.device) -> tuple[int, dict[str, Any] | None]:
    """Load the newest committed step, if any. Returns ``(step to continue from, resume check)``."""
    if mgr.local_dir is not None:
        return resume_tiered(mgr, state, rank, device)
    step = mgr.latest_step()
    if step is None:
        log.info("no committed checkpoint under %s: starting from scratch", mgr.root)
        return 0, None
    t0 = time.perf_counter()
    rng = {k: dist_ckpt.rank_local(v) for k, v in rng_states(device).items()}
    sd: dict[str, Any] = {"train": state, "step": 0, "rng": rng}
    if rank >= mgr.manifest(step).world_size:
        del sd["rng"]  # the saving job had no such rank: keep this rank's fresh RNG state
    mgr.load(sd, step)
    if "rng" in sd:
        set_rng_states({k: v.value for k, v in rng.items()}, device)
    if sd["step"] != step:
        raise RuntimeError(f"checkpoint {mgr.path_for(step)} holds step {sd['step']}, expected {step}")
    check = resume_check(state, mgr.path_for(step), rank)
    log.info("resumed from step %d in %.2f s; parameters equal to the saved ones: %s", step, time.perf_counter() - t0, check.get("equal"))
    return step, check


def resume_tiered(mgr: CheckpointManager, state: TrainState, rank: int, device: torch.device) -> tuple[int, dict[str, Any] | None]:
    """With a node-local tier: load the newest step complete over all tiers (``mgr.load`` chooses it).

    The resume check compares with the durable copy when the step has one (a local
    restore then proves equal to root's bytes); a local-only step records only where it came from.
    """
    t0 = time.perf_counter()
    rng = {k: dist_ckpt.rank_local(v) for k, v in rng_states(device).items()}
    sd: dict[str, Any] = {"train": state, "step": 0, "rng": rng}
    try:
        step = mgr.load(sd)  # a rank the saving job lacked keeps its fresh RNG state (LoadInfo.kept_rank_local)
    except dist_ckpt.CheckpointNotFound:
        log.info("no committed checkpoint under %s or in the node-local tier: starting from scratch", mgr.root)
        return 0, None
    set_rng_states({k: v.value for k, v in rng.items()}, device)
    if sd["step"] != step:
        raise RuntimeError(f"step {step} of the checkpoint tiers holds step {sd['step']}")
    info = mgr.last_restore
    check = resume_check(state, mgr.path_for(step), rank) if step in mgr.steps() else ({} if rank else {"equal": None})
    if rank == 0 and info is not None:
        check["restore"] = {"step": info.step, "tier": info.tier, "seconds": info.seconds, "bytes_local": info.bytes_local,
                            "bytes_peer": info.bytes_peer, "bytes_durable": info.bytes_durable}  # fmt: skip
    log.info("resumed from step %d in %.2f s (%s)", step, time.perf_counter() - t0, info.line() if info else "")
    return step, check


def checkpoint_state(state: TrainState, step: int, device: torch.device) -> dict[str, Any]:
    """What one checkpoint holds: model and optimizer (sharded), the step, this rank's RNG state."""
    return {"train": state, "step": step, "rng": {k: dist_ckpt.rank_local(v) for k, v in rng_states(device).items()}}


@dataclass
class LoopResult:
    final_loss: float
    step_times: list[float]
    stopped_at: int | None = None  # the step every rank stopped at after a stop signal or the time limit


def train_loop(args: argparse.Namespace, state: TrainState, mgr: CheckpointManager, start: int, device: torch.device) -> LoopResult:
    """Train steps ``start .. args.steps``, saving every ``--ckpt-every`` steps and after the last.

    Once any rank gets a stop signal (SIGTERM, SIGUSR2) or the Slurm time limit comes near,
    ``mgr.should_stop`` turns True on every rank at the same step: the loop saves that step
    (an emergency checkpoint) and ends.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    result = LoopResult(float("nan"), [])
    pending: tuple[Any, ...] = ()  # (stage_future, write_future) of the async save in flight
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = batch_for(step, args, rank, world, device)
        loss = F.cross_entropy(state.model(x).flatten(0, 1), y.flatten())
        loss.backward()  # overlaps with staging: neither changes the parameters
        if pending:
            pending[0].result()  # the stager reads the parameters until then
        state.optim.step()
        state.optim.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            total = loss.detach().clone()
            dist.all_reduce(total)
            result.final_loss = total.item() / world
            log.info("step %d/%d: loss %.4f (%.0f ms/step)", done, args.steps, result.final_loss, (time.perf_counter() - t0) * 1e3)
        if done % args.ckpt_every == 0 or done == args.steps:
            if pending:
                pending[1].result()  # a failed previous save raises CheckpointError here, on every rank
            pending = mgr.save(done, checkpoint_state(state, done, device)) or ()
        result.step_times.append(time.perf_counter() - t0)
        if mgr.should_stop(done):
            if not (done % args.ckpt_every == 0 or done == args.steps):
                if pending:
                    pending[1].result()
                pending = mgr.save(done, checkpoint_state(state, done, device)) or ()
            mgr.wait()
            result.stopped_at = done
            log.info("stopped at step %d: emergency checkpoint %s", done, "committed" if mgr.latest_step() == done else "FAILED")
            break
    mgr.close()
    if pending:
        pending[1].result()
    return result


def train(args: argparse.Namespace) -> tuple[dict[str, Any], CheckpointManager]:
    """Set up, resume, train; return the run's summary (parameter digest on rank 0) and the (closed) manager."""
    rank, world, device = setup(args)
    t_start = time.perf_counter()
    state = build(args, world, device)
    mgr = CheckpointManager(
        args.ckpt_dir,
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        async_save=not args.sync,
        local_dir=args.local_dir or None,
        replicas=args.replicas,
        persist_every=args.persist_every,
        local_keep=args.local_keep,
    )
    torch.manual_seed(args.seed + 1 + rank)  # distinct dropout per rank; a resume restores the saved state
    start, check = resume(mgr, state, rank, device)
    loop = train_loop(args, state, mgr, start, device)
    final = full_tensors(state.model.state_dict())  # collective
    last = loop.stopped_at if loop.stopped_at is not None else args.steps
    return {
        "world_size": world,
        "device": str(device),
        "resumed_from": start if check is not None else None,
        "resume_check": check,
        "first_step": start,
        "last_step": last,
        "stopped_at": loop.stopped_at,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "steps_run": max(0, last - start),
        "final_loss": loop.final_loss,
        "step_ms_mean": 1e3 * sum(loop.step_times) / len(loop.step_times) if loop.step_times else None,
        "checkpoints": [s.to_dict() for s in mgr.history],
        "committed_steps": mgr.steps(),
        "param_digest": digest(final) if rank == 0 else None,
        "params": sum(t.numel() for t in final.values()),
        "wall_s": time.perf_counter() - t_start,
    }, mgr


def report(summary: dict[str, Any], path: str | None) -> None:
    """(rank 0) Print the short summary and write the JSON."""
    ck = [SaveStats(**{k: v for k, v in c.items() if k != "gbps"}) for c in summary["checkpoints"]]
    check = summary["resume_check"]
    print(
        f"[rank 0] trained steps {summary['first_step']}..{summary['last_step']} on {summary['world_size']} rank(s) ({summary['device']}),"
        f" {summary['params'] / 1e6:.2f} M parameters, final loss {summary['final_loss']:.4f}, {summary['step_ms_mean'] or 0:.0f} ms/step"
    )
    if summary["resumed_from"] is not None:
        print(
            f"[rank 0] resumed from step {summary['resumed_from']}: parameters and optimizer state equal to the saved ones: {check['equal']}"
            f" ({check['tensors']} tensors{'; differ: ' + ', '.join(check['mismatched']) if check['mismatched'] else ''})"
        )
    if summary["stopped_at"] is not None:
        print(
            f"[rank 0] stopped early at step {summary['stopped_at']} (stop signal or time limit); the emergency checkpoint is"
            f" {'committed' if summary['stopped_at'] in summary['committed_steps'] else 'MISSING'}: a restarted job resumes from it"
        )
    for s in ck:
        print(f"[rank 0] checkpoint {s.line()}")
    print(f"[rank 0] committed steps now: {summary['committed_steps']}; parameter digest {summary['param_digest']}")
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary, mgr = train(args)
        if dist.get_rank() == 0:
            report(summary, args.summary_json)
        ok = summary["resume_check"] is None or summary["resume_check"].get("equal", True) is not False  # None: a local-only step, not compared
        dist.barrier()  # a fence: gloo's workers have dropped the last collective's tensors
        if summary["stopped_at"] is not None:
            # Last: under Slurm, requeueing ends this run (SIGTERM, then SIGKILL after KillWait).
            mgr.requeue()
        return 0 if ok else 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Exit without interpreter finalization.

    Gloo's worker threads may still hold the last collective's work object, whose tensors
    own Python objects; freeing it needs the GIL, and a thread that asks for the GIL during
    finalization is killed, which aborts the process ("terminate called without an active
    exception", pytorch/pytorch#179291). Everything that matters is done and flushed here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        rc = main()
    except SystemExit as e:  # --help, usage errors, a bad argument combination
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    exit_now(rc)
