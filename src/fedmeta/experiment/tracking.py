"""Trackers: TensorBoard and MLflow receive a run's metrics rows as ``metrics.jsonl`` gets them.

``metrics.jsonl`` stays the record; a tracker is a view of it for the tools people
already watch. Each gets every row's numbers (``time/finished_at`` and other text stay
out) at step ``round``, the rounds done, and the resolved config once; MLflow also gets
the run's tags and, when the run finishes, ``evaluation.json``. ``[logging]`` in the
config turns them on (``fedmeta.experiment.config.LoggingConfig``); their packages are
imported only then.

A resumed run continues the same TensorBoard directory and MLflow run (its id is kept in
the run directory's ``mlflow_run_id``) with each step once: TensorBoard drops what the
stopped run logged after its checkpoint (``purge_step``), as the resumed run logs those
rounds again; MLflow, whose metric history only grows, skips the rounds it already has.
Those rounds have the same bits in the resumed run, but for ``time/*``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

import fedmeta
from fedmeta.experiment.config import ConfigError, ExperimentConfig, LoggingConfig, config_to_dict, config_to_toml
from fedmeta.experiment.run_dir import evaluation_path, replace_atomically

LOGGING_INSTALL = 'pip install "fedmeta[logging]"'
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
MLFLOW_RUN_ID = "mlflow_run_id"
_PACKAGES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
"""What each tracker imports; MLflow's SQLite store needs SQLAlchemy and Alembic, which ``mlflow-skinny`` lacks."""


class Tracker(Protocol):
    """Receives each metrics row as it is appended, then is closed with the run's end."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self, finished: bool) -> None: ...


def require_trackers(settings: LoggingConfig) -> None:
    """Raises ConfigError for a tracker turned on without its packages (naming the extra to install), or for a
    tracking URI MLflow cannot open, before the run makes its directory."""
    for key, packages in _PACKAGES.items():
        missing = [name for name in packages if importlib.util.find_spec(name) is None]
        if getattr(settings, key) and missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"logging.{key} = true: {' and '.join(missing)} {verb} not installed; install it "
                              f"with {LOGGING_INSTALL}")
    if settings.mlflow and settings.mlflow_tracking_uri is not None:
        _check_tracking_uri(settings.mlflow_tracking_uri)


def _check_tracking_uri(uri: str) -> None:
    """MLflow opens a store as its client is made (a server only on the first request), and refuses a file store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri)
    except MlflowException as error:
        reason = " ".join(str(error).split()).split(". ")[0]  # its first sentence, on one line
        raise ConfigError(f"logging.mlflow_tracking_uri = {uri!r}: expected a store MLflow opens, such as "
                          f"'sqlite:///PATH' or 'http://HOST:PORT' ({reason})") from None


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers by key, but for ``round``, which is their step."""
    return {key: float(value) for key, value in row.items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker:
    """Scalars in ``run_dir/tensorboard/``; the config as text, on the run's first start."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, rounds_done: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # steps after the checkpoint were logged by the stopped run and come again
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=rounds_done + 1 if rounds_done else None)
        if not rounds_done:
            indented = "".join(f"    {line}\n" for line in config_to_toml(config).splitlines())  # Markdown code
            self.writer.add_text("config", indented, global_step=0)

    def log(self, row: Mapping[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["round"])
        self.writer.flush()  # a checkpoint after this row must not count steps a crash loses

    def close(self, finished: bool) -> None:
        self.writer.close()


def local_mlflow_uri(run_dir: Path) -> str:
    """The default tracking store: SQLite in ``run_dir/mlflow/`` (MLflow 3 refuses its file store unless told)."""
    return f"sqlite:///{(run_dir / MLFLOW_DIR / 'mlflow.db').resolve()}"


def _params(config: ExperimentConfig) -> list[tuple[str, str]]:
    """The config's keys as MLflow params (``algorithm.client_lr``), unset ones left out."""
    flat: list[tuple[str, str]] = []

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                flat.append((f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)))

    walk(config_to_dict(config), "")
    return flat


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MlflowTracker:
    """One MLflow run per run directory, whose id ``run_dir/mlflow_run_id`` keeps for a resumed run."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, rounds_done: int) -> None:
        from mlflow.tracking import MlflowClient

        settings = config.logging
        local = settings.mlflow_tracking_uri is None
        if local:
            (run_dir / MLFLOW_DIR).mkdir(exist_ok=True)
            # a new store announces its tables at INFO, amid the run's own output, for every run
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(local_mlflow_uri(run_dir) if local else settings.mlflow_tracking_uri)
        self.run_dir = run_dir
        id_file = run_dir / MLFLOW_RUN_ID
        if rounds_done and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = self._last_step()
            return
        name = settings.mlflow_experiment or config.name
        experiment = self.client.get_experiment_by_name(name)
        artifacts = (run_dir / MLFLOW_DIR / "artifacts").resolve().as_uri() if local else None
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(name, artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags={
            "fedmeta.version": fedmeta.__version__, "torch.version": torch.__version__,
            "fedmeta.run_dir": str(run_dir.resolve())}).info.run_id
        replace_atomically(id_file, lambda file: file.write(self.run_id.encode()))
        self.logged = rounds_done
        self._log_config(config)

    def _log_config(self, config: ExperimentConfig) -> None:
        from mlflow.entities import Param

        for chunk in _chunks(_params(config), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in chunk])
        self.client.log_text(self.run_id, config_to_toml(config), "config.toml")

    def _last_step(self) -> int:
        """The last step the run has logged: a resumed run logs only after it."""
        keys = self.client.get_run(self.run_id).data.metrics
        return max((metric.step for key in keys for metric in self.client.get_metric_history(self.run_id, key)),
                   default=0)

    def log(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        if row["round"] <= self.logged:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, row["round"]) for key, value in scalars(row).items()]
        for chunk in _chunks(metrics, 1000):  # MLflow's limit of metrics a batch
            self.client.log_batch(self.run_id, metrics=list(chunk))
        self.logged = row["round"]

    def close(self, finished: bool) -> None:
        if finished and evaluation_path(self.run_dir).is_file():
            self.client.log_artifact(self.run_id, str(evaluation_path(self.run_dir)))
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")


class Trackers:
    """The trackers ``[logging]`` turns on, fed together."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = trackers

    def log(self, row: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row)


@contextmanager
def open_trackers(config: ExperimentConfig, run_dir: Path, rounds_done: int) -> Iterator[Trackers]:
    """The run's trackers, for rounds after ``rounds_done``; closed as finished unless the block raises."""
    kinds = [kind for key, kind in (("tensorboard", TensorBoardTracker), ("mlflow", MlflowTracker))
             if getattr(config.logging, key)]
    opened: list[Tracker] = []
    finished = False
    try:
        for kind in kinds:
            opened.append(kind(config, run_dir, rounds_done))
        yield Trackers(opened)
        finished = True
    finally:
        for tracker in opened:
            tracker.close(finished)
