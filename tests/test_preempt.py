"""Preemption and time limits: one stop step on every rank, the emergency save, requeue.

Multi-rank tests run real gloo ranks (tests/launcher.py) that send a real
signal to one rank; the torchrun test signals the torchrun agent; the Slurm
test (tests/test_launch.py's one-node Slurm, root only) sends
``scancel --signal=USR2`` to a running sbatch job.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launcher import run_ranks
from test_launch import (  # noqa: F401 (slurm: the fixture)
    SBATCH,
    base_env,
    finish,
    free_port,
    slurm,
    start,
    summary_of,
    tail,
    train_args,
)

from dist_ckpt.errors import RequeueError
from dist_ckpt.manager import CheckpointManager
from dist_ckpt.preempt import (
    SignalFlag,
    TimeLimit,
    parse_signals,
    parse_squeue_end,
    requeue_job,
    slurm_job_id,
)

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "20"}
EVERY = 5  # regular checkpoints every EVERY steps


# -- handlers, Slurm helpers (one process) -----------------------------------------------


def test_handlers_only_flag_chain_a_python_handler_and_are_restored():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        flag = SignalFlag(("SIGTERM", "USR2"))
        assert set(flag.installed) == {signal.SIGTERM, signal.SIGUSR2}
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # SIG_DFL before: not chained, so the test survives it
        time.sleep(0.01)  # let the interpreter run the handlers
        assert flag.signum == signal.SIGUSR2 and seen == [signal.SIGUSR2]
        flag.close()
        assert signal.getsignal(signal.SIGUSR2) is previous and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_empty_signals_install_nothing_and_bad_names_are_refused():
    before = signal.getsignal(signal.SIGTERM)
    flag = SignalFlag(())
    assert flag.installed == () and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ValueError, match="SIGKILL"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ValueError, match="SIGNOPE"):
        parse_signals(["SIGNOPE"])


def test_handlers_are_not_installed_off_the_main_thread(caplog):
    before = signal.getsignal(signal.SIGUSR2)
    out = []
    with caplog.at_level(logging.WARNING, logger="dist_ckpt.preempt"):
        t = threading.Thread(target=lambda: out.append(SignalFlag(("SIGUSR2",))))
        t.start()
        t.join()
    assert out[0].installed == () and signal.getsignal(signal.SIGUSR2) is before
    assert "only be installed from the main thread" in caplog.text


def test_slurm_job_id_time_limit_and_squeue_parsing():
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "77"}) == "77"
    assert slurm_job_id({"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}) == "77_3"
    assert parse_squeue_end("N/A\n") is None and parse_squeue_end("Unknown") is None
    assert parse_squeue_end("2026-12-01T09:30:00\n") == time.mktime((2026, 12, 1, 9, 30, 0, 0, 0, -1))
    limit = TimeLimit(end=1000.0, margin_s=10.0, check_every_s=0.0)
    assert not limit.expired(needed_s=5.0, now=980.0)  # 20 s left >= 5 + 10
    assert limit.expired(needed_s=15.0, now=980.0)  # 20 s left < 15 + 10


def test_requeue_calls_scontrol_with_the_array_task_id_and_fails_clearly_without_it(tmp_path, caplog):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "called"
    fake = bin_dir / "scontrol"  # a crafted scontrol at the boundary: records its arguments
    fake.write_text(f'#!/bin/sh\necho "$@" > {called}\n')
    fake.chmod(0o755)
    env = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "PATH": str(bin_dir)}
    assert requeue_job(0, env) is True and called.read_text().split() == ["requeue", "77_3"]
    assert requeue_job(1, env) is False  # only rank 0 requeues
    with pytest.raises(RequeueError, match="scontrol is not on PATH"):
        requeue_job(0, dict(env, PATH=str(tmp_path / "empty")))
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    with pytest.raises(RequeueError, match="presently disabled"):
        requeue_job(0, env)
    with caplog.at_level(logging.INFO, logger="dist_ckpt.preempt"):
        assert requeue_job(0, {"PATH": str(bin_dir)}) is False
    assert "not a Slurm job" in caplog.text


# -- real ranks: one signalled rank, the same stop step everywhere -------------------------


def _train(rank, world, root, steps, plan):
    """Train ``steps`` steps (one all_reduce each), save every EVERY steps; stop when told.

    ``plan``: which rank gets SIGUSR2 at which step and moment, and which rank is slow there.
    Returns the step it stopped at (None: ran to the end), its value of ``w`` and the newest step.
    """
    mgr = CheckpointManager(root, keep_last=2)
    me = rank == plan["rank"]
    w = torch.zeros(256)
    pending, stopped = None, None
    for step in range(steps):
        if me and step == plan["step"] and plan["moment"] == "timer":  # lands anywhere: in the collective, staging, saving
            threading.Timer(plan["delay"], os.kill, (os.getpid(), signal.SIGUSR2)).start()
        if pending is not None:
            pending[0].result()  # staged: w may change
        t = torch.ones(1)
        dist.all_reduce(t)
        w += t
        done = step + 1
        if rank == plan.get("slow_rank") and done == plan["step"]:
            time.sleep(plan["slow_s"])  # slow to reach the step boundary
        if done % EVERY == 0:
            if me and done == plan["step"] and plan["moment"] == "before_commit":
                os.kill(os.getpid(), signal.SIGUSR2)  # while the previous save is still to be committed
            if pending is not None:
                pending[1].result()
            pending = mgr.save(done, {"w": w, "step": done})
            if me and done == plan["step"] and plan["moment"] == "async_save":
                os.kill(os.getpid(), signal.SIGUSR2)  # with this save in flight
        if me and done == plan["step"] and plan["moment"] == "step_end":
            os.kill(os.getpid(), signal.SIGUSR2)
        if mgr.should_stop(done):
            if done % EVERY:
                mgr.wait()
                mgr.save(done, {"w": w, "step": done})
            mgr.wait()
            mgr.requeue()  # not under Slurm: a log line
            stopped = done
            break
    mgr.close()
    return stopped, w[0].item(), mgr.latest_step()


def _resume(rank, world, root):
    mgr = CheckpointManager(root)
    sd = {"w": torch.zeros(256), "step": -1}
    step = mgr.load(sd)
    mgr.close()
    return step, sd["step"], sd["w"][0].item()


def _check_stopped_and_resumes(root, out, world):
    stopped = {r: v[0] for r, v in out.items()}
    assert len(set(stopped.values())) == 1 and None not in stopped.values(), stopped  # the same step everywhere
    step = stopped[0]
    assert all(v[2] == step for v in out.values()), out  # the emergency checkpoint is committed
    back = run_ranks(_resume, world, root, env=FAST, timeout=60)
    assert all(b == (step, step, float(step * world)) for b in back.values()), back  # w = step * world after step steps
    return step


MOMENTS = ("timer", "async_save", "before_commit", "step_end")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_signal_to_one_random_rank_stops_every_rank_at_the_same_step(tmp_path, seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3])
    moment = MOMENTS[seed - 1]
    step = rng.randrange(1, 4) * EVERY if moment in ("async_save", "before_commit") else rng.randrange(3, 18)
    plan = {"rank": rng.randrange(world), "step": step, "moment": moment, "delay": rng.uniform(0.0, 0.05)}
    root = str(tmp_path / "ck")
    out = run_ranks(_train, world, root, 60, plan, env=FAST, timeout=90)
    got = _check_stopped_and_resumes(root, out, world)
    if moment != "timer":
        assert got == step + 1, (plan, out)  # signalled at should_stop(step): every rank stops at step + 1


def test_signalled_rank_while_another_is_slow_to_reach_the_boundary(tmp_path):
    plan = {"rank": 0, "step": 7, "moment": "step_end", "slow_rank": 2, "slow_s": 2.0}
    root = str(tmp_path / "ck")
    out = run_ranks(_train, 3, root, 60, plan, env=FAST, timeout=90)
    assert _check_stopped_and_resumes(root, out, 3) == 8


def _train_to_time_limit(rank, world, root, steps):
    mgr = CheckpointManager(root, keep_last=2, stop_margin_s=4.0)
    w, stopped = torch.zeros(256), None
    for step in range(steps):
        t = torch.ones(1)
        dist.all_reduce(t)
        w += t
        time.sleep(0.01)
        if mgr.should_stop(step + 1):
            mgr.save(step + 1, {"w": w, "step": step + 1})
            mgr.requeue()
            stopped = step + 1
            break
    mgr.close()
    return stopped, w[0].item(), mgr.latest_step()


def test_slurm_time_limit_without_a_signal_stops_saves_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "called"
    fake = bin_dir / "scontrol"  # stands in for Slurm's scontrol: records the requeue
    fake.write_text(f'#!/bin/sh\necho "$@" >> {called}\n')
    fake.chmod(0o755)
    env = dict(FAST, SLURM_JOB_ID="4242", SLURM_JOB_END_TIME=str(int(time.time()) + 10), PATH=f"{bin_dir}:{os.environ['PATH']}")
    root = str(tmp_path / "ck")
    out = run_ranks(_train_to_time_limit, 2, root, 100_000, env=env, timeout=60)
    step = _check_stopped_and_resumes(root, out, 2)
    assert 0 < step < 100_000
    assert called.read_text().split() == ["requeue", "4242"]  # once, by rank 0


# -- torchrun and Slurm: the launch scripts end to end -------------------------------------

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def _wait_for_path(path: Path, seconds: float, alive=lambda: True) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive():
        if path.exists():
            return True
        time.sleep(0.1)
    return path.exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_commits_the_workers_emergency_checkpoint_within_the_grace(tmp_path):
    ckpt, log = tmp_path / "ck", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(TRAIN), *train_args(ckpt, 100_000, tmp_path / "s1.json")]
    p = start(cmd, base_env(GLOO_SOCKET_IFNAME="lo"), log)
    try:
        assert _wait_for_path(ckpt / "step-00000004" / "MANIFEST", 90, lambda: p.poll() is None), tail(log)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)  # the torchrun agent only: it forwards SIGTERM, SIGKILLs 30 s later
        p.wait(timeout=60)
        grace_used = time.monotonic() - t0
    finally:
        finish([p], 1)
    summary = summary_of(tmp_path / "s1.json", [log])
    step = summary["stopped_at"]
    assert step is not None and step in summary["committed_steps"], tail(log)
    assert grace_used < 30, f"workers outlived torchrun's 30 s grace ({grace_used:.1f} s)\n{tail(log)}"
    text = log.read_text()
    assert f"[rank 1] stopping at step {step}" in text and "SIGKILL" not in text, tail(log)
    p = start(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(TRAIN), *train_args(ckpt, step + 2, tmp_path / "s2.json")],
        base_env(GLOO_SOCKET_IFNAME="lo"),
        tmp_path / "run2.log",
    )
    assert finish([p], 90) == [0], tail(tmp_path / "run2.log")
    again = summary_of(tmp_path / "s2.json", [tmp_path / "run2.log"])
    assert again["resumed_from"] == step and again["resume_check"]["equal"] is True


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_usr2_saves_requeues_and_the_requeued_run_resumes_and_completes(slurm, tmp_path):  # noqa: F811 (the fixture)
    ckpt, out, steps = tmp_path / "ck", tmp_path / "job.out", 40
    export = f"ALL,NPROC_PER_NODE=2,MASTER_PORT={free_port()},GLOO_SOCKET_IFNAME=lo"
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes",
        "1",
        "--output",
        str(out),
        f"--export={export}",
        str(SBATCH),
        *train_args(ckpt, steps, tmp_path / "s.json", "--ckpt-every", "4"),
    ]
    r = subprocess.run(cmd, env=slurm, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().split(";")[0]
    slurm["DCK_JOBS"] = job
    assert _wait_for_path(ckpt / "step-00000004" / "MANIFEST", 90), tail(out)
    r = subprocess.run(["scancel", "--signal=USR2", job], env=slurm, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deadline, pending_since, hurried = time.monotonic() + 150, None, False
    while time.monotonic() < deadline and not (
        (info := _job(slurm, job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and info.get("Restarts") == "1"
    ):
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            pending_since = pending_since or time.monotonic()
            # Slurm holds a requeued job for ~2 minutes before it is eligible again; skip the wait, but
            # only seconds later: slurmd refuses a launch in the same second as the kill ("already killed").
            if not hurried and time.monotonic() - pending_since > 3:
                hurried = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True).returncode == 0
        time.sleep(0.5)
    text = out.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{tail(out, 120)}"
    first = text.split("restart count 1", 1)[0]
    stopped = int(first.split("[rank 0] stopped early at step ", 1)[1].split()[0])
    assert f"requeued Slurm job {job}" in first, tail(out, 120)
    second = summary_of(tmp_path / "s.json", [out])  # the requeued run's
    assert second["restart_count"] == 1 and second["resumed_from"] == stopped and second["resume_check"]["equal"] is True
    assert second["last_step"] == steps and steps in second["committed_steps"], second


def test_should_stop_benchmark_runs_and_reports_every_figure():
    bench = REPO / "benchmarks" / "bench_should_stop.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, str(bench), "--calls", "2000"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(figures) == {"calls", "empty_call_ns", "no_signal_ns", "agree_ms", "slurm_ns"} and figures["agree_ms"] > 0
