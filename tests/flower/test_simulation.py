import pytest

pytest.importorskip("flwr")

from fedmeta.flower.client import client_app  # noqa: E402
from fedmeta.flower.server import make_server_app  # noqa: E402


@pytest.mark.slow
@pytest.mark.bits
def test_two_stage_on_flowers_simulation_engine_ends_with_the_local_engines_bits(tmp_path, tiny, local_run,
                                                                                 same_run, simulate):
    # FedAvg with server momentum in round 0 and 1, then Reptile(K=3) with server Adam in round 2,
    # over 3 virtual SuperNodes holding 4 clients each
    overrides = ["algorithm.name=two_stage", "algorithm.switch_round=2", "algorithm.local_steps=3",
                 "algorithm.server_momentum=0.9"]
    local = local_run(*overrides)

    simulate(make_server_app(tiny(tmp_path / "flower", *overrides)), client_app)

    same_run(tmp_path / "flower", local)
    assert [row["stage"] for row in local.history] == [0, 0, 1]


@pytest.mark.slow
@pytest.mark.bits
def test_fedreps_heads_stay_on_their_simulated_supernodes_and_the_run_ends_with_the_local_engines_bits(
        tmp_path, tiny, local_run, same_run, simulate):
    # clients 0 and 5 train in rounds 0 and 1: the heads they keep on their nodes must be the local engine's
    overrides = ["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc2']"]
    local = local_run(*overrides)

    simulate(make_server_app(tiny(tmp_path / "flower", *overrides)), client_app)

    same_run(tmp_path / "flower", local)
