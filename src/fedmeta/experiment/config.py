"""Experiment configuration: TOML sections mapped onto frozen dataclasses.

Keys are the library's argument names (``client_lr``, ``local_epochs``, ...). Every
value is checked on load, so a typo or a bad value stops the run before any work with a
message naming the key, the value and, for typos, the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import sys
import types
import typing
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from fedmeta.algorithms.client_update import CLIENT_OPTIMIZERS
from fedmeta.algorithms.faults import Faults, InvalidFaults
from fedmeta.algorithms.per_fedavg import VARIANTS
from fedmeta.algorithms.privacy import ACCOUNTANTS, SAMPLINGS
from fedmeta.algorithms.server_optimizers import SERVER_OPTIMIZERS
from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION
from fedmeta.evaluation.tasks import DEFAULT_METRICS, LOSSES, METRICS
from fedmeta.import_path import is_import_path, is_passed_from_python
from fedmeta.models.registry import MODELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENGINE_KINDS = ("process", "ray")
CLIENT_STATE_STORES = ("memory", "disk")
RAY_INSTALL = 'pip install "fedmeta[ray]"'
PRIVACY_INSTALL = 'pip install "fedmeta[privacy]"'
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")
RAY_ADDRESS = re.compile(r"auto|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}")
MAX_NAME_BYTES = 200
"""Leaves room for the run directory's ``-<YYYYmmdd-HHMMSS>-<n>`` within a file name's 255 bytes."""
DATA_KINDS = ("synthetic", "emnist", "shakespeare", "leaf_json")
ALGORITHMS = ("fedsgd", "fedavg", "reptile", "two_stage", "centralized", "fedprox", "fomaml", "maml", "perfedavg",
              "local_only", "ditto", "fedrep", "fedper", "pfedme", "scaffold")
PERSONAL_HEAD_METHODS = ("fedrep", "fedper")
NOT_PRIVATE = {
    "centralized": "pools every client's data in one place",
    "local_only": "trains no global model, so there is nothing to release",
    "scaffold": "its control variates are a second release, which DP-FedAvg neither clips nor noises",
}
"""Algorithms ``[privacy]`` refuses, and why."""
DEFAULT_MODELS = {
    "synthetic": "logistic_regression",
    "emnist": "fedavg_cnn",
    "leaf_json": "fedavg_cnn",
    "shakespeare": "char_lstm",
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the bad value."""


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def _check_path(key: str, value: str | None) -> None:
    """An empty path would silently mean the working directory, and the OS takes none with a NUL byte."""
    if value is not None:
        _require(value != "" and "\0" not in value, key, value, "a path, non-empty and without NUL bytes")


def _check_name(name: str) -> None:
    """The name starts the run directory's name: it must make one file name, visible and not an option."""
    shown = name if len(name) <= 80 else name[:60] + "..."  # a 10 MB name must not make a 10 MB message
    _require(0 < len(name.encode(errors="surrogatepass")) <= MAX_NAME_BYTES and "/" not in name
             and not name.startswith((".", "-")) and not any(ord(c) < 32 or ord(c) == 127 for c in name),
             "name", shown, f"a name of 1 to {MAX_NAME_BYTES} bytes, without '/' or control characters, not starting "
             "with '.' or '-' (it names the run directory)")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(repr(c) for c in choices))


def _choice_or_import_path(key: str, value: str, choices: Sequence[str]) -> None:
    """One of ``choices``, one's own object by import path, or the mark of one passed from Python."""
    _require(value in choices or is_import_path(value) or is_passed_from_python(value), key, value,
             "one of " + ", ".join(repr(c) for c in choices) + ", or an import path 'package.module:name' of your own")


@dataclass(frozen=True)
class DataConfig:
    """Which federated dataset, and how its clients split into training and held-out.

    ``path`` is a directory holding the dataset's files (the TFF h5 pair, or LEAF json);
    without it, the download cache is used. ``num_clients``, ``alpha`` and ``beta`` are
    the synthetic generator's. ``max_clients`` keeps the first clients by id before the
    split (a quick run); ``max_train_clients`` keeps that many of the training clients,
    drawn from the seed, after it: the held-out clients stay the same, and a smaller count
    keeps a subset of a larger one's (a study over the number of training clients).

    ``kind`` may instead be the import path of a function of one's own
    (``"mypkg.data:load"``), called with those of ``seed``, ``path``, ``num_clients`` and
    ``held_out_fraction`` it names. It returns a ``FederatedDataset``; a mapping of client
    ids to ``(x, y)`` (each client's examples, split into train and test); or a dataset of
    ``(x, y)`` pairs with integer labels, split over ``num_clients`` clients with
    Dirichlet(``alpha``) label skew (``fedmeta.data.partition``).
    """

    kind: str = "synthetic"
    path: str | None = None
    held_out_fraction: float = PAPER_HELD_OUT_FRACTION
    max_clients: int | None = None
    max_train_clients: int | None = None
    num_clients: int = 100
    alpha: float = 0.5
    beta: float = 0.5

    def __post_init__(self) -> None:
        _choice_or_import_path("data.kind", self.kind, DATA_KINDS)
        _check_path("data.path", self.path)
        _require(0 < self.held_out_fraction < 1, "data.held_out_fraction", self.held_out_fraction,
                 "a fraction in (0, 1)")
        _require(self.max_clients is None or self.max_clients >= 2, "data.max_clients", self.max_clients,
                 "at least 2")
        _require(self.max_train_clients is None or self.max_train_clients >= 1, "data.max_train_clients",
                 self.max_train_clients, "at least 1")
        _require(self.num_clients >= 2, "data.num_clients", self.num_clients, "at least 2")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            _require(0 <= value < math.inf, f"data.{key}", value, "a finite standard deviation >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """The model; unset, each dataset kind has its paper model (see ``DEFAULT_MODELS``).

    ``name`` may be the import path of a model factory of one's own
    (``"mypkg.models:resnet18"``), called with those of ``num_classes`` (the output width)
    and ``input_dim`` (the width of a flat input) it names.

    ``personal`` names the modules each client keeps for itself (its head, e.g.
    ``["fc2"]`` of the ``mlp``), for ``fedrep`` and ``fedper``; a name the model lacks is
    refused when the model is built, before any run directory is made.
    """

    name: str | None = None
    personal: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name is not None:
            _choice_or_import_path("model.name", self.name, sorted(MODELS))
        _require(all(self.personal) and len(set(self.personal)) == len(self.personal), "model.personal",
                 list(self.personal), "distinct, non-empty module names")


@dataclass(frozen=True)
class TaskConfig:
    """What the model learns: the ``loss`` it trains on and the ``metrics`` each client reports.

    Losses: ``"cross_entropy"`` (classification, the default), ``"mse"`` and ``"mae"``
    (regression), ``"bce_with_logits"`` (multi-label: one logit per label, targets 0 or 1).
    Metrics: ``"accuracy"``, ``"mse"``, ``"mae"``, ``"label_accuracy"`` (each label's, and
    their mean), and for EMNIST-62's labels the accuracy on digits, letters, upper- or
    lower-case letters alone (``"digit_accuracy"``, ``"letter_accuracy"``,
    ``"upper_accuracy"``, ``"lower_accuracy"``; NaN for a client without any). Unset,
    ``metrics`` are the loss's (``DEFAULT_METRICS``). The first metric is the primary one: a
    client is hurt when personalization moves it the wrong way, and ``evaluation.thresholds``
    are on it. Either key may be an import path of one's own: a
    loss returning the batch mean (as ``torch.nn.functional``'s do), a ``Metric``.
    """

    loss: str = "cross_entropy"
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _choice_or_import_path("task.loss", self.loss, list(LOSSES))
        for i, metric in enumerate(self.metrics or ()):
            _choice_or_import_path(f"task.metrics[{i}]", metric, list(METRICS))
        if self.metrics is not None:
            _require(len(set(self.metrics)) == len(self.metrics), "task.metrics", list(self.metrics),
                     "distinct metrics")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics, the loss's own if unset (none for a loss of one's own: it reports itself)."""
        return self.metrics if self.metrics is not None else DEFAULT_METRICS.get(self.loss, ())


@dataclass(frozen=True)
class AlgorithmConfig:
    """The federated algorithm: its name and the hyperparameters of its three parts.

    ``local_epochs`` applies to FedAvg, ``local_steps`` to Reptile and the centralized
    baseline; ``two_stage`` uses both and switches at ``switch_round``, where its server
    optimizer changes to Adam with ``reptile_server_lr``.

    The methods that followed the paper: ``fedprox`` is FedAvg with the proximal weight
    ``mu``; ``fomaml`` and ``maml`` take ``inner_steps`` support steps of lr ``inner_lr``
    and send the meta-gradient, which the server optimizer steps with ``server_lr``;
    ``perfedavg`` takes ``local_steps`` steps of lr ``client_lr`` with inner step
    ``inner_lr``, in its ``variant`` ``"fo"`` or ``"hf"``. MAML and Per-FedAvg clients
    personalize with SGD steps of lr ``inner_lr`` (``inner_steps`` for MAML,
    ``personalization_steps`` for Per-FedAvg); the others fine-tune as ``[evaluation]``
    says. ``local_only`` trains no global model: each evaluated client fine-tunes its own
    from the initial weights.

    Methods whose clients keep state between rounds: ``ditto`` trains the global model as
    FedAvg and each client's personal model for ``local_epochs`` too, pulled toward the
    global one with weight ``lam`` (held-out clients train that personal model from the
    global weights, as ``[evaluation]`` says, with the same pull); ``fedrep`` trains the
    client's head (``model.personal``) for ``head_epochs``, then the shared body for
    ``local_epochs``; ``fedper`` trains both together; their held-out clients fine-tune
    the head alone. ``pfedme`` takes ``local_steps`` steps of ``client_lr`` on the Moreau
    envelope with weight ``lam`` (> 0), each solving for the personal model with
    ``inner_steps`` steps of ``inner_lr``; ``server_lr`` is its β; held-out clients compute
    their personal model as Ditto's do. ``scaffold`` takes ``local_epochs`` of SGD steps
    (``client_optimizer = "sgd"`` only) corrected by the server's and the client's control
    variates; ``server_lr`` is its η_g; held-out clients fine-tune everything.
    """

    name: str = "fedavg"
    cohort_size: int = 10
    local_epochs: int = 1
    local_steps: int = 10
    client_lr: float = 0.02
    client_batch_size: int = 20
    client_optimizer: str = "sgd"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    switch_round: int | None = None
    reptile_server_lr: float = 1e-3
    mu: float = 0.0
    inner_steps: int = 1
    inner_lr: float = 0.02
    variant: str = "fo"
    personalization_steps: int = 1
    lam: float = 0.1
    head_epochs: int = 1

    def __post_init__(self) -> None:
        _choice("algorithm.name", self.name, ALGORITHMS)
        _choice("algorithm.client_optimizer", self.client_optimizer, CLIENT_OPTIMIZERS)
        _choice("algorithm.server_optimizer", self.server_optimizer, sorted(SERVER_OPTIMIZERS))
        _choice("algorithm.variant", self.variant, VARIANTS)
        for key in ("cohort_size", "local_epochs", "local_steps", "client_batch_size", "inner_steps",
                    "personalization_steps", "head_epochs"):
            value = getattr(self, key)
            _require(value >= 1, f"algorithm.{key}", value, "at least 1")
        for key in ("client_lr", "server_lr", "reptile_server_lr", "inner_lr"):
            value = getattr(self, key)
            _require(0 < value < math.inf, f"algorithm.{key}", value, "a positive, finite learning rate")
        _require(0 <= self.mu < math.inf, "algorithm.mu", self.mu, "a proximal weight >= 0, finite")
        _require(0 <= self.lam < math.inf, "algorithm.lam", self.lam, "a regularization weight >= 0, finite")
        _require(self.name != "pfedme" or self.lam > 0, "algorithm.lam", self.lam,
                 "a regularization weight > 0 for pfedme (with 0 its local model never moves)")
        _require(0 <= self.server_momentum < 1, "algorithm.server_momentum", self.server_momentum,
                 "a momentum in [0, 1)")
        _require(self.server_momentum == 0 or self.server_optimizer == "sgd", "algorithm.server_momentum",
                 self.server_momentum, f"0 with server_optimizer {self.server_optimizer!r} (momentum is SGD's)")
        _require(self.name != "scaffold" or self.client_optimizer == "sgd", "algorithm.client_optimizer",
                 self.client_optimizer, "'sgd' for scaffold (its control variates assume SGD client steps)")
        if self.name == "two_stage":
            _require(self.switch_round is not None and self.switch_round >= 1, "algorithm.switch_round",
                     self.switch_round, "a round >= 1 for two_stage")


@dataclass(frozen=True)
class EvaluationConfig:
    """Personalization evaluation on held-out clients, every ``every`` rounds and at the end.

    Each evaluated client fine-tunes for ``fine_tune_epochs`` epochs of the fine-tuning
    optimizer on its train split (the paper: SGD lr 0.02 or Adam lr 0.002, batch 20).
    ``thresholds`` are values of the task's primary metric (accuracies, by default) whose
    rounds-to-threshold the run reports: reached at or above them, or at or below for an error.
    """

    every: int = 10
    max_clients: int | None = None
    fine_tune_epochs: int = 3
    fine_tune_optimizer: str = "sgd"
    fine_tune_lr: float = 0.02
    fine_tune_batch_size: int = 20
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _require(self.every >= 1, "evaluation.every", self.every, "at least 1")
        _require(self.max_clients is None or self.max_clients >= 1, "evaluation.max_clients", self.max_clients,
                 "at least 1")
        _require(self.fine_tune_epochs >= 1, "evaluation.fine_tune_epochs", self.fine_tune_epochs, "at least 1")
        _choice("evaluation.fine_tune_optimizer", self.fine_tune_optimizer, CLIENT_OPTIMIZERS)
        _require(0 < self.fine_tune_lr < math.inf, "evaluation.fine_tune_lr", self.fine_tune_lr,
                 "a positive, finite learning rate")
        _require(self.fine_tune_batch_size >= 1, "evaluation.fine_tune_batch_size", self.fine_tune_batch_size,
                 "at least 1")
        _require(all(0 < t < math.inf for t in self.thresholds), "evaluation.thresholds", self.thresholds,
                 "values > 0, finite, of the task's primary metric")


@dataclass(frozen=True)
class EngineConfig:
    """Where client work runs.

    ``kind = "process"``: ``workers`` processes on this machine (unset: one per core; 0:
    in this process). ``kind = "ray"``: ``workers`` Ray actors (unset: one per CPU of the
    cluster) on the Ray cluster at ``address`` (``"auto"``, ``"HOST:PORT"`` of its head
    node, ``"ray://HOST:PORT"`` for Ray Client; unset: a local Ray instance started for
    the run); it needs ``pip install "fedmeta[ray]"``.
    ``channels_last`` runs convolutions in the layout measured faster on CPUs;
    ``bfloat16`` is opt-in autocast for client work: ``true``, ``false`` or ``"auto"`` (on where
    the device has native bfloat16 units, chosen on the machine that runs; see
    ``fedmeta.engine.execution``).
    ``device`` is where client work and evaluation run: ``"cpu"`` (the default), ``"cuda"``
    (every GPU, one worker per GPU unless ``workers`` says otherwise), ``"cuda:N"`` (that
    GPU), ``"mps"`` (Apple's), or ``"auto"`` (a GPU if there is one, else the CPU); the
    server's weights stay on the CPU.
    ``batched = true`` trains each round's cohort in this process as one batched
    computation (``torch.func.vmap``) where the client update is plain SGD on the default
    loss and the model has no buffers or dropout, on all of torch's threads; its updates
    equal the per-client ones up to float rounding. An opt-in (see ``benchmarks/README.md``).
    ``client_states`` is where a stateful method's client states are kept: ``"memory"``, or
    ``"disk"``, a file per state in the run directory's ``client_states/``, for states that
    would not fit in memory (``fedmeta.engine.states``).
    Neither the kind of engine, the number of workers, their scheduling nor where client
    states are kept changes the results.
    """

    kind: str = "process"
    workers: int | None = None
    address: str | None = None
    channels_last: bool = True
    bfloat16: bool | str = False
    client_states: str = "memory"
    device: str = "cpu"
    batched: bool = False

    def __post_init__(self) -> None:
        _choice("engine.kind", self.kind, ENGINE_KINDS)
        _choice("engine.client_states", self.client_states, CLIENT_STATE_STORES)
        _require(isinstance(self.bfloat16, bool) or self.bfloat16 == "auto", "engine.bfloat16", self.bfloat16,
                 "true, false or 'auto'")
        _require(isinstance(self.device, str) and DEVICE.fullmatch(self.device) is not None, "engine.device",
                 self.device, "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
        if self.kind == "process":
            _require(self.workers is None or self.workers >= 0, "engine.workers", self.workers,
                     "0 (in-process) or more worker processes")
            _require(not self.batched or not self.workers, "engine.workers", self.workers,
                     "unset or 0 with engine.batched = true (the batched cohort trains in this process)")
            _require(self.address is None, "engine.address", self.address,
                     "unset with engine.kind = 'process' (an address is a Ray cluster's; set engine.kind = 'ray')")
            return
        _require(self.workers is None or self.workers >= 1, "engine.workers", self.workers,
                 "at least 1 Ray actor with engine.kind = 'ray' (unset: one per CPU of the cluster)")
        _require(not self.batched, "engine.batched", self.batched,
                 "false with engine.kind = 'ray' (the batched cohort trains in this process)")
        _require(not self.device.startswith("cuda:"), "engine.device", self.device,
                 "'cuda' with engine.kind = 'ray' (Ray gives each actor a GPU of its own)")
        _require(self.address is None or RAY_ADDRESS.fullmatch(self.address) is not None, "engine.address",
                 self.address, "'auto', 'HOST:PORT' of a Ray head node, or 'ray://HOST:PORT' (unset: a local "
                 "Ray instance)")
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(f"engine.kind = 'ray': Ray is not installed; install it with {RAY_INSTALL}")


@dataclass(frozen=True)
class FlowerConfig:
    """How a Flower deployment (``fedmeta flower app``) aggregates; ``fedmeta run`` does not read it.

    ``secagg = true`` sums each round's updates under Flower's SecAgg+ (``fedmeta.flower.secagg``),
    so that the server sees only their sum. The other keys are Flower's ``SecAggPlusWorkflow``
    settings: each SuperNode's secret is split into ``num_shares`` shares, of which
    ``reconstruction_threshold`` recover it; a node's weighted update must lie within
    ±``clipping_range`` per coordinate and is quantized to ``quantization_range`` levels;
    ``max_weight`` scales its weight (a power of two keeps the weights exact).
    """

    secagg: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1024.0

    def __post_init__(self) -> None:
        _require(self.num_shares >= 3, "flower.num_shares", self.num_shares, "at least 3")
        _require(2 <= self.reconstruction_threshold < self.num_shares, "flower.reconstruction_threshold",
                 self.reconstruction_threshold, f"2 to flower.num_shares - 1 = {self.num_shares - 1}")
        _require(0 < self.clipping_range < math.inf, "flower.clipping_range", self.clipping_range,
                 "a range > 0, finite")
        _require(2 <= self.quantization_range < 2**31, "flower.quantization_range", self.quantization_range,
                 "2 to 2**31 - 1 levels (the masks are drawn modulo 2**32)")
        _require(0 < self.max_weight < math.inf, "flower.max_weight", self.max_weight, "a weight > 0, finite")


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP-FedAvg (``fedmeta.algorithms.privacy``); off unless a noise multiplier or target ε is set.

    Each cohort client's delta is clipped to L2 norm ``clip`` (C); the server adds Gaussian
    noise of std ``noise_multiplier``·C to their sum and divides it by ``cohort_size``.
    ``target_epsilon`` instead of ``noise_multiplier`` picks the smallest noise multiplier
    whose ε after ``rounds`` rounds is at most it. ε is at ``delta``, below 1/N for N
    training clients, by the ``accountant`` (``"rdp"`` or ``"pld"``) for how cohorts are
    drawn, ``sampling``: ``"fixed"`` (``cohort_size`` clients without replacement, as
    without privacy; RDP only) or ``"poisson"`` (each training client with probability
    ``cohort_size``/N). With ``target_quantile`` (γ), C adapts (Andrew et al. 2021):
    ``clip`` is its initial value, ``clip_lr`` its step, ``clipped_count_stddev`` the std
    of the noise on the count of unclipped clients (unset: ``cohort_size``/20). Needs the
    ``privacy`` extra.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    clip: float | None = None
    target_quantile: float | None = None
    clip_lr: float = 0.2
    clipped_count_stddev: float | None = None
    accountant: str = "rdp"
    sampling: str = "fixed"

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def __post_init__(self) -> None:
        _choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        _choice("privacy.sampling", self.sampling, SAMPLINGS)
        _require(self.noise_multiplier is None or 0 < self.noise_multiplier < math.inf, "privacy.noise_multiplier",
                 self.noise_multiplier, "a noise multiplier > 0, finite")
        _require(self.target_epsilon is None or 0 < self.target_epsilon < math.inf, "privacy.target_epsilon",
                 self.target_epsilon, "an epsilon > 0, finite (for no privacy, leave [privacy] out)")
        _require(self.noise_multiplier is None or self.target_epsilon is None, "privacy.target_epsilon",
                 self.target_epsilon, "unset beside privacy.noise_multiplier (either one sets the noise)")
        _require(self.clip is None or 0 < self.clip < math.inf, "privacy.clip", self.clip, "a clip norm > 0, finite")
        _require(self.delta is None or 0 < self.delta < 1, "privacy.delta", self.delta,
                 "a delta in (0, 1/N), N the number of training clients")
        _require(self.target_quantile is None or 0 < self.target_quantile < 1, "privacy.target_quantile",
                 self.target_quantile, "a quantile in (0, 1)")
        _require(0 < self.clip_lr < math.inf, "privacy.clip_lr", self.clip_lr, "a step > 0, finite")
        _require(self.clipped_count_stddev is None or 0 < self.clipped_count_stddev < math.inf,
                 "privacy.clipped_count_stddev", self.clipped_count_stddev, "a standard deviation > 0, finite")
        _require(not (self.accountant == "pld" and self.sampling == "fixed"), "privacy.accountant", self.accountant,
                 "'rdp' with privacy.sampling = 'fixed' (dp-accounting's PLD has no event for a fixed-size cohort "
                 "drawn without replacement), or privacy.sampling = 'poisson'")
        if not self.enabled:
            for key in ("delta", "clip", "target_quantile", "clipped_count_stddev"):
                _require(getattr(self, key) is None, f"privacy.{key}", getattr(self, key),
                         "privacy.noise_multiplier or privacy.target_epsilon beside it (without, privacy is off)")
            return
        _require(self.clip is not None, "privacy.clip", None, "a clip norm > 0, finite (each client's delta is "
                 "clipped to it)")
        _require(self.delta is not None, "privacy.delta", None, "a delta in (0, 1/N), N the number of training clients")
        if importlib.util.find_spec("dp_accounting") is None:
            raise ConfigError(f"[privacy]: dp-accounting is not installed; install it with {PRIVACY_INSTALL}")


@dataclass(frozen=True)
class LoggingConfig:
    """Trackers that receive every metrics row beside ``metrics.jsonl`` (``fedmeta.experiment.tracking``).

    ``metrics.jsonl`` stays the record; both trackers need ``pip install "fedmeta[logging]"``.
    ``tensorboard`` writes TensorBoard event files to the run directory's ``tensorboard/``.
    ``mlflow`` logs to one MLflow run in the tracking store at ``mlflow_tracking_uri``
    (``"sqlite:///PATH"``, ``"http://HOST:PORT"``; unset: a SQLite store in the run
    directory's ``mlflow/``, so that nothing is written elsewhere), in the experiment
    ``mlflow_experiment`` (unset: the run's ``name``).
    """

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None

    def __post_init__(self) -> None:
        for key in ("mlflow_tracking_uri", "mlflow_experiment"):
            value = getattr(self, key)
            _require(value is None or (value.strip() != "" and "\0" not in value), f"logging.{key}", value,
                     "a non-empty string without NUL bytes")
            _require(value is None or self.mlflow, f"logging.{key}", value,
                     "logging.mlflow = true beside it (without, MLflow is off)")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run: ``rounds`` rounds of the algorithm, evaluated as configured.

    The run directory is ``output_dir/<name>-<timestamp>``. A checkpoint is written every
    ``checkpoint_every`` rounds and after the last. The run stops as diverged when a round's
    ``client/train_loss`` is NaN/inf or above ``divergence_factor`` times ln(num_classes),
    the loss of a uniform guess (``inf``: stop on non-finite losses only).
    """

    name: str = "default"
    seed: int = 0
    rounds: int = 50
    output_dir: str = "runs"
    checkpoint_every: int = 10
    divergence_factor: float = 10.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    faults: Faults = field(default_factory=Faults)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        cohort = 1 if self.algorithm.name == "centralized" else self.algorithm.cohort_size
        _require(self.faults.min_clients <= cohort, "faults.min_clients", self.faults.min_clients,
                 f"at most the cohort size ({cohort})")
        _require(self.rounds >= 1, "rounds", self.rounds, "at least 1")
        _require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "at least 1")
        _require(self.divergence_factor > 1, "divergence_factor", self.divergence_factor,
                 "a factor > 1 (inf: stop on non-finite losses only)")
        _check_name(self.name)
        _check_path("output_dir", self.output_dir)
        if self.task.metric_names[:1] in (("accuracy",), ("label_accuracy",)):
            _require(all(t <= 1 for t in self.evaluation.thresholds), "evaluation.thresholds",
                     self.evaluation.thresholds, "accuracies in (0, 1]")
        _require(self.model.name is not None or self.data.kind in DEFAULT_MODELS, "model.name", None,
                 f"a model for data.kind = {self.data.kind!r} (only the built-in kinds have a default model)")
        if self.algorithm.name in PERSONAL_HEAD_METHODS:
            _require(bool(self.model.personal), "model.personal", [], f"the names of the model's personal modules "
                     f"(its head, e.g. ['fc2'] of the 'mlp') for algorithm.name = {self.algorithm.name!r}")
        else:
            _require(not self.model.personal, "model.personal", list(self.model.personal),
                     f"unset: only {' and '.join(PERSONAL_HEAD_METHODS)} keep personal modules, not "
                     f"algorithm.name = {self.algorithm.name!r}")
        # the population known before loading (the dataset build checks the training clients)
        population = self.data.num_clients if self.data.kind == "synthetic" else self.data.max_clients
        if self.algorithm.name != "centralized" and population is not None:
            source = "data.num_clients" if self.data.kind == "synthetic" else "data.max_clients"
            _require(self.algorithm.cohort_size <= population, "algorithm.cohort_size", self.algorithm.cohort_size,
                     f"at most {source} = {population}, the number of clients")
        if self.privacy.enabled:
            self._check_privacy()

    def _check_privacy(self) -> None:
        """What ``[privacy]`` needs of the other sections."""
        name = self.algorithm.name
        _require(name not in NOT_PRIVATE, "algorithm.name", name,
                 f"an algorithm DP-FedAvg can make private with [privacy] ({name}: {NOT_PRIVATE.get(name)})")
        _require(self.faults.update_norm_factor is None, "faults.update_norm_factor", self.faults.update_norm_factor,
                 "unset with [privacy] (a bound from the round's median norm lets one client's data decide "
                 "whether another's update counts)")
        privacy = self.privacy
        if privacy.target_quantile is not None and privacy.noise_multiplier is not None:
            count_stddev = privacy.clipped_count_stddev or self.algorithm.cohort_size / 20
            _require(privacy.noise_multiplier < 2 * count_stddev, "privacy.noise_multiplier",
                     privacy.noise_multiplier, f"below 2 × the unclipped-count std {count_stddev:g} with adaptive "
                     "clipping (raise privacy.clipped_count_stddev)")

    @property
    def model_name(self) -> str:
        return self.model.name or DEFAULT_MODELS[self.data.kind]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in known], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Checks ``value`` against a field's type; ints are accepted for floats."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:  # bool | str: the field itself says which values it takes
            return value
        kind = kinds[0]
        args = typing.get_args(kind)  # an optional list's item type
    if typing.get_origin(kind) is tuple:
        _require(isinstance(value, (list, tuple)), key, value, "a list")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        _require(abs(value) <= sys.float_info.max, key, value, "a float (this integer is too large for one)")
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    _require(ok, key, value, f"{'an' if kind is int else 'a'} {kind.__name__}")
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    types_ = _field_types(cls)
    known = [f"{prefix}{k}" for k in types_]
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(f"{prefix}{key}", known)
        kind = types_[key]
        if dataclasses.is_dataclass(kind):
            _require(isinstance(value, Mapping), f"{prefix}{key}", value, "a table")
            kwargs[key] = _build(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, kind)
    try:
        return cls(**kwargs)
    except InvalidFaults as error:  # the library checks [faults] itself; name the config key
        raise ConfigError(f"{prefix}{error.setting} = {error.value!r}: expected {error.expected}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``section.key=value``; the value is TOML (``0.1``, ``true``, ``[1, 2]``).

    A bare word that is not TOML is taken as a string, so ``data.kind=emnist`` works;
    ``none`` unsets an optional key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. algorithm.client_lr=0.05")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except ValueError:  # TOMLDecodeError, or an integer too long for Python to read: a bare word
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}=...: the value is nested too deeply") from None
    return key.strip().split("."), value


def _merge(raw: dict[str, Any], path: list[str], value: Any) -> None:
    table = raw
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
    table[path[-1]] = value


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Builds a validated config from TOML-like data plus ``key=value`` overrides."""
    merged = _to_plain(raw)
    for text in overrides:
        path, value = parse_override(text)
        _merge(merged, path, value)
    return _build(ExperimentConfig, merged, "")


def builtin_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name (``femnist`` for ``femnist.toml``)."""
    with resources.as_file(resources.files("fedmeta") / "configs") as folder:
        return {p.stem: p for p in sorted(Path(folder).glob("*.toml"))}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads a TOML config and applies overrides.

    ``path`` is a file, or the name of a shipped config (``femnist``); none gives the
    embedded default.
    """
    if path is None:
        return config_from_dict({}, overrides)
    path = Path(path)
    shipped = builtin_configs()
    if not path.exists() and str(path) in shipped:
        path = shipped[str(path)]
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file not found: {path} (shipped configs: {', '.join(shipped)})"
        ) from None
    except OSError as error:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start})") from None
    except ValueError as error:  # TOMLDecodeError, or an integer too long for Python to read
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Plain data for JSON and checkpoints; ``config_from_dict`` inverts it."""
    return _to_plain(config)


def resolved(config: ExperimentConfig) -> ExperimentConfig:
    """Fills the values chosen at run time (the model by dataset) into the config."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, name=config.model_name))


def _toml_lines(table: Mapping[str, Any]) -> list[str]:
    """One ``key = value`` line per key of a flat table; an unset key is a comment, as TOML has no null."""
    return [f"# {key}: unset" if value is None else tomli_w.dumps({key: value}).rstrip("\n")
            for key, value in table.items()]


def config_to_toml(config: ExperimentConfig) -> str:
    """The config as TOML with every key, in the dataclasses' order; ``load_config`` reads it back to ``config``.

    An unset optional key is written as a comment (``# max_clients: unset``), so the text
    still shows every key a config has.
    """
    plain = config_to_dict(config)
    lines = _toml_lines({key: value for key, value in plain.items() if not isinstance(value, dict)})
    for section, table in plain.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]", *_toml_lines(table)]
    return "\n".join(lines) + "\n"
