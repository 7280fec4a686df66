"""The ``fedmeta`` command: parses arguments, builds a config, calls the library.

    fedmeta run [CONFIG] [--set key=value ...]
    fedmeta run --resume RUN_DIR
    fedmeta config show [CONFIG] [--set key=value ...]
    fedmeta eval RUN_DIR|CHECKPOINT [--set evaluation.key=value ...] [--clients held_out|train]
    fedmeta decompose RUN_DIR|CHECKPOINT [--client ID]
    fedmeta plot RUN_DIR
    fedmeta history RUN_DIR [--all]
    fedmeta runs [DIR]
    fedmeta runs compare RUN_DIR [RUN_DIR ...] [--output PNG]
    fedmeta data download emnist|shakespeare [--cache-dir DIR]
    fedmeta flower app DIR [CONFIG] [--set key=value ...]
    fedmeta reproduce table1|schedule|centralized|shakespeare|writers|finetune|all|report
                      [--scale smoke|quick|full] [--data-dir DIR]
    fedmeta compare [--methods M,M...] [--scale smoke|quick|full] [--seeds N] [--datasets D,D...] [--data-dir DIR]
    fedmeta privacy-study [--scale smoke|full] [--report-only] [--data-dir DIR]

Errors a user can fix (bad config, missing file, offline download) end with one line
``fedmeta: error: ...`` and exit status 2; ``--debug`` (before or after the command)
prints the traceback above that line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from fedmeta import __version__
from fedmeta.data.download import DATASETS, DownloadError, download
from fedmeta.evaluation.personalization import PersonalizationReport, primary_metric
from fedmeta.evaluation.tuning import Tuning
from fedmeta.experiment.build import describe_personalization
from fedmeta.experiment import compare as comparison
from fedmeta.experiment.config import (
    ConfigError, ExperimentConfig, builtin_configs, config_to_toml, load_config, resolved,
)
from fedmeta.experiment.privacy_study import STUDIES, run_study
from fedmeta.experiment.privacy_study import write_report as write_study_report
from fedmeta.experiment.reproduce import EXPERIMENTS, SCALES, default_data_dir, reproduce, write_report
from fedmeta.experiment.run import (
    checkpoint_file, decompose_checkpoint, evaluate_checkpoint, resume_experiment, run_experiment, tune_checkpoint,
)
from fedmeta.experiment.run_dir import checkpoint_path, config_path, read_metrics, writing
from fedmeta.experiment.runs import compare_runs, format_runs, list_runs
from fedmeta.flower.app import write_app  # the run config only: imports no Flower
from fedmeta.params import norm
from fedmeta.plots import plot_run


def shipped_configs() -> str:
    """The configs shipped with fedmeta, one line each (data, model, algorithm, rounds), for ``run --help``."""
    lines = ["shipped configs (fedmeta run NAME; fedmeta config show NAME prints every key):"]
    for name, path in builtin_configs().items():
        try:
            config = load_config(path)
        except ConfigError as error:  # needs an extra this install lacks (dp_fedavg without dp-accounting)
            lines.append(f"  {name:<18} {str(error).removeprefix(f'{path}: ')}")
            continue
        rounds = f"{config.rounds} round{'' if config.rounds == 1 else 's'}"
        lines.append(f"  {name:<18} {config.data.kind} data, {config.model_name}, {config.algorithm.name}, {rounds}")
    return "\n".join(lines)


_SHIPPED_CONFIGS = "(the shipped configs)"
"""The run parser's epilog until help is printed: ``_ShippedConfigsHelp`` puts the list there."""


class _ShippedConfigsHelp(argparse.RawDescriptionHelpFormatter):
    """Lists the shipped configs where ``run --help`` ends; only then, as loading them all costs every command time."""

    def add_text(self, text: str | None) -> None:
        super().add_text(shipped_configs() if text is _SHIPPED_CONFIGS else text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated learning personalization.")
    parser.add_argument("--version", action="version", version=f"fedmeta {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    overrides = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                 "help": "override a config key, e.g. algorithm.client_lr=0.05 (repeatable)"}

    run = commands.add_parser("run", help="train and evaluate; no CONFIG runs the embedded synthetic default",
                              epilog=_SHIPPED_CONFIGS, formatter_class=_ShippedConfigsHelp)
    run.add_argument("config", nargs="?", help="TOML config file or shipped config name (listed below)")
    run.add_argument("--set", dest="overrides", **overrides)
    run.add_argument("--no-progress", action="store_true",
                     help="hide the progress bar (hidden anyway when stdout or stderr is not a terminal)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a stopped run from its checkpoint, with its own config (no CONFIG or --set)")

    configs = commands.add_parser("config", help="configs and their keys")
    config_commands = configs.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config as TOML, every key (unset ones as "
                                                   "comments)")
    show.add_argument("config", nargs="?", help="TOML config file or shipped config name (default: embedded)")
    show.add_argument("--set", dest="overrides", **overrides)

    evaluate = commands.add_parser("eval", help="personalization evaluation of a checkpoint")
    evaluate.add_argument("checkpoint", metavar="RUN_DIR", help="a run directory, or its checkpoint.pt")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="change the evaluation, e.g. evaluation.fine_tune_lr=0.002 (repeatable): "
                               "evaluation.fine_tune_*, evaluation.max_clients, engine.* but engine.client_states, "
                               "data.path; MAML's and Per-FedAvg's adaptation keys, Ditto's and pFedMe's algorithm.lam")
    evaluate.add_argument("--clients", choices=("held_out", "train"), default="held_out")
    evaluate.add_argument("--tune", action="store_true",
                          help="choose the fine-tuning optimizer, lr and epochs (1-10) on a validation split of the "
                               "training clients, then evaluate the held-out clients with them")
    evaluate.add_argument("--output", help="write per-client results here (JSON)")

    decompose = commands.add_parser("decompose",
                                    help="FedAvg update = FedSGD gradient + FOMAML gradients, for one client")
    decompose.add_argument("checkpoint", metavar="RUN_DIR", help="a run directory, or its checkpoint.pt")
    decompose.add_argument("--client", help="client id (default: the first training client)")
    decompose.add_argument("--set", dest="overrides", **overrides)

    plot = commands.add_parser("plot", help="write PNG plots of a run directory")
    plot.add_argument("run_dir")

    history = commands.add_parser("history", help="a run's metrics over rounds, as a table (from metrics.jsonl)")
    history.add_argument("run_dir")
    history.add_argument("--all", action="store_true", help="every round, not only the evaluated ones")

    runs = commands.add_parser("runs", help="list the run directories in DIR (default runs/), or compare runs",
                               usage="fedmeta runs [DIR]\n       fedmeta runs compare RUN_DIR [RUN_DIR ...] "
                                     "[--output PNG]")
    runs.add_argument("paths", nargs="*", metavar="DIR", help="a folder of runs; or `compare` and run directories")
    runs.add_argument("--output", metavar="PNG", default="runs-compare.png",
                      help="compare's plot (default runs-compare.png)")

    data = commands.add_parser("data", help="dataset utilities")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    fetch = data_commands.add_parser("download", help="fetch and verify the official TFF files")
    fetch.add_argument("name", choices=sorted(DATASETS))
    fetch.add_argument("--cache-dir", help="where to keep the files (default: the fedmeta cache)")
    fetch.add_argument("--url", help="fetch the archive from this mirror instead of TFF's")
    flower = commands.add_parser("flower", help="deploy an experiment through Flower")
    flower_commands = flower.add_subparsers(dest="flower_command", required=True)
    flower_app = flower_commands.add_parser("app", help="write a Flower App directory that runs the experiment")
    flower_app.add_argument("directory", help="the App directory to create; its name is the App's")
    flower_app.add_argument("config", nargs="?", help="TOML config file or shipped config name (default: embedded)")
    flower_app.add_argument("--set", dest="overrides", **overrides)
    repro = commands.add_parser("reproduce", help="run the paper's experiments; write a report beside its numbers")
    repro.add_argument("experiment", choices=(*EXPERIMENTS, "all", "report"),
                       help="an experiment, all of them, or only the report from the runs present")
    repro.add_argument("--scale", choices=tuple(SCALES), default="quick",
                       help="smoke (seconds, for tests), quick (~15 min), full (the paper's grid, ~8 h on 2 cores)")
    repro.add_argument("--data-dir", help="directory holding femnist/ and shakespeare/ "
                                          "(default: $FEDMETA_SHARED_DATA, else ../shared/data)")
    repro.add_argument("--output", default="runs/reproduce", help="root of the run directories (default: %(default)s)")
    repro.add_argument("--report-dir", help="where report.md and plots/ go (default: OUTPUT/SCALE)")
    repro.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    versus = commands.add_parser("compare", help="personalization methods at an equal budget on the same held-out "
                                                 "clients; writes a report")
    versus.add_argument("--methods", default=",".join(comparison.METHODS),
                        help="comma-separated algorithm names (default: %(default)s)")
    versus.add_argument("--scale", choices=tuple(comparison.SCALES), default="quick",
                        help="smoke (seconds, for tests), quick (two synthetic settings, minutes), full (FEMNIST "
                             "and Shakespeare, hours; each setting prints its estimate)")
    versus.add_argument("--seeds", type=int, help=f"how many seeds, at least {comparison.MIN_SEEDS} (default: the "
                                                  "scale's, 3)")
    versus.add_argument("--datasets", help="comma-separated datasets of the scale (default: all of them)")
    versus.add_argument("--data-dir", help="directory holding femnist/ and shakespeare/ "
                                           "(default: $FEDMETA_SHARED_DATA, else ../shared/data)")
    versus.add_argument("--output", default="runs/compare", help="root of the runs (default: %(default)s)")
    versus.add_argument("--report-dir", help="where report.md and plots/ go (default: OUTPUT/SCALE)")
    versus.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    study = commands.add_parser("privacy-study", help="DP-FedAvg on FEMNIST at several epsilon, judged on "
                                                      "held-out writers; writes a report")
    study.add_argument("--scale", choices=tuple(STUDIES), default="full",
                       help="smoke (seconds, for tests) or full (FEMNIST c20/E2 at epsilon 1, 3, 8 and without "
                            "privacy, about 30 min on 2 cores)")
    study.add_argument("--report-only", action="store_true", help="write the report from the runs present")
    study.add_argument("--data-dir", help="directory holding femnist/ (default: $FEDMETA_SHARED_DATA, else "
                                          "../shared/data)")
    study.add_argument("--output", default="runs/privacy", help="root of the runs (default: %(default)s)")
    study.add_argument("--report-dir", help="where report.md and plots/ go (default: OUTPUT/SCALE)")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    # --debug after the command too; SUPPRESS keeps a subcommand from resetting the global value
    for command in (*commands.choices.values(), *config_commands.choices.values(), *data_commands.choices.values(),
                    *flower_commands.choices.values()):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def format_report(report: PersonalizationReport, config: ExperimentConfig) -> str:
    """The two numbers of the paper (accuracy, or the task's primary metric), with spread, as a few aligned lines."""
    initial, final = report.initial, report.personalized[-1]
    stage, fine_tune = describe_personalization(config)
    by_epoch = "  ".join(f"{s.mean:.4f}" for s in report.personalized)
    metric = report.task.primary
    return "\n".join([
        f"clients evaluated       {len(report.clients)}",
        f"{'initial ' + metric:<23} {initial.mean:.4f} ± {initial.std:.4f}  "
        f"(median {initial.median:.4f}, IQR {initial.q25:.4f}–{initial.q75:.4f})",
        f"{'personalized ' + metric:<23} {final.mean:.4f} ± {final.std:.4f}  "
        f"(median {final.median:.4f}, IQR {final.q25:.4f}–{final.q75:.4f})",
        f"  by fine-tuning {stage:<7}{by_epoch}",
        f"  fine-tuning           {fine_tune}",
        f"clients hurt            {report.share_hurt:.1%}",
    ])


def _interrupted(run_dir: Path | None) -> str:
    """How to go on after Ctrl-C, for the run directory in hand."""
    if run_dir is None:
        return "fedmeta: interrupted before the run directory was created; nothing to resume"
    if checkpoint_path(run_dir).is_file():
        return f"fedmeta: interrupted; continue with `fedmeta run --resume {run_dir}` from the last checkpoint"
    return f"fedmeta: interrupted before the first checkpoint; start again with `fedmeta run {config_path(run_dir)}`"


def _progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: not with --no-progress, nor when stdout or stderr is not a terminal,
    where the bar's redrawn frames would fill a pipe or a log file."""
    return not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()


def _run(args: argparse.Namespace) -> None:
    if args.resume is not None and (args.config is not None or args.overrides):
        raise ValueError(f"--resume {args.resume}: a resumed run keeps the config it started with; "
                         "drop CONFIG and --set (or start a new run)")
    run_dir = None

    def started(path: Path) -> None:
        nonlocal run_dir
        run_dir = path
        print(f"run directory           {path}", flush=True)

    try:
        if args.resume is None:
            result = run_experiment(load_config(args.config, args.overrides), progress=_progress(args),
                                    started=started)
        else:
            result = resume_experiment(args.resume, progress=_progress(args), started=started)
    except KeyboardInterrupt:
        print(_interrupted(run_dir), file=sys.stderr)
        raise SystemExit(130) from None
    dataset = result.dataset
    last = result.history[-1]
    dropped = dataset.info.get("dropped_clients", 0)
    print(f"data                    {dataset.name}: {len(dataset.train_ids)} training, "
          f"{len(dataset.held_out_ids)} held-out clients"
          + (f" ({dropped} dropped: no training or no test examples)" if dropped else ""))
    print(f"algorithm               {result.config.algorithm.name}, {result.config.rounds} rounds, "
          f"model {result.config.model_name}")
    loss = last.get("client/train_loss")  # absent when no client of the last round came back
    print(f"final train loss        {'none came back' if loss is None else f'{loss:.4f}'}")
    if "privacy/epsilon" in last:
        privacy = result.config.privacy
        print(f"privacy                 epsilon {last['privacy/epsilon']:.4g} at delta {privacy.delta:g} after "
              f"{last['round']} rounds ({privacy.accountant}, {privacy.sampling} cohorts, noise multiplier "
              f"{last['privacy/noise_multiplier']:.4g}, clip {last['privacy/clip']:.4g})")
    print(format_report(result.report, result.config))


def _config(args: argparse.Namespace) -> None:
    print(config_to_toml(resolved(load_config(args.config, args.overrides))), end="")


def _writable_file(path: Path, flag: str) -> None:
    """Raises ValueError unless ``path`` can be written as a file: checked before the work it records."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: a directory; give the path of a file to write")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: no directory {path.parent} to write it in")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def _eval(args: argparse.Namespace) -> None:
    if args.output:
        _writable_file(Path(args.output), "--output")
    if args.tune and args.clients != "held_out":
        raise ValueError("--tune chooses on training clients and evaluates the held-out ones; drop --clients train")
    tuning = None
    if args.tune:
        config, tuning, report = tune_checkpoint(args.checkpoint, args.overrides)
    else:
        config, report = evaluate_checkpoint(args.checkpoint, args.overrides, clients=args.clients)
    print(f"checkpoint              {checkpoint_file(args.checkpoint)} ({args.clients} clients)")
    if tuning is not None:
        print(format_tuning(tuning))
    print(format_report(report, config))
    if args.output:
        results = report.to_json() | ({} if tuning is None else {"tuning": tuning.to_json()})
        with writing(Path(args.output)):
            Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"per-client results      {args.output}")


def format_tuning(tuning: Tuning) -> str:
    """Each fine-tuning candidate's mean on the validation clients after every epoch, and the one chosen."""
    epochs = len(tuning.candidates[0].by_epoch)
    lines = [f"fine-tuning chosen on   {len(tuning.client_ids)} validation clients (training clients, never "
             f"held-out): mean {tuning.metric} before and after epochs 1-{epochs}"]
    lines += [f"  {c.optimizer:<4} lr {c.lr:<7g} {c.initial:.3f} | " + " ".join(f"{v:.3f}" for v in c.by_epoch)
              for c in tuning.candidates]
    lines.append(f"chosen                  {tuning.optimizer} lr {tuning.lr:g}, {tuning.epochs} epoch(s): "
                 f"validation {tuning.metric} {tuning.score:.4f}")
    return "\n".join(lines)


def _decompose(args: argparse.Namespace) -> None:
    client_id, decomposition, fedavg_gradient = decompose_checkpoint(args.checkpoint, args.client, args.overrides)
    summed = decomposition.summed()
    gap = max(float((summed[k] - fedavg_gradient[k]).abs().max()) for k in summed)
    print(f"client                  {client_id}: {1 + len(decomposition.fomaml)} local steps")
    for term, size in decomposition.norms().items():
        print(f"  |{term}|".ljust(24) + f"{size:.6g}")
    print(f"|sum of terms| {norm(summed):.6g}; largest difference from the client's FedAvg update "
          f"{gap:.3g}")


def _plot(args: argparse.Namespace) -> None:
    for path in plot_run(args.run_dir):
        print(path)


def format_history(rows: list[dict], every_round: bool = False) -> str:
    """The rounds of ``metrics.jsonl`` as an aligned table, by rounds done; its primary metric, accuracy unless
    the task has another."""
    metric = next(filter(None, map(primary_metric, rows)), "accuracy")
    columns = [("rounds", "round", "{:d}"), ("train loss", "client/train_loss", "{:.4f}"),
               ("initial", f"initial/{metric}", "{:.4f}"), ("personalized", f"personalized/{metric}", "{:.4f}"),
               ("hurt", "personalized/share_hurt", "{:.1%}")]
    shown = [row for row in rows if every_round or f"initial/{metric}" in row]
    cells = [[name for name, *_ in columns]]
    for row in shown:
        cells.append([form.format(row[key]) if key in row else "" for _, key, form in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def _history(args: argparse.Namespace) -> None:
    print(format_history(read_metrics(Path(args.run_dir)), every_round=args.all))


def _runs(args: argparse.Namespace) -> None:
    if args.paths[:1] == ["compare"]:
        if len(args.paths) < 2:
            raise ValueError("runs compare: name at least one run directory")
        print(format_runs(compare_runs(args.paths[1:], args.output)))
        print(f"plot: {args.output}")
    elif len(args.paths) > 1:
        raise ValueError(f"runs: one folder of runs, not {len(args.paths)} (to compare runs: fedmeta runs compare "
                         f"{' '.join(args.paths)})")
    else:
        print(format_runs(list_runs(args.paths[0] if args.paths else "runs")))


def _data(args: argparse.Namespace) -> None:
    paths = download(args.name, args.cache_dir, url=args.url)
    for path in paths.values():
        print(path)


def _flower(args: argparse.Namespace) -> None:
    print(write_app(load_config(args.config, args.overrides), args.directory))


def _reproduce(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    source = None if args.data_dir else f"data directory {data_dir} (the default; pass --data-dir)"
    command = " ".join(["fedmeta reproduce", args.experiment, "--scale", args.scale]
                       + [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("data_dir", "report_dir")
                          if getattr(args, flag)])
    if args.experiment != "report":
        experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
        try:
            reproduce(experiments, SCALES[args.scale], Path(args.output), data_dir, progress=_progress(args),
                      log=lambda line: print(line, flush=True), source=source)
        except KeyboardInterrupt:
            print(f"fedmeta: interrupted; `{command}` again resumes from the last checkpoints", file=sys.stderr)
            raise SystemExit(130) from None
    path = write_report(SCALES[args.scale], Path(args.output), data_dir,
                        Path(args.report_dir) if args.report_dir else None, command=command, source=source)
    print(f"report                  {path}")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def _compare(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    source = None if args.data_dir else f"data directory {data_dir} (the default; pass --data-dir)"
    scale = comparison.plan_scale(args.scale, args.seeds, _names(args.datasets))
    command = " ".join(["fedmeta compare --methods", args.methods, "--scale", args.scale]
                       + [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("seeds", "datasets")
                          if getattr(args, flag)])
    try:
        result = comparison.compare(_names(args.methods), scale, Path(args.output), data_dir,
                                    progress=_progress(args), log=lambda line: print(line, flush=True),
                                    source=source)
    except KeyboardInterrupt:
        print(f"fedmeta: interrupted; `{command}` again resumes from the last checkpoints", file=sys.stderr)
        raise SystemExit(130) from None
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.output) / scale.name
    print(f"report                  {comparison.write_report(result, report_dir, command=command)}")


def _privacy_study(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    source = None if args.data_dir else f"data directory {data_dir} (the default; pass --data-dir)"
    study = STUDIES[args.scale]
    command = " ".join(["fedmeta privacy-study --scale", args.scale]
                       + [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("data_dir", "report_dir")
                          if getattr(args, flag)])
    if not args.report_only:
        try:
            run_study(study, Path(args.output), data_dir, progress=_progress(args),
                      log=lambda line: print(line, flush=True), source=source)
        except KeyboardInterrupt:
            print(f"fedmeta: interrupted; `{command}` again resumes from the last checkpoints", file=sys.stderr)
            raise SystemExit(130) from None
    path = write_study_report(study, Path(args.output), data_dir, Path(args.report_dir) if args.report_dir else None,
                              command=command, source=source)
    print(f"report                  {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _run, "config": _config, "eval": _eval, "decompose": _decompose, "plot": _plot,
                "history": _history, "runs": _runs, "data": _data, "flower": _flower, "reproduce": _reproduce,
                "compare": _compare, "privacy-study": _privacy_study}
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError, DownloadError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"fedmeta: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmeta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout left (`| head -1`); no more output can reach it, and Python's own
        # flush at exit must not fail on it again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("fedmeta: error: standard output was closed before all output was written (Broken pipe)",
              file=sys.stderr)
        return 2
    return 0
