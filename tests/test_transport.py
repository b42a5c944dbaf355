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
        report = child.finish()
    finally:
        for s in peers:
            s.close(0)
        ctx.term()
    print(f"coordinator peak RSS growth under 2 x 512 MiB unauthenticated messages: {report['peak_growth'] / MiB:.1f} MiB; dropped {report['dropped']}")
    assert "error" not in report, report
    assert report["saved"] == ["ck"]
    assert report["peak_growth"] < 48 * MiB, report
    assert report["dropped"].get("handshake", 0) >= 2, report  # both were seen, and refused at the handshake


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
        report = child.finish()
    finally:
        for c in conns:
            c.close()
    print(f"flood of {flood} idle connections at a {limit}-descriptor job: max {report['max_fds']} fds open, gate {report['gate']}, dropped {report['dropped']}")
    assert "error" not in report, report
    assert report["saved"][0] == "ck" and report["opened"] == 16
    assert report["max_fds"] < limit - 32, report


def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    code = (
        "import resource; from dist_ckpt.transport import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))\n"
        "print(raise_fd_limit() == resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr
