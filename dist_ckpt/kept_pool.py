"""Reader threads kept between loads, shared by the data reads and the fragment reads of a load.

Starting a thread waits until it runs: on cores shared by several ranks that
was ~8 ms of a ~70 ms warm load (4 ranks on 2 vCPUs), and a v2 load that
started its own pool for two fragments waited ~12 ms more. Every parallel read
of a load therefore runs on one process-wide pool whose threads outlive it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

_T = TypeVar("_T")
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
