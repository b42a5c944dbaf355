"""S3Storage (s3:// checkpoints) against a real S3-API server (moto over HTTP, tests/s3_server.py).

Ranks are gloo processes (tests/launcher.py); the server's endpoint and test
credentials reach them through the standard AWS_* variables. Faults are
injected at the HTTP level by tests/s3_fault_proxy.py.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[test]'")

import dist_ckpt as dc
from dist_ckpt.errors import CheckpointExists, ChecksumError, UnsafeFileError
from dist_ckpt.loader import read_manifest
from dist_ckpt.storage import get_storage
from dist_ckpt.storage.s3 import OBJECT_RE, S3Storage
from dist_ckpt.storage.s3_client import RetryPolicy, S3Client

FAST = {"DIST_CKPT_HEARTBEAT_INTERVAL_S": "0.2", "DIST_CKPT_HEARTBEAT_TIMEOUT_S": "5", "DIST_CKPT_TIMEOUT_S": "30"}
SHAPES = {"w": (37, 12), "v": (16, 9), "b": (23,)}
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


# -- one process -----------------------------------------------------------------------


def test_save_load_overwrite_in_one_process(s3_bucket, client):
    sd = {"w": torch.arange(3000.0).reshape(30, 100), "b": torch.ones(7), "step": 3}
    path = f"s3://{s3_bucket}/run/ck"
    dc.save(sd, path)
    manifest, root, _ = read_manifest(path)
    assert root == f"{s3_bucket}/run/ck"
    (name,) = manifest.files
    assert name.startswith("data/") and OBJECT_RE.match(name[len("data/") :]), name  # the real object, named with the save id
    assert keys(client) == sorted(["run/ck/MANIFEST", f"run/ck/{name}"])
    out = {"w": torch.zeros(30, 100), "b": torch.zeros(7), "step": 0}
    assert dc.load(out, path)["step"] == 3 and torch.equal(out["w"], sd["w"])

    with pytest.raises(CheckpointExists):
        dc.save(sd, path)
    sd["w"] += 1
    dc.save(sd, path, overwrite=True)
    (new_name,) = read_manifest(path)[0].files
    assert new_name != name
    assert keys(client) == sorted(["run/ck/MANIFEST", f"run/ck/{new_name}"])  # the old save's object is gone
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
    client.put(key, bytes(data))
    with pytest.raises(ChecksumError):
        dc.load({"w": torch.zeros(5000)}, path)


def test_unknown_bucket_and_missing_checkpoint(s3_bucket):
    with pytest.raises(dc.CheckpointNotFound):
        dc.load({"w": torch.zeros(3)}, f"s3://{s3_bucket}/nothing-here")
    storage, path = get_storage(f"s3://{s3_bucket}/x")
    assert isinstance(storage, S3Storage) and path == f"{s3_bucket}/x"
