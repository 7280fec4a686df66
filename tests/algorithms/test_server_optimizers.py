import math

import pytest
import torch

from fedmeta.algorithms.server_optimizers import (
    build_server_optimizer, server_adagrad, server_adam, server_sgd, server_yogi,
)


def deltas(steps: int = 5):
    """A fixed sequence of pseudo-updates for two tensors of different shapes."""
    generator = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(2, 3, generator=generator), "b": torch.randn(3, generator=generator)}
            for _ in range(steps)]


def start():
    return {"w": torch.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": torch.tensor([0.5, -0.5, 2.0])}


def run_ours(optimizer, steps: int = 5):
    weights = start()
    state = optimizer.init(weights)
    trajectory = []
    for delta in deltas(steps):
        weights, state = optimizer.apply(weights, delta, state)
        trajectory.append(weights)
    return trajectory


def run_torch(make, steps: int = 5):
    """Feeds g = −Δ to a ``torch.optim`` optimizer and records its weights after each step."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start().items()}
    optimizer = make(list(params.values()))
    trajectory = []
    for delta in deltas(steps):
        for k, p in params.items():
            p.grad = -delta[k]
        optimizer.step()
        trajectory.append({k: p.detach().clone() for k, p in params.items()})
    return trajectory


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        for k in reference:
            torch.testing.assert_close(mine[k], reference[k])


def test_server_sgd_with_lr_1_and_no_momentum_adds_the_delta():
    weights = {"w": torch.tensor([1.0, 2.0])}

    new, _ = server_sgd(1.0).apply(weights, {"w": torch.tensor([0.5, -1.0])}, {})

    torch.testing.assert_close(new["w"], torch.tensor([1.5, 1.0]))


def test_server_sgd_momentum_by_hand_for_two_steps():
    optimizer = server_sgd(lr=0.5, momentum=0.9)
    weights = {"w": torch.tensor([1.0])}
    state = optimizer.init(weights)

    weights, state = optimizer.apply(weights, {"w": torch.tensor([2.0])}, state)
    first = weights["w"].item()
    weights, state = optimizer.apply(weights, {"w": torch.tensor([1.0])}, state)

    assert first == pytest.approx(2.0)                       # v = 2, θ = 1 + 0.5·2
    assert state["velocity"]["w"].item() == pytest.approx(2.8)  # v = 0.9·2 + 1
    assert weights["w"].item() == pytest.approx(3.4)         # θ = 2 + 0.5·2.8


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.0), (0.7, 0.0), (1.0, 0.9), (0.3, 0.5)])
def test_server_sgd_matches_torch_sgd_fed_minus_delta(lr, momentum):
    ours = run_ours(server_sgd(lr, momentum))

    theirs = run_torch(lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum))

    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("kwargs", [{}, dict(lr=0.1, beta1=0.5, beta2=0.9, eps=1e-3)])
def test_server_adam_matches_torch_adam_fed_minus_delta(kwargs):
    ours = run_ours(server_adam(**kwargs))

    theirs = run_torch(lambda p: torch.optim.Adam(
        p, lr=kwargs.get("lr", 1e-3), betas=(kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.999)),
        eps=kwargs.get("eps", 1e-8)))

    assert_same_trajectory(ours, theirs)


def test_server_adam_first_step_moves_by_lr_along_the_delta_sign():
    weights = {"w": torch.tensor([1.0, 1.0])}
    optimizer = server_adam(lr=0.01)

    new, state = optimizer.apply(weights, {"w": torch.tensor([0.3, -2.0])}, optimizer.init(weights))

    # bias-corrected m/√v = g/|g| on the first step
    torch.testing.assert_close(new["w"], torch.tensor([1.01, 0.99]))
    assert state["step"] == 1


@pytest.mark.parametrize("kwargs", [{}, dict(lr=0.5, eps=1e-3, initial_accumulator=0.1)])
def test_server_adagrad_matches_torch_adagrad_fed_minus_delta(kwargs):
    ours = run_ours(server_adagrad(**kwargs))

    theirs = run_torch(lambda p: torch.optim.Adagrad(
        p, lr=kwargs.get("lr", 0.1), eps=kwargs.get("eps", 1e-10),
        initial_accumulator_value=kwargs.get("initial_accumulator", 0.0)))

    assert_same_trajectory(ours, theirs)


def test_server_yogi_starts_from_eps_squared_and_matches_hand_values_for_two_steps():
    optimizer = server_yogi(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    weights = {"w": torch.tensor([1.0], dtype=torch.float64)}
    state = optimizer.init(weights)
    v0 = state["v"]["w"].item()

    weights, state = optimizer.apply(weights, {"w": torch.tensor([0.5], dtype=torch.float64)}, state)
    w1, v1 = weights["w"].item(), state["v"]["w"].item()
    weights, state = optimizer.apply(weights, {"w": torch.tensor([0.01], dtype=torch.float64)}, state)

    assert v0 == pytest.approx(1e-6)                            # v₀ = eps²
    # step 1: Δ² = 0.25 > v₀, so v grows: v₁ = 1e-6 + 0.01·0.25; m₁ = 0.1·0.5
    assert v1 == pytest.approx(0.002501)
    assert w1 == pytest.approx(1.0 + 0.1 * 0.05 / (math.sqrt(0.002501) + 1e-3))
    # step 2: Δ² = 1e-4 < v₁, so v shrinks (unlike Adam's): v₂ = 0.002501 − 0.01·1e-4 = 0.0025
    assert state["v"]["w"].item() == pytest.approx(0.0025)
    assert state["m"]["w"].item() == pytest.approx(0.046)     # 0.9·0.05 + 0.1·0.01
    assert weights["w"].item() == pytest.approx(w1 + 0.1 * 0.046 / (0.05 + 1e-3))


def test_server_optimizers_do_not_modify_the_weights_or_state_passed_in():
    weights = start()
    before = {k: v.clone() for k, v in weights.items()}
    optimizer = server_adam(lr=0.1)
    state = optimizer.init(weights)

    optimizer.apply(weights, deltas(1)[0], state)

    assert all(torch.equal(weights[k], before[k]) for k in before)
    assert state["step"] == 0 and all(torch.equal(m, torch.zeros_like(m)) for m in state["m"].values())


def test_build_server_optimizer_builds_sgd_with_momentum_like_server_sgd():
    built = run_ours(build_server_optimizer("sgd", 0.5, momentum=0.9))

    direct = run_ours(server_sgd(0.5, 0.9))

    assert all(torch.equal(a[k], b[k]) for a, b in zip(built, direct) for k in a)


def test_build_server_optimizer_passes_extra_settings_through():
    built = run_ours(build_server_optimizer("adam", 0.1, beta1=0.5, eps=1e-3))

    direct = run_ours(server_adam(0.1, beta1=0.5, eps=1e-3))

    assert all(torch.equal(a[k], b[k]) for a, b in zip(built, direct) for k in a)


def test_build_server_optimizer_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown server optimizer 'rmsprop'; choose one of \['adagrad', 'adam'"):
        build_server_optimizer("rmsprop", 0.1)


@pytest.mark.parametrize("name", ["adam", "adagrad", "yogi"])
def test_build_server_optimizer_rejects_momentum_for_anything_but_sgd(name):
    with pytest.raises(ValueError, match=f"server momentum applies to 'sgd' only, not '{name}'"):
        build_server_optimizer(name, 0.1, momentum=0.9)


@pytest.mark.parametrize("builder", [server_sgd, server_adam, server_adagrad, server_yogi])
def test_server_optimizers_reject_a_non_positive_lr(builder):
    with pytest.raises(ValueError, match="server lr must be > 0, got 0.0"):
        builder(lr=0.0)


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_server_sgd_rejects_momentum_outside_zero_to_one(momentum):
    with pytest.raises(ValueError, match=f"server momentum must be in \\[0, 1\\), got {momentum}"):
        server_sgd(1.0, momentum)
