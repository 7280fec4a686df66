"""Turns a results file of ``benchmarks.run`` into a markdown table and a plot.

    python -m benchmarks.report benchmarks/results/latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE = "reference"


def best_runs(report: dict) -> dict[tuple[str, str], dict]:
    """The fastest successful run of each (workload, system), or its unsupported/error entry."""
    best: dict[tuple[str, str], dict] = {}
    for run in report["runs"]:
        key = (run["workload"], run["system"])
        old = best.get(key)
        if old is None or run.get("samples_per_second", -1) > old.get("samples_per_second", -1):
            best[key] = run
    return best


def table(report: dict) -> str:
    best = best_runs(report)
    workloads = list(dict.fromkeys(w for w, _ in best))
    lines = ["| workload | system | samples/s | vs reference | s/round | start-up s | peak RSS MB | peak PSS MB "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for workload in workloads:
        reference = best.get((workload, REFERENCE), {}).get("samples_per_second")
        for (w, system), run in best.items():
            if w != workload:
                continue
            if "unsupported" in run or "error" in run:
                why = run.get("unsupported") or run["error"]
                lines.append(f"| {w} | {system} | – | – | – | – | – | – | {why} |")
                continue
            ratio = f"{run['samples_per_second'] / reference:.2f}x" if reference else "–"
            lines.append(
                f"| {w} | {system} | {run['samples_per_second']:.0f} | {ratio} | {run['seconds_per_round']:.3f} | "
                f"{run['startup_seconds']:.1f} | {run['peak_rss_mb']:.0f} | {run['peak_pss_mb']:.0f} | "
                f"{run.get('note', '')} |"
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    best = best_runs(report)
    ok = {k: r for k, r in best.items() if "samples_per_second" in r}
    workloads = [w for w in dict.fromkeys(w for w, _ in ok) if not w.startswith("S")]
    systems = list(dict.fromkeys(s for w, s in ok if w in workloads))
    sweep = sorted({int(w[1:]) for w, _ in ok if w.startswith("S")})
    fig, (bars, scaling) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        xs, ys = [], []
        for j, workload in enumerate(workloads):
            reference = ok.get((workload, REFERENCE))
            run = ok.get((workload, system))
            if run and reference:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(run["samples_per_second"] / reference["samples_per_second"])
        bars.bar(xs, ys, width, label=system)
    bars.axhline(1.0, color="black", lw=0.8, ls="--")
    bars.set_xticks(range(len(workloads)), workloads)
    bars.set_ylabel("samples/s relative to the reference")
    bars.set_title("Throughput, measured side by side")
    bars.legend(fontsize=7, ncol=2)
    if sweep:
        memory = scaling.twinx()
        for system, style in (("fedmeta", "-o"), ("naive", "--s")):
            runs = [ok.get((f"S{p}", system)) for p in sweep]
            if all(runs):
                scaling.plot(sweep, [r["seconds_per_round"] * 1000 for r in runs], style, label=f"{system} ms/round")
                memory.plot(sweep, [r["peak_pss_mb"] for r in runs], style, alpha=0.4, color="gray",
                            label=f"{system} peak PSS")
        scaling.set_xscale("log")
        scaling.set_xlabel("synthetic population (clients)")
        scaling.set_ylabel("ms per round (cohort 10)")
        memory.set_ylabel("peak PSS, MB (gray)")
        scaling.set_ylim(bottom=0)
        memory.set_ylim(bottom=0)
        scaling.legend(fontsize=7, loc="lower left")
        scaling.set_title("Per-round time and memory vs population")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(report: dict, stem: Path) -> str:
    """Writes ``stem.md`` and ``stem.png``; returns the markdown."""
    m = report["machine"]
    text = (f"Measured {m['date']} on {m['cores']} cores ({m['processor']}), {m['memory_gb']} GB, "
            f"Python {m['python']}, torch {m['torch']}; {report['workers']} workers per system; "
            f"whole run {report['total_seconds'] / 60:.1f} min.\n\n{table(report)}\n")
    stem.with_suffix(".md").write_text(text)
    plot(report, stem.with_suffix(".png"))
    return text


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(write_report(json.loads(source.read_text()), source.with_suffix("")))
