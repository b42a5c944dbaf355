"""Converters between dist_ckpt and DCP, ``torch.save`` and safetensors.

Everything runs in one process without a process group. A *source* turns the
input into a tree of plain containers whose tensor leaves are
:class:`LazyTensor` (read only when a sink asks) or tensors already mapped in
memory; a *sink* writes that tree. Every source feeds every sink:

=============  ==========================================================
source         how it is read
=============  ==========================================================
``dist_ckpt``  the manifest, then one tensor at a time with ``read_tensors``
               on a single :class:`~dist_ckpt.reader.ReadTask`; rank-local
               values are those of ``rank`` (default 0)
``dcp``        ``.metadata`` (a pickle), then one tensor at a time through
               DCP's own load planner and ``FileSystemReader``
``torch``      ``torch.load(mmap=True)``: tensors stay file-backed pages
=============  ==========================================================

=================  =====================================================================
sink               output and memory
=================  =====================================================================
``dist_ckpt``      a committed checkpoint (``world_size`` 1) loadable by
                   :func:`dist_ckpt.load` on any world size; tensors are written in
                   batches of ~:data:`sinks.BATCH_BYTES` (one data file per batch), cut
                   into dim-0 chunks of at most :data:`sinks.CHUNK_BYTES` so that sharded
                   loads read and verify whole chunks. Memory: one batch.
``dcp``            ``torch.distributed.checkpoint.save`` with ``FileSystemWriter``
                   and one file per tensor: DCP's writer keeps every tensor of a file
                   alive until the file is closed, so per-tensor files bound memory by
                   the largest tensor. Loadable by ``torch.distributed.checkpoint.load``.
``torch``          one ``torch.save`` file, loadable with ``torch.load(weights_only=True)``.
                   **Not bounded**: ``torch.save`` needs the whole tree in memory.
``safetensors``    tensors only, named by joining key paths with ``"."`` (ambiguous
                   names are refused); plain objects go in the header metadata as
                   JSON, others are skipped and reported. Written tensor by tensor.
=================  =====================================================================

Trust: a DCP directory and a ``torch.save`` file are pickles, so reading them
can execute code; they are only read with ``trust_pickle=True``. Values a
dist_ckpt checkpoint holds pickled are never unpickled without it either
(dist_ckpt → dist_ckpt copies them as bytes; safetensors skips them).
"""

from __future__ import annotations

import os

from ..errors import PickleNotAllowed
from ..flatten import flatten
from ._common import _TRUST, FORMATS, ConvertError, ConvertResult, LazyTensor, Meter, Options, Progress, local_path
from .sinks import SINKS, is_tensor, meta
from .sources import SOURCES, detect_format

__all__ = ["FORMATS", "ConvertError", "ConvertResult", "LazyTensor", "Progress", "convert", "detect_format", "trust_message"]


def trust_message(fmt: str) -> str:
    """Why reading ``fmt`` needs ``trust_pickle`` (for errors and the CLI help)."""
    name, why = _TRUST[fmt]
    return (
        f"reading a {name} checkpoint unpickles it ({why}), and unpickling can execute arbitrary code; "
        "pass --trust-pickle (trust_pickle=True) only for a checkpoint from a source you trust"
    )


def convert(
    src: str, dst: str, to: str, *, trust_pickle: bool = False, pickle_objects: bool = False, rank: int = 0, progress: Progress | None = None
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into a new ``to``-format checkpoint at ``dst``.

    Args:
        src: a dist_ckpt checkpoint, a DCP directory or a ``torch.save`` file (detected).
        dst: output path; must not exist.
        to: one of :data:`FORMATS`.
        trust_pickle: allow unpickling: needed to read DCP and ``torch.save`` input,
            and to write dist_ckpt values stored pickled to DCP or ``torch.save``.
        pickle_objects: (to dist_ckpt) store values that are neither tensors nor
            msgpack-native pickled, instead of refusing them.
        rank: (dist_ckpt input) whose rank-local values to take.
        progress: called with ``(tensor_bytes_done, tensor_bytes_total)``.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        PickleNotAllowed: the conversion needs unpickling and ``trust_pickle`` is false.
        ConvertError: the target format cannot hold the source (ambiguous names,
            dtype, non-dict root, a value ``weights_only`` rejects); ``dst`` exists.
        CheckpointNotFound, ManifestError, ChecksumError, DataFileError: bad input.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(src)
    if fmt in _TRUST and not trust_pickle:
        raise PickleNotAllowed(trust_message(fmt))
    if os.path.lexists(local_path(dst)):
        raise ConvertError(f"{dst} already exists; refusing to overwrite it")
    opts = Options(fmt, trust_pickle, pickle_objects)
    leaves, structure = flatten(SOURCES[fmt](src, rank))
    total = sum(meta(v)[2] for v in leaves.values() if is_tensor(v))
    skipped = SINKS[to](leaves, structure, dst, Meter(total, progress), opts)
    n_tensors = sum(1 for v in leaves.values() if is_tensor(v))
    return ConvertResult(fmt, to, dst, n_tensors, len(leaves) - n_tensors, total, skipped)
