"""How client work runs on a model: memory layout and precision, chosen by measurement.

``channels_last`` stores convolution weights (and so their activations) as NHWC, which
oneDNN's CPU kernels run faster than the default NCHW at the small batches of client
training (see ``benchmarks/README.md``); it leaves models without convolutions alone.
``bfloat16`` runs client work under autocast: an opt-in, since it changes the numbers
and is only faster where the hardware has native bfloat16 units (``native_bfloat16``: on
x86 CPUs AVX-512 BF16 or AMX; it ran W1 1.59x faster on such a CPU and ended a FEMNIST run
within 0.003 of float32's accuracy, see ``benchmarks/README.md``). ``bfloat16 = "auto"``
chooses it exactly there.

Client work always runs on one thread, in every engine: how a kernel splits a reduction
over threads changes its rounding, so a multi-threaded in-process run would not give the
bits of one-thread workers, Ray actors or Flower's simulation (on some CPUs and not others).

``device`` is where client work runs. The engine moves what a client's work reads onto
it (the weights of the task; the client's data once per worker, kept for later rounds;
its state) and brings what it returns back to the CPU, so the algorithms never see a
device and the server's weights, aggregation and checkpoints stay on the CPU. On the
CPU nothing moves and nothing is copied: the default keeps every run's bits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import ContextManager, Iterator, TypeVar

import torch
from torch import nn

from fedmeta.data.federated import ClientData

T = TypeVar("T")


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Runs torch's intra-op work on one thread inside the block, restoring the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_device(value: T, device: torch.device | str) -> T:
    """``value`` with every tensor in it (in dicts, lists, tuples and NamedTuples) on ``device``.

    On the device a tensor is already on, the tensor itself comes back, not a copy.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, to_device(v, device)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class ClientsOnDevice:
    """A worker's clients on its device: each moved once and kept, so later rounds copy nothing.

    A client is known by its id and the very object passed: a different object under the
    same id (a client sent with its task) is moved afresh.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._moved: dict[str, tuple[ClientData, ClientData]] = {}

    def __call__(self, client: ClientData) -> ClientData:
        if self.device.type == "cpu":
            return client
        source, moved = self._moved.get(client.client_id, (None, None))
        if source is not client:
            moved = dataclasses.replace(client, train=to_device(client.train, self.device),
                                        test=to_device(client.test, self.device))
            self._moved[client.client_id] = (client, moved)
        return moved


def resolve_device(device: str) -> str:
    """The device ``engine.device`` names on this machine: ``"auto"`` made concrete, the others checked.

    Raises:
        ValueError: in one line, for a device this machine does not have.
    """
    cuda, gpus = torch.cuda.is_available(), torch.cuda.device_count()
    mps = torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device.startswith("cuda"):
        if not cuda:
            raise ValueError(f"engine.device = {device!r}: this machine has no CUDA GPU that torch "
                             f"{torch.__version__} can use; set engine.device = 'cpu' or 'auto'")
        index = int(device.partition(":")[2] or 0)
        if index >= gpus:
            raise ValueError(f"engine.device = {device!r}: this machine has {gpus} CUDA GPU(s), numbered from 0")
    if device == "mps" and not mps:
        raise ValueError("engine.device = 'mps': this machine has no Apple GPU that torch can use; "
                         "set engine.device = 'cpu' or 'auto'")
    return device


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` computes in bfloat16 natively: an x86 CPU with AVX-512 BF16 or AMX, a CUDA GPU that
    supports it; not MPS, and not other CPUs, where autocast converts and runs slower than float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")
    return False


def _cpu_has(check: str) -> bool:
    """``torch.cpu``'s private ISA check ``check``; False on a torch without it, so "auto" keeps float32."""
    found = getattr(torch.cpu, check, None)
    return bool(found()) if found is not None else False


def resolve_bfloat16(setting: bool | str, device: str) -> bool:
    """``engine.bfloat16`` on this machine: ``"auto"`` is bfloat16 where ``device`` has native units."""
    return native_bfloat16(device) if setting == "auto" else bool(setting)


def worker_device(device: str, index: int) -> str:
    """The device of worker ``index``: with ``"cuda"`` (every GPU), worker i gets GPU i modulo their count."""
    if device != "cuda":
        return device
    return f"cuda:{index % max(torch.cuda.device_count(), 1)}"


@dataclass(frozen=True)
class Execution:
    """How an engine runs client work: memory layout, precision and device (see the module docstring)."""

    channels_last: bool = True
    bfloat16: bool = False
    device: str = "cpu"

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Converts ``model`` in place (its parameters stay the same objects) and returns it.

        Off the CPU it returns a copy on the device and leaves ``model`` where it was.
        """
        if not self.on_cpu:
            model = copy.deepcopy(model).to(self.device)
        if self.channels_last and any(p.dim() == 4 for p in model.parameters()):
            model.to(memory_format=torch.channels_last)
        return model

    def for_worker(self, index: int) -> Execution:
        """This execution for worker ``index`` of a parallel engine (its own GPU where there are several)."""
        return dataclasses.replace(self, device=worker_device(self.device, index))

    def to_device(self, value: T) -> T:
        """What client work reads (weights, a client's state) on the device (itself on the CPU)."""
        return value if self.on_cpu else to_device(value, self.device)

    def output(self, result: T) -> T:
        """What client work returned, on the CPU (itself, from work on the CPU)."""
        return result if self.on_cpu else to_device(result, "cpu")

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The context client work runs in: one thread, and bfloat16 autocast if chosen."""
        # no cast cache: it lives as long as the context, which spans a whole client's
        # training, so every step after the first would run on the first step's weights
        autocast: ContextManager = (torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                                   cache_enabled=False)
                                    if self.bfloat16 else contextlib.nullcontext())
        with single_threaded(), autocast:
            yield
