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
``torch``      ``torch.load(mmap=True, weights_only=True)``: tensors stay
               file-backed pages; full unpickling only when ``weights_only``
               refuses the file and ``trust_pickle`` is set
``safetensors`` the header (checked by the safetensors library), then one
               tensor at a time; flat names as in the file (``"model.w"``)
=============  ==========================================================

``select`` keeps only the values whose dotted name (key path joined with
``"."``) is ``select`` or starts with ``select + "."``; ``strip_prefix``
then drops that prefix from their names (``model.w`` → ``w``), e.g. to
export a model's weights from a training checkpoint.

=================  =====================================================================
sink               output and memory
=================  =====================================================================
``dist_ckpt``      a committed checkpoint (``world_size`` 1) loadable by
                   :func:`dist_ckpt.load` on any world size; tensors are written in
                   batches of ~:data:`sinks.BATCH_BYTES` (one data file per batch), cut
                   into dim-0 chunks of at most :data:`sinks.CHUNK_BYTES` so that sharded
                   loads read and verify whole chunks. Memory: one batch.
``dcp``            ``torch.distributed.checkpoint.save`` with a ``FileSystemWriter`` that
                   writes one file per size bucket of ~:data:`sinks.BUCKET_BYTES`, one file
                   at a time: DCP's writer keeps every tensor of a file alive until the
                   file is closed, so memory is one bucket (or the largest tensor).
                   Loadable by ``torch.distributed.checkpoint.load``.
``torch``          one ``torch.save`` file, loadable with ``torch.load(weights_only=True)``.
                   **Not bounded**: ``torch.save`` needs the whole tree in memory.
``safetensors``    tensors only, named by joining key paths with ``"."`` (ambiguous
                   names are refused); plain objects go in the header metadata as
                   JSON, others are skipped and reported. Written tensor by tensor.
=================  =====================================================================

Trust: a DCP directory and a ``torch.save`` file are pickles, so reading them
can execute code. A DCP directory is only read with ``trust_pickle=True``; a
``torch.save`` file is first read with ``weights_only=True`` (plain tensors and
containers convert safely) and needs ``trust_pickle=True`` only when that fails. Values a
dist_ckpt checkpoint holds pickled are never unpickled without it either
(dist_ckpt → dist_ckpt copies them as bytes; safetensors skips them).
"""

from __future__ import annotations

import os
from typing import Any

from ..config import Config
from ..errors import PickleNotAllowed
from ..flatten import KeyPath, flatten
from ..storage import get_storage
from ._common import _ASK_FIRST, _TRUST, FORMATS, ConvertError, ConvertResult, LazyTensor, Meter, Options, Progress, local_path
from .sinks import SINKS, is_tensor, meta
from .sources import SOURCES, _nest, detect_format

__all__ = ["FORMATS", "ConvertError", "ConvertResult", "LazyTensor", "Progress", "convert", "detect_format", "trust_message"]


def trust_message(fmt: str) -> str:
    """Why reading ``fmt`` needs ``trust_pickle`` (for errors and the CLI help)."""
    name, why = _TRUST[fmt]
    return (
        f"reading a {name} checkpoint unpickles it ({why}), and unpickling can execute arbitrary code; "
        "pass --trust-pickle (trust_pickle=True) only for a checkpoint from a source you trust"
    )


def _dotted(key: KeyPath) -> str:
    return ".".join(str(k) for k in key)


def _strip(key: KeyPath, prefix: str) -> KeyPath:
    """``key`` without its leading ``prefix``, which may end inside a component (flat ``"model.w"`` names)."""
    for i in range(1, len(key) + 1):
        joined = _dotted(key[:i])
        if joined == prefix:
            return key[i:]
        if joined.startswith(prefix + "."):
            return (joined[len(prefix) + 1 :],) + key[i:]
    return key


def select_leaves(leaves: dict[KeyPath, Any], select: str, strip_prefix: bool) -> dict[KeyPath, Any]:
    """The leaves named ``select`` or ``select.*`` (dotted names), without that prefix when ``strip_prefix``.

    Raises:
        ConvertError: nothing matches, or stripping leaves a value without a name.
    """
    prefix = select.rstrip(".")
    chosen = {k: v for k, v in leaves.items() if _dotted(k) == prefix or _dotted(k).startswith(prefix + ".")}
    if not chosen:
        names = sorted({str(k[0]) for k in leaves if k})[:10]
        raise ConvertError(f"--select {select!r} matches no value; top-level names: {', '.join(names) or '(none)'}")
    if not strip_prefix:
        return chosen
    out = {_strip(k, prefix): v for k, v in chosen.items()}
    if () in out:
        raise ConvertError(f"--strip-prefix would leave {prefix!r} itself without a name; select its parent or keep the prefix")
    return out


def _check_dst(dst: str, to: str) -> None:
    """Refuse an existing ``dst``, and a non-local one for the formats written as local files.

    Raises:
        ConvertError: ``dst`` exists, or only the dist_ckpt sink can write to its scheme.
    """
    remote = "://" in dst and not dst.startswith("file://")
    if remote and to != "dist_ckpt":
        raise ConvertError(f"--to {to} writes local files; {dst} is not a local path (only --to dist_ckpt writes to {dst.split('://', 1)[0]}://)")
    if remote:
        storage, path = get_storage(dst)
        exists = storage.exists(path)  # on S3: anything stored under the prefix
    else:
        exists = os.path.lexists(local_path(dst))
    if exists:
        raise ConvertError(f"{dst} already exists; refusing to overwrite it")


def convert(
    src: str,
    dst: str,
    to: str,
    *,
    trust_pickle: bool = False,
    pickle_objects: bool = False,
    rank: int = 0,
    progress: Progress | None = None,
    select: str | None = None,
    strip_prefix: bool = False,
    format_version: int | None = None,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into a new ``to``-format checkpoint at ``dst``.

    Args:
        src: a dist_ckpt checkpoint (a local path or any backend's URL, e.g. ``s3://``), a local DCP
            directory, ``torch.save`` or ``.safetensors`` file (detected).
        dst: output path; must not exist. ``s3://`` (or another backend's URL) only with ``to="dist_ckpt"``.
        to: one of :data:`FORMATS`.
        trust_pickle: allow unpickling: needed to read DCP input and ``torch.save`` input
            that ``weights_only=True`` refuses, and to write dist_ckpt values stored
            pickled to DCP or ``torch.save``.
        pickle_objects: (to dist_ckpt) store values that are neither tensors nor
            msgpack-native pickled, instead of refusing them.
        rank: (dist_ckpt input) whose rank-local values to take.
        progress: called with ``(tensor_bytes_done, tensor_bytes_total)``.
        select: keep only the values named ``select`` or ``select.*`` (dotted key paths).
        strip_prefix: (with ``select``) drop the selected prefix from the names.
        format_version: (to dist_ckpt) 1 or 2 (docs/format.md); None: ``Config.from_env().format_version``
            (``DIST_CKPT_FORMAT_VERSION``).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        PickleNotAllowed: the conversion needs unpickling and ``trust_pickle`` is false.
        ConvertError: the target format cannot hold the source (ambiguous names,
            dtype, non-dict root, a value ``weights_only`` rejects); ``dst`` exists;
            ``select`` matches nothing.
        CheckpointNotFound, ManifestError, ChecksumError, DataFileError: bad input.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(src)
    if fmt in _ASK_FIRST and not trust_pickle:
        raise PickleNotAllowed(trust_message(fmt))
    if strip_prefix and select is None:
        raise ConvertError("--strip-prefix (strip_prefix) needs --select PREFIX: the prefix to strip")
    _check_dst(dst, to)
    version = format_version if format_version is not None else Config.from_env().format_version
    if version not in (1, 2):
        raise ValueError(f"format_version must be 1 or 2, got {version!r}")
    opts = Options(fmt, trust_pickle, pickle_objects, version)
    leaves, structure = flatten(SOURCES[fmt](src, rank, trust_pickle))
    if select is not None:
        leaves, structure = flatten(_nest(list(select_leaves(leaves, select, strip_prefix).items())))
    total = sum(meta(v)[2] for v in leaves.values() if is_tensor(v))
    skipped = SINKS[to](leaves, structure, dst, Meter(total, progress), opts)
    n_tensors = sum(1 for v in leaves.values() if is_tensor(v))
    return ConvertResult(fmt, to, dst, n_tensors, len(leaves) - n_tensors, total, skipped)
