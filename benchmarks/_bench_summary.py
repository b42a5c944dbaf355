"""From the jobs' per-repetition results to the figures, the ceilings, the ratios and the targets.

Pure data: ``bench_checkpoint.py`` hands in what the jobs wrote, gets back
the dict it prints as the table and the JSON line. Medians over repetitions;
the paired ratios take each repetition's own pair (they ran back to back, so
drift cancels).

Ceilings are measured in the same run as the libraries: the write ceiling is
the best of the raw writers (1, 2 and 4 threads, one file each, per rank;
O_DIRECT), the cold and warm read ceilings the best of the raw readers (1, 2
and 4 threads per rank over each rank's share, into the load target's own
tensors), the memcpy ceiling one copy of every rank's local tensors. A
ceiling's variants are the contenders whose name starts with ``disk``. The
same raw reads into one reused buffer per thread (``reuse*``, cache-resident,
a task no load can do) are reported beside them (``*_reused_buffer_GBps``),
not used as a ceiling.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

NAN = float("nan")

# Issue 18's targets, marked per row of the table: ratio key (a per-world key
# such as ``reshard_load_vs_dcp_4to2`` takes its family's) -> (comparison, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "save_vs_write_ceiling": (">=", 0.9),
    "save_vs_dcp": (">=", 1.5),
    "load_vs_read_ceiling": (">=", 0.95),
    "load_vs_dcp": (">=", 1.0),
    "load_warm_vs_warm_ceiling": (">=", 0.7),
    "reshard_load_vs_read_ceiling": (">=", 0.95),
    "reshard_load_vs_dcp": (">=", 1.0),
    "reshard_load_warm_vs_warm_ceiling": (">=", 0.7),
    "async_block_vs_memcpy": ("<=", 1.3),
    "async_total_vs_blocked_plus_save": ("<=", 1.2),
    "staging_vs_pinned": (">=", 0.8),
}
# DESIGN §7's numbers, reported beside them (``design_targets_met``).
DESIGN_TARGETS: dict[str, tuple[str, float]] = {
    "save_vs_dcp": (">=", 1.5),
    "save_vs_write_ceiling": (">=", 0.8),
    "load_vs_dcp": (">=", 1.5),
    "reshard_load_vs_dcp": (">=", 1.5),
    "async_block_vs_dcp": ("<=", 0.5),
    "staging_vs_pinned": (">=", 0.8),
}
_PER_WORLD = re.compile(r"^(.*)_\d+to\d+$")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def gbps(reps: list[dict[str, float]], nbytes: int) -> list[float]:
    """GB/s of each repetition (a rep's own byte count wins: the disk items write whole pieces)."""
    return [r.get("bytes", nbytes) / r["s"] / 1e9 for r in reps]


def ratio(x: float, y: float) -> float:
    return x / y if y and y == y and x == x else NAN


def paired(xs: list[float], ys: list[float]) -> float:
    """Median of per-repetition ratios: each pair ran back to back, so drift cancels."""
    return med([ratio(x, y) for x, y in zip(xs, ys)])


def variants(d: dict[str, Any], prefix: str = "disk") -> list[str]:
    """The ceiling's variants among a step's contenders (named ``disk*``; the S3 run's are ``raw_*``)."""
    return sorted(k for k in d if k.startswith(prefix))


def best(d: dict[str, float], prefix: str = "disk") -> float:
    """The ceiling: the best of its variants' figures (NaN when none ran)."""
    return max((d[k] for k in variants(d, prefix)), default=NAN)


def best_per_rep(d: dict[str, list[float]], prefix: str = "disk") -> list[float]:
    """Each repetition's best variant, for the paired ratios against a ceiling."""
    return [max(xs) for xs in zip(*(d[k] for k in variants(d, prefix)))]


def meets(value: float | None, op: str, bound: float) -> bool | None:
    if value is None or value != value:
        return None
    return value >= bound if op == ">=" else value <= bound


def target_of(key: str, table: dict[str, tuple[str, float]]) -> tuple[str, float] | None:
    """The target of ratio ``key`` in ``table``: its own, or its family's for a per-world key."""
    if key in table:
        return table[key]
    m = _PER_WORLD.match(key)
    return table.get(m.group(1)) if m else None


def targets_met(ratios: dict[str, float], table: dict[str, tuple[str, float]]) -> dict[str, bool | None]:
    """``{ratio key: met?}`` for every ratio with a target (None: not measured)."""
    return {k: meets(v, *t) for k, v in ratios.items() if (t := target_of(k, table)) is not None}


def _per_rep(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int) -> dict[str, Any]:
    """Every repetition's figure: GB/s for saves and loads, seconds for async saves and the memcpy."""
    n = main["total_bytes"]
    return {
        "save_GBps": {k: gbps(v, n) for k, v in main["sync"].items()},
        "save_s": {k: [r["s"] for r in v] for k, v in main["sync"].items()},
        "load_GBps": {k: gbps(v, n) for k, v in main["load"].items()},
        "load_warm_GBps": {k: gbps(v, n) for k, v in main.get("load_warm", {}).items()},
        "async_blocked_s": {k: [r["blocked_s"] for r in v] for k, v in main["async"].items()},
        "async_total_s": {k: [r["total_s"] for r in v] for k, v in main["async"].items()},
        "memcpy_s": [r["s"] for r in main.get("memcpy", [])],
        "reshard_load_GBps": {f"{world}to{m}": {k: gbps(v, n) for k, v in r["load"].items()} for m, r in reshard.items()},
        "reshard_load_warm_GBps": {f"{world}to{m}": {k: gbps(v, n) for k, v in r.get("load_warm", {}).items()} for m, r in reshard.items()},
        "cpu_s": _cpu(main, reshard, world),
    }


def _cpu(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int) -> dict[str, dict[str, list[float]]]:
    """CPU seconds of every repetition (summed over the step's ranks) per step and contender; steps measured without it are left out."""
    steps = {"save": main["sync"], "async_save": main["async"], "load": main["load"], "load_warm": main.get("load_warm", {})}
    for m, r in reshard.items():
        steps[f"reshard_load_{world}to{m}"], steps[f"reshard_load_warm_{world}to{m}"] = r["load"], r.get("load_warm", {})
    out = {step: {k: [r["cpu_s"] for r in v] for k, v in items.items() if v and all("cpu_s" in r for r in v)} for step, items in steps.items()}
    return {step: d for step, d in out.items() if d}


RAW_PREFIXES = ("disk", "reuse")  # the raw I/O contenders: not libraries (no verification, no memory figures)


def _is_raw(name: str) -> bool:
    return name.startswith(RAW_PREFIXES)


def _memory(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int, field: str) -> dict[str, dict[str, float]]:
    """Max over repetitions of ``field`` (peak RSS or its growth) per step and contender."""
    steps = {"save": main["sync"], "async_save": main["async"], "load": main["load"]}
    steps.update({f"reshard_load_{world}to{m}": r["load"] for m, r in reshard.items()})
    return {step: {k: max(r[field] for r in v) for k, v in items.items() if not _is_raw(k)} for step, items in steps.items()}


def _ceilings(fig: dict[str, Any], reps: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The run's ceilings (medians of each variant, then the best variant) and their variants."""
    memcpy_s = med(reps["memcpy_s"])
    return {
        "write_GBps": best(fig["save_GBps"]),
        "read_cold_GBps": best(fig["load_GBps"]),
        "read_warm_GBps": best(fig["load_warm_GBps"]),
        # Information, not ceilings: the same reads into a reused, cache-resident buffer.
        "read_cold_reused_buffer_GBps": best(fig["load_GBps"], "reuse"),
        "read_warm_reused_buffer_GBps": best(fig["load_warm_GBps"], "reuse"),
        "reshard": {key: _read_ceilings(d, fig["reshard_load_warm_GBps"].get(key, {})) for key, d in fig["reshard_load_GBps"].items()},
        "memcpy_s": memcpy_s,
        "memcpy_GBps": nbytes / memcpy_s / 1e9 if memcpy_s == memcpy_s else NAN,
        "variants": {"write": variants(fig["save_GBps"]), "read": variants(fig["load_GBps"])},
    }


def _read_ceilings(cold: dict[str, float], warm: dict[str, float]) -> dict[str, float]:
    """A resharded job's cold and warm read ceilings, and (where measured) its reused-buffer reads."""
    out = {"read_cold_GBps": best(cold), "read_warm_GBps": best(warm)}
    if variants(cold, "reuse"):
        out.update(read_cold_reused_buffer_GBps=best(cold, "reuse"), read_warm_reused_buffer_GBps=best(warm, "reuse"))
    return out


def _ratios(fig: dict[str, Any], c: dict[str, Any]) -> dict[str, float]:
    """Ratios of the medians; dist_ckpt is the numerator."""
    s, l, lw = fig["save_GBps"], fig["load_GBps"], fig["load_warm_GBps"]
    b, t, dc_save_s = fig["async_blocked_s"], fig["async_total_s"], fig["save_s"].get("dist_ckpt", NAN)
    q = {
        "save_vs_dcp": ratio(s["dist_ckpt"], s["dcp"]),
        "save_vs_torch_save": ratio(s["dist_ckpt"], s["torch_save"]),
        "save_vs_write_ceiling": ratio(s["dist_ckpt"], c["write_GBps"]),
        "save_vs_disk": ratio(s["dist_ckpt"], s["disk"]),  # one writer per rank (before the ceilings had variants)
        "save_vs_disk_direct": ratio(s["dist_ckpt"], s.get("disk_direct", NAN)),
        "load_vs_dcp": ratio(l["dist_ckpt"], l["dcp"]),
        "load_vs_torch_load": ratio(l["dist_ckpt"], l["torch_load"]),
        "load_vs_read_ceiling": ratio(l["dist_ckpt"], c["read_cold_GBps"]),
        "load_vs_disk": ratio(l["dist_ckpt"], l["disk"]),  # one reader per rank
        "load_warm_vs_dcp": ratio(lw.get("dist_ckpt", NAN), lw.get("dcp", NAN)),
        "load_warm_vs_warm_ceiling": ratio(lw.get("dist_ckpt", NAN), c["read_warm_GBps"]),
        "load_warm_vs_page_cache": ratio(lw.get("dist_ckpt", NAN), lw.get("disk", NAN)),
        "load_vs_reused_buffer": ratio(l["dist_ckpt"], c["read_cold_reused_buffer_GBps"]),  # the old, cache-resident "ceiling"
        "load_warm_vs_reused_buffer": ratio(lw.get("dist_ckpt", NAN), c["read_warm_reused_buffer_GBps"]),
        "async_block_vs_dcp": ratio(b.get("dist_ckpt", NAN), b.get("dcp", NAN)),
        "async_block_vs_dcp_stager": ratio(b.get("dist_ckpt", NAN), b.get("dcp_stager", NAN)),
        "async_block_vs_memcpy": ratio(b.get("dist_ckpt", NAN), c["memcpy_s"]),
        "async_total_vs_dcp": ratio(t.get("dist_ckpt", NAN), t.get("dcp", NAN)),
        "async_total_vs_blocked_plus_save": ratio(t.get("dist_ckpt", NAN), b.get("dist_ckpt", NAN) + dc_save_s),
    }
    worst = NAN
    for key, d in fig["reshard_load_GBps"].items():
        w, cr = fig["reshard_load_warm_GBps"].get(key, {}), c["reshard"][key]
        q[f"reshard_load_vs_dcp_{key}"] = x = ratio(d["dist_ckpt"], d["dcp"])
        q[f"reshard_load_vs_read_ceiling_{key}"] = ratio(d["dist_ckpt"], cr["read_cold_GBps"])
        q[f"reshard_load_vs_disk_{key}"] = ratio(d["dist_ckpt"], d.get("disk", NAN))
        q[f"reshard_load_warm_vs_dcp_{key}"] = ratio(w.get("dist_ckpt", NAN), w.get("dcp", NAN))
        q[f"reshard_load_warm_vs_warm_ceiling_{key}"] = ratio(w.get("dist_ckpt", NAN), cr["read_warm_GBps"])
        q[f"reshard_load_vs_reused_buffer_{key}"] = ratio(d["dist_ckpt"], cr.get("read_cold_reused_buffer_GBps", NAN))
        q[f"reshard_load_warm_vs_reused_buffer_{key}"] = ratio(w.get("dist_ckpt", NAN), cr.get("read_warm_reused_buffer_GBps", NAN))
        worst = x if worst != worst else min(worst, x)
    q["reshard_load_vs_dcp"] = worst  # the worst resharded world size (NaN → null when none ran)
    return q


def _paired_ratios(reps: dict[str, Any]) -> dict[str, float]:
    """The same ratios taken per repetition (against each repetition's best ceiling variant)."""
    s, l, b = reps["save_GBps"], reps["load_GBps"], reps["async_blocked_s"]
    q = {
        "save_vs_dcp": paired(s["dist_ckpt"], s["dcp"]),
        "save_vs_write_ceiling": paired(s["dist_ckpt"], best_per_rep(s)),
        "save_vs_disk": paired(s["dist_ckpt"], s["disk"]),
        "load_vs_dcp": paired(l["dist_ckpt"], l["dcp"]),
        "load_vs_read_ceiling": paired(l["dist_ckpt"], best_per_rep(l)),
        "load_warm_vs_warm_ceiling": paired(reps["load_warm_GBps"].get("dist_ckpt", []), best_per_rep(reps["load_warm_GBps"])),
        "async_block_vs_dcp": paired(b.get("dist_ckpt", []), b.get("dcp", [])),
        "async_block_vs_memcpy": paired(b.get("dist_ckpt", []), reps["memcpy_s"]),
    }
    for key, d in reps["reshard_load_GBps"].items():
        q[f"reshard_load_vs_dcp_{key}"] = paired(d["dist_ckpt"], d["dcp"])
        q[f"reshard_load_vs_read_ceiling_{key}"] = paired(d["dist_ckpt"], best_per_rep(d))
    return q


def _figures(main: dict[str, Any], reshard: dict[int, dict[str, Any]], reps: dict[str, Any], world: int) -> dict[str, Any]:
    n = main["total_bytes"]
    return {
        "save_GBps": {k: med(v) for k, v in reps["save_GBps"].items()},
        "save_s": {k: med(v) for k, v in reps["save_s"].items()},
        "load_GBps": {k: med(v) for k, v in reps["load_GBps"].items()},
        "load_warm_GBps": {k: med(v) for k, v in reps["load_warm_GBps"].items()},
        "reshard_load_GBps": {w: {k: med(v) for k, v in d.items()} for w, d in reps["reshard_load_GBps"].items()},
        "reshard_load_warm_GBps": {w: {k: med(v) for k, v in d.items()} for w, d in reps["reshard_load_warm_GBps"].items()},
        "async_blocked_s": {k: med(v) for k, v in reps["async_blocked_s"].items()},
        "async_blocked_first_s": {k: v[0] for k, v in reps["async_blocked_s"].items()},
        "async_total_s": {k: med(v) for k, v in reps["async_total_s"].items()},
        "async_total_GBps": {k: n / med(v) / 1e9 for k, v in reps["async_total_s"].items()},
        "dc_prepare_s": main.get("dc_prepare_s"),
        "cpu_s": {step: {k: med(v) for k, v in d.items()} for step, d in reps["cpu_s"].items()},
        "peak_rss_mb": _memory(main, reshard, world, "peak_rss_mb"),
        "rss_growth_mb": _memory(main, reshard, world, "rss_growth_mb"),
    }


def _staging(main: dict[str, Any], fig: dict[str, Any], ratios: dict[str, float]) -> None:
    """CUDA: the staging of the first save after prepare() against pinned D2H (adds to ``fig`` and ``ratios``)."""
    local = main["local_bytes_rank0"]
    fig["staging_ceiling_GBps"] = main["staging_ceiling"]
    first = fig["async_blocked_first_s"]
    fig["dc_staging_first_GBps"] = local / first["dist_ckpt"] / 1e9 if "dist_ckpt" in first else NAN
    fig["dcp_staging_first_GBps"] = local / first["dcp"] / 1e9 if "dcp" in first else NAN
    ratios["staging_vs_pinned"] = ratio(fig["dc_staging_first_GBps"], main["staging_ceiling"]["d2h_pinned_GBps"])


def _verified(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int) -> dict[str, bool]:
    """Whether every load of every library (not the raw reads) restored the saved values."""
    loads = {"load": main["load"], "load_warm": main.get("load_warm", {})}
    loads.update({f"reshard_{world}to{m}": r["load"] for m, r in reshard.items()})
    loads.update({f"reshard_{world}to{m}_warm": r.get("load_warm", {}) for m, r in reshard.items()})
    return {f"{step}_{k}": all(x.get("verified", 1) for x in v) for step, items in loads.items() for k, v in items.items() if not _is_raw(k)}


def summarize(run: dict[str, Any], main: dict[str, Any], reshard: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The run's result: figures, ceilings, ratios, targets, peak RSS and verification.

    Args:
        run: what the run was (device, world, reshard_worlds, reps, dir, no_async).
        main: the main job's results; reshard: each resharded job's, by world size.

    Returns:
        The dict printed as the table and as the JSON line.
    """
    world, n = run["world"], main["total_bytes"]
    reps = _per_rep(main, reshard, world)
    fig = _figures(main, reshard, reps, world)
    ceilings = _ceilings(fig, reps, n)
    ratios = _ratios(fig, ceilings)
    if "staging_ceiling" in main:
        _staging(main, fig, ratios)
    return {
        "bench": "dist_ckpt",
        **run,
        "total_bytes": n,
        "n_tensors": main.get("n_tensors"),
        "page_cache_dropped": bool(main.get("dropped_caches")) and all(r.get("dropped_caches") for r in reshard.values()),
        "dcp_stager_error": main.get("dcp_stager_error"),
        "figures": fig,
        "ceilings": ceilings,
        "ratios": ratios,
        "paired_ratios": _paired_ratios(reps),
        "verified": _verified(main, reshard, world),
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "targets_met": targets_met(ratios, TARGETS),
        "design_targets_met": targets_met(ratios, DESIGN_TARGETS),
        "reps_raw": reps,
    }


def clean(x: Any) -> Any:
    """NaN → None, so the JSON line stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
