"""Checks before anything is written: a model that does not fit the data is one line, and no run directory."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmeta.cli import main
from fedmeta.data.federated import ClientData, Examples, split_clients
from fedmeta.experiment.build import build_dataset
from fedmeta.experiment.inputs import check_model_fits
from fedmeta.experiment.run import run_experiment
from fedmeta.models import registry
from fedmeta.models.cnn import TFFCNN

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = Path(os.environ.get("FEDMETA_SHARED_DATA", REPO.parent / "shared" / "data")) / "shakespeare"


class ImagesOnly(nn.Module):
    """A model whose forward refuses every input, with a message of two lines."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        raise ValueError("expects images of 28x28\nsecond line that the message leaves out")


def test_a_model_that_fails_on_the_first_batch_is_one_line_before_the_run_directory(tmp_path, tiny_config,
                                                                                     monkeypatch):
    monkeypatch.setitem(registry.MODELS, "images_only", lambda num_classes, input_dim: ImagesOnly())
    config = tiny_config(tmp_path / "runs", "model.name=images_only")
    first = build_dataset(config.data, config.seed).train_ids[0]

    with pytest.raises(ValueError) as error:
        run_experiment(config, progress=False)

    assert str(error.value) == (f"model.name = 'images_only' does not fit data.kind = 'synthetic': on two examples "
                                f"of client {first!r} it raises ValueError: expects images of 28x28; data.kind = "
                                "'synthetic' takes model.name = 'logistic_regression' by default")
    assert not (tmp_path / "runs").exists()


def test_fedmeta_run_with_a_cnn_on_vectors_exits_2_in_one_line_and_leaves_no_directory(tmp_path, capsys,
                                                                                      tiny_settings):
    code = main(["run", *tiny_settings(tmp_path / "runs", "model.name=fedavg_cnn"), "--no-progress"])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("fedmeta: error: model.name = 'fedavg_cnn' does not fit data.kind = 'synthetic': on two "
                          "examples of client 'synthetic_")
    assert err.endswith("; data.kind = 'synthetic' takes model.name = 'logistic_regression' by default\n")
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="needs the shared data checkout's shakespeare/")
def test_the_shakespeare_config_with_the_emnist_cnn_is_refused_before_any_round(tmp_path, capsys):
    code = main(["run", "shakespeare", "--set", "model.name=fedavg_cnn", "--set", f"data.path={SHAKESPEARE}",
                 "--set", "data.max_clients=20", "--set", f"output_dir={tmp_path / 'runs'}", "--no-progress"])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("fedmeta: error: model.name = 'fedavg_cnn' does not fit data.kind = 'shakespeare': ")
    assert "it raises RuntimeError: " in err and err.count("\n") == 1
    assert err.endswith("; data.kind = 'shakespeare' takes model.name = 'char_lstm' by default\n")
    assert not (tmp_path / "runs").exists()


def test_the_check_draws_no_random_numbers_and_leaves_the_model_as_it_was(tiny_config, tmp_path):
    # TFF's CNN has dropout: a forward pass in training mode would draw from torch's generator
    images = Examples(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    dataset = split_clients({c: ClientData(c, images, images) for c in "ab"}, num_classes=62, held_out_fraction=0.5,
                            seed=0)
    model = TFFCNN(62).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.get_rng_state()

    check_model_fits(tiny_config(tmp_path), model, dataset)

    assert torch.equal(torch.get_rng_state(), generator)
    assert model.training
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())
