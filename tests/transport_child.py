"""A one-rank job for tests/test_transport.py, run as its own process.

Usage: ``python transport_child.py MODE ROOT [NOFILE]``. It starts a
checkpointer (so a coordinator), prints one JSON line with its endpoint,
waits for ``go`` on stdin (the test has started its hostile peers), lets the
coordinator see them, saves, and prints one JSON line with what it measured.
Its own process so its peak RSS (VmHWM) and descriptor limit are its own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def vm_hwm() -> int:
    """Peak resident set in bytes since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:  # a low descriptor limit, soft = hard, so it cannot be raised
        n = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    import torch

    import dist_ckpt as dc
    from dist_ckpt.config import Config

    ck = dc.make_sync_checkpointer(config=Config(timeout_s=30, heartbeat_interval_s=0.2, heartbeat_timeout_s=10))
    coord = ck.writer.session.coordinator
    hello = {"endpoint": coord.endpoint}
    try:  # what an ex-member of the job could know: the server's public key (the test's ZAP case)
        from dist_ckpt.transport import curve_keys

        hello["server_key"] = curve_keys(coord._secret, "server")[0].decode()
    except ImportError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS: the peak from here is the attack's
    base_rss = vm_hwm()
    print(json.dumps(hello), flush=True)
    assert sys.stdin.readline().strip() == "go"
    # "rss": until the coordinator has refused each peer: the two keyless DEALERs at the handshake and the raw
    # peer at its handshake's size. Not a total of 3 drops: a refused DEALER reconnects and is refused again, so
    # the two alone could reach it before the raw peer's 128 MiB frame came in. "flood": the test
    # has already watched this process's descriptors (/proc/<pid>/fd, from outside: listing its
    # own would take a descriptor, and fail with EMFILE at the very moment that matters).
    deadline = time.monotonic() + 30
    while mode == "rss" and time.monotonic() < deadline and (coord.dropped.get("handshake", 0) < 2 or coord.dropped.get("handshake-size", 0) < 1):
        time.sleep(0.05)
    peak_growth = vm_hwm() - base_rss
    state = {"w": torch.arange(1000.0), "step": 1}
    result: dict[str, object] = {"peak_growth": peak_growth, "dropped": dict(coord.dropped)}
    try:
        ck.save(os.path.join(root, "ck"), state)
        result["saved"] = sorted(os.listdir(root))
        files = [open(os.path.join(root, f"f{i}"), "w") for i in range(16)]  # the training process's own open()s
        for f in files:
            f.close()
        result["opened"] = len(files)
    except Exception as e:  # reported to the test, which asserts on it
        result["error"] = f"{type(e).__name__}: {e}"
    result["gate"] = {"pending": getattr(getattr(coord, "_gate", None), "pending", None), "shed": getattr(getattr(coord, "_gate", None), "shed", None)}
    print(json.dumps(result), flush=True)
    ck.close()


if __name__ == "__main__":
    main()
