"""``bench_checkpoint.py --plot FILE.png``: the run's figures beside DCP's and the ceilings (matplotlib).

Three panels: cold throughput (sync save and every load), page-cache-warm
loads, and the async save's seconds. In each group the ceiling (or, for the
async rows, the bound its target is set against) is the grey bar on the
right, and dist_ckpt's bar is labelled with its fraction of it.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

NAN = float("nan")
COLORS = {"dist_ckpt": "#1f77b4", "DCP": "#ff7f0e", "torch": "#2ca02c", "DCP stager": "#d62728", "ceiling": "#9e9e9e", "bound": "#9e9e9e"}
REFERENCE = ("ceiling", "bound")  # the grey bar each group is measured against
Group = tuple[str, dict[str, float]]  # (label, {series: value})


def _throughput_groups(r: dict[str, Any], warm: bool) -> list[Group]:
    f, c, w = r["figures"], r["ceilings"], r["world"]
    loads = [(f"load {w}->{w}", f["load_warm_GBps" if warm else "load_GBps"], c)]
    loads += [
        (f"load {w}->{k.split('to')[1]}", f["reshard_load_warm_GBps" if warm else "reshard_load_GBps"].get(k, {}), c["reshard"][k])
        for k in f["reshard_load_GBps"]
    ]
    groups: list[Group] = []
    if not warm:
        s = f["save_GBps"]
        groups.append(("sync save", {"dist_ckpt": s["dist_ckpt"], "DCP": s["dcp"], "torch": s["torch_save"], "ceiling": c["write_GBps"]}))
    for label, d, cl in loads:
        series = {"dist_ckpt": d.get("dist_ckpt", NAN), "DCP": d.get("dcp", NAN)}
        if "torch_load" in d:
            series["torch"] = d["torch_load"]
        series["ceiling"] = cl["read_warm_GBps" if warm else "read_cold_GBps"]
        groups.append((label, series))
    return groups


def _async_groups(r: dict[str, Any]) -> list[Group]:
    f, c = r["figures"], r["ceilings"]
    b, t = f["async_blocked_s"], f["async_total_s"]
    if not b:
        return []
    bound = b.get("dist_ckpt", NAN) + f["save_s"].get("dist_ckpt", NAN)
    return [
        ("blocked", {"dist_ckpt": b.get("dist_ckpt", NAN), "DCP": b.get("dcp", NAN), "DCP stager": b.get("dcp_stager", NAN), "bound": c["memcpy_s"]}),
        ("until committed", {"dist_ckpt": t.get("dist_ckpt", NAN), "DCP": t.get("dcp", NAN), "DCP stager": t.get("dcp_stager", NAN), "bound": bound}),
    ]


def _bars(ax: Any, groups: list[Group], title: str, unit: str) -> None:
    """One panel: a cluster of bars per group, dist_ckpt's labelled with its share of the ceiling."""
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    if not groups:
        ax.text(0.5, 0.5, "not run (--no-async)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    width = 0.8 / max(len(s) for _, s in groups)
    for gi, (_, series) in enumerate(groups):
        ref = next(series[k] for k in REFERENCE if k in series)
        for si, (name, value) in enumerate(series.items()):
            x = gi + (si - (len(series) - 1) / 2) * width
            ax.bar(x, value if value == value else 0, width, color=COLORS[name], label=name, hatch="//" if name in REFERENCE else None)
            if name == "dist_ckpt" and ref == ref and value == value:
                ax.annotate(f"{value / ref:.2f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per series
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the labels


def plot(r: dict[str, Any], path: str) -> None:
    """Draw the run's result (``_bench_summary.summarize``) to ``path`` (PNG).

    Args:
        r: the run's result, as printed in the JSON line.
        path: the image file to write.
    """
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4), gridspec_kw={"width_ratios": [1.6, 1.2, 0.9]})
    _bars(axes[0], _throughput_groups(r, warm=False), "cold: sync save and loads (page cache dropped)", "GB/s (higher is better)")
    _bars(axes[1], _throughput_groups(r, warm=True), "loads, page cache warm", "GB/s (higher is better)")
    _bars(axes[2], _async_groups(r), "async save (bounds: memcpy;\nblocked + sync save)", "seconds (lower is better)")
    dropped = "page cache dropped" if r["page_cache_dropped"] else "page cache NOT dropped"
    fig.suptitle(
        f"dist_ckpt vs DCP: {r['device']}, world {r['world']}, {r['total_bytes'] / (1 << 20):.0f} MiB, "
        f"medians of {r['reps']} rep(s), {dropped}; on dist_ckpt's bars: dist_ckpt / the hatched ceiling or bound",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
