"""``[engine] kind = "ray"``: its keys are checked on load, and nothing imports Ray until a Ray engine starts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from fedmeta.cli import main
from fedmeta.experiment.config import ConfigError, load_config

real_find_spec = importlib.util.find_spec


@pytest.fixture
def without_ray(monkeypatch):
    """This process as it would be without Ray installed."""
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "ray", None)


@pytest.mark.parametrize("override, message", [
    ("engine.kind=spark", r"engine.kind = 'spark': expected one of 'process', 'ray'"),
    ("engine.address=auto", r"engine.address = 'auto': expected unset with engine.kind = 'process' \(an address is "
                            r"a Ray cluster's; set engine.kind = 'ray'\)"),
])
def test_bad_engine_values_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("engine.workers=0", r"engine.workers = 0: expected at least 1 Ray actor with engine.kind = 'ray' "
                         r"\(unset: one per CPU of the cluster\)"),
    ("engine.address=http://head:6379", r"engine.address = 'http://head:6379': expected 'auto', 'HOST:PORT' of a "
                                        r"Ray head node, or 'ray://HOST:PORT' \(unset: a local Ray instance\)"),
    ("engine.address=head", r"engine.address = 'head': expected 'auto', 'HOST:PORT'"),
    ("engine.address=6379", r"engine.address = 6379: expected a str"),
])
def test_bad_ray_values_name_the_key_and_the_value(override, message):
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["engine.kind=ray", override])


@pytest.mark.parametrize("address", [None, "auto", "127.0.0.1:6379", "head-node.example:6379", "ray://10.0.0.5:10001",
                                     "[::1]:6379"])
def test_ray_addresses_are_taken(address):
    pytest.importorskip("ray")
    overrides = ["engine.kind=ray", "engine.workers=3"] + ([f"engine.address={address}"] if address else [])

    config = load_config(None, overrides)

    assert (config.engine.kind, config.engine.workers, config.engine.address) == ("ray", 3, address)


def test_without_ray_the_config_says_how_to_install_it(without_ray):
    with pytest.raises(ConfigError, match=r"""engine.kind = 'ray': Ray is not installed; install it with """
                                          r"""pip install "fedmeta\[ray\]\""""):
        load_config(None, ["engine.kind=ray"])


def test_without_ray_the_cli_stops_before_any_work_with_one_line(without_ray, tmp_path, capsys):
    code = main(["run", "--no-progress", "--set", "engine.kind=ray", "--set", f"output_dir={tmp_path}"])

    out, err = capsys.readouterr()
    assert code == 2
    assert err == ("fedmeta: error: engine.kind = 'ray': Ray is not installed; "
                   'install it with pip install "fedmeta[ray]"\n')
    assert not any(tmp_path.iterdir())


def test_without_ray_the_engine_module_says_how_to_install_it(without_ray):
    sys.modules.pop("fedmeta.engine.ray_engine", None)
    with pytest.raises(ImportError, match=r'the Ray engine needs Ray: pip install "fedmeta\[ray\]"'):
        from fedmeta.engine import RayEngine  # noqa: F401


@pytest.mark.slow
def test_importing_fedmeta_and_running_in_process_never_imports_ray(tmp_path):
    script = (
        "import sys\n"
        "import fedmeta, fedmeta.engine, fedmeta.cli, fedmeta.experiment.run\n"
        "from fedmeta.experiment.config import load_config\n"
        "from fedmeta.experiment.run import run_experiment\n"
        f"run_experiment(load_config(None, ['rounds=1', 'data.num_clients=6', 'algorithm.cohort_size=2', "
        f"'engine.workers=0', 'output_dir={tmp_path}']), progress=False)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
