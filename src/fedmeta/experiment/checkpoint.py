"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is written atomically (a side file in the same directory, flushed and
fsynced, renamed over the old one, then the directory fsynced), so a crash at any moment
leaves the previous checkpoint or the new one on disk, never half a file. It is read
with ``torch.load(weights_only=True)``: tensors and plain data only, so loading a file
never runs code from it.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import torch

from fedmeta.algorithms.algorithm import ServerState
from fedmeta.experiment.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from fedmeta.params import Params

CHECKPOINT_FORMAT = "fedmeta.checkpoint/2"
# /1 (before resume) lacks metrics_offset and torch_rng_state: it can be evaluated, not resumed
READABLE_FORMATS = ("fedmeta.checkpoint/1", CHECKPOINT_FORMAT)
REQUIRED_KEYS = ("config", "rounds_done", "weights", "server_state")


@dataclass(frozen=True)
class Checkpoint:
    """A run after ``rounds_done`` rounds.

    ``metrics_offset`` is the size in bytes of ``metrics.jsonl`` when it held exactly the
    lines of those rounds. ``torch_rng_state`` is torch's global CPU generator; it is the
    only global random state there is, because every draw of data, cohorts and client work
    comes from ``client_seed(seed, round, name)`` and neither numpy's nor Python's global
    generator is ever used. Both are None in a format-1 checkpoint.
    """

    config: ExperimentConfig
    state: ServerState
    rounds_done: int
    metrics_offset: int | None = None
    torch_rng_state: torch.Tensor | None = None


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable; POSIX only (Windows cannot open directories)."""
    if os.name == "posix":
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` through a side file that is fsynced and renamed over it.

    Readers, and a run resumed after a crash, see the old file or the new one, whole.
    """
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` atomically."""
    state = checkpoint.state
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(checkpoint.config),
        "rounds_done": checkpoint.rounds_done,
        "weights": state.weights,
        "server_state": {"aggregator": state.aggregator, "server": state.server, "stage": state.stage},
        "metrics_offset": checkpoint.metrics_offset,
        "torch_rng_state": checkpoint.torch_rng_state,
    }
    replace_atomically(path, lambda file: torch.save(payload, file))


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


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a checkpoint (tensors and plain data only); anything else is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise _refusal(path, error) from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a fedmeta checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    weights, server = payload.get("weights"), payload.get("server_state")
    problem = (
        f"missing {', '.join(missing)}" if missing
        else "weights are not a dict of tensors"
        if not (isinstance(weights, dict) and all(isinstance(w, torch.Tensor) for w in weights.values()))
        else "server_state lacks aggregator, server or stage"
        if not (isinstance(server, dict) and {"aggregator", "server", "stage"} <= server.keys())
        else None
    )
    if problem:
        raise ValueError(f"{path}: not a fedmeta checkpoint ({problem})")
    try:
        config = config_from_dict(payload["config"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    state = ServerState(weights, server["aggregator"], server["server"], server["stage"])
    return Checkpoint(config, state, int(payload["rounds_done"]), payload.get("metrics_offset"),
                      payload.get("torch_rng_state"))


def load_checkpoint(path: str | Path) -> tuple[ExperimentConfig, Params, int]:
    """Reads a checkpoint into (config, weights, rounds done), what evaluation needs."""
    checkpoint = read_checkpoint(path)
    return checkpoint.config, checkpoint.state.weights, checkpoint.rounds_done
