"""Crafted checkpoint files: FIFOs, links and endless files are refused, never read (no hang, no unbounded read)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dist_ckpt as dc
from dist_ckpt.errors import DataFileError, UnsafeFileError
from dist_ckpt.storage.local import LocalStorage
from dist_ckpt.verify import READ_ERROR, verify

pytestmark = pytest.mark.timeout(30)  # the bugs these cover were hangs


def _saved(tmp_path) -> tuple[str, dict]:
    sd = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "step": 3}
    path = str(tmp_path / "ck")
    dc.save(sd, path)
    return path, sd


def _target() -> dict:
    return {"w": torch.zeros(64, 64), "step": 0}


def _data_file(path: str) -> str:
    (name,) = [n for n in os.listdir(f"{path}/data") if n.endswith(".bin")]  # the data file (a v2 save also has its fragment)
    return f"{path}/data/{name}"


def test_fifo_manifest_is_refused_by_load_verify_convert_and_resume(tmp_path):
    root = tmp_path / "run"
    mgr = dc.CheckpointManager(str(root), async_save=False)
    mgr.save(1, {"w": torch.ones(8)})
    step = mgr.path_for(1)
    mgr.close()
    os.remove(f"{step}/MANIFEST")
    os.mkfifo(f"{step}/MANIFEST")
    with pytest.raises(UnsafeFileError, match=r"MANIFEST is a FIFO, not a regular file"):
        dc.load({"w": torch.zeros(8)}, step)
    with pytest.raises(UnsafeFileError, match="FIFO"):
        verify(step)
    with pytest.raises(UnsafeFileError, match="FIFO"):
        dc.convert(step, str(tmp_path / "out"), "safetensors")
    mgr = dc.CheckpointManager(str(root), async_save=False)
    try:
        with pytest.raises(UnsafeFileError, match="FIFO"):
            mgr.load({"w": torch.zeros(8)})
    finally:
        mgr.close()


def test_fifo_data_file_is_refused_by_load_and_verify(tmp_path):
    path, _ = _saved(tmp_path)
    data = _data_file(path)
    os.remove(data)
    os.mkfifo(data)
    with pytest.raises(DataFileError, match=r"cannot open data file .*r00000\.bin.* is a FIFO, not a regular file"):
        dc.load(_target(), path)
    report = verify(path)
    assert not report.ok and {b.reason for b in report.bad} == {READ_ERROR} and "FIFO" in report.bad[0].detail


def test_manifest_linked_to_dev_zero_is_refused_unread(tmp_path):
    path, _ = _saved(tmp_path)
    os.remove(f"{path}/MANIFEST")
    os.symlink("/dev/zero", f"{path}/MANIFEST")
    with pytest.raises(UnsafeFileError, match="MANIFEST is a symbolic link"):
        dc.load(_target(), path)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        verify(path)


@pytest.mark.parametrize("what", ["file", "dir"])
def test_data_linked_outside_the_checkpoint_is_not_followed(tmp_path, what):
    path, sd = _saved(tmp_path)
    outside = tmp_path / "outside"
    data = _data_file(path)
    if what == "file":  # the same bytes outside: checksums alone would not notice
        outside.mkdir()
        shutil.copy(data, outside / "copy.bin")
        os.remove(data)
        os.symlink(outside / "copy.bin", data)
        where = os.path.basename(data)
    else:
        shutil.copytree(f"{path}/data", outside)
        shutil.rmtree(f"{path}/data")
        os.symlink(outside, f"{path}/data")
        where = "data"
    with pytest.raises(DataFileError, match=rf"{where} is a symbolic link"):
        dc.load(_target(), path)
    report = verify(path)
    assert not report.ok and report.bad[0].reason == READ_ERROR and "symbolic link" in report.bad[0].detail


def test_read_bytes_reads_at_most_the_cap_and_only_regular_files(tmp_path):
    f = tmp_path / "m"
    f.write_bytes(b"x" * 5000)
    storage = LocalStorage()
    assert storage.read_bytes(str(f)) == b"x" * 5000
    with pytest.raises(UnsafeFileError, match=r"is 5000 bytes, more than the 4096"):
        storage.read_bytes(str(f), max_bytes=4096)
    with pytest.raises(UnsafeFileError, match="directory"):
        storage.read_bytes(str(tmp_path))
    with pytest.raises(UnsafeFileError, match="character device"):
        storage.open_read("/dev/zero")
