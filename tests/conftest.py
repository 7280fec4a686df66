"""Tiny fixtures built in code: a few 2-feature, 2-class clients and one linear model.

Inputs are small integers so sums, gradients at zero weights (softmax = ½ everywhere)
and losses (ln 2 at zero weights) can be worked out by hand.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

from fedmeta.data.federated import ClientData, Examples, FederatedDataset, split_clients
from fedmeta.experiment.config import ExperimentConfig, load_config
from fedmeta.params import Params, get_weights

# Flower deployments spend most of their time in Flower's polling sleeps: started first, they
# overlap the files that keep the cores busy instead of leaving one worker alone with them at the end.
STARTED_FIRST = ("flower/test_secagg.py", "flower/test_deployment.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.path.as_posix().endswith(STARTED_FIRST))


# 12 Synthetic clients: 9 training, 3 held out; cohorts of 3; evaluated after rounds 1 and 2
# (the last); in this process, so that no test forks workers unless it is about them
TINY = ("data.num_clients=12", "data.held_out_fraction=0.25", "rounds=3", "algorithm.cohort_size=3",
        "evaluation.every=2", "evaluation.fine_tune_epochs=2", "engine.workers=0")


def examples(x: Sequence[Sequence[float]], y: Sequence[int]) -> Examples:
    """Float inputs ``[N, 2]`` and long targets ``[N]`` from plain lists."""
    return Examples(torch.tensor(x, dtype=torch.float32).reshape(len(y), -1), torch.tensor(y, dtype=torch.long))


MakeClient = Callable[..., ClientData]


@pytest.fixture
def make_client() -> MakeClient:
    """Builds a ClientData from lists; the test split defaults to two fixed examples."""

    def make(client_id: str, train_x, train_y, test_x=((1.0, 0.0), (0.0, 1.0)), test_y=(0, 1)) -> ClientData:
        return ClientData(client_id, examples(train_x, train_y), examples(test_x, test_y))

    return make


@pytest.fixture
def clients(make_client: MakeClient) -> list[ClientData]:
    """Four clients with 2, 3, 4 and 3 train examples (12 in all), two test examples each."""
    return [
        make_client("a", [[1, 0], [0, 1]], [0, 1]),
        make_client("b", [[1, 1], [2, 0], [0, 2]], [0, 0, 1]),
        make_client("c", [[1, 2], [2, 1], [0, 1], [1, 0]], [1, 0, 1, 0],
                    test_x=[[2, 0], [0, 2]], test_y=[0, 1]),
        make_client("d", [[3, 0], [0, 3], [1, 1]], [0, 1, 1],
                    test_x=[[1, 1], [3, 0]], test_y=[1, 0]),
    ]


@pytest.fixture
def dataset(clients: list[ClientData]) -> FederatedDataset:
    """The four clients, one of them held out (seeded split)."""
    return split_clients({c.client_id: c for c in clients}, num_classes=2, held_out_fraction=0.25, seed=0)


@pytest.fixture
def linear_model() -> nn.Linear:
    """``nn.Linear(2, 2)`` with fixed, non-symmetric weights (no global RNG involved)."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25], [-0.5, 0.75]]))
        model.bias.copy_(torch.tensor([0.125, -0.125]))
    return model


@pytest.fixture
def initial_weights(linear_model: nn.Linear) -> Params:
    """A detached copy of ``linear_model``'s weights."""
    return get_weights(linear_model)


@pytest.fixture
def zero_weights() -> Params:
    """All-zero weights for ``nn.Linear(2, 2)``: every logit is 0 and every loss ln 2."""
    return {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}


def tiny_overrides(output_dir, *overrides: str) -> list[str]:
    """The tiny experiment's ``--set`` values, writing under ``output_dir``; later overrides win."""
    return [*TINY, f"output_dir={output_dir}", *overrides]


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ExperimentConfig]:
    """Builds the tiny experiment's config: ``tiny_config(output_dir, *overrides)``."""
    return lambda output_dir, *overrides: load_config(None, tiny_overrides(output_dir, *overrides))


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[..., list[str]]:
    """The tiny experiment as ``fedmeta run`` arguments: ``--set KEY=VALUE`` for each override."""
    return lambda output_dir, *overrides: [arg for override in tiny_overrides(output_dir, *overrides)
                                           for arg in ("--set", override)]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance with 2 logical CPUs for the module's tests (skipped without the ray extra)."""
    pytest.importorskip("ray")
    from engine_cases import running_ray

    with running_ray(2):
        yield


@pytest.fixture(scope="module")
def one_ray_engine(local_ray) -> Iterator[None]:
    """Runs with ``engine.kind = "ray"`` in the module share a RayEngine while their model keeps its shape.

    A run's actors would otherwise start (and import torch) anew for every run; the
    shared engine starts them once. Each run still restores its own client states (none
    at its start) and its clients travel with their tasks where the actors lack them.
    """
    from contextlib import nullcontext

    import fedmeta.experiment.run as run_module

    build = run_module.build_engine
    held = {}  # one engine at a time: its actors hold the Ray instance's CPUs

    def shared(config, model, clients):
        if config.kind != "ray":
            return build(config, model, clients)
        shape = (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        if shape not in held:
            for engine in held.values():
                engine.close()
            held.clear()
            held[shape] = build(config, model, clients)
        return nullcontext(held[shape])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "build_engine", shared)
        try:
            yield
        finally:
            for engine in held.values():
                engine.close()


@pytest.fixture
def crash_at_round(monkeypatch) -> Callable[..., None]:
    """``crash_at_round(n)``: the run loop raises as it starts round ``n`` (from 0), after the rounds before it.

    ``crash_at_round(n, KeyboardInterrupt)`` stops it as Ctrl-C would; ``monkeypatch.undo()``
    lets later runs through.
    """
    import fedmeta.experiment.run as run_module

    real = run_module.run_round

    def crash(round_to_crash: int, error: type[BaseException] = RuntimeError) -> None:
        def crashing(*args, round_idx, **kwargs):
            if round_idx == round_to_crash:
                raise error("simulated crash")
            return real(*args, round_idx=round_idx, **kwargs)

        monkeypatch.setattr(run_module, "run_round", crashing)

    return crash
