"""Reader threads kept between loads, shared by the data reads and the fragment reads of a load.

Starting a thread waits until it runs: on cores shared by several ranks that
was ~8 ms of a ~70 ms warm load (4 ranks on 2 vCPUs), and a v2 load that
started its own pool for two fragments waited ~12 ms more. Every parallel read
of a load therefore runs on one process-wide pool whose threads outlive it.
Even a kept thread has to be woken and scheduled, so :func:`drain` runs work
of many small items (fragments): the calling thread takes items until none is
left and waits only for those a pool thread took, never for a thread to run.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

_T = TypeVar("_T")
_MISSING = object()
_R = TypeVar("_R")

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def kept_pool(workers: int) -> ThreadPoolExecutor:
    """This process's reader threads, at least ``workers`` of them, kept between loads.

    Idle readers wait on their queue and end with the interpreter. A forked
    child (which inherits no threads) makes its own. A smaller pool replaced
    by a larger one is only dropped: a load still holding it finishes on it,
    and its threads end once it is collected (the executor's own weakref
    callback).

    Args:
        workers: threads the caller will keep busy at once.

    Returns:
        The executor (its threads are named ``dist_ckpt-reader``).
    """
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="dist_ckpt-reader"))
        return _pool[2]


def spread(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(item) for item in items]``, the first on the calling thread, the others at once on the kept pool.

    The calling thread does a share itself rather than idle in a wait, and no
    thread is started once the pool holds ``len(items) - 1`` threads. Every
    call has finished when this returns or raises, so nothing the items share
    (open files) is still in use.

    Args:
        fn: the work of one item; may raise.
        items: one per thread (at most a handful: each beyond the first is one pool thread).

    Returns:
        The results in the order of ``items``.

    Raises:
        Exception: the first item's (in order) exception, once all have finished.
    """
    if len(items) <= 1:
        return [fn(item) for item in items]
    pool = kept_pool(len(items) - 1)
    futs = [pool.submit(fn, item) for item in items[1:]]
    try:
        first = fn(items[0])
    finally:
        wait(futs)
    return [first, *(f.result() for f in futs)]


class _Drain:
    """Items taken one at a time by whichever thread asks next; counts the items in flight on other threads."""

    def __init__(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> None:
        self.fn, self.items = fn, items
        self.results: list[object] = [_MISSING] * len(items)
        self.errors: list[BaseException | None] = [None] * len(items)
        self.next, self.busy = 0, 0
        self.cond = threading.Condition()

    def work(self, caller: bool = False) -> None:
        while True:
            with self.cond:
                i = self.next
                if i >= len(self.items):
                    return
                self.next += 1
                self.busy += not caller
            try:
                self.results[i] = self.fn(self.items[i])
            except BaseException as e:  # noqa: BLE001 - kept per item and raised by drain() on the calling thread
                self.errors[i] = e
            finally:
                if not caller:
                    with self.cond:
                        self.busy -= 1
                        self.cond.notify_all()


def drain(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """``[fn(item) for item in items]`` by the calling thread and up to ``workers - 1`` kept threads, each taking the next item left.

    The calling thread works too and waits only for items a pool thread has
    taken: a pool thread not yet scheduled when the items run out finds none
    and returns, so under load (or with every kept thread busy) the caller does
    them all itself instead of waiting for a thread to run. Suits many small
    items whose order does not matter (fragment reads); each item is done by
    exactly one thread.

    Args:
        fn: the work of one item; may raise.
        items: the items.
        workers: threads at most, the calling one included.

    Returns:
        The results in the order of ``items``.

    Raises:
        BaseException: the exception of the first item (in order) that raised, once every taken item is done.
    """
    d = _Drain(fn, items)
    helpers = min(workers, len(items)) - 1
    if helpers > 0:
        pool = kept_pool(helpers)
        futs = [pool.submit(d.work) for _ in range(helpers)]
    d.work(caller=True)
    with d.cond:
        d.cond.wait_for(lambda: d.busy == 0)
    if helpers > 0:
        for f in futs:
            f.cancel()  # not started yet: it would find nothing left
    for e in d.errors:
        if e is not None:
            raise e
    return d.results  # type: ignore[return-value]
