import os
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # the multi-rank launcher and rank functions

# Hypothesis fails a test whose first examples take over 1 s to generate (too_slow) or, by default, an example that
# runs over 200 ms: both measure the machine, and a loaded CI box exceeds them. Every @settings(...) in the tests
# inherits this profile for what it does not set itself.
settings.register_profile("loaded-machine", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("loaded-machine")

pytest_plugins = ["s3_server"]  # the S3 server fixtures (s3_server, s3_bucket, s3_fault_proxy)

# Threads of the services a session, checkpointer or tier opens in this process.
# One left running outlived its test until interpreter exit, and its heartbeat
# thread, starved by the teardown, logged "this process was unresponsive".
SERVICE_THREADS = ("dist_ckpt-agent-", "dist_ckpt-coordinator", "dist_ckpt-peer-")


@pytest.fixture(autouse=True)
def _closes_what_it_opens(request: pytest.FixtureRequest):
    """Fail a test that leaves an agent, coordinator or peer service of its own running.

    The functional API's shared session (``dc.save``) lives per process by
    design; it is closed here after each test, so no test inherits another's
    session (or the ``DIST_CKPT_*`` settings it was made with).
    """
    before = set(threading.enumerate())
    yield
    import dist_ckpt.api

    dist_ckpt.api._close_defaults()
    started = [t for t in threading.enumerate() if t not in before and t.name.startswith(SERVICE_THREADS)]
    deadline = time.monotonic() + 30.0  # a closed service's thread may still be on its way out (slowly, on a loaded machine): a leaked one never is
    for t in started:
        t.join(max(0.0, deadline - time.monotonic()))
    left = sorted(t.name for t in started if t.is_alive())
    if left:
        pytest.fail(
            f"{request.node.nodeid} left {left} running: close the checkpointer, session or service it opened (a with block or try/finally)", pytrace=False
        )
