"""The comparison report: one table per dataset, the search that chose each method's values, plots.

Numbers come from the finished runs alone (``evaluation.json`` and ``metrics.jsonl``);
per-client numbers are paired only when their client ids match (``paired_differences``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fedmeta.experiment.build import describe_personalization
from fedmeta.experiment.compare import published as published_numbers
from fedmeta.experiment.compare.methods import Method
from fedmeta.experiment.compare.plan import estimated_seconds
from fedmeta.experiment.compare.search import candidate_name
from fedmeta.experiment.reproduce.figures import PLOTS, plot_curves, plot_gains
from fedmeta.experiment.reproduce.findings import SeededRuns, accuracy_cell
from fedmeta.experiment.reproduce.markdown import table
from fedmeta.experiment.reproduce.runs import RunRecord, read_record
from fedmeta.experiment.reproduce.verdicts import Accuracies, Interval, paired_differences, paired_interval

if TYPE_CHECKING:
    from fedmeta.experiment.compare import Comparison, SettingRuns

BASELINE = "local_only"
"""The floor every method must beat: when compared, each method's personalized accuracy is paired with its."""


def curves_name(setting: str) -> str:
    return f"{setting}_accuracy_over_rounds.png"


def gains_name(setting: str) -> str:
    return f"{setting}_gain_distribution.png"


def seeded_runs(method: Method, runs: SettingRuns) -> SeededRuns:
    """A method's runs at every seed, with the records of those that finished."""
    states = runs.states[method.name]
    records = tuple(read_record(s) if s.status == "finished" else None for s in states)
    return SeededRuns(method.label, tuple(s.spec for s in states), records)


def checked_accuracies(runs: SeededRuns) -> Accuracies:
    """Initial and personalized per-client accuracy per seed, each pair checked to be the same clients."""
    initial, personalized = [], []
    for record in runs.records:
        e = record.evaluation
        ids = e["client_ids"]
        last = [a[-1] for a in e["personalized_accuracy"]]
        if not len(ids) == len(e["initial_accuracy"]) == len(last):
            raise ValueError(f"{record.run_dir}: evaluation.json lists {len(ids)} clients but "
                             f"{len(e['initial_accuracy'])} initial and {len(last)} personalized accuracies")
        initial.append(np.asarray(e["initial_accuracy"], dtype=np.float64))
        personalized.append(np.asarray(last, dtype=np.float64))
    return Accuracies(tuple(initial), tuple(personalized))


def versus(runs: SeededRuns, baseline: SeededRuns) -> Interval:
    """Personalized accuracy minus the baseline's, client by client at each seed; refused if the clients differ."""
    differences = []
    for ours, theirs in zip(runs.records, baseline.records):
        a, b = theirs.evaluation, ours.evaluation
        differences.append(paired_differences(
            a["client_ids"], [x[-1] for x in a["personalized_accuracy"]], b["client_ids"],
            [x[-1] for x in b["personalized_accuracy"]], f"{ours.run_dir.name} against {theirs.run_dir.name}"))
    return paired_interval(differences)


def client_samples(record: RunRecord) -> int:
    """Client training samples the run spent: each round's samples per second times its seconds."""
    return round(sum(row.get("time/samples_per_second", 0.0) * row.get("time/round_seconds", 0.0)
                     for row in record.history))


def method_row(runs: SeededRuns, baseline: SeededRuns | None) -> list[str]:
    """method | initial | personalized | gain (95%) | share hurt | client samples | wall time [| vs baseline]."""
    extra = [] if baseline is None else ["—"]
    if not runs.complete:
        finished = sum(r is not None for r in runs.records)
        return [runs.label, f"{finished} of {len(runs.records)} seeds finished (see Missing runs)", "—", "—", "—",
                "—", "—", *extra]
    acc = checked_accuracies(runs)
    hurt = np.mean([float(np.mean(g < 0)) for g in acc.gains])
    samples = np.mean([client_samples(r) for r in runs.records])
    seconds = np.mean([r.wall_seconds for r in runs.records])
    if baseline is not None and baseline.complete and baseline is not runs:
        extra = [str(versus(runs, baseline))]
    return [runs.label, accuracy_cell(acc.initial), accuracy_cell(acc.personalized), str(paired_interval(acc.gains)),
            f"{hurt:.1%}", f"{samples:,.0f}", f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min",
            *extra]


def _settings_text(method: Method, runs: SeededRuns) -> str:
    config = runs.specs[0].config
    a = config.algorithm
    fixed = ", ".join(f"{key} {getattr(a, key)!r}" for key in method.fixed)
    return (f"{method.label}: {config.rounds} rounds of {a.cohort_size} clients, client lr {a.client_lr:g}, batch "
            f"{a.client_batch_size}" + (f", {fixed}" if fixed else "")
            + f"; personalized by {describe_personalization(config)[1]}")


def _search_rows(runs: SettingRuns, methods: Sequence[Method]) -> list[list[str]]:
    rows = []
    for method in methods:
        chosen = runs.choices[method.name]
        for trial in runs.trials[method.name]:
            score = "diverged" if trial.score is None else f"{trial.score:.4f}"
            initial = "—" if trial.initial is None else f"{trial.initial:.4f}"
            mark = " **(chosen)**" if trial.choice == chosen else ""
            rows.append([method.label, f"`{candidate_name(trial.choice)}`{mark}", str(trial.config.rounds), initial,
                         score])
    return rows


def _budget_rows(all_runs: dict[str, SeededRuns], methods: Sequence[Method]) -> list[list[str]]:
    rows = []
    for method in methods:
        runs = all_runs[method.name]
        config = runs.specs[0].config
        measured = [r.wall_seconds / 60 for r in runs.records if r is not None]
        rounds = sorted({s.config.rounds for s in runs.specs})
        rows.append([method.label, "/".join(str(r) for r in rounds), str(config.evaluation.every),
                     f"{estimated_seconds(config) / 60:.1f}", f"{np.mean(measured):.1f}" if measured else "—"])
    return rows


def _missing(all_runs: dict[str, SeededRuns], runs: SettingRuns) -> list[str]:
    lines = []
    for name, seeded in all_runs.items():
        for state in runs.states[name]:
            if state.status != "finished":
                why = (f"interrupted after {state.rounds_done} of {state.spec.config.rounds} rounds (resumable)"
                       if state.status == "resumable" else f"diverged: {state.note}" if state.status == "diverged"
                       else "not run")
                lines.append(f"- `{state.spec.name}`: {why}")
    return lines


def _published(setting: str, all_runs: dict[str, SeededRuns], methods: Sequence[Method]) -> list[str]:
    rows = []
    for p in published_numbers.published(setting):
        ours = all_runs.get(p.method)
        if ours is None or not ours.complete:
            continue
        acc = checked_accuracies(ours)
        rows.append([ours.label, f"{np.mean([a.mean() for a in acc.initial]):.4f}",
                     f"{np.mean([a.mean() for a in acc.personalized]):.4f}", f"{p.initial:g}", f"{p.personalized:g}",
                     p.source, p.differences])
    if not rows:
        return []
    return ["#### Beside published numbers", "",
            *table(["method", "initial (ours)", "personalized (ours)", "initial (paper)", "personalized (paper)",
                    "paper", "how the settings differ"], rows), ""]


def _setting_section(runs: SettingRuns, methods: Sequence[Method]) -> list[str]:
    setting = runs.setting
    all_runs = {m.name: seeded_runs(m, runs) for m in methods}
    baseline = all_runs.get(BASELINE)
    header = ["method", "initial", "personalized", "gain (95%, paired)", "clients hurt", "client samples", "wall time"]
    if baseline is not None:
        header.append("personalized − local only (95%, paired)")
    data = setting.data
    described = (f"Synthetic({data.alpha:g}, {data.beta:g}), {data.num_clients} clients" if data.kind == "synthetic"
                 else f"{data.kind} from the TFF h5 files" + (f", first {data.max_clients} clients"
                                                              if data.max_clients else ""))
    lines = [
        f"## {setting.name}", "",
        f"{described}; model `{setting.model}`; {setting.cohort_size} clients a round; budget "
        f"{setting.budget:,} client training samples per run. Initial and personalized: mean ± std over held-out "
        "clients at the last round (± the 95% interval over seeds); gain: personalized − initial per client; "
        "clients hurt: share with gain < 0; client samples and wall time: mean over seeds.", "",
        *table(header, [method_row(all_runs[m.name], baseline) for m in methods]), "",
    ]
    curves = {r.label: r.curve() for r in all_runs.values() if r.complete}
    if curves:
        lines += [f"![accuracy over rounds; dashed: initial, solid: personalized]({PLOTS}/{curves_name(setting.name)})",
                  "", f"![per-client personalization gain]({PLOTS}/{gains_name(setting.name)})", ""]
    lines += _published(setting.name, all_runs, methods)
    lines += [
        "#### Hyperparameters: the search on training clients", "",
        "Each candidate trained with the same budget on the first seed's training clients less a validation "
        "split of them, and was scored by the validation clients' mean personalized accuracy; held-out clients "
        "are never read. The best was run at every seed.", "",
        *table(["method", "candidate", "rounds", "validation initial", "validation personalized"],
               _search_rows(runs, methods)), "",
        *(f"- {_settings_text(m, all_runs[m.name])}" for m in methods), "",
        "#### Rounds and time", "",
        *table(["method", "rounds (at the seeds)", "evaluated every", "estimated min", "measured min"],
               _budget_rows(all_runs, methods)), "",
    ]
    missing = _missing(all_runs, runs)
    if missing:
        lines += ["#### Missing runs", "", *missing, ""]
    return lines


def render(comparison: Comparison, *, command: str, generated: str) -> str:
    """The whole report as markdown; ``command`` and ``generated`` (UTC) say how and when it was made."""
    scale = comparison.scale
    lines = [
        f"# Personalization methods compared: `{scale.name}` scale", "",
        f"Generated by `{command}` on {generated}. Seeds {', '.join(str(s) for s in scale.seeds)}: in fedmeta "
        "the run seed draws the held-out split, the initial model and the cohorts, so the intervals over seeds "
        "cover all three. Every method is evaluated on the same held-out clients at a seed.", "",
        *([scale.note, ""] if scale.note else []),
    ]
    for runs in comparison.settings:
        lines += _setting_section(runs, comparison.methods)
    lines += [
        "## How this is decided (fixed before any run)", "",
        "- **Equal budget:** every method spends the same number of client training samples; its rounds are the "
        "budget over its samples per round (cohort × per-client samples: FedAvg and FedProx one pass over the "
        "client's data, Reptile K batches, MAML and FOMAML K + 1, Per-FedAvg 2 per step, Ditto two passes, pFedMe "
        "K batches per local step, SCAFFOLD one pass; two-stage half in each stage). FedAvg, FedProx, Ditto and "
        "SCAFFOLD spend it in expectation, since their cohorts' data sizes vary; the table shows what each spent. "
        "Local-only trains nothing globally. Personalization is the method's own rule and not counted.",
        "- **One server:** every method steps its global model with the paper's server optimizer, SGD with "
        "momentum 0.9 (lr 1 where the server averages models; MAML's and FOMAML's lr, the meta step, is searched; "
        "two-stage's second stage keeps the paper's Adam), so that the methods differ in their client updates "
        "alone.",
        "- **Intervals:** a t interval over the seeds' mean per-client differences (both sides of a difference "
        "are the same held-out clients; a pair of runs whose client ids differ is refused).",
        "- **Hyperparameters:** a grid per method, searched on training clients only, as listed per dataset.",
        f"- **Published numbers:** {published_numbers.NOT_FOUND}", "",
    ]
    return "\n".join(lines) + "\n"


def write_figures(comparison: Comparison, plots: Path) -> None:
    """Accuracy over rounds and the per-client gains, one pair per dataset with a finished method."""
    for runs in comparison.settings:
        finished = [seeded_runs(m, runs) for m in comparison.methods]
        finished = [r for r in finished if r.complete]
        if not finished:
            continue
        plot_curves({runs.setting.name: {r.label: r.curve() for r in finished}}, plots / curves_name(runs.setting.name))
        plot_gains({r.label: np.concatenate(checked_accuracies(r).gains) for r in finished},
                   plots / gains_name(runs.setting.name), f"{runs.setting.name}: personalization gain per client")


def write_report(comparison: Comparison, report_dir: Path, *, command: str = "fedmeta compare") -> Path:
    """Writes ``report.md`` and ``plots/`` into ``report_dir``; returns the report's path."""
    (report_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    text = render(comparison, command=command, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_figures(comparison, report_dir / PLOTS)
    path = report_dir / "report.md"
    path.write_text(text)
    return path
