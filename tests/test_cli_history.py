import json

from fedmeta.cli import format_history, main

ROWS = [
    {"round": 1, "client/train_loss": 1.5},
    {"round": 2, "client/train_loss": 0.75, "initial/accuracy": 0.5, "personalized/accuracy": 0.625,
     "personalized/share_hurt": 0.25},
]


def test_history_shows_the_evaluated_rounds_by_rounds_done():
    assert format_history(ROWS).splitlines() == [
        "rounds  train loss  initial  personalized   hurt",
        "     2      0.7500   0.5000        0.6250  25.0%",
    ]


def test_history_all_shows_every_round_with_blanks_where_nothing_was_evaluated():
    assert format_history(ROWS, every_round=True).splitlines()[1:] == [
        "     1      1.5000",
        "     2      0.7500   0.5000        0.6250  25.0%",
    ]


def test_history_refuses_metrics_whose_rounds_repeat(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [*ROWS, ROWS[0]]))

    assert main(["history", str(tmp_path)]) == 2

    assert capsys.readouterr().err == (f"fedmeta: error: {tmp_path / 'metrics.jsonl'}: line 3 holds round 1 after "
                                       "round 2; rounds that repeat or go backwards mean two processes wrote this "
                                       "run at once, so its metrics cannot be trusted\n")
