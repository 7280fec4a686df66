"""The scripts in examples/ run at smoke size and leave the run directory they report."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("script", "metric", "loss"), [("own_model_dirichlet.py", "accuracy", "cross_entropy"),
                                                        ("regression_dict.py", "mae", "mse")])
def test_an_example_runs_at_smoke_size_and_prints_its_run_directorys_last_numbers(tmp_path, script, metric, loss):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    run_dir = tmp_path / re.search(r"^run directory +(\S+)$", done.stdout, re.M)[1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert f"initial {rows[-1][f'initial/{metric}']:.4f}  personalized {rows[-1][f'personalized/{metric}']:.4f}" \
        in done.stdout
    assert f'loss = "{loss}"' in (run_dir / "config.toml").read_text()
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "evaluation.json").is_file()
