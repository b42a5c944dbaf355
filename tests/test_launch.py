"""The launch scripts end to end: torchrun (one node), a real one-node Slurm, and two "hosts".

Each test trains launch/train.py for a few steps with checkpoints, then resumes
on a different number of ranks and checks that the run resumed from the last
committed step with parameters equal to the saved ones (train.py compares them
and records the result in its summary JSON).

All traffic stays on loopback, or inside network namespaces these tests create
(10.77.x.y on a veth pair). Daemons and namespaces are removed even when a test
fails. The Slurm and two-host tests need root and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from dist_helpers import rank_files

from dist_ckpt.loader import read_manifest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "30"}
# A small model keeps every run to seconds on a 2-core machine.
SMALL = ["--d-model", "64", "--layers", "2", "--seq-len", "32", "--global-batch", "4", "--log-every", "2"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without torchrun/Slurm variables that would leak into the job."""
    leak = (
        "SLURM_",
        "MASTER_",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_ADDR",
        "WORLD_SIZE",
        "TORCHELASTIC",
        "DIST_CKPT_",
        "NNODES",
        "NODE_RANK",
        "NPROC_PER_NODE",
        "RDZV_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(leak)}
    env.update(FAST, PYTHON=sys.executable, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def train_args(ckpt: Path, steps: int, summary: Path, *more: str) -> list[str]:
    return ["--ckpt-dir", str(ckpt), "--steps", str(steps), "--ckpt-every", "2", "--summary-json", str(summary), *SMALL, *more]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for every process; kill the process groups of those still running at the deadline."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the group this test started (torchrun and its ranks)
            p.wait()
    return codes


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


def summary_of(path: Path, logs: list[Path]) -> dict:
    assert path.exists(), "no summary written\n" + "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
    return json.loads(path.read_text())


def check_resumed(first: dict, second: dict, ckpt: Path, first_world: int, second_world: int) -> None:
    """The first run committed its last step; the second resumed from it with equal state."""
    assert first["resumed_from"] is None and first["world_size"] == first_world
    assert first["last_step"] in first["committed_steps"]
    assert read_manifest(str(ckpt / f"step-{first['last_step']:08d}"))[0].world_size == first_world
    assert second["world_size"] == second_world
    assert second["resumed_from"] == first["last_step"], second
    assert second["resume_check"]["equal"] is True, second["resume_check"]
    assert second["resume_check"]["tensors"] > 10
    assert second["committed_steps"][-1] == second["last_step"]
    assert read_manifest(str(ckpt / f"step-{second['last_step']:08d}"))[0].world_size == second_world


# -- (a) torchrun on one node ---------------------------------------------------------------


def test_torchrun_save_on_2_ranks_resume_on_1(tmp_path):
    ckpt = tmp_path / "ck"
    env = base_env(GLOO_SOCKET_IFNAME="lo")
    logs = [tmp_path / "run1.log", tmp_path / "run2.log"]
    # launch/torchrun.sh with NNODES unset and no MASTER_ADDR: torchrun --standalone.
    p = start(["bash", str(TORCHRUN_SH), *train_args(ckpt, 4, tmp_path / "s1.json")], dict(env, NPROC_PER_NODE="2"), logs[0])
    assert finish([p], 90) == [0], tail(logs[0])
    assert sorted(os.listdir(ckpt)) == ["step-00000002", "step-00000004"]
    p = start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            str(REPO / "launch" / "train.py"),
            *train_args(ckpt, 6, tmp_path / "s2.json", "--sync"),
        ],
        env,
        logs[1],
    )
    assert finish([p], 90) == [0], tail(logs[1])
    first, second = summary_of(tmp_path / "s1.json", logs), summary_of(tmp_path / "s2.json", logs)
    check_resumed(first, second, ckpt, 2, 1)
    assert [c["step"] for c in second["checkpoints"]] == [6] and second["checkpoints"][0]["gbps"] > 0
    assert "resumed from step 4" in (tmp_path / "run2.log").read_text()


def test_torchrun_two_nodes_with_a_node_local_tier_restore_from_the_partner(tmp_path):
    """torchrun --nnodes 2 (static rendezvous, one rank per node, a local dir each): the second run finds
    node 0's local dir wiped and rank 0 restores from its replica on node 1, equal to root's copy."""
    ckpt = tmp_path / "ck"

    def run(steps: int, summary: Path, tag: str) -> list[Path]:
        env, port = base_env(GLOO_SOCKET_IFNAME="lo"), str(free_port())
        logs, procs = [], []
        for node in (0, 1):
            node_env = dict(env, NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="1")
            tier = ["--local-dir", str(tmp_path / f"local{node}"), "--replicas", "1", "--persist-every", "1", "--local-keep", "2"]
            logs.append(tmp_path / f"{tag}-node{node}.log")
            procs.append(start(["bash", str(TORCHRUN_SH), *train_args(ckpt, steps, summary, *tier)], node_env, logs[-1]))
        assert finish(procs, 120) == [0, 0], "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
        return logs

    logs = run(4, tmp_path / "s1.json", "run1")
    # every save went to both tiers (--persist-every 1); each node holds both ranks' files of the kept steps
    assert sorted(os.listdir(ckpt)) == ["step-00000002", "step-00000004"]
    (job,) = os.listdir(tmp_path / "local1")
    assert sorted(os.listdir(tmp_path / "local1" / job)) == ["step-00000002", "step-00000004"]
    assert sorted(os.listdir(tmp_path / "local1" / job / "step-00000004" / "data")) == sorted(f.split("/")[1] for f in rank_files([0, 1]))
    shutil.rmtree(tmp_path / "local0")  # node 0 replaced
    logs += run(6, tmp_path / "s2.json", "run2")
    second = summary_of(tmp_path / "s2.json", logs)
    assert second["resumed_from"] == 4 and second["resume_check"]["equal"] is True, second["resume_check"]
    restore = second["resume_check"]["restore"]
    assert restore["tier"] == "peer" and restore["bytes_peer"] > 0 and restore["bytes_durable"] == 0, restore
    assert [c["tier"] for c in second["checkpoints"]] == ["local", "durable"] and second["checkpoints"][-1]["step"] == 6


# -- (b) a real one-node Slurm ---------------------------------------------------------------


SLURM_TOOLS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")

SLURM_CONF = """\
ClusterName=dckpttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# sbatch --wait polls every 2 s only when job records are never purged
MinJobAge=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _daemon_logs(d: Path) -> str:
    return "\n".join(
        f"--- {p.name}:\n{tail(p, 25)}"
        for p in (d / "munge" / "munged.log", d / "log" / "slurmctld.log", d / "log" / "slurmd.log", d / "slurmctld.out", d / "slurmd.out")
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return False


@pytest.fixture
def slurm(tmp_path) -> Iterator[dict[str, str]]:
    """munged, slurmctld and slurmd (node "localhost", loopback only) in the foreground, for this test only.

    Yields the environment for Slurm commands (``SLURM_CONF``); stops every daemon it started.
    """
    if os.geteuid() != 0:
        pytest.skip("the Slurm test starts slurmctld/slurmd/munged and needs root")
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}; .ci/system-deps.sh installs slurm-wlm and munge)")
    d = tmp_path / "slurm"
    for sub in ("munge", "state", "spool", "log"):
        (d / sub).mkdir(parents=True)
    os.chmod(d, 0o700)
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=d, ctld_port=free_port(), slurmd_port=free_port(), cpus=os.cpu_count() or 1))
    env = base_env(SLURM_CONF=str(conf))
    sock = d / "munge" / "munge.sock"
    procs: list[subprocess.Popen] = []
    try:
        munged = [
            "munged",
            "--foreground",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={d}/munge/munged.pid",
            f"--log-file={d}/munge/munged.log",
            f"--seed-file={d}/munge/munged.seed",
        ]
        procs.append(subprocess.Popen(munged, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        if not _wait_for(lambda: subprocess.run(["munge", "-n", "-S", str(sock)], capture_output=True).returncode == 0, 10):
            pytest.skip("munged did not start:\n" + _daemon_logs(d))
        for name, cmd in (("slurmctld", ["slurmctld", "-D", "-f", str(conf)]), ("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", "localhost"])):
            with open(d / f"{name}.out", "wb") as out:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

        def node_idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        if not _wait_for(node_idle, 30) or any(p.poll() is not None for p in procs):
            pytest.skip("Slurm could not start (node not idle within 30 s):\n" + _daemon_logs(d))
        env["DCK_SLURM_DIR"] = str(d)
        yield env  # the test adds the ids of the jobs it submitted as DCK_JOBS
    finally:
        jobs = env.get("DCK_JOBS", "").split()
        if jobs and len(procs) == 3 and all(p.poll() is None for p in procs):
            subprocess.run(["scancel", "--full", *jobs], env=env, capture_output=True)
            _wait_for(lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip(), 20)
        _stop(procs)


def _sbatch(env: dict[str, str], out: Path, args: list[str], timeout: float) -> tuple[int | None, str]:
    """``sbatch --wait`` the training script on 2 local ranks; returns ``(exit code, job id)``."""
    export = f"ALL,NPROC_PER_NODE=2,MASTER_PORT={free_port()},GLOO_SOCKET_IFNAME=lo"
    cmd = ["sbatch", "--wait", "--parsable", "--nodes", "1", "--output", str(out), f"--export={export}", str(SBATCH), *args]
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = p.communicate(timeout=timeout)
        return p.returncode, text.strip().split(";")[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        text, _ = p.communicate()
        job = text.strip().split(";")[0]
        subprocess.run(["scancel", "--full", job], env=env, capture_output=True)
        return None, job


def test_slurm_sbatch_trains_then_resumes(slurm, tmp_path):
    ckpt = tmp_path / "ck"
    d = Path(slurm["DCK_SLURM_DIR"])
    outs = [tmp_path / "job1.out", tmp_path / "job2.out"]
    rc, job = _sbatch(slurm, outs[0], train_args(ckpt, 4, tmp_path / "s1.json"), 100)
    slurm["DCK_JOBS"] = job
    assert rc == 0, f"job {job} exited with {rc}\n{tail(outs[0])}\n{_daemon_logs(d)}"
    rc, job2 = _sbatch(slurm, outs[1], train_args(ckpt, 6, tmp_path / "s2.json"), 100)
    slurm["DCK_JOBS"] += f" {job2}"
    assert rc == 0, f"job {job2} exited with {rc}\n{tail(outs[1])}\n{_daemon_logs(d)}"
    first, second = summary_of(tmp_path / "s1.json", outs), summary_of(tmp_path / "s2.json", outs)
    check_resumed(first, second, ckpt, 2, 2)
    text = outs[0].read_text()
    assert f"job {job}, 1 node(s) x 2 rank(s), rendezvous localhost:" in text  # the first host from scontrol show hostnames


# -- (c) two hosts: network namespaces joined by a veth pair ------------------------------------


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """Two network namespaces, each with loopback and one end of a veth pair (10.77.<n>.1 and .2).

    Yields ``[(namespace, interface, address), ...]``; deletes both namespaces afterwards.
    """
    if os.geteuid() != 0:
        pytest.skip("the two-host test creates network namespaces and needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    n = os.getpid() % 250 + 1
    hosts = [(f"dck{os.getpid()}a", f"dck{n}a", f"10.77.{n}.1"), (f"dck{os.getpid()}b", f"dck{n}b", f"10.77.{n}.2")]
    created: list[str] = []
    try:
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
    except OSError as e:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", hosts[0][1]], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {e}")
    try:
        yield hosts
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", hosts[0][1]], capture_output=True)


def start_on_two_hosts(
    hosts: list[tuple[str, str, str]], port: int, rdzv_id: str, log_for: Callable[[str], Path], args_for: Callable[[str], list[str]]
) -> tuple[list[subprocess.Popen], list[Path]]:
    """One torchrun agent per host (namespace), the first hosting the rendezvous on its link address; ``(procs, logs)``."""
    addr_a = hosts[0][2]
    procs, logs = [], []
    for (ns, dev, addr), is_host in zip(hosts, (1, 0)):
        env = base_env(
            NNODES="2",
            NPROC_PER_NODE="1",
            MASTER_ADDR=addr_a,
            MASTER_PORT=str(port),
            RDZV_ID=rdzv_id,
            RDZV_CONF=f"is_host={is_host}",
            LOCAL_ADDR=addr,
            GLOO_SOCKET_IFNAME=dev,
        )
        logs.append(log_for(ns))
        procs.append(start(["ip", "netns", "exec", ns, "bash", str(TORCHRUN_SH), *args_for(ns)], env, logs[-1]))
    return procs, logs


def test_two_hosts_save_on_both_restore_on_one(two_hosts, tmp_path):
    shared = tmp_path / "shared"  # both "hosts" see the same filesystem, as with NFS or Lustre
    ckpt = shared / "ck"
    shared.mkdir()
    (ns_a, _, addr_a), (ns_b, _, addr_b) = two_hosts
    procs, logs = start_on_two_hosts(
        two_hosts, 29400, f"dck-{os.getpid()}", lambda ns: tmp_path / f"{ns}.log", lambda ns: train_args(ckpt, 4, shared / "s1.json", "--verbose")
    )
    codes = finish(procs, 100)
    report = "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
    assert codes == [0, 0], report
    text = {ns: log.read_text() for ns, log in zip((ns_a, ns_b), logs)}
    rank0 = next(ns for ns in text if "[rank 0] coordinator for 2 ranks listening on tcp://" in text[ns])
    other = ns_b if rank0 == ns_a else ns_a
    endpoint = text[rank0].split("listening on tcp://", 1)[1].split()[0]
    assert endpoint.startswith(f"{addr_a}:" if rank0 == ns_a else f"{addr_b}:"), endpoint  # bound on the link, not loopback
    assert "[rank 1] save 1 committed" in text[other], report  # rank 1 heard the commit across the link
    manifest = read_manifest(str(ckpt / "step-00000004"))[0]
    assert manifest.world_size == 2 and {f.split("/")[1][:6] for f in manifest.files} == {"r00000", "r00001"}  # both hosts wrote

    restore_log = tmp_path / "restore.log"
    env = base_env(NPROC_PER_NODE="1", GLOO_SOCKET_IFNAME="lo")
    p = start(["ip", "netns", "exec", ns_b, "bash", str(TORCHRUN_SH), *train_args(ckpt, 6, shared / "s2.json")], env, restore_log)
    assert finish([p], 90) == [0], tail(restore_log)
    first, second = summary_of(shared / "s1.json", logs), summary_of(shared / "s2.json", [restore_log])
    check_resumed(first, second, ckpt, 2, 1)


def test_two_hosts_node_local_tier_restores_a_wiped_host_from_its_partner(two_hosts, tmp_path):
    """The node-local tier over a real link: each host keeps its own local dir and the other's replica;
    host a loses its local dir and its rank restores through the peer service across the veth pair."""
    shared = tmp_path / "shared"
    ckpt = shared / "ck"
    shared.mkdir()
    (ns_a, _, _), (ns_b, _, _) = two_hosts

    def run(steps: int, summary: Path, tag: str) -> dict[str, str]:
        def args(ns: str) -> list[str]:
            return train_args(ckpt, steps, summary, "--local-dir", str(tmp_path / f"local-{ns}"), "--replicas", "1", "--persist-every", "1", "--verbose")

        procs, logs = start_on_two_hosts(two_hosts, 29401, f"dck-tier-{os.getpid()}-{tag}", lambda ns: tmp_path / f"{tag}-{ns}.log", args)
        codes = finish(procs, 120)
        assert codes == [0, 0], "\n".join(f"--- {p}\n{tail(p)}" for p in logs)
        return {ns: log.read_text() for ns, log in zip((ns_a, ns_b), logs)}

    run(4, shared / "s1.json", "run1")
    shutil.rmtree(tmp_path / f"local-{ns_a}")  # host a replaced (whichever rank it runs next)
    text = run(6, shared / "s2.json", "run2")
    second = summary_of(shared / "s2.json", [])
    assert second["resumed_from"] == 4 and second["resume_check"]["equal"] is True, second["resume_check"]  # equal to root's step 4
    assert "resume: restored step 4 from the peer tier" in text[ns_a], tail(tmp_path / f"run2-{ns_a}.log")
    assert "resume: restored step 4 from the local tier" in text[ns_b], tail(tmp_path / f"run2-{ns_b}.log")
