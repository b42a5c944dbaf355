"""The save plan: who writes which chunk, as sent to the ranks and used by the merge.

:func:`dist_ckpt.planner.plan_save` makes a :class:`SavePlan`; the coordinator
keeps the last one in a :class:`PlanCache`, sends each rank its row
(:meth:`SavePlan.to_msgpack_for`, parsed by :meth:`SavePlan.parse_rank_plan`)
and places the written chunks in the manifest through :attr:`SavePlan.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import msgpack
import numpy as np

from .boxes import KeyPath
from .description import Schema
from .errors import WireError
from .layout import ChunkLayout, chunk_layout

__all__ = ["PlanCache", "PlanGroup", "SavePlan"]


@dataclass(frozen=True, eq=False)
class PlanGroup:
    """The ranks that share one schema: their boxes and what each of them writes.

    Manifest entries are numbered: global tensors ``0 .. len(plan.keys)-1`` in
    order of first appearance (by rank, then schema order), then the rank-local
    tensors of each group, ``local_base + row * n_local + local_pos[column]``.
    """

    schema: Schema
    ranks: np.ndarray  # (R,) ascending
    writes: np.ndarray  # (R, T) bool: row r writes its tensor (column) t
    col_entry: np.ndarray  # (T,) entry of a global column; -1 for a rank-local one
    local_pos: np.ndarray  # (T,) a rank-local column's key among the schema's local keys; -1 otherwise
    local_keys: tuple[KeyPath, ...]  # distinct rank-local keys, in schema order
    local_base: int

    def entries(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Manifest entry of the chunk in column ``cols[i]`` of row ``rows[i]``."""
        ent = self.col_entry[cols]
        local = ent < 0
        if local.any():
            ent = ent.copy()
            ent[local] = self.local_base + rows[local] * len(self.local_keys) + self.local_pos[cols[local]]
        return ent


@dataclass(frozen=True, eq=False)
class SavePlan:
    """Who writes what, and where in the manifest each written chunk goes.

    ``writes[rank]`` (built on demand) indexes that rank's described tensors.
    """

    ranks: np.ndarray  # (W,) ascending
    loads: np.ndarray  # (W,) bytes each rank writes
    groups: tuple[PlanGroup, ...]
    keys: tuple[KeyPath, ...]  # global entries
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> ChunkLayout:
        """Where each written chunk lands in the manifest.

        Built on first use from the boxes the plan was made from, which are
        then dropped: the coordinator asks for it once the replies are out,
        while the ranks write.
        """
        found = self._memo.get("layout")
        if found is None:
            boxes, n_entries = self._memo.pop("boxes")
            found = self._memo["layout"] = chunk_layout(list(self.groups), boxes, n_entries)
        return found

    def where(self, rank: int) -> tuple[int, int] | None:
        """``(group, row)`` of ``rank``, or ``None`` if it took no part."""
        return self._row_of().get(rank)

    @property
    def n_entries(self) -> int:
        return len(self.keys) + sum(len(g.ranks) * len(g.local_keys) for g in self.groups)

    def _row_of(self) -> dict[int, tuple[int, int]]:
        found = self._memo.get("rows")
        if found is None:
            found = self._memo["rows"] = {r: (gi, row) for gi, g in enumerate(self.groups) for row, r in enumerate(g.ranks.tolist())}
        return found

    @property
    def writes(self) -> dict[int, tuple[int, ...]]:
        """``{rank: indices of the tensors it writes}`` for every rank."""
        found = self._memo.get("writes")
        if found is None:
            out = {}
            for g in self.groups:
                rows, cols = np.nonzero(g.writes)
                bounds = np.searchsorted(rows, np.arange(len(g.ranks) + 1)).tolist()
                out.update((r, tuple(cols[bounds[i] : bounds[i + 1]].tolist())) for i, r in enumerate(g.ranks.tolist()))
            found = self._memo["writes"] = dict(sorted(out.items()))
        return found

    @property
    def bytes_per_rank(self) -> dict[int, int]:
        return dict(zip(self.ranks.tolist(), self.loads.tolist()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavePlan) and self.writes == other.writes and self.bytes_per_rank == other.bytes_per_rank

    def to_msgpack_for(self, rank: int) -> bytes:
        """The plan of one rank, as sent in the coordinator's reply: ``[n_tensors, bitmap]``."""
        where = self._row_of().get(rank)
        if where is None:
            return msgpack.packb([0, b""], use_bin_type=True)
        gi, row = where
        bits = self._memo.get(("bits", gi))
        if bits is None:  # one packbits per group, not per rank
            bits = self._memo[("bits", gi)] = np.packbits(self.groups[gi].writes, axis=1, bitorder="little")
        return msgpack.packb([self.groups[gi].writes.shape[1], bits[row].tobytes()], use_bin_type=True)

    @staticmethod
    def parse_rank_plan(data: bytes, n_tensors: int) -> tuple[int, ...]:
        """Decode one rank's plan: the indices (below ``n_tensors``) it writes, ascending.

        Raises:
            WireError: on anything that is not a plan for ``n_tensors`` tensors.
        """
        try:
            obj = msgpack.unpackb(data, raw=False, use_list=True, max_str_len=0, max_array_len=2, max_map_len=0, max_ext_len=0)
        except Exception as e:
            raise WireError(f"save plan is not valid msgpack ({type(e).__name__}: {e})") from e
        if type(obj) is not list or len(obj) != 2 or type(obj[0]) is not int or type(obj[1]) is not bytes:
            raise WireError("save plan must be [n_tensors, bitmap]")
        n, bits = obj
        if n != n_tensors or len(bits) != -(-n // 8):
            raise WireError(f"save plan is for {n} tensors in {len(bits)} bytes; this rank described {n_tensors}")
        mask = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
        if mask[n:].any():
            raise WireError("save plan sets bits past its last tensor")
        return tuple(np.flatnonzero(mask).tolist())


class PlanCache:
    """Remembers the last plan, keyed by every rank's ``(rank, digest)``."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] | None = None
        self._plan: SavePlan | None = None

    @staticmethod
    def _norm(digests: Mapping[int, int] | Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        items = digests.items() if isinstance(digests, Mapping) else digests
        return tuple(sorted((int(r), int(d)) for r, d in items))

    def lookup(self, digests: Mapping[int, int] | Iterable[tuple[int, int]]) -> SavePlan | None:
        """The cached plan if every rank's digest (and the set of ranks) is unchanged."""
        return self._plan if self._key is not None and self._norm(digests) == self._key else None

    def store(self, digests: Mapping[int, int] | Iterable[tuple[int, int]], plan: SavePlan) -> None:
        self._key, self._plan = self._norm(digests), plan

    def clear(self) -> None:
        """Forget the plan (a big one is worth freeing before its successor is built)."""
        self._key, self._plan = None, None
