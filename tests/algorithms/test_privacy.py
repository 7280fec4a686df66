"""DP-FedAvg's mean (clip, noise, fixed denominator), adaptive clipping, Poisson cohorts, and the accountant."""

import math

import pytest
import torch

from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.algorithm import Switch
from fedmeta.algorithms.presets import fedavg, two_stage
from fedmeta.algorithms.privacy import (
    AdaptiveClipping, clip_factor, poisson_cohort, private_mean, value_noise_multiplier, with_private_mean,
)
from fedmeta.client_work import ClientUpdate
from fedmeta.data.synthetic import synthetic
from fedmeta.params import norm

LIKE = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def update(w, b, num_examples=5):
    return ClientUpdate({"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32)},
                        num_examples, {})


def random_updates(count, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [ClientUpdate({k: scale * torch.randn(t.shape, generator=generator) for k, t in LIKE.items()}, 3, {})
            for _ in range(count)]


def test_a_delta_over_the_clip_norm_is_scaled_onto_it_and_one_within_is_kept():
    over = update([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [4.0, 0.0, 0.0])  # norm 5
    within = update([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.4, 0.0, 0.0])  # norm 0.5
    alone = private_mean(0.0, 1.0, 1, seed=0, like=LIKE)

    clipped, _ = alone.apply([over], alone.init())
    kept, _ = alone.apply([within], alone.init())

    torch.testing.assert_close(clipped["w"][0, 0], torch.tensor(0.6))  # 3 / 5
    torch.testing.assert_close(clipped["b"][0], torch.tensor(0.8))  # 4 / 5
    assert torch.equal(kept["w"], within.delta["w"]) and torch.equal(kept["b"], within.delta["b"])
    assert clip_factor(over.delta, 1.0) == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(5))
def test_every_clients_contribution_respects_the_clip_bound(seed):
    clip, cohort = 0.7, 4
    updates = random_updates(cohort, seed, scale=2.0 ** (seed - 2))  # some within the bound, some far over
    mean = private_mean(0.0, clip, cohort, seed=0, like=LIKE)
    alone = private_mean(0.0, clip, 1, seed=0, like=LIKE)

    contributions = [alone.apply([u], alone.init())[0] for u in updates]
    together, _ = mean.apply(updates, mean.init())
    replaced, _ = mean.apply([*updates[:-1], *random_updates(1, seed + 100, scale=50.0)], mean.init())

    assert all(norm(c) <= clip * (1 + 1e-6) for c in contributions)
    assert norm({k: (together[k] - replaced[k]) for k in LIKE}) <= 2 * clip / cohort * (1 + 1e-6)


@pytest.mark.bits
def test_without_noise_and_clipping_it_is_the_uniform_mean_bit_for_bit():
    updates = random_updates(5, seed=3)
    private = private_mean(0.0, math.inf, len(updates), seed=0, like=LIKE)

    delta, _ = private.apply(updates, private.init())
    uniform, _ = weighted_mean("uniform").apply(updates, ())

    assert all(torch.equal(delta[k], uniform[k]) for k in LIKE)


def test_the_sum_is_divided_by_the_expected_cohort_not_by_the_updates_that_came_back():
    updates = [update([[1.0, 0, 0], [0, 0, 0]], [0, 0, 0]), update([[0.5, 0, 0], [0, 0, 0]], [0, 0, 0])]
    private = private_mean(0.0, 10.0, 4, seed=0, like=LIKE)  # 4 expected, 2 came back

    delta, _ = private.apply(updates, private.init())

    torch.testing.assert_close(delta["w"][0, 0], torch.tensor(0.375))  # (1 + 0.5) / 4


def test_the_noise_std_is_noise_multiplier_times_clip_over_the_denominator():
    like = {"w": torch.zeros(1000)}
    z, clip, m = 1.3, 0.4, 8
    private = private_mean(z, clip, m, seed=11, like=like)
    state, draws = private.init(), []

    for _ in range(100):  # 100 rounds of pure noise (no update came back), 100,000 values
        delta, state = private.apply([], state)
        draws.append(delta["w"])
    noise = torch.stack(draws).double()

    expected = z * clip / m
    n = noise.numel()
    # the sample std of n normals is within 5 standard errors (σ/√(2n)) of σ; the mean within 5 σ/√n of 0
    assert abs(float(noise.std()) - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n)
    # rounds draw fresh noise: consecutive rounds are uncorrelated (within 5/√1000)
    assert abs(float(torch.corrcoef(noise[:2])[0, 1])) < 5 / math.sqrt(1000)
    assert state["rounds"] == 100


def test_adaptive_clipping_noises_the_delta_with_the_multiplier_left_after_the_count():
    like = {"w": torch.zeros(1000)}
    adaptive = AdaptiveClipping(target_quantile=0.5, lr=0.2, count_stddev=1.0)
    private = private_mean(1.0, 0.5, 10, seed=0, like=like, adaptive=adaptive)
    state, draws = private.init(), []

    for _ in range(100):
        delta, state = private.apply([], {**state, "clip": 0.5})  # the clip held still, to measure one std
        draws.append(delta["w"])
    noise = torch.stack(draws).double()

    z_delta = (1.0 - 0.25) ** -0.5  # (z⁻² − (2σ_b)⁻²)^(−½) with z = 1, σ_b = 1
    assert value_noise_multiplier(1.0, adaptive) == pytest.approx(z_delta)
    expected = z_delta * 0.5 / 10
    assert abs(float(noise.std()) - expected) < 5 * expected / math.sqrt(2 * noise.numel())


def test_adaptive_clipping_needs_more_count_noise_than_half_the_multiplier():
    with pytest.raises(ValueError, match="needs an unclipped-count std above 0.6"):
        value_noise_multiplier(1.2, AdaptiveClipping(0.5, 0.2, 0.6))


@pytest.mark.parametrize("unclipped, expected_factor", [(2, 1.0), (4, math.exp(-0.2 * 0.5)), (0, math.exp(0.2 * 0.5))])
def test_adaptive_clip_moves_geometrically_toward_the_target_quantile(unclipped, expected_factor):
    small, large = update([[0.1, 0, 0], [0, 0, 0]], [0, 0, 0]), update([[9.0, 0, 0], [0, 0, 0]], [0, 0, 0])
    updates = [small] * unclipped + [large] * (4 - unclipped)
    adaptive = AdaptiveClipping(target_quantile=0.5, lr=0.2, count_stddev=1e-12)  # a count without noise
    private = private_mean(0.0, 1.0, 4, seed=0, like=LIKE, adaptive=adaptive)

    _, state = private.apply(updates, private.init())

    # b̄ = unclipped / 4; C ← C·exp(−0.2 (b̄ − 0.5))
    assert state["clip"] == pytest.approx(expected_factor, rel=1e-9)


@pytest.mark.bits
def test_the_same_seed_gives_the_same_bits_and_another_seed_other_noise():
    updates = random_updates(3, seed=1)
    first, again, other = (private_mean(1.0, 0.5, 3, seed=s, like=LIKE) for s in (7, 7, 8))

    a, _ = first.apply(updates, {"clip": 0.5, "rounds": 4})
    b, _ = again.apply(updates, {"clip": 0.5, "rounds": 4})
    c, _ = other.apply(updates, {"clip": 0.5, "rounds": 4})

    assert all(torch.equal(a[k], b[k]) for k in LIKE)
    assert not torch.equal(a["w"], c["w"])


def test_each_stage_of_a_switch_draws_its_own_noise():
    private = with_private_mean(two_stage(switch_round=2), lambda stream: private_mean(
        1.0, 0.5, 3, seed=0, like=LIKE, stream=stream))
    plain = with_private_mean(fedavg(), lambda stream: private_mean(1.0, 0.5, 3, seed=0, like=LIKE, stream=stream))

    before, _ = private.before.aggregator.apply([], private.before.aggregator.init())
    after, _ = private.after.aggregator.apply([], private.after.aggregator.init())

    assert isinstance(private, Switch) and not isinstance(plain, Switch)
    assert not torch.equal(before["w"], after["w"])


def test_a_bad_noise_multiplier_or_clip_is_refused():
    with pytest.raises(ValueError, match="noise multiplier must be >= 0"):
        private_mean(-1.0, 1.0, 3, seed=0, like=LIKE)
    with pytest.raises(ValueError, match="clip norm must be > 0"):
        private_mean(1.0, 0.0, 3, seed=0, like=LIKE)


def test_a_poisson_cohort_takes_each_client_with_the_rate_from_seed_and_round_alone():
    dataset = synthetic(200, seed=0, held_out_fraction=0.2)

    sizes = [len(poisson_cohort(dataset, 0.1, seed=0, round_idx=r)) for r in range(200)]
    again = poisson_cohort(dataset, 0.1, seed=0, round_idx=3)

    n = len(dataset.train_ids)
    mean = sum(sizes) / len(sizes)
    # the mean of 200 binomial(n, 0.1) sizes is within 5 standard errors of 0.1 n
    assert abs(mean - 0.1 * n) < 5 * math.sqrt(n * 0.1 * 0.9 / len(sizes))
    assert [c.client_id for c in again] == [c.client_id for c in poisson_cohort(dataset, 0.1, 0, 3)]
    assert poisson_cohort(dataset, 0.0, 0, 0) == [] and len(poisson_cohort(dataset, 1.0, 0, 0)) == n
