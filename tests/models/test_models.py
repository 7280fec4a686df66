import pytest
import torch

from fedmeta.models import MODELS, CharLSTM, FedAvgCNN, LogisticRegression, TFFCNN, build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_fedavg_cnn_has_the_papers_1_690_046_parameters():
    model = FedAvgCNN(num_classes=62)

    total = count(model)

    # conv 1·32·25+32, conv 32·64·25+64, dense 3136·512+512, dense 512·62+62
    assert total == 832 + 51_264 + 1_606_144 + 31_806 == 1_690_046


def test_logistic_regression_is_one_linear_layer_on_flattened_inputs():
    model = LogisticRegression(input_dim=6, num_classes=3)

    logits = model(torch.zeros(4, 2, 3))

    assert logits.shape == (4, 3)
    assert count(model) == 6 * 3 + 3


@pytest.mark.parametrize(
    ("name", "input_dim", "x", "shape"),
    [
        ("fedavg_cnn", 0, torch.zeros(2, 1, 28, 28), (2, 62)),
        ("tff_cnn", 0, torch.zeros(2, 1, 28, 28), (2, 62)),
        ("char_lstm", 0, torch.zeros(2, 5, dtype=torch.long), (2, 5, 62)),
        ("logistic_regression", 784, torch.zeros(2, 1, 28, 28), (2, 62)),
        ("mlp", 784, torch.zeros(2, 1, 28, 28), (2, 62)),
    ],
)
def test_every_registered_model_gives_logits_of_the_expected_shape(name, input_dim, x, shape):
    model = build_model(name, num_classes=62, input_dim=input_dim).eval()

    with torch.no_grad():
        logits = model(x)

    assert logits.shape == shape


def test_the_shape_cases_cover_the_whole_registry():
    names = set(MODELS)

    assert names == {"fedavg_cnn", "tff_cnn", "char_lstm", "logistic_regression", "mlp"}


@pytest.mark.parametrize(("name", "cls"), [("fedavg_cnn", FedAvgCNN), ("tff_cnn", TFFCNN), ("char_lstm", CharLSTM)])
def test_build_model_passes_num_classes_as_the_output_width(name, cls):
    model = build_model(name, num_classes=10)

    last = list(model.parameters())[-1]

    assert isinstance(model, cls) and last.shape == (10,)


def test_tff_cnn_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = TFFCNN(num_classes=5)
    x = torch.randn(3, 1, 28, 28)

    train = [model.train()(x) for _ in range(2)]
    evaluation = [model.eval()(x) for _ in range(2)]

    assert not torch.equal(train[0], train[1])
    assert torch.equal(evaluation[0], evaluation[1])


def test_build_model_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of \['char_lstm', 'fedavg_cnn'"):
        build_model("resnet", num_classes=10)


def test_logistic_regression_without_an_input_width_is_refused():
    with pytest.raises(ValueError, match=r"model 'logistic_regression' needs the input width, got input_dim=0"):
        build_model("logistic_regression", num_classes=3)
