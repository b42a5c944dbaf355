"""The ``dist-ckpt`` command on s3:// paths (ls, inspect, verify, convert both ways, gc), against the real moto server.

Checkpoints are saved with ``dc.save`` in one process; the server's endpoint and
test credentials come from the ``s3_bucket`` fixture's AWS_* variables, as a
user's would. Damage and leftovers are made with the real client at the HTTP
boundary: a rewritten object, an object no MANIFEST names, an unfinished
multipart upload.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("boto3", reason="boto3 is not installed: pip install -e '.[test]'")

import dist_ckpt as dc
from dist_ckpt.cli import main
from dist_ckpt.loader import read_manifest
from dist_ckpt.storage.s3 import object_name
from dist_ckpt.storage.s3_client import S3Client


def _state(step: int) -> dict:
    return {"model": {"w": torch.arange(24.0).reshape(8, 3) + step, "b": torch.ones(5)}, "step": step}


def _target() -> dict:
    return {"model": {"w": torch.zeros(8, 3), "b": torch.zeros(5)}, "step": 0}


@pytest.fixture
def client(s3_bucket):
    c = S3Client(s3_bucket)
    yield c
    c.close()


def _keys(client: S3Client, prefix: str) -> list[str]:
    return sorted(o.key for o in client.list(prefix))


def test_ls_on_s3_lists_states_sizes_and_the_newest(s3_bucket, client, capsys):
    root = f"s3://{s3_bucket}/run"
    dc.save(_state(1), f"{root}/step-00000001")
    dc.save(_state(2), f"{root}/step-00000002")
    client.put("run/step-00000003/" + object_name("killedsave", "data/r00000.bin"), b"x" * 100)  # a save that never committed
    client.put("run/step-00000004/.metadata", b"dcp")  # someone else's checkpoint under a step name
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    rows = {line[2:].split()[0]: line for line in out.splitlines()[1:5]}  # "* name  state  size  world  age"
    assert rows["step-00000002"].startswith("* ") and "committed" in rows["step-00000002"]
    name, state, size, unit, world, age = rows["step-00000001"].split()
    assert state == "committed" and unit in ("B", "KiB") and float(size) > 0 and world == "1" and age.endswith("s")  # sizes and ages from the LIST
    assert "incomplete" in rows["step-00000003"] and "100 B" in rows["step-00000003"]
    assert "foreign" in rows["step-00000004"]
    assert "step-00000004: holds a DCP checkpoint (.metadata)" in out and "newest committed: step-00000002" in out
    assert main(["ls", f"s3://{s3_bucket}/nothing-here"]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_inspect_and_verify_on_s3_and_a_flipped_byte(s3_bucket, client, capsys):
    path = f"s3://{s3_bucket}/run/step-00000002"
    dc.save(_state(2), path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint  {path}" in out and "float32 [8, 3]" in out and "step   = 2" in out
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == path and sorted(t["name"] for t in info["tensors"]) == ["model.b", "model.w"]
    assert main(["verify", path, "--no-progress"]) == 0
    assert f"OK  {path}: 2 chunks" in capsys.readouterr().out

    assert main(["inspect", f"s3://{s3_bucket}/run"]) == 1  # the root, not a checkpoint: says what to run
    assert f"dist-ckpt inspect s3://{s3_bucket}/run/step-00000002" in capsys.readouterr().err

    (name,) = read_manifest(path)[0].files
    key = f"run/step-00000002/{name}"
    data = bytearray(client.get(key, 1 << 20))
    data[3] ^= 0xFF  # inside model.w or model.b: one chunk goes bad
    client.put(key, bytes(data))
    assert main(["verify", path, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED  {path}: 1 bad chunk(s)" in out and f"file {name}" in out


def test_convert_s3_to_local_and_local_to_s3(s3_bucket, tmp_path, capsys):
    src = f"s3://{s3_bucket}/run/step-00000005"
    dc.save(_state(5), src)
    local = str(tmp_path / "copy")
    assert main(["convert", src, local, "--to", "dist_ckpt", "--no-progress"]) == 0
    back = f"s3://{s3_bucket}/imported/step-00000000"
    assert main(["convert", local, back, "--to", "dist_ckpt", "--no-progress"]) == 0
    assert f"wrote {back} (dist_ckpt)" in capsys.readouterr().out
    for path in (local, back):
        out = dc.load(_target(), path)
        assert out["step"] == 5 and torch.equal(out["model"]["w"], _state(5)["model"]["w"]), path
    assert main(["convert", src, str(tmp_path / "m.safetensors"), "--to", "safetensors", "--no-progress"]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["model.w"], _state(5)["model"]["w"])

    assert main(["convert", local, back, "--to", "dist_ckpt", "--no-progress"]) == 1  # the sink is never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", src, f"s3://{s3_bucket}/x.safetensors", "--to", "safetensors", "--no-progress"]) == 1
    assert "--to safetensors writes local files" in capsys.readouterr().err


def test_gc_on_s3_retention_and_unreferenced_objects(s3_bucket, client, capsys):
    root = f"s3://{s3_bucket}/run"
    for step in (1, 2, 3):
        dc.save(_state(step), f"{root}/step-0000000{step}")
    leftover = "run/step-00000003/" + object_name("killedsave", "data/r00001.bin")  # a killed rank's completed object
    client.put(leftover, b"y" * 64)
    upload_key = "run/step-00000003/" + object_name("killedsave", "data/r00002.bin")  # a killed rank's unfinished upload
    upload = client.raw.create_multipart_upload(Bucket=s3_bucket, Key=upload_key)["UploadId"]
    client.put("run/notes.txt", b"not ours")
    committed = {s: _keys(client, f"run/step-0000000{s}/") for s in (2, 3)}
    before = _keys(client, "run/")

    assert main(["gc", root, "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove step-00000001  (retention: keeping the last 2" in out and "not collected (--dry-run)" in out
    assert f"would remove s3://{s3_bucket}/{leftover}" in out and upload in out  # the preview names the unreferenced objects and uploads
    assert main(["gc", root, "--min-age", "3600"]) == 0  # a save may be in flight: its objects have no MANIFEST yet
    assert "not collected (--min-age" in capsys.readouterr().out
    assert _keys(client, "run/") == before and list(client.list_uploads("run/")) == [(upload_key, upload)]

    assert main(["gc", root, "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert "removed step-00000001" in out and f"removed s3://{s3_bucket}/{leftover}" in out and upload in out
    assert _keys(client, "run/step-00000001/") == []
    assert _keys(client, "run/step-00000002/") == committed[2]
    assert _keys(client, "run/step-00000003/") == [k for k in committed[3] if k != leftover]
    assert list(client.list_uploads("run/")) == []
    assert client.head("run/notes.txt") is not None  # not ours: never touched
    assert dc.load(_target(), f"{root}/step-00000003")["step"] == 3
    assert main(["gc", root, "--keep-last", "2"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


MIN_AGE = 6.0  # gc --min-age of the test below


def test_gc_min_age_on_s3_spares_a_save_in_flight(s3_bucket, client, capsys):
    root = f"s3://{s3_bucket}/run"
    dc.save(_state(1), f"{root}/step-00000001")
    dead = "run/step-00000001/" + object_name("killedsave", "data/r00001.bin")  # a killed save's leftovers
    client.put(dead, b"y" * 64)
    dead_key = "run/step-00000001/" + object_name("killedsave", "data/r00002.bin")
    dead_upload = client.raw.create_multipart_upload(Bucket=s3_bucket, Key=dead_key)["UploadId"]
    client.raw.upload_part(Bucket=s3_bucket, Key=dead_key, UploadId=dead_upload, PartNumber=1, Body=b"p" * 100)
    # The store's LastModified is in whole seconds (up to 1 s early), so the save in flight below must be written, given
    # its part and listed within MIN_AGE - 1 s: 1.5 s (with 2.5) was too little for a loaded machine; the dead one is older.
    time.sleep(MIN_AGE + 0.5)
    young = "run/step-00000002/" + object_name("inflight", "data/r00000.bin")  # a save in flight: done object, no MANIFEST yet
    client.put(young, b"z" * 64)
    young_key = "run/step-00000002/" + object_name("inflight", "data/r00001.bin")
    young_upload = client.raw.create_multipart_upload(Bucket=s3_bucket, Key=young_key)["UploadId"]
    client.raw.upload_part(Bucket=s3_bucket, Key=young_key, UploadId=young_upload, PartNumber=1, Body=b"p" * 100)  # its writer is uploading
    assert main(["gc", root, "--min-age", str(MIN_AGE)]) == 0
    out = capsys.readouterr().out
    assert f"removed s3://{s3_bucket}/{dead}" in out and dead_upload in out
    assert young not in out and young_upload not in out and f"younger than {MIN_AGE:g} s: not collected" in out
    assert client.head(dead) is None and client.head(young) is not None
    assert [u for _, u in client.list_uploads("run/")] == [young_upload]
    assert dc.load(_target(), f"{root}/step-00000001")["step"] == 1
