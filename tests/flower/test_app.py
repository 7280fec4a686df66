import subprocess
import sys
import types

import pytest
import torch

from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.cli import main
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine.local import ClientFailure
from fedmeta.experiment.config import ConfigError, load_config
from fedmeta.flower.app import app_pyproject, experiment_config, run_config, write_app

flwr_config = pytest.importorskip("flwr.common.config")
from flwr.cli.config_utils import load_and_validate  # noqa: E402

from fedmeta.experiment.config import config_to_toml  # noqa: E402
from fedmeta.flower.node import load_node, partition  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict  # noqa: E402

from fedmeta.flower import server  # noqa: E402
from fedmeta.flower.server import PromptGrid, Replies, replies_by_client  # noqa: E402


def flower_run_config(app_dir, *overrides):
    """The run config Flower's runtime hands the apps: the App's, fused with `--run-config` overrides."""
    return flwr_config.get_fused_config_from_dir(app_dir, flwr_config.parse_config_args(list(overrides)))


@pytest.mark.slow
def test_importing_fedmeta_and_its_cli_imports_no_flower():
    code = ("import sys, fedmeta, fedmeta.cli, fedmeta.flower.app; "
            "print(sorted(m for m in sys.modules if m.startswith('flwr')))")

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == "[]"


@pytest.mark.slow
def test_loading_the_client_apps_imports_no_torch_until_a_message_needs_it():
    # SecAgg+'s setup, share-keys and unmask stages never reach fedmeta's handlers: a process per message
    code = "import sys, fedmeta.flower.client; print(sorted(m for m in sys.modules if m.startswith('torch')))"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == "[]"


def test_an_app_written_for_a_config_gives_flower_a_run_config_that_is_that_config(tmp_path):
    config = load_config("femnist_two_stage", ["data.path=data/femnist", "evaluation.max_clients=50"])

    write_app(config, tmp_path / "fedmeta-app")

    flwr_project, warnings = load_and_validate(tmp_path / "fedmeta-app" / "pyproject.toml")
    assert warnings == []
    assert flwr_project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedmeta.flower.server:server_app", "clientapp": "fedmeta.flower.client:client_app"}
    assert experiment_config(flower_run_config(tmp_path / "fedmeta-app")) == config
    assert config.evaluation.thresholds == (0.7, 0.75, 0.8)  # a list, carried as TOML text


def test_flwr_run_config_overrides_set_keys_as_fedmeta_run_set_does(tmp_path):
    write_app(load_config("synthetic"), tmp_path / "fedmeta-app")

    fused = flower_run_config(tmp_path / "fedmeta-app", "rounds=7 algorithm.client_lr=0.05",
                              "evaluation.thresholds='[0.5]'")

    assert experiment_config(fused) == load_config(
        "synthetic", ["rounds=7", "algorithm.client_lr=0.05", "evaluation.thresholds=[0.5]"])


def test_a_bad_value_in_the_run_config_names_its_key():
    values = run_config(load_config(None))

    with pytest.raises(ConfigError, match=r"^algorithm.cohort_size = 0: expected at least 1$"):
        experiment_config({**values, "algorithm": {**values["algorithm"], "cohort_size": 0}})
    with pytest.raises(ConfigError, match=r"^evaluation.thresholds = '0.7': expected a TOML list"):
        experiment_config({**values, "evaluation.thresholds": "0.7"})


def test_write_app_refuses_to_overwrite_an_app_and_names_flowers_name_rule(tmp_path):
    write_app(load_config(None), tmp_path / "fedmeta-app")

    with pytest.raises(ValueError, match=r"pyproject.toml already exists; choose a new directory"):
        write_app(load_config(None), tmp_path / "fedmeta-app")
    with pytest.raises(ValueError, match=r"^Flower App name 'my_app': start with a letter and use letters, "
                                         r"digits and hyphens only"):
        app_pyproject(load_config(None), "my_app")


def test_cli_writes_the_app_with_overrides_and_reports_errors_in_one_line(tmp_path, capsys):
    code = main(["flower", "app", str(tmp_path / "fedmeta-app"), "synthetic", "--set", "rounds=5"])
    again = main(["flower", "app", str(tmp_path / "fedmeta-app")])

    out, err = capsys.readouterr()
    assert code == 0 and again == 2
    assert out.strip() == str(tmp_path / "fedmeta-app" / "pyproject.toml")
    assert experiment_config(flower_run_config(tmp_path / "fedmeta-app")) == load_config("synthetic", ["rounds=5"])
    assert err.startswith("fedmeta: error: ") and "already exists" in err


def test_partitions_deal_the_sorted_client_ids_round_robin():
    ids = ["e", "a", "d", "b", "c"]

    assert [partition(ids, p, 2) for p in (0, 1)] == [["a", "c", "e"], ["b", "d"]]
    assert [partition(ids, p, 5) for p in range(5)] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    with pytest.raises(ValueError, match=r"^node config partition-id = 2: expected 0 to num-partitions - 1 = 1$"):
        partition(ids, 2, 2)
    with pytest.raises(ValueError, match=r"^node config num-partitions = 6: the dataset has only 5 clients"):
        partition(ids, 0, 6)


def test_a_supernode_reads_its_data_from_its_node_config_data_path(tmp_path):
    experiment = config_to_toml(load_config("femnist", ["data.path=server/femnist"]))

    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'node-data'}: "):
        load_node(experiment, 0, 2, str(tmp_path / "node-data"))


def test_a_supernode_holds_every_other_client_of_the_dataset_for_partition_1_of_2():
    config = load_config(None, ["data.num_clients=5", "algorithm.cohort_size=2"])

    node = load_node(config_to_toml(config), 1, 2, None)

    assert sorted(node.clients) == ["synthetic_00001", "synthetic_00003"]  # ids 0..4, the 2nd and 4th


def _client(client_id):
    empty = Examples(torch.empty(0), torch.empty(0, dtype=torch.long))
    return ClientData(client_id, empty, empty)


def test_replies_come_back_in_client_order_and_missing_or_failed_clients_as_failures():
    update = ClientUpdate({"w": torch.tensor([1.0])}, 3, {})
    replies = Replies({"b": (22, update), "c": "ValueError: client has no training examples"})

    results = replies.map(None, {}, [_client("b"), _client("a"), _client("c")], [22, 11, 33], on_error="collect")

    assert results[0] is update
    assert [type(r) for r in results[1:]] == [ClientFailure, ClientFailure]
    assert str(results[1].error) == "client 'a': no reply from its SuperNode"
    assert str(results[2].error) == "client 'c': ValueError: client has no training examples"
    with pytest.raises(RuntimeError, match=r"^client 'c': ValueError"):
        replies.map(None, {}, [_client("c")], [33])


def test_a_reply_computed_with_another_seed_than_fedmeta_derives_is_refused():
    replies = Replies({"b": (21, ClientUpdate({}, 1, {}))})

    with pytest.raises(RuntimeError, match=r"^client 'b' ran with seed 21, expected 22$"):
        replies.map(None, {}, [_client("b")], [22], on_error="collect")


class Reply:
    """A stand-in for a Flower reply (a real Message needs a running Flower task)."""

    def __init__(self, node, content=None, error=None):
        self.metadata = types.SimpleNamespace(src_node_id=node)
        self.content, self.error = content, error

    def has_error(self):
        return self.error is not None


def test_node_replies_give_each_clients_result_and_a_flower_error_fails_the_nodes_clients():
    reply = Reply(7, RecordDict({
        "config": ConfigRecord({"client-ids": ["b", "c"], "seeds": [22, 33],
                                "errors": ["", "ValueError: client has no training examples"]}),
        "arrays/b": ArrayRecord(torch_state_dict={"w": torch.tensor([0.5])}),
        "metrics/b": MetricRecord({"train_loss": 0.25, "num-examples": 3}),
    }))
    crashed = Reply(8, error=Error(code=0, reason="ClientApp crashed"))
    parsed = {}

    replies = replies_by_client([reply, crashed], {7: ["b", "c"], 8: ["d"]},
                                lambda client_id, content: parsed.setdefault(client_id, content[f"arrays/{client_id}"]))
    results = replies.map(None, {}, [_client(c) for c in "bcd"], [22, 33, 44], on_error="collect")

    assert list(parsed) == ["b"]
    assert results[0] is parsed["b"]
    assert [str(r.error) for r in results[1:]] == [
        "client 'c': ValueError: client has no training examples",
        "client 'd': SuperNode 8: Flower error 0: ClientApp crashed",
    ]


def test_a_flower_app_for_the_centralized_baseline_is_refused_in_one_line_before_anything_is_written(tmp_path,
                                                                                                    capsys):
    code = main(["flower", "app", str(tmp_path / "app"), "--set", "algorithm.name=centralized"])

    assert code == 2
    assert capsys.readouterr().err == (
        "fedmeta: error: algorithm.name = 'centralized' pools every client's data in one place, which a Flower "
        "deployment never does; choose a federated algorithm\n")
    assert not (tmp_path / "app").exists()


def test_a_flower_app_for_a_task_other_than_classification_is_refused_rather_than_trained_on_cross_entropy(
        tmp_path, capsys):
    code = main(["flower", "app", str(tmp_path / "app"), "--set", "task.loss=mse"])

    assert code == 2
    assert capsys.readouterr().err == (
        "fedmeta: error: [task] loss = 'mse': a Flower deployment trains on cross-entropy and reports accuracy; run "
        "other tasks with `fedmeta run` or fedmeta.Experiment\n")
    assert not (tmp_path / "app").exists()


class ScriptedGrid:
    """A grid whose replies to messages "m1" and "m2" arrive at the polls a script names."""

    def __init__(self, arrivals):
        self.arrivals, self.polls = arrivals, []

    def push_messages(self, messages):
        return list(messages)

    def pull_messages(self, message_ids):
        self.polls.append(sorted(message_ids))
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=m))
                for m in self.arrivals.get(len(self.polls), [])]


@pytest.fixture
def sleeps(monkeypatch):
    """The server's sleeps, on a clock that only they move."""
    clock, slept = [0.0], []
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(server.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s)))
    return slept


def test_the_server_polls_for_replies_every_tenth_of_a_second_and_asks_only_for_those_still_missing(sleeps):
    scripted = ScriptedGrid({2: ["m2"], 4: ["m1"]})

    replies = PromptGrid(scripted).send_and_receive(["m1", "m2"], timeout=60)

    # Flower's deployment grid would have slept 3 s after each of the first three polls
    assert [r.metadata.reply_to_message_id for r in replies] == ["m2", "m1"]
    assert scripted.polls == [["m1", "m2"], ["m1", "m2"], ["m1"], ["m1"]]
    assert sleeps == [0.1, 0.1, 0.1]


def test_replies_that_miss_the_timeout_are_left_out_as_flowers_grid_leaves_them(sleeps):
    scripted = ScriptedGrid({1: ["m1"], 30: ["m2"]})

    replies = PromptGrid(scripted, poll=0.25).send_and_receive(["m1", "m2"], timeout=1.0)

    # polls at 0, 0.25, 0.5, 0.75 and 1.0 s; the fifth reaches the deadline
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert len(scripted.polls) == 5
