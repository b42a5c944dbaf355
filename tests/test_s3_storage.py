"""S3Storage (s3:// checkpoints) against a real S3-API server (moto over HTTP, tests/s3_server.py).

Ranks are gloo processes (tests/launcher.py); the server's endpoint and test
credentials reach them through the standard AWS_* variables. Faults are
injected at the HTTP level by tests/s3_fault_proxy.py.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from dist_helpers import dtensor, global_tensor
from launcher import run_ranks

pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[test]'")

import dist_ckpt as dc
from dist_ckpt.errors import CheckpointError, CheckpointExists, ChecksumError, DistCkptError, ManifestError, StorageError, UnsafeFileError
from dist_ckpt.fragments import checkpoint_files
from dist_ckpt.loader import read_manifest, read_metadata_at
from dist_ckpt.manager import CheckpointManager
from dist_ckpt.storage import get_storage
from dist_ckpt.storage.s3 import COALESCE_GAP, OBJECT_RE, WINDOW_BYTES, S3Storage, S3WriteStream, _coalesce
from dist_ckpt.storage.s3_client import RetryPolicy, S3Client
from dist_ckpt.verify import verify

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "30"}
SHAPES = {"w": (37, 12), "v": (16, 9), "b": (23,)}
RANKS_TIMEOUT = 150  # an upper bound for a launch on a shared, busy machine (each takes seconds when idle)
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def env(s3_server, s3_bucket) -> dict[str, str]:
    """What the rank processes need: fast heartbeats and the server's AWS_* variables (the forkserver may predate them)."""
    return {**FAST, **s3_server.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture
def client(s3_bucket):
    c = S3Client(s3_bucket, retry=FAST_RETRY)
    yield c
    c.close()


def keys(client: S3Client, prefix: str = "") -> list[str]:
    return sorted(o.key for o in client.list(prefix))


def objects(path: str) -> list[str]:
    """Every object the committed MANIFEST at ``s3://`` ``path`` names besides itself: data objects, and in version 2 the fragments.

    Read through the process's own storage, not a test's fault-proxy one: the proxy's log stays the load's.
    """
    return sorted(checkpoint_files(read_metadata_at(path)[0]))


# -- one process -----------------------------------------------------------------------


def test_save_load_overwrite_in_one_process(s3_bucket, client):
    sd = {"w": torch.arange(3000.0).reshape(30, 100), "b": torch.ones(7), "step": 3}
    path = f"s3://{s3_bucket}/run/ck"
    dc.save(sd, path)
    manifest, root, _ = read_manifest(path)
    assert root == f"{s3_bucket}/run/ck"
    (name,) = manifest.files
    assert name.startswith("data/") and OBJECT_RE.match(name[len("data/") :]), name  # the real object, named with the save id
    stored = objects(path)  # v1: the data object; v2: and the rank's fragment, also named with the save id
    assert name in stored and all(OBJECT_RE.match(f[len("data/") :]) for f in stored), stored
    assert keys(client) == sorted(["run/ck/MANIFEST", *(f"run/ck/{f}" for f in stored)])
    out = {"w": torch.zeros(30, 100), "b": torch.zeros(7), "step": 0}
    assert dc.load(out, path)["step"] == 3 and torch.equal(out["w"], sd["w"])

    with pytest.raises(CheckpointExists):
        dc.save(sd, path)
    sd["w"] += 1
    dc.save(sd, path, overwrite=True)
    (new_name,) = read_manifest(path)[0].files
    assert new_name != name
    new_stored = objects(path)
    assert new_name in new_stored and not set(new_stored) & set(stored)
    assert keys(client) == sorted(["run/ck/MANIFEST", *(f"run/ck/{f}" for f in new_stored)])  # the old save's objects are gone
    dc.load(out, path)
    assert torch.equal(out["w"], sd["w"])


def test_multipart_data_object_and_manifest_size_limit(s3_bucket, client):
    storage = S3Storage(part_size=5 << 20, max_in_flight=2)
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: three parts
    path = f"s3://{s3_bucket}/mp"
    dc.save({"x": big, "y": torch.ones(3)}, path, storage=storage)
    (name,) = read_manifest(path)[0].files
    assert client.head(f"mp/{name}").etag.endswith('-3"')  # a multipart upload of 3 parts
    out = {"x": torch.zeros_like(big), "y": torch.zeros(3)}
    dc.load(out, path)
    assert torch.equal(out["x"], big)
    with pytest.raises(UnsafeFileError) as e:
        storage.read_bytes(f"{s3_bucket}/mp/MANIFEST", max_bytes=100)
    assert e.value.errno == errno.EFBIG


def test_flipped_byte_is_a_checksum_error(s3_bucket, client):
    path = f"s3://{s3_bucket}/flip"
    dc.save({"w": torch.arange(5000.0)}, path)
    (name,) = read_manifest(path)[0].files
    key = f"flip/{name}"
    data = bytearray(client.get(key, 1 << 20))
    data[1234] ^= 0x40
    assert verify(path).ok
    client.put(key, bytes(data))
    with pytest.raises(ChecksumError):
        dc.load({"w": torch.zeros(5000)}, path)
    report = verify(path)  # what `dist-ckpt verify` runs
    assert not report.ok and len(report.bad) == 1


def test_part_size_and_concurrency_come_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("DIST_CKPT_S3_PART_SIZE", str(8 << 20))
    monkeypatch.setenv("DIST_CKPT_S3_MAX_IN_FLIGHT", "3")
    storage = S3Storage()  # what the s3 scheme builds
    assert (storage.part_size, storage.max_in_flight) == (8 << 20, 3)
    assert S3Storage(max_in_flight=7).max_in_flight == 7
    for bad in ({"s3_part_size": 1 << 20}, {"s3_max_in_flight": 0}):
        with pytest.raises(ValueError, match="s3_part_size"):
            dc.Config(**bad)


def test_s3_paths_share_one_storage_and_client_per_process_and_settings(s3_bucket, monkeypatch):
    path = f"s3://{s3_bucket}/shared/step-00000001"
    dc.save({"w": torch.ones(4)}, path)
    storage = get_storage(path)[0]
    client = storage._where(s3_bucket)[0]
    assert dc.load({"w": torch.zeros(4)}, path)["w"].sum() == 4
    assert get_storage(f"s3://{s3_bucket}/other")[0] is storage and storage._where(s3_bucket)[0] is client  # the save's client served the load
    monkeypatch.setenv("DIST_CKPT_S3_MAX_IN_FLIGHT", "2")  # other settings: another storage
    other = get_storage(path)[0]
    assert other is not storage and other.max_in_flight == 2
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")  # other credentials: other clients
    assert get_storage(path)[0] is not other
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.delenv("DIST_CKPT_S3_MAX_IN_FLIGHT")
    assert get_storage(path)[0] is storage
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child: neither the parent's storage nor, through an inherited storage, its client
        try:
            fresh = get_storage(path)[0] is not storage and storage._where(s3_bucket)[0] is not client
            os.write(write, b"ok" if fresh else b"parent's")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 16) == b"ok"
    os.waitpid(pid, 0)


def test_without_boto3_the_scheme_says_how_to_install_it():
    code = "import sys; sys.modules['boto3'] = None\nfrom dist_ckpt.storage import get_storage\ntry:\n    get_storage('s3://b/x')\nexcept Exception as e:\n    print(type(e).__name__, e)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(dc.__file__))},
    ).stdout
    assert out.startswith("UnsupportedScheme") and "pip install 'dist-ckpt[s3]'" in out, out


def test_unknown_bucket_and_missing_checkpoint(s3_bucket):
    with pytest.raises(dc.CheckpointNotFound):
        dc.load({"w": torch.zeros(3)}, f"s3://{s3_bucket}/nothing-here")
    storage, path = get_storage(f"s3://{s3_bucket}/x")
    assert isinstance(storage, S3Storage) and path == f"{s3_bucket}/x"


def test_requests_failing_with_500_and_resets_are_retried(s3_bucket, s3_fault_proxy, client):
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    path = f"s3://{s3_bucket}/flaky"
    s3_fault_proxy.inject("500", nth=1, method="PUT", path_contains="/data/")  # the data object's first PUT
    s3_fault_proxy.inject("reset", nth=1, method="PUT", path_contains="MANIFEST")  # the commit's first try
    s3_fault_proxy.inject("truncate", nth=1, method="GET", path_contains="/data/")  # a ranged read cut off mid-body
    sd = {"w": torch.arange(4000.0)}
    dc.save(sd, path, storage=storage)
    out = {"w": torch.zeros(4000)}
    dc.load(out, path, storage=storage)
    assert torch.equal(out["w"], sd["w"])
    fired = [(m, a) for m, _, a in s3_fault_proxy.log if a != "pass"]
    assert sorted(fired) == [("GET", "truncate"), ("PUT", "500"), ("PUT", "reset")]
    assert not [p for m, p, _ in s3_fault_proxy.log if "list-type=" in p or "uploads" in p]  # neither the save nor the load LISTs


def _data_ranges(proxy, suffix: str = ".bin") -> list[tuple[int, int]]:
    """(first, last) byte of each ranged GET of a data object (``suffix=".frag"``: of a v2 fragment) the proxy saw."""
    return [(a, b) for p, a, b in proxy.ranges if "/data/" in p and p.partition("?")[0].endswith(suffix)]


def test_load_reads_each_file_in_a_few_coalesced_gets(s3_bucket, s3_fault_proxy):
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    path = f"s3://{s3_bucket}/many"
    sd = {f"t{i:02d}": torch.arange(1000.0) + i for i in range(40)}  # 40 chunks in one data object
    dc.save(sd, path, storage=storage)
    s3_fault_proxy.clear()
    out = dc.load({k: torch.zeros(1000) for k in sd}, path, storage=storage)
    assert all(torch.equal(out[k], sd[k]) for k in sd)  # every chunk still checksum-verified by the reader
    got = _data_ranges(s3_fault_proxy)
    assert 1 <= len(got) <= dc.Config().reader_threads  # one GET per reader thread, not one per chunk (40 before)
    fragments = [f for f in objects(path) if f.endswith(".frag")]  # v2 only: the chunk records, read before the data
    assert len(_data_ranges(s3_fault_proxy, ".frag")) == len(fragments)  # one GET per fragment
    spans = sorted(got)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # no byte fetched twice


def test_a_failing_coalesced_get_fails_the_load_naming_the_object(s3_bucket, s3_fault_proxy):
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    path = f"s3://{s3_bucket}/failing"
    sd = {f"t{i}": torch.arange(1000.0) for i in range(8)}
    dc.save(sd, path, storage=storage)
    (name,) = read_manifest(path, storage)[0].files
    s3_fault_proxy.inject("500", times=1000, method="GET", path_contains=name)  # every try of every window's GET of the data object
    with pytest.raises(StorageError, match=name.rpartition("/")[2]):  # raised in the reading thread, not lost in the fetch pool
        dc.load({k: torch.zeros(1000) for k in sd}, path, storage=storage)


def test_a_failing_fragment_get_fails_the_load_naming_the_fragment(s3_bucket, s3_fault_proxy):
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    path = f"s3://{s3_bucket}/failing-frag"
    sd = {f"t{i}": torch.arange(1000.0) for i in range(8)}
    ck = dc.make_sync_checkpointer(config=dc.Config(format_version=2), storage=storage)  # a version-2 save whatever the default
    try:
        ck.save(path, sd)
    finally:
        ck.close()
    (fragment,) = [f for f in objects(path) if f.endswith(".frag")]
    s3_fault_proxy.inject("500", times=1000, method="GET", path_contains=fragment)  # every try of the fragment's GET
    with pytest.raises(StorageError, match=fragment.rpartition("/")[2]) as e:  # the store's failure, not a claim that the checkpoint is bad
        dc.load({k: torch.zeros(1000) for k in sd}, path, storage=storage)
    assert not isinstance(e.value, ManifestError)
    assert not _data_ranges(s3_fault_proxy)  # no data object read without its records


def test_coalescing_merges_runs_across_small_gaps_only_and_caps_windows():
    gap, win, mib = COALESCE_GAP, WINDOW_BYTES, 1 << 20
    runs = [(5 * mib, 100), (0, 10), (10 + gap, 10), (5 * mib + 100 + gap + 1, 50), (40 * mib, 40 * mib)]  # unsorted, one past the end
    got = [(w.start, w.end) for w in _coalesce(runs, 60 * mib)]
    assert got == [(0, 20 + gap), (5 * mib, 5 * mib + 100), (5 * mib + 101 + gap, 5 * mib + 151 + gap), (40 * mib, 40 * mib + win), (40 * mib + win, 60 * mib)]
    assert _coalesce([(0, 0), (70 * mib, 10)], 60 * mib) == []


def test_coalesced_reads_skip_what_the_load_does_not_need(s3_bucket, s3_fault_proxy):
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    path = f"s3://{s3_bucket}/skip"
    sd = {"a": torch.arange(3000.0), "big": torch.ones(3 << 20), "z": torch.arange(2000.0)}  # 12 MiB between two small tensors
    dc.save(sd, path, storage=storage)
    big = read_manifest(path, storage)[0].tensors[("big",)].chunks
    lo, hi = int(big.offset[0]), int(big.offset[0]) + int(big.nbytes[0])
    s3_fault_proxy.clear()
    out = dc.load({"a": torch.zeros(3000), "z": torch.zeros(2000)}, path, storage=storage, strict=False)
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["z"], sd["z"])
    got = _data_ranges(s3_fault_proxy)
    assert got and not [(a, b) for a, b in got if a < hi and b >= lo]  # no byte of "big" fetched


class OverwrittenDuringLoad(S3Storage):
    """Its first open of a data object lets ``swap`` (another job's overwrite) run first: the load read the old MANIFEST."""

    def __init__(self, swap) -> None:
        super().__init__()
        self.swaps = [swap]

    def open_read(self, path):
        if "/data/" in path and self.swaps:
            self.swaps.pop()()
        return super().open_read(path)


def test_load_racing_an_overwrite_retries_with_the_new_manifest(s3_bucket, client):
    path = f"s3://{s3_bucket}/raced"
    dc.save({"w": torch.full((500,), 1.0)}, path)
    storage = OverwrittenDuringLoad(lambda: dc.save({"w": torch.full((500,), 2.0)}, path, overwrite=True))
    out = dc.load({"w": torch.zeros(500)}, path, storage=storage)
    assert not storage.swaps and torch.equal(out["w"], torch.full((500,), 2.0))  # the old objects were gone: retried, new one whole


def test_resume_sets_a_damaged_step_aside_in_place(s3_bucket, client):
    root = f"s3://{s3_bucket}/resume"
    mgr = CheckpointManager(root, keep_last=None, async_save=False)
    for step in (1, 2):
        mgr.save(step, {"w": torch.full((1000,), float(step))})
    (name,) = read_manifest(f"{root}/step-00000002")[0].files
    key = f"resume/step-00000002/{name}"
    data = bytearray(client.get(key, 1 << 20))
    data[100] ^= 1
    client.put(key, bytes(data))
    sd = {"w": torch.zeros(1000)}
    mgr.load(sd)  # step 2 fails its checksum: step 1 is loaded, step 2 set aside
    assert float(sd["w"][0]) == 1.0 and mgr.steps() == [1]
    mgr.close()
    step2 = keys(client, "resume/step-00000002/")
    assert key in step2 and "resume/step-00000002/MANIFEST" not in step2 and any("/MANIFEST.bad-" in k for k in step2), step2
    again = CheckpointManager(root, keep_last=None, async_save=False)  # its garbage collection keeps what MANIFEST.bad-* names
    assert key in keys(client, "resume/step-00000002/") and again.steps() == [1]
    again.save(2, {"w": torch.full((1000,), 5.0)})  # the set-aside step does not block a new save of it
    again.load(sd)
    assert again.steps() == [1, 2] and float(sd["w"][0]) == 5.0
    again.close()


def test_uncommit_deletes_the_manifest_before_the_objects(s3_bucket, s3_fault_proxy, client):
    path = f"s3://{s3_bucket}/unc"
    dc.save({"w": torch.arange(100.0)}, path)
    stored = objects(path)  # the data object (and in v2 the fragment)
    storage = S3Storage(retry=FAST_RETRY, endpoint_url=s3_fault_proxy.endpoint)
    s3_fault_proxy.inject("500", times=1000, method="POST", path_contains="delete")  # every DeleteObjects fails
    with pytest.raises(StorageError):
        storage.uncommit(f"{s3_bucket}/unc")
    assert keys(client, "unc/") == [f"unc/{f}" for f in stored]  # no longer committed; the objects left are garbage
    with pytest.raises(dc.CheckpointNotFound):
        dc.load({"w": torch.zeros(100)}, path)
    s3_fault_proxy.clear()
    assert sorted(storage.collect_garbage(f"{s3_bucket}/unc")) == [f"s3://{s3_bucket}/unc/{f}" for f in stored]


def test_abort_and_garbage_collection_remove_only_their_own_objects(s3_bucket, client):
    storage = S3Storage(part_size=5 << 20, max_in_flight=1)
    ck = f"{s3_bucket}/own/ck"
    dc.save({"w": torch.arange(100.0)}, f"s3://{ck}")
    committed = keys(client, "own/")
    client.put("own/ck/data/notes.txt", b"a user's file")
    mine, other = storage.save_target(ck, "job1-1", True), storage.save_target(ck, "job2-1", True)
    for target in (mine, other):
        stream = storage.open_stream(target, "data/r00000.bin")
        stream.append(memoryview(b"x" * 10), 0)
        stream.sync()
        stream.close()
    unfinished = storage.open_stream(mine, "data/r00001.bin")
    unfinished.append(memoryview(bytes(6 << 20)), 0)  # over one part: a multipart upload is open, never completed
    storage.abort(mine)
    unfinished.close()
    assert list(client.list_uploads("own/")) == []
    theirs = f"own/ck/{storage.stored_name(other, 'data/r00000.bin')}"
    assert keys(client, "own/") == sorted([*committed, "own/ck/data/notes.txt", theirs])
    assert storage.collect_garbage(f"{s3_bucket}/own") == [f"s3://{s3_bucket}/{theirs}"]
    assert keys(client, "own/") == sorted([*committed, "own/ck/data/notes.txt"])


def _leftover(storage: S3Storage, ckpt: str, save_id: str) -> str:
    """A data object of save ``save_id`` that was never committed (a killed save's); returns its key."""
    target = storage.save_target(ckpt, save_id, True)
    stream = storage.open_stream(target, "data/r00000.bin")
    stream.append(memoryview(b"x" * 10), 0)
    stream.sync()
    stream.close()
    return f"{ckpt.split('/', 1)[1]}/{storage.stored_name(target, 'data/r00000.bin')}"


def test_an_unreadable_manifest_keeps_its_objects_and_can_be_overwritten(s3_bucket, client):
    path = f"s3://{s3_bucket}/crafted/ck"
    dc.save({"w": torch.arange(100.0)}, path)
    storage = S3Storage()
    leftover = _leftover(storage, f"{s3_bucket}/crafted/ck", "dead-1")
    before = keys(client, "crafted/")
    old = objects(path)  # what the MANIFEST named before it was damaged
    client.put("crafted/ck/MANIFEST", b"\x93 not a manifest")
    assert storage.collect_garbage(f"{s3_bucket}/crafted") == []  # cannot tell what it references: nothing removed
    assert keys(client, "crafted/") == before
    dc.save({"w": torch.ones(100)}, path, overwrite=True)  # the old objects are garbage now, beside the leftover
    assert float(dc.load({"w": torch.zeros(100)}, path)["w"].sum()) == 100.0
    removed = storage.collect_garbage(f"{s3_bucket}/crafted")
    assert sorted(removed) == sorted([f"s3://{s3_bucket}/{leftover}", *(f"s3://{s3_bucket}/crafted/ck/{f}" for f in old)])


def test_garbage_collection_reads_no_manifest_in_the_steady_state(s3_bucket, s3_fault_proxy, client):
    for step in (1, 2):
        dc.save({"w": torch.arange(100.0)}, f"s3://{s3_bucket}/steady/step-{step}")
    storage = S3Storage(endpoint_url=s3_fault_proxy.endpoint)
    assert storage.collect_garbage(f"{s3_bucket}/steady") == []
    assert [m for m, _, _ in s3_fault_proxy.log] == ["GET", "GET"]  # one LIST of objects, one of uploads: no MANIFEST read


# -- gloo ranks ------------------------------------------------------------------------


def _state(world: int, layout: str) -> dict:
    sd = {name: dtensor(global_tensor(name, shape), world, layout if len(shape) == 2 else "shard0") for name, shape in SHAPES.items()}
    sd["step"] = 11
    return sd


def _async_save_then_load(rank, world, path):
    stage_f, write_f = dc.async_save(_state(world, "shard0_shard1_2d"), path)
    stage_f.result()
    write_f.result()
    return _load_and_check(rank, world, path)  # on the same 4 ranks, another layout (one launch less)


def _load_and_check(rank, world, path):
    sd = _state(world, "shard1")
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            v.to_local().zero_()
    dc.load(sd, path)
    return all(torch.equal(sd[n].full_tensor(), global_tensor(n, shape)) for n, shape in SHAPES.items()) and sd["step"] == 11


def test_async_save_on_4_ranks_loads_on_4_2_and_3(s3_bucket, env, client):
    path = f"s3://{s3_bucket}/job/ck"
    assert run_ranks(_async_save_then_load, 4, path, timeout=RANKS_TIMEOUT, env=env) == dict.fromkeys(range(4), True)
    files = read_manifest(path)[0].files
    assert len(files) == 4 and {f.rsplit(".", 2)[-2] for f in files} == {f"r0000{r}" for r in range(4)}
    assert len({f[len("data/") : len("data/") + 4] for f in files}) > 1  # the ranks' objects spread over prefixes
    for world in (2, 3):
        assert run_ranks(_load_and_check, world, path, timeout=RANKS_TIMEOUT, env=env) == dict.fromkeys(range(world), True), world


def _manager_run(rank, world, root, leftover):
    mgr = CheckpointManager(root, keep_last=2, async_save=True)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((64, 8), float(step)), "step": step})
    mgr.close()
    if rank == 0:  # a save killed before its commit left an object behind
        storage, _ = get_storage(root)
        storage.open_stream(storage.save_target(f"{root.split('://')[1]}/step-00000004", "dead-1", False), "data/r00000.bin").sync()
    torch.distributed.barrier()
    resumed = CheckpointManager(root, keep_last=2, async_save=False)  # rank 0 collects the garbage at start
    sd = {"w": torch.zeros(64, 8), "step": 0}
    resumed.load(sd)
    steps = resumed.steps()
    resumed.close()
    return steps, sd["step"], float(sd["w"][0, 0])


def test_manager_retention_resume_and_garbage(s3_bucket, env, client):
    root = f"s3://{s3_bucket}/train"
    out = run_ranks(_manager_run, 2, root, None, timeout=RANKS_TIMEOUT, env=env)
    assert out == dict.fromkeys(range(2), ([2, 3], 3, 3.0))
    left = keys(client)
    assert not [k for k in left if k.startswith("train/step-00000001/")]  # retention removed MANIFEST and objects
    assert not [k for k in left if k.startswith("train/step-00000004/")]  # the unreferenced object was collected
    referenced = {f"train/{s}/{f}" for s in ("step-00000002", "step-00000003") for f in objects(f"s3://{s3_bucket}/train/{s}")}
    assert set(left) == {"train/step-00000002/MANIFEST", "train/step-00000003/MANIFEST"} | referenced


def _save_one(rank, world, path):
    try:
        dc.save({"w": dtensor(torch.arange(2000.0), world, "shard0")}, path)  # every rank writes its half
        return "saved"
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"


def test_rank_whose_uploads_fail_fails_the_save_on_every_rank(s3_bucket, env, s3_fault_proxy, client):
    s3_fault_proxy.inject("500", nth=1, times=1000, method="PUT", path_contains=".r00001.bin")
    path = f"s3://{s3_bucket}/fails"
    out = run_ranks(_save_one, 2, path, timeout=RANKS_TIMEOUT, env={**env, "AWS_ENDPOINT_URL": s3_fault_proxy.endpoint})
    for rank in (0, 1):
        assert out[rank].startswith("CheckpointError") and "rank 1" in out[rank] and "InternalError" in out[rank], out[rank]
    assert "fails/MANIFEST" not in keys(client, "fails/")  # nothing committed
    # The abort removed what was there; rank 0's upload, had it still been running, would complete after it: garbage.
    S3Storage().collect_garbage(f"{s3_bucket}/fails")
    assert keys(client, "fails/") == [] and list(client.list_uploads("fails/")) == []


class KillingStorage(S3Storage):
    """Rank 0 SIGKILLs itself once the first part of its data object is uploaded (a multipart upload left open)."""

    def open_stream(self, target, name):
        stream = super().open_stream(target, name)
        if os.environ["RANK"] == "0":
            stream.__class__ = _KillingStream
        return stream


class _KillingStream(S3WriteStream):
    def _write(self, data, offset):
        super()._write(data, offset)
        if self._writer._parts:
            self._writer._parts[0].result()  # the first part is stored: the upload exists server-side
            os.kill(os.getpid(), signal.SIGKILL)


def _save_killed(rank, world, path):
    big = torch.arange((6 << 20) // 4 * world, dtype=torch.float32)  # each rank writes a 6 MiB share: a multipart upload of 5 MiB parts
    try:
        dc.save({"x": dtensor(big, world, "shard0")}, path, storage=KillingStorage(part_size=5 << 20))
    except DistCkptError as e:  # the coordinator died with rank 0: a timeout
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_rank_killed_mid_upload_commits_nothing_and_gc_collects_it(s3_bucket, env, client):
    path = f"s3://{s3_bucket}/killed/ck"
    # 4 s, not FAST's 5, for a quicker give-up; 2 s allowed rank 0's coordinator, uploading to moto on a loaded machine,
    # a stall of only 1.6 s before it aborts the save itself, which rank 1 would report instead of the coordinator's death
    out = run_ranks(_save_killed, 2, path, timeout=RANKS_TIMEOUT, env={**env, "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "4"}, expect_fail={0})
    assert "died" in out[0] and "Coordinator" in out[1], out
    left = keys(client, "killed/")
    uploads = list(client.list_uploads("killed/"))
    assert "killed/ck/MANIFEST" not in left and uploads, (left, uploads)  # not committed; rank 0's parts are stored
    removed = S3Storage().collect_garbage(f"{s3_bucket}/killed")
    assert len(removed) == len(left) + len(uploads)
    assert keys(client, "killed/") == [] and list(client.list_uploads("killed/")) == []


def test_two_jobs_committing_one_path_at_once_exactly_one_wins(s3_bucket, env, s3_fault_proxy, client):
    s3_fault_proxy.inject("hold", nth=1, times=2, method="PUT", path_contains="MANIFEST")  # both commits meet here
    path = f"s3://{s3_bucket}/race"
    outs: dict[int, dict] = {}
    jobs = [
        threading.Thread(
            target=lambda j=j: outs.__setitem__(
                j, run_ranks(_save_one, 2, path, timeout=RANKS_TIMEOUT, env={**env, "AWS_ENDPOINT_URL": s3_fault_proxy.endpoint})
            )
        )
        for j in range(2)
    ]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join()
    results = sorted(outs[j][0] for j in range(2))
    assert results[1] == "saved" and results[0].startswith("CheckpointExists"), results
    assert all(outs[j][0] == outs[j][1] for j in range(2))  # every rank of a job hears the same outcome
    assert s3_fault_proxy.broken_holds == 0  # the two MANIFEST puts really were in flight together
    assert keys(client, "race/") == sorted(["race/MANIFEST", *(f"race/{f}" for f in objects(path))])  # the loser removed its objects
