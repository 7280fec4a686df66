"""[logging]: TensorBoard and MLflow hold metrics.jsonl's numbers, read back from what they wrote."""

import importlib.util
import json
import re

import numpy as np
import pytest

from fedmeta.cli import main
from fedmeta.experiment.config import ConfigError, load_config
from fedmeta.experiment.run import resume_experiment, run_experiment
from fedmeta.experiment.run_dir import read_metrics
from fedmeta.experiment.tracking import MLFLOW_RUN_ID, TENSORBOARD_DIR, local_mlflow_uri, scalars


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar's (step, value) pairs as TensorBoard reads them, after its purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(run_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(local_mlflow_uri(run_dir)), (run_dir / MLFLOW_RUN_ID).read_text()


def mlflow_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    client, run_id = mlflow_client(run_dir)
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def metrics_by_key(rows, as_float32=False) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by key as (round, value); TensorBoard keeps float32."""
    by_key = {}
    for row in rows:
        for key, value in scalars(row).items():
            by_key.setdefault(key, []).append((row["round"], float(np.float32(value)) if as_float32 else value))
    return by_key


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_config):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    config = tiny_config(tmp_path_factory.mktemp("tracked"), "logging.tensorboard=true", "logging.mlflow=true")
    return run_experiment(config, progress=False)


@pytest.mark.slow
def test_tensorboard_holds_each_metrics_row_at_its_round(tracked_run):
    rows = read_metrics(tracked_run.run_dir)

    logged = tensorboard_scalars(tracked_run.run_dir)

    assert logged == metrics_by_key(rows, as_float32=True)
    assert logged["initial/accuracy"] == [(2, rows[1]["initial/accuracy"]), (3, rows[2]["initial/accuracy"])]
    assert "time/finished_at" not in logged and "personalized/accuracy_by_epoch" not in logged  # text, a list


@pytest.mark.slow
def test_tensorboard_holds_the_resolved_config_as_text(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run.run_dir / TENSORBOARD_DIR)).Reload()

    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "".join(f"    {line}\n" for line in (tracked_run.run_dir / "config.toml").read_text().splitlines())


@pytest.mark.slow
def test_mlflow_metric_history_equals_metrics_jsonl(tracked_run):
    rows = read_metrics(tracked_run.run_dir)

    logged = mlflow_scalars(tracked_run.run_dir)

    assert logged == metrics_by_key(rows)


@pytest.mark.slow
def test_mlflow_run_holds_the_config_tags_and_final_evaluation(tracked_run, tmp_path):
    import fedmeta

    client, run_id = mlflow_client(tracked_run.run_dir)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "default"  # the run's name
    assert run.data.params["algorithm.cohort_size"] == "3" and run.data.params["data.kind"] == "synthetic"
    assert "data.path" not in run.data.params  # unset
    assert run.data.tags["fedmeta.version"] == fedmeta.__version__
    evaluation = client.download_artifacts(run_id, "evaluation.json", str(tmp_path))
    assert json.loads(open(evaluation).read()) == json.loads((tracked_run.run_dir / "evaluation.json").read_text())
    config = client.download_artifacts(run_id, "config.toml", str(tmp_path))
    assert open(config).read() == (tracked_run.run_dir / "config.toml").read_text()


@pytest.mark.slow
def test_a_resumed_run_continues_both_trackers_with_each_round_once(tmp_path, monkeypatch, tiny_config,
                                                                     crash_at_round):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    config = tiny_config(tmp_path, "rounds=4", "checkpoint_every=2", "logging.tensorboard=true",
                         "logging.mlflow=true")
    crash_at_round(3)  # rounds 1 to 3 logged, the checkpoint holds 2: round 3 comes again
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(config, progress=False)
    monkeypatch.undo()
    run_dir = next(tmp_path.iterdir())
    first_run_id = (run_dir / MLFLOW_RUN_ID).read_text()

    resume_experiment(run_dir, progress=False)

    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert tensorboard_scalars(run_dir) == metrics_by_key(rows, as_float32=True)
    assert (run_dir / MLFLOW_RUN_ID).read_text() == first_run_id
    logged = mlflow_scalars(run_dir)
    assert {key: [step for step, _ in pairs] for key, pairs in logged.items()} == {
        key: [step for step, _ in pairs] for key, pairs in metrics_by_key(rows).items()}
    # round 3 is the stopped run's, which has the resumed run's bits but for its times
    assert {key: pairs for key, pairs in logged.items() if not key.startswith("time/")} == {
        key: pairs for key, pairs in metrics_by_key(rows).items() if not key.startswith("time/")}
    client, run_id = mlflow_client(run_dir)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_without_logging_no_tracker_writes_to_the_run_directory(tmp_path, tiny_config):
    result = run_experiment(tiny_config(tmp_path, "rounds=1"), progress=False)

    assert sorted(path.name for path in result.run_dir.iterdir()) == [
        "checkpoint.pt", "config.toml", "evaluation.json", "evaluations.jsonl", "metrics.jsonl", "provenance.json"]


@pytest.mark.parametrize("overrides, message", [
    (["logging.tensorboard=3"], "logging.tensorboard = 3: expected a bool"),
    (["logging.mlflow_tracking_uri=sqlite:///mlflow.db"],
     "logging.mlflow_tracking_uri = 'sqlite:///mlflow.db': expected logging.mlflow = true beside it (without, "
     "MLflow is off)"),
    (["logging.mlflow=true", "logging.mlflow_experiment=''"],
     "logging.mlflow_experiment = '': expected a non-empty string without NUL bytes"),
])
def test_a_bad_logging_key_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, overrides)


@pytest.mark.parametrize("key, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_tracker_without_its_package_is_one_line_naming_the_extra_before_any_run_directory(
        tmp_path, capsys, monkeypatch, tiny_settings, key, package):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == package
                        else find_spec(name, *args))

    code = main(["run", "--no-progress", *tiny_settings(tmp_path / "runs", f"logging.{key}=true")])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f'fedmeta: error: logging.{key} = true: {package} is not installed; install it with '
                   'pip install "fedmeta[logging]"\n')
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("uri, reason", [
    ("mlruns", "The filesystem tracking backend (e.g., './mlruns') is in maintenance mode and will not receive "
               "further updates"),
    ("bogus://x", "Model registry functionality is unavailable; got unsupported URI 'bogus://x' for model registry "
                  "data storage"),
])
def test_a_tracking_uri_mlflow_cannot_open_is_one_line_before_any_run_directory(tmp_path, capsys, tiny_settings,
                                                                                 uri, reason):
    pytest.importorskip("mlflow")

    code = main(["run", "--no-progress", *tiny_settings(tmp_path / "runs", "logging.mlflow=true",
                                                        f"logging.mlflow_tracking_uri={uri}")])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"fedmeta: error: logging.mlflow_tracking_uri = {uri!r}: expected a store MLflow opens, such as "
                   f"'sqlite:///PATH' or 'http://HOST:PORT' ({reason})\n")
    assert not (tmp_path / "runs").exists()
