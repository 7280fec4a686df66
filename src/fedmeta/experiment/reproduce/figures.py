"""The report's PNG plots, small (dpi 80) so the full report can be committed with them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from fedmeta.experiment.reproduce.findings import (
    Curve, EpochPoint, Findings, comparison_curves, comparison_gains, epoch_point,
)
from fedmeta.experiment.reproduce.gap import SizeQuarters, gain_by_writer_size
from fedmeta.plots import pyplot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

DPI = 80
PLOTS = "plots"
"""The plots' folder, beside the report."""
TABLE1_CURVES = "table1_accuracy_over_rounds.png"
TABLE1_BY_EPOCHS = "table1_initial_vs_personalized.png"
TABLE1_GAINS = "table1_gain_distribution.png"
COMPARISON_CURVES = "comparisons_accuracy_over_rounds.png"
COMPARISON_GAINS = "comparisons_gain_distribution.png"
GAIN_BY_SIZE = "table1_gain_by_writer_size.png"


def write_figures(findings: Findings, plots: Path) -> None:
    """Draws into ``plots`` each figure the findings have data for (``markdown`` links the same ones).

    Table 1's three once a cell finished; the comparisons' curves once one comparison
    finished, their gains once two configurations did.
    """
    done = findings.table1_shown
    if done:
        cohorts = sorted({cohort for cohort, _ in done})
        plot_curves({f"{cohort} clients/round": {f"E={e}": cell.curve() for (k, e), cell in done.items()
                                                 if k == cohort} for cohort in cohorts}, plots / TABLE1_CURVES)
        plot_by_epochs({cohort: [epoch_point(k, e, cell) for (k, e), cell in done.items() if k == cohort]
                        for cohort in cohorts}, plots / TABLE1_BY_EPOCHS)
        plot_gains({cell.label: np.concatenate(cell.accuracies.gains) for cell in done.values()},
                   plots / TABLE1_GAINS, "Table 1: personalization gain per writer")
        by_size = {cell.label: q for cell in done.values() if (q := gain_by_writer_size(cell)) is not None}
        if by_size:
            plot_gain_by_size(by_size, plots / GAIN_BY_SIZE)
    panels = comparison_curves(findings)
    if panels:
        plot_curves(panels, plots / COMPARISON_CURVES, {"two-stage vs FedAvg": findings.switch_round})
    gains = comparison_gains(findings)
    if len(gains) > 1:
        plot_gains(gains, plots / COMPARISON_GAINS, "personalization gain per client")


def plot_curves(panels: Mapping[str, Mapping[str, Curve]], path: Path,
                markers: Mapping[str, int] | None = None) -> None:
    """One panel per title; one color per curve, personalized solid and initial dashed.

    ``markers`` draws a vertical line at a round in the panel of that title (the switch).
    Past ten curves the colors come from a 20-color map, so that no two curves share one.
    """
    most = max(len(curves) for curves in panels.values())
    legend_rows = -(-(most + 2) // 4)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 6.0), 3.4 + 0.22 * legend_rows),
                             squeeze=False, layout="constrained")
    palette = plt.get_cmap("tab10" if most <= 10 else "tab20").colors
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for color, (label, curve) in zip(palette, curves.items()):
            ax.plot(curve.rounds, curve.personalized, color=color, marker="o", markersize=3, label=label)
            ax.plot(curve.rounds, curve.initial, color=color, linestyle="--", marker="o", markersize=3)
        if markers and title in markers:
            ax.axvline(markers[title], color="gray", linewidth=0.8, linestyle=":")
        ax.set(title=title, xlabel="rounds", ylabel="accuracy (held-out clients)")
        ax.grid(alpha=0.3)
    styles = [plt.Line2D([], [], color="black", label="personalized"),
              plt.Line2D([], [], color="black", linestyle="--", label="initial")]
    _add_legend(fig, axes[0], styles)
    _save(fig, path)


def plot_by_epochs(cohorts: Mapping[int, Sequence[EpochPoint]], path: Path) -> None:
    """Initial and personalized accuracy against E, per cohort size; the paper's as hollow markers."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cohorts), figsize=(4.2 * len(cohorts), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (cohort, points) in zip(axes[0], cohorts.items()):
        x = np.arange(len(points))
        ax.plot(x, [p.personalized for p in points], "s-", color="tab:orange", label="personalized (ours)")
        ax.plot(x, [p.initial for p in points], "o-", color="tab:blue", label="initial (ours)")
        paper = [(i, p) for i, p in enumerate(points) if p.paper_initial is not None]
        if paper:
            ax.plot([i for i, _ in paper], [p.paper_personalized for _, p in paper], "s:", color="tab:orange",
                    markerfacecolor="none", label="personalized (paper)")
            ax.plot([i for i, _ in paper], [p.paper_initial for _, p in paper], "o:", color="tab:blue",
                    markerfacecolor="none", label="initial (paper)")
        ax.set_xticks(x, [f"E={p.local_epochs}" for p in points])
        ax.set(title=f"{cohort} clients/round", ylabel="accuracy")
        ax.grid(alpha=0.3)
    _add_legend(fig, axes[0])
    _save(fig, path)


def plot_gains(gains: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Per-client personalization gain (personalized − initial) per configuration, as box plots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(gains) + 1.5), 3.4), layout="constrained")
    labels = list(gains)
    ax.boxplot([gains[label] for label in labels], showmeans=True, showfliers=True,
               flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title=title, ylabel="personalized − initial (per client)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_gain_by_size(quarters: Mapping[str, SizeQuarters], path: Path) -> None:
    """Each cell's mean gain per quarter of writer size (the held-out writers, hence the quarters, are shared)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for label, cell in quarters.items():
        ax.plot(range(4), cell.gains, marker="o", label=label)
    sizes = next(iter(quarters.values())).sizes
    ax.set_xticks(range(4), [f"{low}–{high}" for low, high in sizes])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title="mean gain per quarter of held-out writers by size", xlabel="train examples of the writers",
           ylabel="personalized − initial")
    ax.legend(fontsize=6, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _add_legend(fig: Figure, axes: Sequence[Axes], extra: Sequence[Line2D] = ()) -> None:
    """Panels with the same entries share one legend under them, where it hides no data point;
    panels with different entries get one each. ``extra`` entries (line styles) end every legend."""
    per_panel = [dict(zip(*reversed(ax.get_legend_handles_labels()))) for ax in axes]
    if any(entries.keys() != per_panel[0].keys() for entries in per_panel):
        for ax in axes:
            handles, labels = ax.get_legend_handles_labels()
            ax.legend([*handles, *extra], [*labels, *(line.get_label() for line in extra)], fontsize=6, loc="best")
        return
    entries = {**per_panel[0], **{line.get_label(): line for line in extra}}
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=4, fontsize=7)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
