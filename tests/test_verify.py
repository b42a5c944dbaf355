"""verify(): every chunk re-hashed; corruption, truncation and missing files reported, not raised."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import dist_ckpt as dc
from dist_ckpt.commit import MANIFEST
from dist_ckpt.loader import read_manifest
from dist_ckpt.verify import CHECKSUM_MISMATCH, FILE_MISSING, FILE_TRUNCATED, verify

verify_mod = importlib.import_module("dist_ckpt.verify")  # the module, even if the package re-exports a function of the same name


def _save(path: str) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "model": {"w": torch.randn(64, 33, generator=g), "b": torch.randn(7, generator=g), "layers": [torch.arange(100, dtype=torch.int16)]},
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 5),
        "rng": dc.rank_local(torch.arange(12, dtype=torch.uint8)),
        "step": 9,
    }
    dc.save(sd, path)


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "ck")
    _save(path)
    return path


def _chunk(path: str, key: tuple, local_rank: int | None = None):
    m, _, _ = read_manifest(path)
    e = m.tensors[key] if local_rank is None else m.local[local_rank].tensors[key]
    return m.files[int(e.chunks.file[0])], int(e.chunks.offset[0]), int(e.chunks.nbytes[0])


def verify_total(path: str) -> int:
    m, _, _ = read_manifest(path)
    entries = list(m.tensors.values()) + [e for sec in m.local.values() for e in sec.tensors.values()]
    return sum(int(e.chunks.nbytes.sum()) for e in entries)


def _flip(path: str, name: str, pos: int) -> None:
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))


def test_clean_checkpoint_checks_every_chunk(ckpt):
    m, _, _ = read_manifest(ckpt)
    entries = list(m.tensors.values()) + [e for sec in m.local.values() for e in sec.tensors.values()]
    seen = []
    report = verify(ckpt, workers=3, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and report.bad == []
    assert report.chunks_checked == sum(len(e.chunks) for e in entries)
    assert report.bytes_checked == sum(int(e.chunks.nbytes.sum()) for e in entries) == 64 * 33 * 4 + 7 * 4 + 200 + 4 + 12
    assert seen[0] == (0, report.bytes_checked) and seen[-1] == (report.bytes_checked, report.bytes_checked)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_anywhere_in_a_chunk_is_caught(ckpt, where):
    name, offset, nbytes = _chunk(ckpt, ("model", "w"))
    _flip(ckpt, name, offset + {"first": 0, "middle": nbytes // 2, "last": nbytes - 1}[where])
    report = verify(ckpt)
    assert not report.ok
    assert [(b.key, b.file, b.offset, b.nbytes, b.reason) for b in report.bad] == [(("model", "w"), name, offset, nbytes, CHECKSUM_MISMATCH)]


def test_rank_local_tensors_are_checked(ckpt):
    name, offset, _ = _chunk(ckpt, ("rng",), local_rank=0)
    _flip(ckpt, name, offset + 3)
    (bad,) = verify(ckpt).bad
    assert (bad.key, bad.rank, bad.reason) == (("rng",), 0, CHECKSUM_MISMATCH)


def test_truncated_data_file(ckpt):
    name, offset, nbytes = _chunk(ckpt, ("model", "w"))
    full = os.path.join(ckpt, name)
    os.truncate(full, offset + nbytes - 1)
    report = verify(ckpt)
    assert not report.ok
    reasons = {b.key: b.reason for b in report.bad}
    assert reasons[("model", "w")] == FILE_TRUNCATED
    assert set(reasons.values()) == {FILE_TRUNCATED}  # chunks before the cut still verify
    assert report.bytes_checked == verify_total(ckpt) - sum(b.nbytes for b in report.bad)  # the cut chunks are not read


def test_missing_data_file_reports_every_chunk_in_it(ckpt):
    m, _, _ = read_manifest(ckpt)
    os.remove(os.path.join(ckpt, m.files[0]))
    report = verify(ckpt)
    assert not report.ok and {b.reason for b in report.bad} == {FILE_MISSING}
    in_file = sum(int(((e.chunks.file == 0) & (e.chunks.nbytes > 0)).sum()) for e in list(m.tensors.values()) + list(m.local[0].tensors.values()))
    assert len(report.bad) == in_file and all(b.file == m.files[0] for b in report.bad)


def test_segments_and_streamed_chunks_agree(ckpt, monkeypatch):
    """With a tiny block, small chunks share reads and a large one is streamed piece by piece."""
    monkeypatch.setattr(verify_mod, "BLOCK", 4096 + 512)
    assert verify(ckpt, workers=1).ok
    name, offset, nbytes = _chunk(ckpt, ("model", "w"))  # 8448 bytes: streamed in 2 pieces
    _flip(ckpt, name, offset + nbytes - 2)
    (bad,) = verify(ckpt, workers=4).bad
    assert bad.key == ("model", "w") and bad.reason == CHECKSUM_MISMATCH


def test_missing_or_invalid_manifest_raises(tmp_path, ckpt):
    with pytest.raises(dc.CheckpointNotFound):
        verify(str(tmp_path / "nothing"))
    with open(os.path.join(ckpt, MANIFEST), "wb") as f:
        f.write(b"\xc1 not msgpack")
    with pytest.raises(dc.ManifestError):
        verify(ckpt)
    with pytest.raises(ValueError, match="workers"):
        verify(ckpt, workers=0)
