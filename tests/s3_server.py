"""A real S3-API server (moto's server mode) on 127.0.0.1 for the tests.

The server runs in its own process, reached over HTTP by the real client
library, so the tests exercise the same code path as a job against S3 or an
S3-compatible store (never an in-process mock of the client). The port is
chosen by the server itself (bound to port 0, reported on its stdout), so
there is no race for a free port between parallel test runs.

Fixtures (registered from ``tests/conftest.py``):

- ``s3_server`` (session): the running server; skips with the reason when
  moto (``pip install -e '.[test]'``) is not installed.
- ``s3_bucket`` (function): a fresh, empty bucket name, with the server's
  endpoint and test credentials set in ``os.environ`` (so rank subprocesses
  inherit them) for the duration of the test.
- ``s3_fault_proxy`` (function): a :class:`~s3_fault_proxy.FaultProxy` in
  front of the server; point a client at its ``endpoint`` to inject faults.

The benchmark ``benchmarks/bench_s3_clients.py`` starts the same server
through :class:`MotoServer`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from s3_fault_proxy import FaultProxy

# The child serves until its stdin closes, so the server dies with the test
# process even when pytest is killed (no orphaned server holding memory).
_SERVER_SCRIPT = r"""
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""

# moto accepts any key pair; these names say so in a log.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """One moto S3 server process on 127.0.0.1.

    Args:
        start_timeout: seconds to wait for the server to answer HTTP.
        env: extra environment for the server process (e.g. moto settings).

    Raises:
        RuntimeError: the server did not start or did not answer in time.
    """

    def __init__(self, start_timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        child_env = {**os.environ, **(env or {})}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not report its port (got {line!r})")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._buckets = itertools.count()
        self._wait_until_answering(start_timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                # moto's own status page: answers without credentials.
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=5).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server at {self.endpoint} did not answer: {e}") from e
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server.

        Returns:
            ``AWS_ENDPOINT_URL`` plus test credentials and region.
        """
        return {"AWS_ENDPOINT_URL": self.endpoint, **TEST_CREDENTIALS}

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a new, empty bucket with a unique name.

        Args:
            prefix: the start of the bucket's name.

        Returns:
            The bucket's name.
        """
        import boto3  # a test dependency, imported only once the server runs

        name = f"{prefix}-{os.getpid()}-{next(self._buckets)}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        client.close()
        return name

    def stop(self) -> None:
        """Stop the server process (idempotent)."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A moto S3 server for the whole test session (skipped without moto)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test]'")
    pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[test]'")
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the server's endpoint and credentials in os.environ."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # A profile or config file of the developer's must not redirect the tests.
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server.create_bucket()


@pytest.fixture
def s3_fault_proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's server, stopped after the test."""
    proxy = FaultProxy(s3_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
