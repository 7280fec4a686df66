"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is written atomically (a side file in the same directory, flushed and
fsynced, renamed over the old one, then the directory fsynced), so a crash at any moment
leaves the previous checkpoint or the new one on disk, never half a file. It is read
with ``torch.load(weights_only=True)``: tensors and plain data only, so loading a file
never runs code from it.

With ``engine.client_states = "disk"`` the clients' states are files in ``client_states/``
beside the checkpoint (``fedmeta.engine.states.DiskStates``), and the checkpoint names the
file of each client. Those files are fsynced before the checkpoint is written and never
rewritten; once it is written, the files it does not name are removed.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from fedmeta.algorithms.algorithm import Schedule, ServerState, init_state, is_stateful
from fedmeta.client_work import ClientState
from fedmeta.engine.states import DiskStates, state_file_version
from fedmeta.experiment.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from fedmeta.experiment.run_dir import replace_atomically
from fedmeta.params import Params

CHECKPOINT_FORMAT = "fedmeta.checkpoint/3"
# /1 (before resume) lacks metrics_offset and torch_rng_state: it can be evaluated, not resumed;
# /2 lacks client_state_files (an older fedmeta would resume without the states they name)
READABLE_FORMATS = ("fedmeta.checkpoint/1", "fedmeta.checkpoint/2", CHECKPOINT_FORMAT)
CLIENT_STATES_DIR = "client_states"
REQUIRED_KEYS = ("config", "rounds_done", "weights", "server_state")


@dataclass(frozen=True)
class Checkpoint:
    """A run after ``rounds_done`` rounds.

    ``metrics_offset`` is the size in bytes of ``metrics.jsonl`` when it held exactly the
    lines of those rounds. ``torch_rng_state`` is torch's global CPU generator; it is the
    only global random state there is, because every draw of data, cohorts and client work
    comes from ``client_seed(seed, round, name)`` and neither numpy's nor Python's global
    generator is ever used. Both are None in a format-1 checkpoint. ``client_states`` are
    the states of the clients of a stateful method (Ditto, FedRep, FedPer, SCAFFOLD), by
    client id, as the engine held them; empty for the others. With
    ``engine.client_states = "disk"`` they are a ``DiskStates`` over ``client_states/``
    beside the checkpoint file, read from there when asked for.
    """

    config: ExperimentConfig
    state: ServerState
    rounds_done: int
    metrics_offset: int | None = None
    torch_rng_state: torch.Tensor | None = None
    client_states: Mapping[str, ClientState] = field(default_factory=dict)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` atomically.

    Client states in a ``DiskStates`` (in ``client_states/`` beside ``path``) are named,
    not held; their files no longer current are removed once the checkpoint is on disk.
    """
    state = checkpoint.state
    on_disk = checkpoint.client_states if isinstance(checkpoint.client_states, DiskStates) else None
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(checkpoint.config),
        "rounds_done": checkpoint.rounds_done,
        "weights": state.weights,
        "server_state": {"aggregator": state.aggregator, "server": state.server, "stage": state.stage},
        "metrics_offset": checkpoint.metrics_offset,
        "torch_rng_state": checkpoint.torch_rng_state,
        "client_states": {} if on_disk else checkpoint.client_states,
        "client_state_files": on_disk.files() if on_disk else {},
    }
    replace_atomically(path, lambda file: torch.save(payload, file))
    if on_disk:
        on_disk.remove_unreferenced()


def _refusal(path: Path, error: Exception) -> ValueError:
    """One line saying why ``torch.load(weights_only=True)`` refused the file."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        named = f" (the first refused: {found.group(1)})" if found else ""
        return ValueError(f"{path}: refused: the file holds objects other than tensors and plain data{named}, "
                          "and loading them could run code")
    detail = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
    return ValueError(f"{path}: not a fedmeta checkpoint: the file is truncated or corrupted "
                      f"({type(error).__name__}{': ' + detail if detail else ''})")


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _payload_problem(payload: dict[str, Any]) -> str | None:
    """What makes a loaded payload no checkpoint at all, before its config is read; None if nothing."""
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    weights, server = payload.get("weights"), payload.get("server_state")
    offset, rng = payload.get("metrics_offset"), payload.get("torch_rng_state")
    if missing:
        return f"missing {', '.join(missing)}"
    if not (isinstance(weights, dict) and all(isinstance(w, torch.Tensor) for w in weights.values())):
        return "weights are not a dict of tensors"
    if not (isinstance(server, dict) and {"aggregator", "server", "stage"} <= server.keys()):
        return "server_state lacks aggregator, server or stage"
    if not _whole_number(server["stage"]) or server["stage"] < 0:
        return f"server_state stage = {server['stage']!r}, expected a stage index"
    if not _whole_number(payload["rounds_done"]) or payload["rounds_done"] < 1:
        return f"rounds_done = {payload['rounds_done']!r}, expected a count of rounds >= 1"
    if offset is not None and (not _whole_number(offset) or offset < 1):
        return f"metrics_offset = {offset!r}, expected a size in bytes >= 1"
    states = payload.get("client_states", {})
    if not (isinstance(states, dict) and all(isinstance(c, str) and isinstance(t, dict)
                                             and all(isinstance(v, torch.Tensor) for v in t.values())
                                             for c, t in states.items())):
        return "client_states are not a dict of client ids to dicts of tensors"
    files = payload.get("client_state_files", {})
    if not (isinstance(files, dict) and all(isinstance(c, str) and isinstance(n, str) for c, n in files.items())):
        return "client_state_files are not a dict of client ids to file names"
    misnamed = next((c for c, name in files.items() if state_file_version(c, name) is None), None)
    if misnamed is not None:
        return f"client_state_files[{misnamed!r}] = {files[misnamed]!r} is not a state file name of that client"
    if states and files:
        return "it holds client states and names client state files; a checkpoint does one or the other"
    expected_rng = torch.get_rng_state()
    if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == expected_rng.dtype
                                and rng.shape == expected_rng.shape):
        found = f"a {rng.dtype} tensor of shape {tuple(rng.shape)}" if isinstance(rng, torch.Tensor) else repr(rng)
        return (f"torch_rng_state is {found}, expected torch's {expected_rng.dtype} generator state "
                f"of shape {tuple(expected_rng.shape)}")
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a checkpoint (tensors and plain data only); anything else is refused in one line.

    Only the file's own consistency is checked here; ``check_against`` checks it against
    the model and algorithm its config builds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise _refusal(path, error) from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a fedmeta checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    problem = _payload_problem(payload)
    if problem:
        raise ValueError(f"{path}: not a fedmeta checkpoint ({problem})")
    try:
        config = config_from_dict(payload["config"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if payload["rounds_done"] > config.rounds:
        raise ValueError(f"{path}: not a fedmeta checkpoint (rounds_done = {payload['rounds_done']} is more than "
                         f"its config's rounds = {config.rounds})")
    server = payload["server_state"]
    state = ServerState(payload["weights"], server["aggregator"], server["server"], server["stage"])
    states: Mapping[str, ClientState] = payload.get("client_states", {})
    if config.engine.client_states == "disk":
        if states:
            raise ValueError(f"{path}: not a fedmeta checkpoint (it holds client states, but its config keeps "
                             "them on disk)")
        states = DiskStates(path.parent / CLIENT_STATES_DIR, payload.get("client_state_files", {}))
    elif payload.get("client_state_files"):
        raise ValueError(f"{path}: not a fedmeta checkpoint (it names client state files, but its config keeps "
                         "client states in memory)")
    return Checkpoint(config, state, payload["rounds_done"], payload.get("metrics_offset"),
                      payload.get("torch_rng_state"), states)


def _mismatch(found: Any, expected: Any, where: str) -> str | None:
    """Where ``found`` differs in structure from ``expected`` (keys, lengths, tensor shapes and dtypes, types)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(found, torch.Tensor):
            return f"{where} is {type(found).__name__}, expected a tensor"
        if found.shape != expected.shape or found.dtype != expected.dtype:
            return (f"{where} is a {found.dtype} tensor of shape {tuple(found.shape)}, expected "
                    f"{expected.dtype} of shape {tuple(expected.shape)}")
        return None
    if isinstance(expected, dict):
        if not isinstance(found, dict) or found.keys() != expected.keys():
            keys = sorted(map(str, found)) if isinstance(found, dict) else type(found).__name__
            return f"{where} holds {keys}, expected {sorted(map(str, expected))}"
        return next((m for k in expected if (m := _mismatch(found[k], expected[k], f"{where}[{k!r}]"))), None)
    if isinstance(expected, (tuple, list)):
        if not isinstance(found, (tuple, list)) or len(found) != len(expected):
            return f"{where} is {found!r:.60}, expected {len(expected)} items"
        return next((m for i, (f, e) in enumerate(zip(found, expected))
                     if (m := _mismatch(f, e, f"{where}[{i}]"))), None)
    if type(found) is not type(expected):
        return f"{where} is {found!r:.60}, expected a {type(expected).__name__}"
    return None


def check_against(path: str | Path, checkpoint: Checkpoint, schedule: Schedule, initial_weights: Params) -> None:
    """Raises ValueError unless the checkpoint is what its config's model and algorithm would have saved.

    Weights must have the model's names, shapes and dtypes and be finite; the server
    state must have the structure of the state of the stage its last round ran in.
    """
    rounds_done = checkpoint.rounds_done
    stage, _ = schedule.at(rounds_done - 1)
    expected = init_state(schedule, initial_weights, rounds_done - 1)
    state = checkpoint.state
    problem = (
        _mismatch(state.weights, expected.weights, "weights")
        or (f"server_state stage = {state.stage}, but round {rounds_done - 1} runs stage {stage}"
            if state.stage != stage else None)
        or _mismatch(state.aggregator, expected.aggregator, "server_state aggregator")
        or _mismatch(state.server, expected.server, "server_state server")
    )
    update = schedule.at(rounds_done - 1)[1].client_update
    if not problem and checkpoint.client_states and not is_stateful(update):
        problem = f"it holds client states, but {schedule.name} keeps none"
    if not problem and checkpoint.client_states:
        expected_state = update.init_client_state(initial_weights)
        try:  # a DiskStates reads each state from its file here
            problem = next((m for client_id, client_state in checkpoint.client_states.items()
                            if (m := _mismatch(client_state, expected_state, f"client_states[{client_id!r}]"))),
                           None)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: names a client state file it cannot use: {error}") from None
    if problem:
        raise ValueError(f"{path}: does not fit its config ({problem})")
    for name, weight in state.weights.items():
        bad = int((~torch.isfinite(weight)).sum()) if weight.is_floating_point() else 0
        if bad:
            raise ValueError(f"{path}: weight {name!r} has {bad} non-finite values of {weight.numel()}; "
                             "a model with NaN or inf weights cannot be evaluated or trained")
    if checkpoint.torch_rng_state is not None:
        try:  # the generator accepts only some states; try it on a copy so the global one is untouched
            torch.Generator().set_state(checkpoint.torch_rng_state)
        except RuntimeError as error:
            raise ValueError(f"{path}: torch_rng_state is not a valid generator state "
                             f"({str(error).splitlines()[0]})") from None


def load_checkpoint(path: str | Path) -> tuple[ExperimentConfig, Params, int]:
    """Reads a checkpoint into (config, weights, rounds done), what evaluation needs."""
    checkpoint = read_checkpoint(path)
    return checkpoint.config, checkpoint.state.weights, checkpoint.rounds_done
