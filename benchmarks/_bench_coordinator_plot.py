"""``bench_coordinator.py --plot FILE.png``: time and coordinator memory against ranks, format v1 beside v2 (matplotlib).

Three panels, ranks on a log axis: save time (plan + commit, first save)
and one rank's load plan; the coordinator's peak memory; the metadata one
loading rank reads. Several runs of one (format, mode, ranks) draw their median
with the min-max spread as an error bar; the issue's targets at 16,384 ranks
are the dotted lines. Runs of ``--in-process`` (``mode``; no sockets, so past
the ~19.7k ranks the open-file limit allows) are their own series, with
hollow markers: they leave out the wire's cost.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {1: "#ff7f0e", 2: "#1f77b4"}
Series = dict[int, list[float]]  # ranks -> one value per run


MODES = {"sockets": "", "in-process": " in-process"}  # label suffix; runs older than the field were socket runs


def _series(results: list[dict[str, Any]], fmt: int, mode: str, value: Callable[[dict[str, Any]], float]) -> Series:
    out: Series = {}
    for r in results:
        if r.get("format", 1) == fmt and r.get("mode", "sockets") == mode:
            out.setdefault(r["ranks"], []).append(value(r))
    return dict(sorted(out.items()))


def _draw(ax: Any, s: Series, label: str, color: str, style: str = "-", hollow: bool = False) -> None:
    if not s:
        return
    xs = list(s)
    mid = [statistics.median(v) for v in s.values()]
    err = [[m - min(v) for m, v in zip(mid, s.values())], [max(v) - m for m, v in zip(mid, s.values())]]
    face = {"markerfacecolor": "white"} if hollow else {}
    ax.errorbar(xs, mid, yerr=err, fmt=style + ("s" if hollow else "o"), color=color, label=label, capsize=3, markersize=4, **face)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Draw ``results`` (bench_coordinator JSON objects, any number of runs per point) into PNG ``path``."""
    tensors = sorted({r["tensors"] for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    t_ax, m_ax, r_ax = axes
    for fmt in (1, 2):
        for mode, tag in MODES.items():
            c, h = COLORS[fmt], mode != "sockets"
            _draw(t_ax, _series(results, fmt, mode, lambda r: r["plan_s"] + r["commit_s"]), f"v{fmt}{tag} plan + commit", c, hollow=h)
            _draw(t_ax, _series(results, fmt, mode, lambda r: r["load_plan_s"]), f"v{fmt}{tag} one rank's load plan", c, "--", h)
            _draw(m_ax, _series(results, fmt, mode, lambda r: r["coordinator_peak_mb"]), f"v{fmt}{tag} coordinator peak", c, hollow=h)
            _draw(
                r_ax, _series(results, fmt, mode, lambda r: r.get("load_plan_read_mb", r["manifest_mb"])), f"v{fmt}{tag} read by one loading rank", c, hollow=h
            )
            _draw(r_ax, _series(results, fmt, mode, lambda r: r["manifest_mb"] + r.get("fragments_mb", 0.0)), f"v{fmt}{tag} all metadata written", c, ":", h)
    t_ax.axhline(2.0, color="grey", ls=":", lw=1, label="target at 16k: plan + commit 2 s")
    t_ax.axhline(0.25, color="grey", ls="-.", lw=1, label="target at 16k: load plan 0.25 s")
    m_ax.axhline(1024, color="grey", ls=":", lw=1, label="target at 16k: 1 GiB")
    for ax, title, unit in ((t_ax, "time", "seconds"), (m_ax, "coordinator peak memory (RSS)", "MiB"), (r_ax, "metadata", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"bench_coordinator.py: simulated ranks x {', '.join(map(str, tensors))} tensors, real coordinator "
        "(median, bars: min-max of runs; hollow: --in-process, no sockets)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
