import pytest

pytest.importorskip("flwr.simulation")
from flwr.simulation import run_simulation  # noqa: E402

from fedmeta.flower.client import client_app  # noqa: E402
from fedmeta.flower.server import make_server_app  # noqa: E402

# one single-CPU Ray actor: the machine's cores are shared, and the order of work never changes a bit
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")


@pytest.mark.slow
@pytest.mark.bits
def test_two_stage_on_flowers_simulation_engine_ends_with_the_local_engines_bits(tmp_path, tiny, local_run,
                                                                                 same_run):
    # FedAvg with server momentum in round 0 and 1, then Reptile(K=3) with server Adam in round 2,
    # over 3 virtual SuperNodes holding 4 clients each
    overrides = ["algorithm.name=two_stage", "algorithm.switch_round=2", "algorithm.local_steps=3",
                 "algorithm.server_momentum=0.9"]
    local = local_run(*overrides)

    run_simulation(server_app=make_server_app(tiny(tmp_path / "flower", *overrides)),
                   client_app=client_app, num_supernodes=3, backend_config=BACKEND)

    same_run(tmp_path / "flower", local)
    assert [row["stage"] for row in local.history] == [0, 0, 1]


@pytest.mark.slow
@pytest.mark.bits
def test_fedreps_heads_stay_on_their_simulated_supernodes_and_the_run_ends_with_the_local_engines_bits(
        tmp_path, tiny, local_run, same_run):
    # clients 0 and 5 train in rounds 0 and 1: the heads they keep on their nodes must be the local engine's
    overrides = ["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc2']"]
    local = local_run(*overrides)

    run_simulation(server_app=make_server_app(tiny(tmp_path / "flower", *overrides)),
                   client_app=client_app, num_supernodes=3, backend_config=BACKEND)

    same_run(tmp_path / "flower", local)
