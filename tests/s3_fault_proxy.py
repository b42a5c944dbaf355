"""A small HTTP fault proxy for S3 fault tests, loopback only.

It sits between the client and the S3 server, forwards every request as it
came (headers untouched, so SigV4 signatures still match), and can make
chosen requests fail at the HTTP level:

- ``"500"``: answer ``500 InternalError`` without forwarding;
- ``"reset"``: reset the connection (TCP RST) without forwarding;
- ``"reset_after"``: forward the request, then reset instead of relaying the
  answer: the server *applied* it but the client never hears so (the
  ambiguous failure a retried conditional write has to sort out);
- ``"truncate"``: forward, relay the answer's headers and the first half of
  its body, then close the connection (a download cut off mid-body);
- ``"hold"``: not a failure: the ``times`` matching requests wait for one
  another (a barrier, ``hold_timeout`` seconds) before going on, which proves
  that a client really has that many requests in flight at once; a barrier
  that times out is counted in :attr:`FaultProxy.broken_holds`.

:attr:`FaultProxy.peak_in_flight` is the most requests at the server at once.

    proxy = FaultProxy(server.endpoint)
    proxy.inject("500", nth=2)                  # the 2nd request from now fails
    proxy.inject("reset", nth=1, times=3, method="PUT")
    ...
    proxy.stop()

Bounds: it listens on 127.0.0.1 only, forwards to a loopback upstream only,
refuses request bodies over ``max_body`` and keeps at most ``max_log``
entries in its log.
"""

from __future__ import annotations

import http.client
import http.server
import ipaddress
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field

ACTIONS = ("500", "reset", "reset_after", "truncate", "hold")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}
_ERROR_500 = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>injected by the fault proxy</Message></Error>'


@dataclass
class _Rule:
    action: str
    nth: int
    times: int
    method: str | None
    path_contains: str | None
    barrier: threading.Barrier | None = None  # the "hold" action's
    seen: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or method == self.method) and (self.path_contains is None or self.path_contains in path)


@dataclass
class _State:
    upstream: tuple[str, int]
    max_body: int
    max_log: int
    rules: list[_Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header) of each ranged request
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    peak_in_flight: int = 0
    broken_holds: int = 0

    def decide(self, method: str, path: str, range_header: str | None = None) -> tuple[str, _Rule | None]:
        """Count the request against every rule; the first that fires wins."""
        with self.lock:
            if range_header is not None and len(self.ranges) < self.max_log:
                self.ranges.append((path, range_header))
            action, fired = "pass", None
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                if fired is None and rule.nth <= rule.seen < rule.nth + rule.times:
                    action, fired = rule.action, rule
            if len(self.log) < self.max_log:
                self.log.append((method, path, action))
            return action, fired

    def count(self, delta: int) -> None:
        with self.lock:
            self.in_flight += delta
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test's own log is the proxy's request log

    def _read_body(self) -> bytes | None:
        """The request body, or None when it is over the bound (answered 413)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        n = int(self.headers.get("Content-Length") or 0)
        if n > self.server.state.max_body:
            self.send_error(413, "request body over the fault proxy's bound")
            return None
        return self.rfile.read(n)

    def _read_chunked(self) -> bytes | None:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0], 16)
            total += size
            if total > self.server.state.max_body:
                self.send_error(413, "request body over the fault proxy's bound")
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after the chunk
            if size == 0:
                return b"".join(parts)

    def _handle(self) -> None:
        body = self._read_body()
        if body is None:
            return
        self._act(*self.server.state.decide(self.command, self.path, self.headers.get("Range")), body)

    def _act(self, action: str, rule: _Rule | None, body: bytes) -> None:
        if action == "hold":
            assert rule is not None and rule.barrier is not None
            try:
                rule.barrier.wait()
            except threading.BrokenBarrierError:
                with self.server.state.lock:
                    self.server.state.broken_holds += 1
            action = "pass"
        if action == "reset":
            self._reset()
        elif action == "500":
            self._reply(500, [("Content-Type", "application/xml")], _ERROR_500)
        elif action == "reset_after":
            self._forward(body)
            self._reset()
        elif action == "truncate":
            status, headers, data = self._forward(body)
            self._reply(status, headers, data[: len(data) // 2], length=len(data))
            # A plain close (FIN), not a reset: a reset would make the client's
            # kernel drop the half body it has not read yet.
            self.wfile.flush()
            self.close_connection = True
        else:
            self._reply(*self._forward(body), head=self.command == "HEAD")

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into a TCP RST: the client sees
        # "connection reset by peer", as from a crashed load balancer.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request upstream as it came; returns the answer (status, headers, body).

        Counted in flight from sending to the answer's last byte, before the
        client hears it: a client that sends its next request on an answer
        can never be counted twice.
        """
        self.server.state.count(+1)
        try:
            return self._forward_counted(body)
        finally:
            self.server.state.count(-1)

    def _forward_counted(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = self.server.upstream_connection()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                conn.putheader(name, value)
        if "content-length" not in {k.lower() for k in self.headers}:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        conn.close()
        return resp.status, headers, data

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, head: bool = False, length: int | None = None) -> None:
        """Send an answer; ``length`` announces more bytes than ``data`` (a cut-off body)."""
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() != "content-length" or head:
                self.send_header(name, value)
        if not head:
            self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)

    def upstream_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.state.upstream, timeout=60)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that fails chosen requests.

    Args:
        upstream: the server's base URL, ``http://127.0.0.1:PORT`` (loopback only).
        max_body: the largest request body forwarded, in bytes.
        max_log: the most requests kept in :attr:`log`.
        hold_timeout: seconds a "hold" barrier waits for all its requests.

    Raises:
        ValueError: the upstream is not a plain-HTTP loopback address.
    """

    def __init__(self, upstream: str, max_body: int = 256 << 20, max_log: int = 100_000, hold_timeout: float = 30.0) -> None:
        self.hold_timeout = hold_timeout
        url = urllib.parse.urlsplit(upstream)
        if url.scheme != "http" or not url.hostname or not ipaddress.ip_address(url.hostname).is_loopback:
            raise ValueError(f"the fault proxy forwards to a loopback http:// address only, not {upstream!r}")
        self._state = _State(upstream=(url.hostname, url.port or 80), max_body=max_body, max_log=max_log)
        self._server = _ProxyServer(self._state)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def inject(self, action: str, nth: int = 1, times: int = 1, method: str | None = None, path_contains: str | None = None) -> None:
        """Fail requests ``nth`` to ``nth + times - 1`` that match, counted from now.

        Args:
            action: one of ACTIONS (module doc).
            nth: the first matching request to fail (1 = the next one).
            times: how many consecutive matching requests fail.
            method: only count requests of this HTTP method (``"PUT"`` …).
            path_contains: only count requests whose path holds this text.

        Raises:
            ValueError: an unknown action, or ``nth``/``times`` below 1.
        """
        if action not in ACTIONS or nth < 1 or times < 1:
            raise ValueError(f"bad fault rule: action={action!r} (one of {ACTIONS}), nth={nth}, times={times}")
        with self._state.lock:
            barrier = threading.Barrier(times, timeout=self.hold_timeout) if action == "hold" else None
            self._state.rules.append(_Rule(action, nth, times, method, path_contains, barrier))

    def clear(self) -> None:
        """Drop every fault rule, the request log and the counters."""
        with self._state.lock:
            self._state.rules.clear()
            self._state.log.clear()
            self._state.ranges.clear()
            self._state.peak_in_flight = self._state.broken_holds = 0

    @property
    def peak_in_flight(self) -> int:
        """The most requests forwarded and not yet answered at once, so far."""
        return self._state.peak_in_flight

    @property
    def broken_holds(self) -> int:
        """Requests whose "hold" barrier timed out (fewer arrived at once than asked)."""
        return self._state.broken_holds

    @property
    def ranges(self) -> list[tuple[str, int, int]]:
        """(path, first byte, last byte) of each ranged request seen (``Range: bytes=a-b``)."""
        with self._state.lock:
            got = list(self._state.ranges)
        out = []
        for path, header in got:
            first, _, last = header.removeprefix("bytes=").partition("-")
            out.append((path, int(first), int(last)))
        return out

    @property
    def log(self) -> list[tuple[str, str, str]]:
        """(method, path, action) of each request seen; ``action`` is "pass" or one of ACTIONS."""
        with self._state.lock:
            return list(self._state.log)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
