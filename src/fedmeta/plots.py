"""PNG plots of a run directory: the two accuracies over rounds, where clients land, and the gain by client size.

Reads only ``metrics.jsonl`` and ``evaluation.json``, so it works on any finished (or
interrupted, for the first plot) run. A task whose primary metric is not accuracy (an
error, say) has its plots drawn for that metric, under the same file names.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmeta.evaluation.personalization import primary_metric
from fedmeta.experiment.run_dir import evaluation_path, read_evaluation, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files only (no display needed).

    Imported when the first plot is drawn, not with fedmeta: matplotlib takes a third of a
    second to import, and most commands draw nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_over_rounds(history: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> None:
    """Initial and personalized accuracy, or ``metric`` (mean ± std over clients), and train loss by round."""
    evaluated = [row for row in history if f"initial/{metric}" in row]
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    rounds = np.array([row["round"] for row in evaluated])
    bounds = (0, 1) if metric.endswith("accuracy") else (-np.inf, np.inf)
    for key, label in (("initial", "initial (global model)"), ("personalized", "personalized (fine-tuned)")):
        mean = np.array([row[f"{key}/{metric}"] for row in evaluated])
        std = np.array([row[f"{key}/{metric}_std"] for row in evaluated])
        top.plot(rounds, mean, marker="o", markersize=3, label=label)
        top.fill_between(rounds, np.clip(mean - std, *bounds), np.clip(mean + std, *bounds), alpha=0.15)
    top.set_ylabel(f"{metric} on held-out clients")
    top.legend(loc="lower right" if metric.endswith("accuracy") else "upper right")
    top.grid(alpha=0.3)
    trained = [row for row in history if "client/train_loss" in row]  # a round no client came back from has none
    bottom.plot([row["round"] for row in trained], [row["client/train_loss"] for row in trained], color="gray")
    bottom.set_xlabel("rounds")
    bottom.set_ylabel("client train loss")
    bottom.grid(alpha=0.3)
    _save(fig, path)


def _primary(evaluation: dict[str, Any]) -> tuple[str, bool]:
    """(the primary metric of ``evaluation.json``, whether higher is better); accuracy where it names none."""
    return evaluation.get("primary_metric", "accuracy"), evaluation.get("higher_is_better", True)


def plot_initial_vs_personalized(evaluation: dict[str, Any], path: Path) -> None:
    """One point per client: above the diagonal (below, for an error), personalization helped it."""
    metric, higher_is_better = _primary(evaluation)
    initial = np.array(evaluation[f"initial_{metric}"])
    final = np.array([acc[-1] for acc in evaluation[f"personalized_{metric}"]])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    hurt = final < initial if higher_is_better else final > initial
    ax.scatter(initial[~hurt], final[~hurt], s=14, alpha=0.7, label="helped or unchanged")
    ax.scatter(initial[hurt], final[hurt], s=14, alpha=0.7, color="tab:red", label=f"hurt ({hurt.mean():.0%})")
    top = 1 if metric.endswith("accuracy") else max(initial.max(), final.max()) * 1.05
    ax.plot([0, top], [0, top], color="black", linewidth=0.8)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=f"initial {metric}", ylabel=f"personalized {metric}",
           title=f"{len(initial)} clients")
    ax.legend(loc="lower right" if higher_is_better else "upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_client_distribution(evaluation: dict[str, Any], path: Path) -> None:
    """Per-client accuracy (or the primary metric) before and after each fine-tuning epoch, and the gain's histogram."""
    metric, _ = _primary(evaluation)
    initial = np.array(evaluation[f"initial_{metric}"])
    by_epoch = np.array(evaluation[f"personalized_{metric}"]).T
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot([initial, *by_epoch], showmeans=True)
    left.set_xticks(range(1, len(by_epoch) + 2), ["initial", *[f"epoch {e + 1}" for e in range(len(by_epoch))]])
    left.set_ylabel(f"client {metric}")
    left.grid(alpha=0.3)
    gain = by_epoch[-1] - initial
    right.hist(gain, bins=30, color="tab:green", alpha=0.8)
    right.axvline(0, color="black", linewidth=0.8)
    right.set(xlabel=f"personalized − initial {metric}", ylabel="clients",
              title=f"mean gain {gain.mean():+.3f}")
    right.grid(alpha=0.3)
    _save(fig, path)


def plot_gain_by_client_size(evaluation: dict[str, Any], path: Path) -> None:
    """Each client's personalization gain against its train examples, with the mean gain of each size quartile."""
    metric, higher_is_better = _primary(evaluation)
    size = np.array(evaluation["client_num_train"], dtype=float)
    final = np.array([acc[-1] for acc in evaluation[f"personalized_{metric}"]])
    gain = final - np.array(evaluation[f"initial_{metric}"])
    hurt = gain < 0 if higher_is_better else gain > 0
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(size[~hurt], gain[~hurt], s=14, alpha=0.6, label="helped or unchanged")
    ax.scatter(size[hurt], gain[hurt], s=14, alpha=0.6, color="tab:red", label=f"hurt ({hurt.mean():.0%})")
    quartiles = np.array_split(np.argsort(size, kind="stable"), min(4, len(size)))
    centers = [float(np.median(size[q])) for q in quartiles]
    means = [float(np.mean(gain[q])) for q in quartiles]
    ax.plot(centers, means, color="black", marker="s", label="mean gain of each size quartile")
    ax.axhline(0, color="black", linewidth=0.8)
    if size.min() > 0:
        ax.set_xscale("log")
    ax.set(xlabel="client train examples", ylabel=f"personalized − initial {metric}",
           title=f"{len(size)} clients; mean gain by size quartile: " + ", ".join(f"{m:+.3f}" for m in means))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes the run's plots into ``run_dir/plots`` and returns their paths."""
    run_dir = Path(run_dir)
    history = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    metric = next(filter(None, map(primary_metric, history)), None)
    if metric is not None:
        written.append(out / "accuracy_over_rounds.png")
        plot_accuracy_over_rounds(history, written[-1], metric)
    if evaluation_path(run_dir).is_file():
        evaluation = read_evaluation(run_dir)
        written.append(out / "initial_vs_personalized.png")
        plot_initial_vs_personalized(evaluation, written[-1])
        written.append(out / "client_distribution.png")
        plot_client_distribution(evaluation, written[-1])
        if "client_num_train" in evaluation:  # older runs lack it
            written.append(out / "gain_by_client_size.png")
            plot_gain_by_client_size(evaluation, written[-1])
    if not written:
        raise ValueError(f"{run_dir}: nothing to plot yet (no evaluated round)")
    return written
