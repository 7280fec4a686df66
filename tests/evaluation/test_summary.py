import math

import pytest

from fedmeta.evaluation.summary import Summary, rounds_to_threshold


def test_summary_of_gives_mean_population_std_and_linear_quartiles():
    values = [1.0, 2.0, 3.0, 4.0]

    summary = Summary.of(values)

    # population std (ddof=0): sqrt((2.25 + 0.25 + 0.25 + 2.25) / 4) = sqrt(1.25);
    # quartiles interpolate linearly between order statistics: 1 + 0.75·1, 3 + 0.25·1
    assert summary == pytest.approx(Summary(mean=2.5, std=math.sqrt(1.25), q25=1.75, median=2.5, q75=3.25,
                                            min=1.0, max=4.0))


def test_summary_of_one_client_has_zero_spread():
    summary = Summary.of([0.8])

    spread = (summary.std, summary.q25, summary.median, summary.q75, summary.min, summary.max)

    assert spread == (0.0, 0.8, 0.8, 0.8, 0.8, 0.8)


def test_summary_counts_every_client_once_whatever_the_order():
    values = [0.9, 0.1, 0.5]

    summary = Summary.of(values)

    assert summary == Summary.of(sorted(values))
    assert summary.median == 0.5 and summary.mean == pytest.approx(0.5)


def test_summary_fields_are_plain_floats_for_json():
    summary = Summary.of([1, 2])

    types = {type(v) for v in summary}

    assert types == {float}


def test_summary_of_no_clients_is_an_error():
    with pytest.raises(ValueError, match="cannot summarize zero clients"):
        Summary.of([])


def test_rounds_to_threshold_counts_rounds_done_and_skips_unevaluated_rows():
    history = [{"round": 1, "acc": 0.5}, {"round": 2}, {"round": 3, "acc": 0.79}, {"round": 4, "acc": 0.8},
               {"round": 5, "acc": 0.9}]

    reached = rounds_to_threshold(history, "acc", 0.8)

    assert reached == 4  # the row written after the 4th round; >= counts as reached


def test_rounds_to_threshold_is_none_when_never_reached():
    history = [{"round": 1, "acc": 0.5}, {"round": 2, "loss": 0.9}, {"round": 3, "acc": 0.79}]

    reached = rounds_to_threshold(history, "acc", 0.8)

    assert reached is None


def test_rounds_to_threshold_reads_a_generator_once():
    history = ({"round": r, "acc": r / 10} for r in range(1, 11))

    reached = rounds_to_threshold(history, "acc", 0.25)

    assert reached == 3  # 0.3 after round 3


def test_rounds_to_threshold_of_an_error_is_the_first_at_or_below_it():
    history = [{"round": 1, "mae": 0.9}, {"round": 2, "mae": 0.5}, {"round": 3, "mae": 0.2}]

    reached = rounds_to_threshold(history, "mae", 0.5, higher_is_better=False)

    assert reached == 2


def test_a_client_the_metric_does_not_apply_to_is_left_out_and_none_gives_nan():
    assert Summary.of([0.5, math.nan, 1.0]) == Summary.of([0.5, 1.0])
    assert all(math.isnan(v) for v in Summary.of([math.nan, math.nan]))
