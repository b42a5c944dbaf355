"""The format-version-2 plan reply: what a rank needs to name its records, without per-chunk arrays.

Every rank already knows its own boxes, so the coordinator does not send it
the (entry, cell) of each tensor it writes. It sends, per plan group, one
**group spec** (the same bytes for every rank of the group, packed once per
plan) from which the rank derives them itself:

* ``code`` per column: its entry for a global tensor, ``-1 - local_pos`` for a
  rank-local one (entry ``local_first + local_pos``, ``local_first`` per rank);
* ``kind`` per column: ``0`` when the entry's split is a grid of even steps with
  affine owners (``a + b * cell``), the common case: the rank finds its cell
  from its box and the steps (and checks box and owner against them); ``1``
  otherwise: the cell comes explicitly in the rank's own part of the reply;
* ``a``, ``b`` per column and ``steps`` per described dim (kind 0 only).

The columns are delta-coded and zlib-compressed: an FSDP group's spec is a few
hundred bytes whatever the number of ranks. See docs/format.md "Version 2"
(the plan reply) and :meth:`dist_ckpt.plan.SavePlan.to_msgpack_for`.

Who runs what: (coordinator) :func:`group_spec` once per group and plan;
(rank) :func:`derive_cells` on its reply, which validates what it derives.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .description import RankColumns, inflate_bounded
from .errors import WireError
from .flatten import format_path
from .split import Split

__all__ = ["GroupSpec", "derive_cells", "group_spec", "spec_kind"]

_I8 = np.dtype("<i8")


@dataclass(frozen=True, eq=False)
class GroupSpec:
    """One group's columns of the spec (see the module docstring)."""

    code: np.ndarray  # (T,) int64
    kind: np.ndarray  # (T,) int64: 0 derive, 1 explicit
    a: np.ndarray  # (T,) int64
    b: np.ndarray  # (T,) int64
    steps: np.ndarray  # (S,) int64, 0 where the column is not kind 0

    def to_bytes(self) -> bytes:
        """Delta-coded, zlib-compressed columns (``code, kind, a, b, steps``, int64 little-endian each)."""
        raw = np.concatenate([self.code, self.kind, self.a, self.b, self.steps]).astype(_I8)
        return zlib.compress(np.diff(raw, prepend=np.zeros(1, _I8)).astype(_I8).tobytes(), 6)

    @staticmethod
    def from_bytes(data: bytes, n_tensors: int, width: int, rank: int) -> GroupSpec:
        """Decode a spec for a schema of ``n_tensors`` tensors and ``width`` described dims (bounded: never more bytes than that).

        Raises:
            WireError: not a spec of exactly that size; names the rank.
        """
        raw = inflate_bounded(data, 8 * (4 * n_tensors + width), "plan reply's group spec", rank)
        cols = np.cumsum(np.frombuffer(raw, _I8), dtype=np.int64)  # wraps like the encoder's diff: exact
        t = n_tensors
        return GroupSpec(cols[:t], cols[t : 2 * t], cols[2 * t : 3 * t], cols[3 * t : 4 * t], cols[4 * t :])


def spec_kind(split: Split) -> int:
    """0 when a rank can derive its cell of ``split`` from its own box (even-step grid, affine owners), else 1."""
    return 0 if split.dims is not None and split.affine is not None and all(isinstance(s, int) for s in split.dims) else 1


def group_spec(code: np.ndarray, splits: list[Split | None], start: np.ndarray, ndim: np.ndarray, width: int) -> GroupSpec:
    """The spec of one group from the split of each of its columns.

    Args:
        code: per column, its entry (global) or ``-1 - local_pos`` (rank-local).
        splits: per column, its entry's split; for a rank-local column the split of any one of its entries
            (they differ only in the owner), or None when no rank of the group writes it.
        start, ndim: the schema's columns: where each tensor's dims start among the described dims, and how many.
    """
    t = len(code)
    kind, a, b = np.ones(t, np.int64), np.zeros(t, np.int64), np.zeros(t, np.int64)
    steps = np.zeros(width, np.int64)
    for col, split in enumerate(splits):
        if split is None or spec_kind(split):
            continue
        assert split.dims is not None and split.affine is not None
        kind[col] = 0
        a[col], b[col] = (-1, 0) if code[col] < 0 else split.affine  # a rank-local tensor: the rank's own, one cell
        steps[start[col] : start[col] + ndim[col]] = split.dims
    return GroupSpec(code.astype(np.int64), kind, a, b, steps)


def derive_cells(spec: GroupSpec, cols: RankColumns, assigned: np.ndarray, local_first: int, explicit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (entry, cell) of each tensor this rank writes, from its group's spec and its own boxes.

    Args:
        spec: the group's spec.
        cols: this rank's description (its schema and boxes).
        assigned: the indices of the tensors it writes, ascending.
        local_first: the entry of its first rank-local tensor.
        explicit: the cells of its kind-1 tensors, in order.

    Returns:
        ``(entries int32, cells int64)`` aligned with ``assigned``.

    Raises:
        WireError: the spec does not fit this rank's boxes: a box that is not a cell of its split, a cell
            whose owner is not this rank, explicit cells not one per kind-1 tensor; names rank, tensor and phase.
    """
    rank = cols.rank
    code, kind = spec.code[assigned], spec.kind[assigned]
    if ((kind != 0) & (kind != 1)).any() or (code < -(1 << 31)).any():
        raise WireError(f"rank {rank}: plan reply (phase plan): group spec has an invalid kind or entry")
    entries = np.where(code >= 0, code, local_first - 1 - code)
    if len(entries) and (int(entries.min()) < 0 or int(entries.max()) >= 1 << 31):
        raise WireError(f"rank {rank}: plan reply (phase plan): an entry outside [0, 2**31)")
    cells = np.empty(len(assigned), np.int64)
    one = kind == 1
    if int(one.sum()) != len(explicit):
        raise WireError(f"rank {rank}: plan reply (phase plan) carries {len(explicit)} explicit cells for {int(one.sum())} tensors")
    cells[one] = explicit
    derive = np.flatnonzero(~one)
    cells[derive] = _own_cells(spec, cols, assigned[derive])
    return entries.astype(np.int32), cells


def _own_cells(spec: GroupSpec, cols: RankColumns, tensors: np.ndarray) -> np.ndarray:
    """The cell of this rank's box of each of ``tensors`` (kind 0), checked: aligned box, this rank the owner."""
    sch, rank, s = cols.schema, cols.rank, cols.schema.width
    cell = np.zeros(len(tensors), np.int64)
    bad = np.zeros(len(tensors), bool)
    nd = sch.ndim[tensors]
    for d in range(int(nd.max()) if len(nd) else 0):  # dim by dim over every tensor at once (row-major cells)
        has = np.flatnonzero(nd > d)
        at = sch.start[tensors[has]] + d
        step, L, off, siz = spec.steps[at], sch.shape_flat[at], cols.boxes[at], cols.boxes[s + at]
        ok = step > 0
        safe = np.where(ok, step, 1)
        k = off // safe
        ok &= (off == k * safe) & (siz == np.minimum(safe, L - off)) & (siz > 0)
        cell[has] = cell[has] * -(-L // safe) + k
        bad[has] |= ~ok
    a, b = spec.a[tensors], spec.b[tensors]
    local = spec.code[tensors] < 0
    bad |= np.where(local, (a != -1) | (b != 0) | (cell != 0), a + b * cell != rank)
    bad |= sch.numel[tensors] == 0  # a zero-element tensor has no cells: nothing of it is written
    if bad.any():
        t = int(tensors[np.flatnonzero(bad)[0]])
        raise WireError(
            f"rank {rank}: plan reply (phase plan): its box of tensor {format_path(sch.keys[t])} is not the cell of the split "
            f"the coordinator sent (steps {spec.steps[sch.start[t] : sch.start[t] + sch.ndim[t]].tolist()}, owner [{int(spec.a[t])}, {int(spec.b[t])}])"
        )
    return cell
