"""The scripts in examples/ run at smoke size and leave the run directory they report."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED_DATA = Path(os.environ.get("FEDMETA_SHARED_DATA", REPO.parent / "shared" / "data"))
FEMNIST = pytest.mark.skipif(not (SHARED_DATA / "femnist" / "femnist_train.h5").is_file(),
                             reason=f"the FEMNIST files are not in {SHARED_DATA / 'femnist'}")
TENSORBOARD = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                 reason='TensorBoard is not installed (pip install "fedmeta[logging]")')


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(event.step, event.value) for event in EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars(tag)]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "metric", "loss", "tensorboard"), [
    ("own_model_dirichlet.py", [], "accuracy", "cross_entropy", False),
    ("regression_dict.py", [], "mae", "mse", False),
    pytest.param("femnist_tensorboard.py", ["--data-dir", str(SHARED_DATA)], "accuracy", "cross_entropy", True,
                 marks=[FEMNIST, TENSORBOARD, pytest.mark.slow]),
])
def test_an_example_runs_at_smoke_size_and_prints_its_run_directorys_last_numbers(tmp_path, script, args, metric,
                                                                                  loss, tensorboard):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    run_dir = tmp_path / re.search(r"^run directory +(\S+)$", done.stdout, re.M)[1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert f"initial {rows[-1][f'initial/{metric}']:.4f}  personalized {rows[-1][f'personalized/{metric}']:.4f}" \
        in done.stdout
    assert f'loss = "{loss}"' in (run_dir / "config.toml").read_text()
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "evaluation.json").is_file()
    assert (run_dir / "tensorboard").is_dir() == tensorboard
    if tensorboard:  # the rows' numbers, as TensorBoard keeps them (float32)
        assert f"tensorboard --logdir {run_dir.relative_to(tmp_path) / 'tensorboard'}" in done.stdout
        assert tensorboard_scalars(run_dir, f"initial/{metric}") == [(2, np.float32(rows[-1][f"initial/{metric}"]))]
        assert tensorboard_scalars(run_dir, "client/train_loss") == [
            (row["round"], np.float32(row["client/train_loss"])) for row in rows]
