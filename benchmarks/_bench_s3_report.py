"""The ``--storage s3`` run's figures, ceilings and ratios, and its table (pure data, as ``_bench_summary``).

Contenders (``_bench_s3.py``): ``dist_ckpt``, ``dcp_s3fs`` (DCP's fsspec
writer/reader), ``s3torchconnector`` (AWS's DCP writer/reader), and the
ceiling variants, whose names start with ``raw_``: boto3 multipart uploads
(``raw_put_*``) and ranged GETs (``raw_get_*``) of each rank's share. The
ceiling is the best variant; dist_ckpt is the numerator of every ratio.
There are no targets: the local server, not a client, is the bottleneck.
"""

from __future__ import annotations

from typing import Any

from _bench_summary import NAN, best, best_per_rep, gbps, med, paired, ratio, variants

MiB = 1 << 20
PEERS = {"dcp": "dcp_s3fs", "s3torchconnector": "s3torchconnector"}  # ratio name -> contender
BOTTLENECK = (
    "the local S3 server (moto, pure Python, on the same CPUs as the ranks) is the bottleneck: "
    "the ratios rank the libraries' overheads against it, not S3's bandwidth"
)


RAW = "raw_"  # the ceiling's variants: boto3's raw uploads and ranged GETs


def _step_ratios(prefix: str, fig: dict[str, float], reps: dict[str, list[float]], ceiling: str, suffix: str, out: dict[str, Any]) -> None:
    """``{prefix}_vs_{peer}{suffix}`` and ``{prefix}_vs_{ceiling}_ceiling{suffix}`` of the medians (``out["ratios"]``) and per repetition."""
    for peer, name in PEERS.items():
        out["ratios"][f"{prefix}_vs_{peer}{suffix}"] = ratio(fig.get("dist_ckpt", NAN), fig.get(name, NAN))
        out["paired_ratios"][f"{prefix}_vs_{peer}{suffix}"] = paired(reps.get("dist_ckpt", []), reps.get(name, []))
    out["ratios"][f"{prefix}_vs_{ceiling}_ceiling{suffix}"] = ratio(fig.get("dist_ckpt", NAN), best(fig, RAW))
    out["paired_ratios"][f"{prefix}_vs_{ceiling}_ceiling{suffix}"] = paired(reps.get("dist_ckpt", []), best_per_rep(reps, RAW))


def _verified(main: dict[str, Any], reshard: dict[int, dict[str, Any]], world: int) -> dict[str, bool]:
    loads = {"load": main["load"], **{f"reshard_{world}to{m}": r["load"] for m, r in reshard.items()}}
    return {f"{step}_{k}": all(x.get("verified", 1) for x in v) for step, items in loads.items() for k, v in items.items() if not k.startswith("raw_")}


def _peak_rss(items: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    return {k: max(r["peak_rss_mb"] for r in v) for k, v in items.items() if not k.startswith("raw_")}


def summarize_s3(run: dict[str, Any], main: dict[str, Any], reshard: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The S3 run's result: figures (GB/s, medians), ceilings, ratios (also per repetition), peak RSS, verification.

    Laid out as the disk run's (``save_GBps``, ``load_GBps``, ``reshard_load_GBps[f"{N}to{M}"]``);
    the ceilings are ``upload_GBps`` and ``get_GBps`` (per resharded world under ``reshard``).

    Args:
        run: what the run was (storage, server, world, reshard_worlds, reps, dir).
        main: the main job's results; reshard: each resharded job's, by world size.

    Returns:
        The dict printed as the table and as the JSON line.
    """
    world, n = run["world"], main["total_bytes"]
    per_rep = {
        "save_GBps": {k: gbps(v, n) for k, v in main["sync"].items()},
        "load_GBps": {k: gbps(v, n) for k, v in main["load"].items()},
        "reshard_load_GBps": {f"{world}to{m}": {k: gbps(v, n) for k, v in r["load"].items()} for m, r in reshard.items()},
    }
    fig = {
        "save_GBps": {k: med(v) for k, v in per_rep["save_GBps"].items()},
        "load_GBps": {k: med(v) for k, v in per_rep["load_GBps"].items()},
        "reshard_load_GBps": {w: {k: med(v) for k, v in d.items()} for w, d in per_rep["reshard_load_GBps"].items()},
    }
    out: dict[str, Any] = {"ratios": {}, "paired_ratios": {}}
    _step_ratios("save", fig["save_GBps"], per_rep["save_GBps"], "upload", "", out)
    _step_ratios("load", fig["load_GBps"], per_rep["load_GBps"], "get", "", out)
    for key, d in fig["reshard_load_GBps"].items():
        _step_ratios("reshard_load", d, per_rep["reshard_load_GBps"][key], "get", f"_{key}", out)
    rss = {"save": _peak_rss(main["sync"]), "load": _peak_rss(main["load"])}
    rss.update({f"reshard_load_{world}to{m}": _peak_rss(r["load"]) for m, r in reshard.items()})
    return {
        "bench": "dist_ckpt",
        **run,
        "total_bytes": n,
        "n_tensors": main.get("n_tensors"),
        "missing": main.get("missing", {}),
        "figures": fig,
        "ceilings": {
            "upload_GBps": best(fig["save_GBps"], RAW),
            "get_GBps": best(fig["load_GBps"], RAW),
            "reshard": {key: {"get_GBps": best(d, RAW)} for key, d in fig["reshard_load_GBps"].items()},
            "variants": {"upload": variants(fig["save_GBps"], RAW), "get": variants(fig["load_GBps"], RAW)},
        },
        **out,
        "peak_rss_mb": rss,
        "verified": _verified(main, reshard, world),
        "bottleneck": BOTTLENECK,
        "reps_raw": per_rep,
    }


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def _s3_row(label: str, d: dict[str, float], ceiling: float, ratios: list[float]) -> None:
    cells = [d.get("dist_ckpt", NAN), d.get("dcp_s3fs", NAN), d.get("s3torchconnector", NAN), ceiling]
    print(f"{label:26}" + "".join(f"{_f(c * 1000, '.1f'):>10}" for c in cells) + "   " + "".join(f"{_f(x):>8}" for x in ratios))
    print("    ceiling = best of boto3 " + ", ".join(f"{k} {_f(d[k] * 1000, '.1f')}" for k in variants(d, RAW)))


def print_s3_table(r: dict[str, Any]) -> None:
    """Print the S3 run's result (:func:`summarize_s3`): MB/s beside DCP+s3fs, s3torchconnector and the boto3 ceiling."""
    w, f, c, q = r["world"], r["figures"], r["ceilings"], r["ratios"]
    print(
        f"\ndist_ckpt benchmark on S3: {r['server']}, world {w}, {r['total_bytes'] / MiB:.0f} MiB state ({r['n_tensors']} tensors), {r['reps']} rep(s), medians"
    )
    print(f"checkpoints under {r['dir']}\n")
    print(f"{'MB/s (higher is better)':26}{'dist_ckpt':>10}{'DCP+s3fs':>10}{'s3tc':>10}{'ceiling':>10}   {'dc/DCP':>8}{'dc/s3tc':>8}{'dc/ceil':>8}")
    print("-" * 100)
    _s3_row("sync save", f["save_GBps"], c["upload_GBps"], [q[f"save_vs_{p}"] for p in ("dcp", "s3torchconnector", "upload_ceiling")])
    _s3_row(f"load {w}->{w}", f["load_GBps"], c["get_GBps"], [q[f"load_vs_{p}"] for p in ("dcp", "s3torchconnector", "get_ceiling")])
    for key, d in f["reshard_load_GBps"].items():
        ratios = [q[f"reshard_load_vs_{p}_{key}"] for p in ("dcp", "s3torchconnector", "get_ceiling")]
        _s3_row(f"resharded load {w}->{key.split('to')[1]}", d, c["reshard"][key]["get_GBps"], ratios)
    print("  s3tc: s3torchconnector's DCP writer/reader; ceiling: boto3 multipart uploads / ranged GETs of each rank's share, no format")
    for name, why in r["missing"].items():
        print(f"  {name} not measured: {why}")
    print(f"\nNOTE: {r['bottleneck']}.")
    print("paired per-repetition ratios (median): " + ", ".join(f"{k} {_f(v)}" for k, v in r["paired_ratios"].items()))
    bad = [k for k, v in r["verified"].items() if not v]
    print(f"loaded values verified: {'all ok' if not bad else 'FAILED: ' + ', '.join(bad)}\n")
