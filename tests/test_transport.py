"""The coordinator's transport: what peers without the job's keys can make rank 0 hold.

Each case runs a one-rank job in its own process (tests/transport_child.py)
so that its peak RSS and descriptor limit are its own, attacks it from this
process over 127.0.0.1, then checks the job's save still succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

pytestmark = pytest.mark.timeout(120)
CHILD = os.path.join(os.path.dirname(__file__), "transport_child.py")
MiB = 1 << 20


class Child:
    """The job's process: ``hello`` (endpoint, ...) once started, ``finish()`` its report."""

    def __init__(self, mode: str, root: str, nofile: int | None = None) -> None:
        args = [sys.executable, CHILD, mode, root] + ([str(nofile)] if nofile else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(self.proc.stdout.readline())

    def max_fds_until_settled(self, settle_s: float = 1.0, deadline_s: float = 20.0) -> int:
        """The most descriptors the job's process held, sampled from here until the count stays put for ``settle_s``."""
        fd_dir, most, last = f"/proc/{self.proc.pid}/fd", 0, -1
        start = stable_since = time.monotonic()
        while time.monotonic() - start < deadline_s:
            fds = len(os.listdir(fd_dir))
            most = max(most, fds)
            if fds != last:
                last, stable_since = fds, time.monotonic()
            elif time.monotonic() - stable_since > settle_s:
                break
            time.sleep(0.05)
        return most

    def finish(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert self.proc.wait(60) == 0 and line, f"job process failed (rc {self.proc.returncode})"
        return json.loads(line)


def test_unauthenticated_big_messages_never_reach_rank_0s_memory(tmp_path):
    child = Child("rss", str(tmp_path))
    ctx = zmq.Context()
    frame = bytes(128 * MiB)  # sent 4 times: a 512 MiB message per peer, this process holds 128 MiB
    peers = []
    raw: socket.socket | None = None
    try:
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all: a store reader's first try
        peers.append(plain)
        if "server_key" in child.hello:
            # knows the server's public key (an ex-member) but holds no rank key: the ZAP gate refuses it
            keyed = ctx.socket(zmq.DEALER)
            keyed.curve_publickey, keyed.curve_secretkey = zmq.curve_keypair()
            keyed.curve_serverkey = child.hello["server_key"].encode()
            peers.append(keyed)
        for s in peers:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(child.hello["endpoint"])
            try:  # queued at once (the pipe exists from connect); refused peers lose their pipe
                s.send_multipart([frame, frame, frame, frame], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
        # A raw TCP peer: a valid ZMTP greeting asking for CURVE, then a 128 MiB "HELLO" frame,
        # which libzmq buffers (up to ZMQ_MAXMSGSIZE) before CURVE can look at it.
        host, port = child.hello["endpoint"][len("tcp://") :].rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\0") + bytes(32)
        threading.Thread(target=_stream, args=(raw, greeting + b"\x06" + (128 * MiB).to_bytes(8, "big"), frame), daemon=True).start()
        report = child.finish()
    finally:
        for s in peers:
            s.close(0)
        ctx.term()
        if raw is not None:
            raw.close()
    print(
        f"coordinator peak RSS growth under two keyless 512 MiB messages and a 128 MiB handshake frame: {report['peak_growth'] / MiB:.1f} MiB; dropped {report['dropped']}"
    )
    assert "error" not in report, report
    assert report["saved"] == ["ck"]
    # The gate cuts a handshake off within one 10 ms poll, which stretches when the CPUs are busy (70 MiB
    # seen with the suite's 2 cores shared): bound it at a quarter of the 640 MiB sent (old code: all of it).
    assert report["peak_growth"] < 160 * MiB, report
    assert report["dropped"].get("handshake", 0) >= 2, report  # both were seen, and refused at the handshake
    assert report["dropped"].get("handshake-size", 0) == 1, report  # the raw peer was cut off


def _stream(sock: socket.socket, head: bytes, body: bytes) -> None:
    try:
        sock.sendall(head)
        sock.sendall(body)
    except OSError:  # cut off by the coordinator: expected
        pass


def test_idle_connection_flood_leaves_rank_0_its_descriptors(tmp_path):
    limit, flood = 256, 400  # soft = hard = 256 descriptors in the job; 400 idle connections
    child = Child("flood", str(tmp_path), nofile=limit)
    conns = []
    try:
        host, port = child.hello["endpoint"][len("tcp://") :].rsplit(":", 1)
        for _ in range(flood):  # non-blocking connects: all 400 are under way within milliseconds
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((host, int(port)))
            conns.append(c)
        max_fds = child.max_fds_until_settled()
        report = child.finish()
    finally:
        for c in conns:
            c.close()
    print(f"flood of {flood} idle connections at a {limit}-descriptor job: max {max_fds} fds open, gate {report['gate']}, dropped {report['dropped']}")
    assert "error" not in report, report
    assert report["saved"][0] == "ck" and report["opened"] == 16
    assert max_fds < limit - 32, (max_fds, report)


def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    code = (
        "import resource; from dist_ckpt.transport import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))\n"
        "print(raise_fd_limit() == resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr


# --- the secret's root of trust (multi-rank, through torchrun-style TCPStore) ---------

FAST = {"DIST_CKPT_TIMEOUT_S": "15", "DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5"}


def _read_the_store_and_forge_rank_1(coord) -> list[bytes]:
    """What a process with network access to the store can do: read every dist_ckpt key,
    then try each value as the secret, as a plain and as a CURVE peer, to speak as rank 1."""
    from datetime import timedelta

    import torch.distributed as dist

    from dist_ckpt import wire

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10))
    values = [store.get(k) for k in store.list_keys()]  # everything in the store
    hello = next(v for v in values if b"|" in v).decode()
    endpoint, job = hello.split("|")
    ctx, socks = zmq.Context.instance(), []
    for value in values:
        candidate = value if len(value) >= 16 else value.ljust(16, b"\0")
        for curve in (False, True):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if curve:
                try:
                    from dist_ckpt.transport import secure_client
                except ImportError:  # a version without CURVE: the plain peer is the whole attack
                    s.close()
                    continue
                secure_client(s, candidate, 1, 1 << 20)
            s.connect(endpoint)
            try:
                s.send_multipart(wire.encode(wire.Heartbeat(job, "0", 1, "plan"), candidate), zmq.NOBLOCK)
            except zmq.Again:
                pass
            socks.append(s)
    deadline = time.monotonic() + 30  # ends as soon as they are seen: the bound is for a loaded machine
    while sum(coord.dropped.values()) < len(socks) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the coordinator has seen every forger (drops or refused handshakes)
    for s in socks:
        s.close()
    return values


def _store_reader_job(rank, world, root):
    import torch
    import torch.distributed as dist

    import dist_ckpt as dc

    ck = dc.make_sync_checkpointer()
    session = ck.writer.session
    values: list[bytes] = []
    if rank == 0:
        values = _read_the_store_and_forge_rank_1(session.coordinator)
    dist.barrier()  # the forgers spoke before rank 1's first message
    for i in range(2):  # the forgery used to fail this save and every later one
        ck.save(f"{root}/ck{i}", {"w": torch.arange(8.0), "step": i})
    out = {"secret": session.agent._secret, "values": values}
    if rank == 0:
        out["dropped"] = dict(session.coordinator.dropped)
    ck.close()
    return out


def test_a_store_reader_cannot_speak_for_a_rank_and_the_saves_succeed(tmp_path):
    from launcher import run_ranks

    keys = tmp_path / "keys"
    out = run_ranks(_store_reader_job, 2, str(tmp_path), env={**FAST, "DIST_CKPT_KEY_DIR": str(keys)}, timeout=90)
    assert out[0]["secret"] == out[1]["secret"]
    assert all(out[0]["secret"] not in v for v in out[0]["values"]), out[0]["values"]  # nothing secret in the store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck0", "ck1", "keys"]
    assert list(keys.iterdir()) == []  # the key file is gone once every rank authenticated
    assert out[0]["dropped"].get("handshake", 0) >= 1, out[0]["dropped"]


def _save_once(rank, world, root):
    import torch

    import dist_ckpt as dc

    ck = dc.make_sync_checkpointer()
    ck.save(f"{root}/ck", {"w": torch.arange(8.0)})
    ck.close()


def test_launcher_secret_needs_no_key_file(tmp_path):
    from launcher import run_ranks

    keys = tmp_path / "keys"
    run_ranks(_save_once, 2, str(tmp_path), env={**FAST, "DIST_CKPT_KEY_DIR": str(keys), "DIST_CKPT_SECRET": os.urandom(32).hex()}, timeout=60)
    assert (tmp_path / "ck" / "MANIFEST").exists() and not keys.exists()


# --- key files (one process) ---------------------------------------------------------

JOB = "0123456789abcdef0123456789abcdef"


def test_key_file_round_trip_is_private_and_named_by_job(tmp_path):
    from dist_ckpt import trust

    d = str(tmp_path / "keys")
    secret = os.urandom(32)
    path = trust.write_key_file(d, JOB, secret)
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(d).st_mode & 0o777 == 0o700
    assert trust.read_key_file(d, JOB, 1) == secret
    other = "f" * 32
    trust.write_key_file(d, other, os.urandom(32))  # another session beside it: no collision
    assert trust.read_key_file(d, JOB, 1) == secret
    with pytest.raises(Exception, match="exists|File exists"):
        trust.write_key_file(d, JOB, secret)  # never overwritten
    trust.remove_key_file(path)
    trust.remove_key_file(path)  # idempotent
    assert os.listdir(d) == [f"{other}.key"]


@pytest.mark.parametrize("plant", ["mode", "symlink", "fifo", "owner", "size"])
def test_key_file_that_others_could_have_planted_or_read_is_refused(tmp_path, plant):
    from dist_ckpt import trust
    from dist_ckpt.errors import SecretError

    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    path = d / f"{JOB}.key"
    if plant == "symlink":
        real = tmp_path / "elsewhere"
        real.write_text("ab" * 32)
        real.chmod(0o600)
        path.symlink_to(real)
    elif plant == "fifo":
        os.mkfifo(path, 0o600)  # would hang a blocking open
    else:
        path.write_text("ab" * (32 if plant != "size" else 31))
        path.chmod(0o644 if plant == "mode" else 0o600)
        if plant == "owner":
            if os.geteuid() != 0:
                pytest.skip("needs root to give the file to another user")
            os.chown(path, 4242, -1)
    with pytest.raises(SecretError):
        trust.read_key_file(str(d), JOB, 1)


def test_a_key_dir_others_can_write_is_refused(tmp_path):
    from dist_ckpt import trust
    from dist_ckpt.errors import SecretError

    d = tmp_path / "keys"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(SecretError, match="writable"):
        trust.write_key_file(str(d), JOB, os.urandom(32))


def test_malformed_hello_from_the_store_is_refused():
    from dist_ckpt.errors import TransportError
    from dist_ckpt.session import _parse_hello

    assert _parse_hello(f"tcp://10.0.0.1:5555|{JOB}".encode()) == ("tcp://10.0.0.1:5555", JOB)
    for bad in (b"tcp://h:1|../../etc/passwd", b"nope", f"udp://h:1|{JOB}".encode(), b"\xff\xfe|"):
        with pytest.raises(TransportError):
            _parse_hello(bad)
