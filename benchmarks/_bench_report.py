"""The benchmark's table: every figure beside DCP's and its ceiling, with the targets marked per row."""

from __future__ import annotations

from typing import Any

from _bench_summary import DESIGN_TARGETS, NAN, TARGETS, ratio, target_of

MiB = 1 << 20
WIDTH = 113
WARM = "  page cache warm"
_VARIANT_LABELS = {"disk": "1", "disk_2w": "2", "disk_4w": "4", "disk_2r": "2", "disk_4r": "4", "disk_direct": "O_DIRECT"}
_REUSED_LABELS = {"reuse": "1", "reuse_2r": "2", "reuse_4r": "4"}


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def _mark(r: dict[str, Any], *keys: str) -> str:
    """``ok`` / ``BELOW TARGET`` for each ratio with a target (nothing for one not measured)."""
    met = r["targets_met"]
    return "".join("" if met.get(k) is None else ("  ok" if met[k] else "  BELOW TARGET") for k in keys)


def _row(label: str, cells: list[Any], ratios: list[Any], marks: str = "", spec: str = ".2f") -> str:
    cells = list(cells) + [""] * (4 - len(cells))
    return (
        f"{label:34}"
        + "".join(f"{_f(c, spec) if c != '' else '':>10}" for c in cells)
        + "   "
        + "".join(f"{_f(x) if x != '' else '':>9}" for x in ratios)
        + marks
    )


def _variants(label: str, d: dict[str, float], unit: str, labels: dict[str, str] = _VARIANT_LABELS) -> str:
    """One line naming the ceiling's variants and their figures (the ceiling is the best)."""
    names = sorted((k for k in d if k in labels), key=list(labels).index)
    parts = [f"{labels[k]} {_f(d[k])}" for k in names]
    return f"    {label} = best of {unit}: " + ", ".join(parts)


def _reused(d: dict[str, float]) -> None:
    """The info line of the reads into a reused buffer (what the read ceiling was before 2026-12-01), where they ran."""
    if any(k in d for k in _REUSED_LABELS):
        print(_variants("  info: reused 16 MiB buffer (cache-resident, not a ceiling)", d, "readers per rank", _REUSED_LABELS))


def _loads(r: dict[str, Any], label: str, cold: dict[str, float], warm: dict[str, float], c: dict[str, float], suffix: str) -> None:
    """A cold load row, its readers line, and its warm row (``suffix``: ``""`` or ``_4to2``)."""
    key = "load" if not suffix else "reshard_load"
    q = r["ratios"]
    print(
        _row(
            label,
            [cold["dist_ckpt"], cold["dcp"], cold.get("torch_load", ""), c["read_cold_GBps"]],
            [
                q[f"{key}_vs_dcp{suffix}"],
                ratio(cold["dist_ckpt"], cold.get("torch_load", NAN)) if "torch_load" in cold else "",
                q[f"{key}_vs_read_ceiling{suffix}"],
            ],
            _mark(r, f"{key}_vs_read_ceiling{suffix}", f"{key}_vs_dcp{suffix}"),
        )
    )
    print(_variants("read ceiling", cold, "readers per rank into the load's tensors"))
    _reused(cold)
    if warm:
        print(
            _row(
                WARM,
                [warm.get("dist_ckpt"), warm.get("dcp"), warm.get("torch_load", ""), c["read_warm_GBps"]],
                [
                    q[f"{key}_warm_vs_dcp{suffix}"],
                    ratio(warm.get("dist_ckpt", NAN), warm.get("torch_load", NAN)) if "torch_load" in warm else "",
                    q[f"{key}_warm_vs_warm_ceiling{suffix}"],
                ],
                _mark(r, f"{key}_warm_vs_warm_ceiling{suffix}"),
            )
        )
        print(_variants("warm read ceiling", warm, "readers per rank into the load's tensors"))
        _reused(warm)


def _print_throughput(r: dict[str, Any]) -> None:
    f, q, c, w = r["figures"], r["ratios"], r["ceilings"], r["world"]
    s = f["save_GBps"]
    print(f"{'GB/s (higher is better)':34}{'dist_ckpt':>10}{'DCP':>10}{'torch':>10}{'ceiling':>10}   {'dc/DCP':>9}{'dc/torch':>9}{'dc/ceil':>9}")
    print("-" * WIDTH)
    print(
        _row(
            "sync save",
            [s["dist_ckpt"], s["dcp"], s["torch_save"], c["write_GBps"]],
            [q["save_vs_dcp"], q["save_vs_torch_save"], q["save_vs_write_ceiling"]],
            _mark(r, "save_vs_write_ceiling", "save_vs_dcp"),
        )
    )
    print(_variants("write ceiling", s, "writers (files) per rank"))
    _loads(r, f"load {w}->{w}", f["load_GBps"], f["load_warm_GBps"], c, "")
    for key, d in f["reshard_load_GBps"].items():
        _loads(r, f"resharded load {w}->{key.split('to')[1]}", d, f["reshard_load_warm_GBps"].get(key, {}), c["reshard"][key], f"_{key}")


def _print_async(r: dict[str, Any]) -> None:
    f, q, c = r["figures"], r["ratios"], r["ceilings"]
    b, first, tot = f["async_blocked_s"], f["async_blocked_first_s"], f["async_total_s"]
    if not b:
        print("async save: not run (--no-async)")
        return
    bound = b.get("dist_ckpt", NAN) + f["save_s"].get("dist_ckpt", NAN)
    print(f"{'async save, s (lower is better)':34}{'dist_ckpt':>10}{'DCP dflt':>10}{'DCP stgr':>10}{'bound':>10}   {'dc/DCP':>9}{'dc/stgr':>9}{'dc/bound':>9}")
    print("-" * WIDTH)
    print(
        _row(
            "blocked (median)",
            [b["dist_ckpt"], b["dcp"], b.get("dcp_stager"), c["memcpy_s"]],
            [q["async_block_vs_dcp"], q["async_block_vs_dcp_stager"], q["async_block_vs_memcpy"]],
            _mark(r, "async_block_vs_memcpy"),
            ".3f",
        )
    )
    print(_row("blocked (first save)", [first["dist_ckpt"], first["dcp"], first.get("dcp_stager")], [], "", ".3f"))
    print(
        _row(
            "until committed (median)",
            [tot["dist_ckpt"], tot["dcp"], tot.get("dcp_stager"), bound],
            [q["async_total_vs_dcp"], ratio(tot["dist_ckpt"], tot.get("dcp_stager", NAN)), q["async_total_vs_blocked_plus_save"]],
            _mark(r, "async_total_vs_blocked_plus_save"),
            ".3f",
        )
    )
    print(f"    bound: blocked <- memcpy of the state ({_f(c['memcpy_GBps'])} GB/s); committed <- dist_ckpt's blocked + its sync save")
    if r.get("dcp_stager_error"):
        print(f"  DCP DefaultStager not measured: {r['dcp_stager_error']}")
    print(f"  dist_ckpt prepare() (staging arena allocation, once, before the first save): {_f(f['dc_prepare_s'], '.3f')} s")
    if "staging_ceiling_GBps" in f:
        s = f["staging_ceiling_GBps"]
        print(
            f"  staging ceiling: pinned D2H {_f(s['d2h_pinned_GBps'])} GB/s (pageable {_f(s['d2h_pageable_GBps'])}); first save stages at "
            f"{_f(f['dc_staging_first_GBps'])} GB/s = {_f(q['staging_vs_pinned'])} of pinned{_mark(r, 'staging_vs_pinned')}; "
            f"DCP default {_f(f['dcp_staging_first_GBps'])} GB/s"
        )


def _print_memory(r: dict[str, Any]) -> None:
    f, w = r["figures"], r["world"]
    rss, grow = f["peak_rss_mb"], f["rss_growth_mb"]

    def cell(step: str, k: str) -> str:
        v, g = rss.get(step, {}).get(k), grow.get(step, {}).get(k)
        return "" if v is None else f"{v:.0f} ({g:+.0f})"

    print(f"{'peak RSS per rank, MB (growth)':34}{'dist_ckpt':>14}{'DCP':>14}{'torch':>14}{'DCP stager':>14}")
    print("-" * WIDTH)
    rows = [("sync save", "save", "torch_save"), ("async save", "async_save", None), (f"load {w}->{w}", "load", "torch_load")]
    rows += [(f"load {w}->{key.split('to')[1]}", f"reshard_load_{key}", None) for key in f["reshard_load_GBps"]]
    for label, step, torch_key in rows:
        cells = [cell(step, "dist_ckpt"), cell(step, "dcp"), cell(step, torch_key) if torch_key else "", cell(step, "dcp_stager")]
        if not any(cells):
            continue  # a step that did not run (--no-async)
        print(f"{label:34}" + "".join(f"{c:>14}" for c in cells))
    print("  (peak includes the state, the load target and arenas kept from earlier steps; growth is over the RSS at the step's start)")


def _print_cpu(r: dict[str, Any]) -> None:
    """CPU seconds per step, summed over the step's ranks (medians): what a step costs the host, not how long it waits."""
    cpu = r["figures"].get("cpu_s", {})
    if not cpu:
        return
    names = ["dist_ckpt", "dcp", "torch_save", "torch_load", "dcp_stager", "disk"]
    print(f"{'CPU s summed over ranks':34}" + "".join(f"{n:>12}" for n in names))
    print("-" * WIDTH)
    for step, d in cpu.items():
        print(f"{step:34}" + "".join(f"{d[n]:>12.3f}" if n in d else f"{'':>12}" for n in names))
    print("  (each rank's process CPU time, user + system, all threads; disk: the 1-thread raw writer/reader)")


def _print_targets(r: dict[str, Any]) -> None:
    families = ", ".join(f"{k} {op} {b:g}" for k, (op, b) in TARGETS.items())
    print(f"targets (issue 18, marked per row): {families}")
    design = ", ".join(f"{k} {'ok' if v else 'BELOW'}" for k, v in r["design_targets_met"].items() if v is not None and target_of(k, DESIGN_TARGETS))
    print(f"DESIGN §7 targets: {design or '-'}")


def print_table(r: dict[str, Any]) -> None:
    """Print the run's result (``_bench_summary.summarize``) as the human-readable table."""
    print(
        f"\ndist_ckpt benchmark: {r['device']}, world {r['world']}, {r['total_bytes'] / MiB:.0f} MiB state ({r['n_tensors']} tensors), "
        f"{r['reps']} rep(s), medians; page cache dropped before loads: {'yes' if r['page_cache_dropped'] else 'NO'}"
    )
    print(f"checkpoints under {r['dir']}\n")
    _print_throughput(r)
    print()
    _print_async(r)
    print()
    _print_memory(r)
    print()
    _print_cpu(r)
    print()
    _print_targets(r)
    print("paired per-repetition ratios (median): " + ", ".join(f"{k} {_f(v)}" for k, v in r["paired_ratios"].items()))
    bad = [k for k, v in r["verified"].items() if not v]
    print(f"loaded values verified: {'all ok' if not bad else 'FAILED: ' + ', '.join(bad)}\n")
