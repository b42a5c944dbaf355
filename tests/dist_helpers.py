"""Shared pieces of the multi-rank tests: meshes, DTensors, global reference tensors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dist_ckpt as dc
from dist_ckpt.config import Config
from dist_ckpt.manifest import ALIGN, BLOCK_BYTES, ChunkTable, block_counts
from dist_ckpt.storage.local import LocalReadHandle, LocalStorage, LocalWriteStream

PLACEMENTS = {
    "shard0": ((None,), lambda: [Shard(0)]),
    "shard1": ((None,), lambda: [Shard(1)]),
    "replicate": ((None,), lambda: [Replicate()]),
    "rep_shard0_2d": ((2, 2), lambda: [Replicate(), Shard(0)]),
    "shard0_shard1_2d": ((2, 2), lambda: [Shard(0), Shard(1)]),
}


def rank_files(ranks: Iterable[int]) -> set[str]:
    """What ``ranks`` write into a checkpoint under the format this environment's saves use (``DIST_CKPT_FORMAT_VERSION``).

    Version 1: ``data/rNNNNN.bin``; version 2: that and the rank's fragment ``data/rNNNNN.frag``.
    """
    exts = ("bin", "frag") if Config.from_env().format_version == 2 else ("bin",)
    return {f"data/r{r:05d}.{ext}" for r in ranks for ext in exts}


def global_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same tensor on every rank (seeded by name)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g).to(dtype)


def mesh_for(world: int, shape: tuple) -> object:
    if shape == (None,):
        return init_device_mesh("cpu", (world,))
    return init_device_mesh("cpu", shape)


def dtensor(t: torch.Tensor, world: int, layout: str) -> DTensor:
    """Distribute ``t`` (present on every rank) without communication."""
    mesh_shape, placements = PLACEMENTS[layout]
    return distribute_tensor(t, mesh_for(world, mesh_shape), placements(), src_data_rank=None)


def checkpointer_load(path: str) -> dict:
    """Everything saved at ``path`` (no target), through a sync checkpointer closed again (conftest fails a test that leaves one open)."""
    with dc.make_sync_checkpointer() as ck:
        return ck.load(path)


class FailingStorage(LocalStorage):
    """A local storage whose data-file writes raise ``OSError(errno_, text)`` (fault injection).

    Module-level, so that it pickles to a writer subprocess (process mode).
    """

    def __init__(self, errno_: int, text: str) -> None:
        self.errno_, self.text = errno_, text

    def open_stream(self, target, name):
        return _FailingStream(f"{target.location}/{name}", self.errno_, self.text)


class _FailingStream(LocalWriteStream):
    def __init__(self, path: str, errno_: int, text: str) -> None:
        super().__init__(path)
        self.errno_, self.text = errno_, text

    def _write(self, data, offset):
        raise OSError(self.errno_, self.text)


def failing_storage(errno_: int, text: str) -> FailingStorage:
    """A :class:`FailingStorage` raising ``OSError(errno_, text)`` on every data-file write."""
    return FailingStorage(errno_, text)


class CountingStorage(LocalStorage):
    """A local storage whose read handles add the bytes they return to :attr:`counted` (what a load reads)."""

    def __init__(self) -> None:
        self.counted = [0]

    def open_read(self, p):
        return _CountingReadHandle(p, self.counted)


class _CountingReadHandle(LocalReadHandle):
    def __init__(self, path: str, counted: list[int]) -> None:
        super().__init__(path)
        self.counted = counted

    def preadv(self, buffers, offset):
        n = super().preadv(buffers, offset)
        self.counted[0] += n
        return n


def as_v1(path: str) -> None:
    """Rewrite the checkpoint at ``path`` with its MANIFEST in format version 1 (a version-2 one's fragments
    are then unused): for tests that craft the v1 chunk tables of a checkpoint saved in either version."""
    from dist_ckpt.loader import read_manifest

    manifest, root, _ = read_manifest(path)
    with open(f"{root}/MANIFEST", "wb") as f:
        f.write(manifest.to_msgpack())


def chunk_table(boxes, ranks, itemsize=4, blocks=False) -> ChunkTable:
    """A v1 chunk table of ``boxes`` ((offsets, sizes) pairs), box i written by rank ``ranks[i]`` into file ``ranks[i]``."""
    nd = len(boxes[0][0]) if boxes else 0
    off = np.array([b[0] for b in boxes], np.int64).reshape(len(boxes), nd)
    siz = np.array([b[1] for b in boxes], np.int64).reshape(len(boxes), nd)
    nbytes = (np.prod(siz, axis=1) if nd else np.ones(len(boxes))).astype(np.int64) * itemsize
    pos = np.concatenate([[0], np.cumsum(-(-nbytes // ALIGN) * ALIGN)[:-1]]).astype(np.int64)
    xxh = np.arange(100, 100 + len(boxes), dtype=np.uint64)
    blk = np.arange(int(block_counts(nbytes, BLOCK_BYTES).sum()), dtype=np.uint64) + 7 if blocks else None
    return ChunkTable(off, siz, np.asarray(ranks, np.int32), pos, nbytes, xxh, blk, BLOCK_BYTES if blocks else 0)
