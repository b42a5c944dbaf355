"""A tiered restore's reads of a peer node's committed file, asked for ahead of the reader.

The reader announces each thread's runs of a file (:meth:`ReadHandle.will_read`);
:class:`PeerReadHandle` cuts them into windows of :data:`READ_AHEAD_BYTES` and
keeps :data:`READ_AHEAD` window requests in flight on one connection per
reading thread, so the peer's service reads (and the network carries) the next
windows while this rank copies and hashes the current one. Without a plan (a
read nobody announced) a read asks for its own bytes, as before: one request
and its reply per piece of at most ``PIECE_BYTES``.

*Why*: the reader reads a whole chunk in 1 MiB pieces and hashes each while it
is in the CPU cache; one request per piece made every piece a round trip
(request, the service's wake-up, ``pread``, reply) with nothing in flight in
between (a peer restore ran at about half the speed of a local one on this box).

Memory: the windows received and not yet copied, at most ``READ_AHEAD x
READ_AHEAD_BYTES`` per reading thread (16 MiB), held as the received frames
(no second copy: each byte is copied once, from the frame into the tensor).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Sequence

from ..storage import ReadHandle
from ..storage.s3 import _coalesce, _scatter
from .peer_client import PeerClient, _Conn
from .peer_protocol import MAX_FILE_BYTES, WINDOW

__all__ = ["PeerReadHandle", "READ_AHEAD", "READ_AHEAD_BYTES"]

READ_AHEAD_BYTES = 4 << 20
"""Bytes one window request asks for (within ``PIECE_BYTES``, the largest reply)."""
READ_AHEAD = WINDOW
"""Window requests a reading thread keeps in flight (the credit window of the peer plane)."""


@dataclass
class _Window:
    start: int
    end: int
    rid: int = -1  # its request's id once asked for
    data: memoryview | None = None  # its reply's bytes once received (fewer than end - start: the file ends there)


class _Ahead:
    """One thread's announced windows of one file, asked for ahead on one connection and consumed front to back."""

    def __init__(self, client: PeerClient, step: int, name: str, windows: Sequence[tuple[int, int]]) -> None:
        self._client, self._step, self._name = client, step, name
        self._todo = collections.deque(_Window(a, b) for a, b in windows)  # not asked for yet
        self._asked: collections.deque[_Window] = collections.deque()
        self._conn: _Conn | None = None
        self._sent = self._received = -1  # ids of the last request sent and the last reply received (replies come in order)

    def ask(self) -> None:
        """Send window requests until :data:`READ_AHEAD` are in flight (or none is left)."""
        while len(self._asked) < READ_AHEAD and self._todo:
            w = self._todo.popleft()
            if self._conn is None:
                self._conn = self._client._take("read", self._name)
            w.rid = self._sent = self._client.ask_read(self._conn, self._step, self._name, w.start, w.end - w.start)
            self._asked.append(w)

    def _skip(self, pos: int) -> None:
        """Forget the windows wholly before ``pos`` (the reader moved past them; a reply not received is skipped by the next wait)."""
        for q in (self._asked, self._todo):
            while q and q[0].end <= pos:
                q.popleft()

    def _bytes(self, w: _Window) -> memoryview:
        if w.data is None:
            assert self._conn is not None
            w.data = self._client.read_reply(self._conn, w.rid, self._name, w.end - w.start)
            self._received = w.rid
        return w.data

    def serve(self, views: list[memoryview], offset: int, want: int) -> int:
        """Copy what the windows hold of ``[offset, offset + want)`` into ``views``; the bytes served (a prefix, maybe 0).

        Raises:
            PeerError: a window's request failed (the plan is closed: later reads ask for their own bytes).
        """
        done = 0
        try:
            while done < want:
                pos = offset + done
                self._skip(pos)
                self.ask()
                if not self._asked or self._asked[0].start > pos:
                    break  # not announced: the caller reads it directly
                w = self._asked[0]
                data = self._bytes(w)
                have = w.start + len(data) - pos
                if have <= 0:
                    break  # the file ends before pos
                n = min(want - done, have)
                _scatter(views, done, data[pos - w.start : pos - w.start + n])
                done += n
                if len(data) < w.end - w.start:
                    break  # the file ends inside this window
        except BaseException:
            self.close()
            raise
        self._skip(offset + done)
        if not self._asked and not self._todo:
            self.close()  # everything announced was read: the connection goes back to the pool now
        return done

    def close(self) -> None:
        """Drop what is left; the connection goes back to the pool if no request on it is unanswered, else it is closed."""
        self._todo.clear()
        self._asked.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._received == self._sent:
                self._client._give_back(conn)
            else:
                conn.close()  # replies still coming: never handed to another request


class PeerReadHandle(ReadHandle):
    """A committed file on a peer's node, read over its service; announced runs are asked for ahead (see the module docstring).

    Thread-safe: each reading thread has its own plan and connection.
    """

    def __init__(self, client: PeerClient, step: int, name: str) -> None:
        self._client, self._step, self.name = client, step, name
        self._plans: dict[int, _Ahead] = {}  # thread ident -> its plan
        self._lock = threading.Lock()

    def will_read(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Plan this thread's next reads (replacing its earlier plan); the first windows are asked for now.

        Raises:
            PeerError: the first requests could not be sent (no connection to the peer).
        """
        windows = [(w.start, w.end) for w in _coalesce(ranges, MAX_FILE_BYTES, READ_AHEAD_BYTES)]
        plan = _Ahead(self._client, self._step, self.name, windows)
        me = threading.get_ident()
        with self._lock:
            old = self._plans.pop(me, None)
            if windows:
                self._plans[me] = plan
        if old is not None:
            old.close()
        plan.ask()

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        want = sum(len(v) for v in views)
        with self._lock:
            plan = self._plans.get(threading.get_ident())
        done = plan.serve(views, offset, want) if plan is not None else 0
        for view in _rest(views, done):  # what no plan holds: asked for directly
            n = self._client.read(self._step, self.name, offset + done, view)
            done += n
            if n < len(view):
                break
        return done

    def size(self) -> int:
        return self._client.size(self._step, self.name)

    def close(self) -> None:
        with self._lock:
            plans, self._plans = list(self._plans.values()), {}
        for plan in plans:
            plan.close()


def _rest(views: list[memoryview], skip: int) -> list[memoryview]:
    """The parts of the concatenation of ``views`` from its byte ``skip``."""
    out, pos = [], 0
    for v in views:
        if pos + len(v) > skip:
            out.append(v[max(0, skip - pos) :])
        pos += len(v)
    return out
