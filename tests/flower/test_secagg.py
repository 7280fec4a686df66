"""Secure aggregation with Flower's SecAgg+: a real deployment of three SuperNodes, and the simulation engine.

SecAgg+ quantizes each SuperNode's update, so a secure run ends near the local run of the
same config, not on its bits: within the bound the round's metrics row records
(``secagg/error_bound``, ``fedmeta.flower.secagg.quantization_bound``), plus the float32
rounding of the two means and of the server step (FLOAT32).
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402

from fedmeta.cli import main  # noqa: E402
from fedmeta.client_work import ClientUpdate  # noqa: E402
from fedmeta.experiment.build import build_dataset, build_initial_model  # noqa: E402
from fedmeta.experiment.checkpoint import read_checkpoint  # noqa: E402
from fedmeta.experiment.config import FlowerConfig, load_config  # noqa: E402
from fedmeta.flower.app import write_app  # noqa: E402
from fedmeta.flower.client import secure_client_app  # noqa: E402
from fedmeta.flower.secagg import node_share, quantization_bound  # noqa: E402
from fedmeta.flower.server import make_server_app  # noqa: E402
from fedmeta.params import get_weights  # noqa: E402
from flower_cases import BIN, CONNECTION, free_port, wait_for_port  # noqa: E402

SECURE = ("rounds=1", "flower.secagg=true")
PRIVATE = ("privacy.noise_multiplier=0.5", "privacy.clip=0.05", "privacy.delta=0.01")
# each node weighs its number of clipped clients, at most the cohort's 4, and sends coordinates within ±C:
# SecAgg+'s range and weight scale sized to that keep its levels fine
PRIVATE_SECAGG = ("flower.max_weight=4", "flower.clipping_range=0.0625")
FLOAT32 = 1e-6
"""Room for float32 rounding: a few ulps of weights below 1 in magnitude."""


def test_node_share_clips_each_delta_on_the_node_when_private_and_weighs_by_examples_otherwise():
    updates = [ClientUpdate({"w": torch.tensor([3.0, 4.0])}, 1, {}),
               ClientUpdate({"w": torch.tensor([0.0, 1.0])}, 3, {})]

    private, private_weight = node_share(updates, {"w": torch.zeros(2)}, clip=1.0)
    plain, plain_weight = node_share(updates, {"w": torch.zeros(2)}, clip=None)
    empty, empty_weight = node_share([], {"w": torch.zeros(2)}, clip=1.0)

    torch.testing.assert_close(private["w"], torch.tensor([0.3, 0.9], dtype=torch.float64))  # ([.6, .8] + [0, 1]) / 2
    assert private_weight == 2
    torch.testing.assert_close(plain["w"], torch.tensor([0.75, 1.75], dtype=torch.float64))  # ([3, 4] + 3·[0, 1]) / 4
    assert plain_weight == 4
    assert empty_weight == 0 and not empty["w"].any()


def test_the_quantization_bound_is_one_level_per_node_over_the_summed_weight_ratios():
    flower = FlowerConfig(clipping_range=8.0, quantization_range=2**22, max_weight=1024.0)

    # 3 nodes, one level 2·8/2**22 each, over Σ W_i / 1024 = 512 / 1024
    assert quantization_bound(flower, 3, 512) == 3 * 16 / 2**22 / 0.5


@pytest.mark.parametrize(("overrides", "message"), [
    (("algorithm.name=reptile",), "flower.secagg = true with algorithm.name = 'reptile': SecAgg+ gives the mean "
                                  "weighted by examples"),
    (("faults.dropout=0.1",), "flower.secagg = true with [faults]: the fault rules judge each client's update"),
    ((*PRIVATE, "privacy.clip=16"), "flower.clipping_range = 8: expected at least privacy.clip = 16"),
])
def test_a_secure_app_that_secagg_cannot_aggregate_as_fedmeta_run_does_is_refused_in_one_line(
        tmp_path, capsys, overrides, message):
    settings = [a for o in ("flower.secagg=true", *overrides) for a in ("--set", o)]

    code = main(["flower", "app", str(tmp_path / "app"), *settings])

    assert code == 2
    assert capsys.readouterr().err.startswith(f"fedmeta: error: {message}")
    assert not (tmp_path / "app").exists()


def test_a_secure_app_runs_flowers_secaggplus_mod_on_its_supernodes(tmp_path):
    write_app(load_config(None, ["flower.secagg=true"]), tmp_path / "fedmeta-app")

    components = tomllib.loads((tmp_path / "fedmeta-app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert components["components"]["clientapp"] == "fedmeta.flower.client:secure_client_app"
    assert secure_client_app._mods == [secaggplus_mod]


def assert_within_quantization(output_dir, local) -> dict:
    """The secure run's final weights lie within its recorded bound of the local run's; returns its one row."""
    (run_dir,) = [p.parent for p in Path(output_dir).glob("*/checkpoint.pt")]
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = read_checkpoint(run_dir / "checkpoint.pt").state.weights
    gap = max(float((weights[k] - w).abs().max()) for k, w in local.weights.items())
    step = max(float((weights[k] - w).abs().max()) for k, w in read_initial(local).items())

    assert gap <= row["secagg/error_bound"] + FLOAT32
    assert gap > 0  # quantized with random rounding: a secure run cannot have the local run's bits
    assert step > 100 * row["secagg/error_bound"]  # the bound is far below what the round moved
    assert row["secagg/num_nodes"] == 3
    assert row["client/num_clients"] == local.history[0]["client/num_clients"]
    assert row["client/num_examples"] == local.history[0]["client/num_examples"]
    return row


def read_initial(local) -> dict:
    """The weights the local run started from (its model, built anew from its config)."""
    return get_weights(build_initial_model(local.config, build_dataset(local.config.data, local.config.seed)))


def record_masked_vectors(monkeypatch) -> list:
    """Keeps every reply the server receives in SecAgg+'s stage of masked vectors."""
    received = []
    collect = SecAggPlusWorkflow.collect_masked_vectors_stage

    class Recording:
        def __init__(self, grid):
            self.grid = grid

        def __getattr__(self, name):
            return getattr(self.grid, name)

        def send_and_receive(self, messages, *, timeout=None):
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            received.extend(replies)
            return replies

    monkeypatch.setattr(SecAggPlusWorkflow, "collect_masked_vectors_stage",
                        lambda self, grid, context, state: collect(self, Recording(grid), context, state))
    return received


@pytest.mark.slow
def test_secure_fedavg_in_simulation_ends_within_the_quantization_bound_and_the_server_gets_only_masked_vectors(
        tmp_path, monkeypatch, tiny, local_run, simulate):
    local = local_run("rounds=1")
    received = record_masked_vectors(monkeypatch)
    config = tiny(tmp_path / "flower", *SECURE)

    simulate(make_server_app(config), secure_client_app)

    assert_within_quantization(tmp_path / "flower", local)
    assert len(received) == 3
    for reply in received:
        assert all(len(arrays) == 0 for arrays in reply.content.array_records.values())  # no update travels as is
        masked = np.concatenate([bytes_to_ndarray(b).ravel()
                                 for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        # unmasked, SecAgg+'s integers lie in [0, T]; masked, they spread over [0, 2**32)
        assert (masked > config.flower.quantization_range).mean() > 0.9


@pytest.mark.slow
def test_private_secure_fedavg_clips_on_the_nodes_and_adds_the_local_runs_noise_on_the_server(
        tmp_path, tiny, local_run, simulate):
    local = local_run("rounds=1", *PRIVATE)

    simulate(make_server_app(tiny(tmp_path / "flower", *SECURE, *PRIVATE, *PRIVATE_SECAGG)), secure_client_app)

    row = assert_within_quantization(tmp_path / "flower", local)
    assert row["privacy/epsilon"] == local.history[0]["privacy/epsilon"]
    (run_dir,) = [p.parent for p in (tmp_path / "flower").glob("*/checkpoint.pt")]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["privacy"] == json.loads((local.run_dir / "evaluation.json").read_text())["privacy"]


def start_insecure_federation(processes, nodes: int) -> None:
    """A SuperLink and ``nodes`` SuperNodes on loopback without TLS, and the ``flwr`` connection to them."""
    port = free_port()
    superlink = processes.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                str(port), "--disable-runtime-dependency-installation")
    wait_for_port(port, superlink)
    for partition_id in range(nodes):
        processes.start(f"supernode-{partition_id}", "flower-supernode", "--insecure", "--superlink",
                        f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config",
                        f"partition-id={partition_id} num-partitions={nodes}")
    home = Path(processes.env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                     f'address = "127.0.0.1:{port}"\ninsecure = true\n')


@pytest.mark.slow
def test_a_deployment_of_three_supernodes_aggregates_under_secagg_within_the_quantization_bound(
        tmp_path, processes, tiny, local_run):
    local = local_run("rounds=1")
    start_insecure_federation(processes, 3)
    write_app(tiny(tmp_path / "unused", *SECURE), tmp_path / "fedmeta-app")

    run = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "fedmeta-app"), CONNECTION, "--stream",
                          "--run-config", f'output_dir="{tmp_path / "flower"}"'],
                         env=processes.env, capture_output=True, text=True, timeout=300)

    log = run.stdout + run.stderr
    assert run.returncode == 0, f"{log}\n{processes.logs()}"
    assert "Secure aggregation completed." in log, log
    assert_within_quantization(tmp_path / "flower", local)
