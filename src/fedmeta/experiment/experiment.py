"""``fedmeta.Experiment``: a run from Python, with one's own model, dataset, loss and metrics if one has them.

It is the CLI's run, given its parts from Python: the same run directory (``config.toml``,
``metrics.jsonl``, checkpoints, ``evaluation.json``), evaluation every ``evaluation.every``
rounds, the divergence stop, resume and plots. The config records each part passed as
the import path that names it, or as ``<passed from Python: ...>``; ``resume`` and
``evaluate`` then take those parts again (``fedmeta.experiment.inputs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from fedmeta.evaluation.personalization import PersonalizationReport
from fedmeta.evaluation.tasks import Metric
from fedmeta.experiment.config import (
    ExperimentConfig, config_from_dict, config_to_dict, load_config, resolved,
)
from fedmeta.experiment.inputs import Given, recorded
from fedmeta.experiment.run import RunResult, evaluate_checkpoint, resume_experiment, run_experiment
from fedmeta.plots import plot_run

Model = nn.Module | Callable[..., nn.Module]
Loss = str | Callable[..., Any]


class Experiment:
    """A configured run, with parts of one's own in place of the config's.

    ``config`` is an ``ExperimentConfig``, a TOML file or shipped config name, a dict of
    TOML tables, or None (the embedded default); ``overrides`` are ``key=value`` as
    ``--set`` takes them. ``model``: an ``nn.Module`` (its weights start the run) or a
    factory called with those of ``num_classes`` and ``input_dim`` it names. ``dataset``:
    a ``FederatedDataset``, a mapping of client ids to ``(x, y)``, a dataset of ``(x, y)``
    pairs with integer labels (split over ``data.num_clients`` clients by Dirichlet
    ``data.alpha``), or a function returning one. ``loss``: a name (``"mse"``) or a function
    returning the batch mean (``torch.nn.functional.huber_loss``). ``metrics``: names or
    ``Metric``s, the first primary. With worker processes (``engine.workers`` > 0) the
    functions passed must be picklable: defined at a module's top level.
    """

    def __init__(self, config: ExperimentConfig | str | Path | Mapping[str, Any] | None = None, *,
                 model: Model | None = None, dataset: Any = None, loss: Loss | None = None,
                 metrics: Sequence[str | Metric] | None = None, overrides: Sequence[str] = ()) -> None:
        if isinstance(config, ExperimentConfig):
            config = config_from_dict(config_to_dict(config), overrides)
        elif isinstance(config, Mapping):
            config = config_from_dict(config, overrides)
        else:
            config = load_config(config, overrides)
        self.given = Given(model, dataset, loss, None if metrics is None else tuple(metrics))
        self._config = config

    @property
    def config(self) -> ExperimentConfig:
        """The config the run records in its ``config.toml``, naming the parts given."""
        return resolved(recorded(self._config, self.given))

    def run(self, *, progress: bool = True) -> RunResult:
        """Trains, evaluates and records the run in a new run directory (``result.run_dir``)."""
        return run_experiment(self._config, given=self.given, progress=progress)

    @staticmethod
    def resume(run_dir: str | Path, *, model: Model | None = None, dataset: Any = None, loss: Loss | None = None,
               metrics: Sequence[str | Metric] | None = None, progress: bool = True) -> RunResult:
        """Continues a stopped run; pass again the parts its ``config.toml`` marks as passed from Python."""
        return resume_experiment(run_dir, given=Given(model, dataset, loss, metrics), progress=progress)

    @staticmethod
    def evaluate(run_dir: str | Path, *, model: Model | None = None, dataset: Any = None, loss: Loss | None = None,
                 metrics: Sequence[str | Metric] | None = None, overrides: Sequence[str] = (),
                 clients: str = "held_out") -> PersonalizationReport:
        """Personalization evaluation of a run's checkpoint, as ``fedmeta eval`` gives it."""
        return evaluate_checkpoint(run_dir, overrides, clients=clients,
                                   given=Given(model, dataset, loss, metrics))[1]

    @staticmethod
    def plot(run_dir: str | Path) -> list[Path]:
        """Writes the run's plots into ``run_dir/plots``, as ``fedmeta plot``; returns their paths."""
        return plot_run(run_dir)
