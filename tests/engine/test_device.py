"""engine.device: which device a name means on this machine, and what moves there and back.

No test here needs a GPU: the machine's GPUs are what ``torch.cuda`` and ``torch.backends.mps``
report, set per test; "meta" stands in for a device where tensors must move.
"""

from __future__ import annotations

import pytest
import torch

from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.cli import main
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import ClientsOnDevice, Execution, resolve_device, to_device, worker_device
from fedmeta.experiment.build import build_execution
from fedmeta.experiment.config import EngineConfig

from engine_cases import image_client, new_model


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(cuda=2, mps=False)``: what torch reports this machine has."""
    def have(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return have


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(0, False, "cpu"), (2, False, "cuda"), (0, True, "mps"),
                                                       (1, True, "cuda")])
def test_auto_is_a_gpu_where_there_is_one_and_the_cpu_otherwise(gpus, cuda, mps, expected):
    gpus(cuda, mps)

    assert resolve_device("auto") == expected


@pytest.mark.parametrize(("device", "cuda", "message"), [
    ("cuda", 0, f"engine.device = 'cuda': this machine has no CUDA GPU that torch {torch.__version__} can use; "
                "set engine.device = 'cpu' or 'auto'"),
    ("cuda:1", 0, "engine.device = 'cuda:1': this machine has no CUDA GPU"),
    ("cuda:2", 2, "engine.device = 'cuda:2': this machine has 2 CUDA GPU(s), numbered from 0"),
    ("mps", 2, "engine.device = 'mps': this machine has no Apple GPU that torch can use"),
])
def test_a_device_this_machine_lacks_is_refused_in_one_line(gpus, device, cuda, message):
    gpus(cuda)

    with pytest.raises(ValueError) as refused:
        resolve_device(device)

    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_a_device_this_machine_has_is_itself(gpus):
    gpus(cuda=2, mps=True)

    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == ["cpu", "cuda", "cuda:1", "mps"]


def test_with_every_gpu_each_worker_gets_the_next_one_and_a_named_gpu_is_every_workers(gpus):
    gpus(cuda=2)

    assert [worker_device("cuda", i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device("cuda:1", i) for i in range(3)] == ["cuda:1"] * 3
    assert Execution(bfloat16=True, device="cuda").for_worker(3) == Execution(bfloat16=True, device="cuda:1")
    assert Execution().for_worker(3) == Execution()


def test_to_device_moves_every_tensor_of_a_result_and_keeps_its_types():
    update = ClientUpdate({"w": torch.ones(2), "b": torch.zeros(1)}, 3, {"loss": 0.5})
    result = (update, [torch.ones(1)], "client07")

    moved = to_device(result, "meta")

    assert type(moved[0]) is ClientUpdate and moved[0].num_examples == 3 and moved[0].metrics == {"loss": 0.5}
    assert {t.device.type for t in (*moved[0].delta.values(), *moved[1])} == {"meta"}
    assert moved[2] == "client07"
    assert to_device(update, "cpu").delta["w"] is update.delta["w"]  # already there: the tensor itself


def test_a_client_moves_once_and_a_new_object_under_its_id_moves_again():
    on_device = ClientsOnDevice("meta")
    client = image_client(1, 5)

    first, again = on_device(client), on_device(client)
    impostor = on_device(ClientData(client.client_id, client.test, client.train))

    assert first is again
    assert first.train.x.device.type == first.test.y.device.type == "meta"
    assert first.train.x.shape == client.train.x.shape and first.client_id == client.client_id
    assert impostor is not first and impostor.train.x.shape == client.test.x.shape


def test_on_the_cpu_nothing_moves_or_is_copied():
    client = image_client(1, 5)
    model = new_model()
    execution = Execution()
    weights = {"w": torch.ones(2)}
    result = ClientUpdate(weights, 1, {})

    assert ClientsOnDevice("cpu")(client) is client
    assert execution.prepare(model) is model
    assert execution.to_device(weights)["w"] is weights["w"]
    assert execution.output(result) is result


def test_off_the_cpu_the_engine_trains_a_copy_and_leaves_the_callers_model_where_it_was():
    model = new_model()

    prepared = Execution(device="meta").prepare(model)

    assert prepared is not model
    assert {p.device.type for p in prepared.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize(("setting", "message"), [
    ("engine.device=gpu", "engine.device = 'gpu': expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"),
    ("engine.device=cuda", "engine.device = 'cuda': this machine has no CUDA GPU"),
])
def test_fedmeta_run_on_a_device_it_cannot_use_stops_in_one_line_before_a_run_directory(
        gpus, tmp_path, capsys, tiny_settings, setting, message):
    gpus(cuda=0)

    code = main(["run", "--no-progress", *tiny_settings(tmp_path / "runs", setting)])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmeta: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_ray_engine_takes_every_gpu_not_a_named_one(tmp_path, capsys, tiny_settings):
    pytest.importorskip("ray")

    code = main(["run", "--no-progress", *tiny_settings(tmp_path / "runs", "engine.kind=ray", "engine.workers=1",
                                                        "engine.device=cuda:1")])

    assert code == 2
    assert capsys.readouterr().err.startswith(
        "fedmeta: error: engine.device = 'cuda:1': expected 'cuda' with engine.kind = 'ray'")


@pytest.mark.bits
def test_a_run_on_the_cpu_named_or_chosen_by_auto_has_the_bits_of_the_default(gpus, tmp_path, tiny_config):
    from fedmeta.experiment.run import run_experiment

    gpus(cuda=0)
    default = run_experiment(tiny_config(tmp_path / "default"), progress=False)
    for device in ("cpu", "auto"):
        run = run_experiment(tiny_config(tmp_path / device, f"engine.device={device}"), progress=False)
        assert run.weights.keys() == default.weights.keys()
        for key, weight in default.weights.items():
            torch.testing.assert_close(run.weights[key], weight, rtol=0, atol=0)



@pytest.mark.parametrize(("avx512_bf16", "amx", "cuda_bf16", "device", "expected"), [
    (False, False, False, "cpu", False),  # AVX2 only: autocast would convert, slower than float32
    (True, False, False, "cpu", True),
    (False, True, False, "cpu", True),
    (True, True, False, "cuda", False),  # the GPU's units decide, not the CPU's
    (False, False, True, "cuda", True),
    (True, True, True, "mps", False),
])
def test_auto_bfloat16_is_on_exactly_where_the_device_has_native_bfloat16_units(
        gpus, monkeypatch, avx512_bf16, amx, cuda_bf16, device, expected):
    gpus(cuda=1, mps=True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)

    chosen = build_execution(EngineConfig(device=device, bfloat16="auto"))

    assert chosen == Execution(bfloat16=expected, device=device)
    # true and false are what they say on any machine
    assert [build_execution(EngineConfig(device=device, bfloat16=b)).bfloat16 for b in (True, False)] == [True, False]
