"""The client states an engine keeps for stateful client work (``map_stateful``): in memory, or in files.

Every engine keeps them in the process that calls ``map_stateful`` and sends a client's
state with its task, so that any worker can run any client (the scheduling that makes
results independent of the number of workers) and a client rerun after its worker died
starts from the state it had. A state changes only when its client's work returns; a
client whose work raised keeps the state it had.

In memory (a dict, the default) the states of every client seen stay on the heap: Ditto's
personal copy of FEMNIST's CNN is 6.8 MB a client, 23 GB for TFF's 3,400 writers.
``DiskStates`` keeps each in a file instead, mapped into memory (``torch.load(mmap=True)``)
only while its client runs, so the process holds client ids and version numbers alone. A
file is never rewritten: a client's n-th state is a new file, ``<client>.<n>.pt``, so a
checkpoint names the files it needs rather than holding 23 GB, and those files stay as
they were however far the run goes on after it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import quote

import torch

from fedmeta.client_work import ClientState


class StateWriteError(OSError, ValueError):
    """A client state file could not be written (a full disk); a ValueError too, since the user can fix it."""


def state_file_name(client_id: str, version: int) -> str:
    """``<client id, %-quoted>.<version>.pt``: one name per client and version, safe for any id."""
    return f"{quote(client_id, safe='')}.{version}.pt"


def state_file_version(client_id: str, name: str) -> int | None:
    """The version ``name`` is the file of for ``client_id``; None if it is no state file of that client."""
    version = name.removesuffix(".pt").rpartition(".")[2]
    if not (version.isdigit() and version == str(int(version)) and int(version) >= 1):
        return None
    return int(version) if state_file_name(client_id, int(version)) == name else None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class DiskStates(Mapping[str, ClientState]):
    """Client states as files in ``directory``, one per client and version; see the module docstring.

    ``files`` are the states to start from, by client id (a checkpoint's, as ``files()``
    gave them). Reading a state maps its file; setting one writes a new file (a side file
    renamed into place, so a crash leaves whole files only) and leaves the old one for
    ``remove_unreferenced``.
    """

    def __init__(self, directory: str | Path, files: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self._versions: dict[str, int] = {}
        for client_id, name in (files or {}).items():
            version = state_file_version(client_id, name)
            if version is None:
                raise ValueError(f"{name!r} is not a state file name of client {client_id!r}")
            self._versions[client_id] = version
        self._unsynced: list[Path] = []

    def __getitem__(self, client_id: str) -> ClientState:
        """The client's state, its tensors mapped from its file (copy-on-write: writing one leaves the file alone)."""
        version = self._versions[client_id]
        path = self.directory / state_file_name(client_id, version)
        try:
            payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing: state {version} of client {client_id!r}") from None
        except Exception as error:  # torch raises several types for a file that is not a state
            raise ValueError(f"{path}: not state {version} of client {client_id!r}: the file is truncated or "
                             f"corrupted ({type(error).__name__})") from None
        found = (payload.get("client_id"), payload.get("version")) if isinstance(payload, dict) else None
        if found != (client_id, version):
            held = f"state {found[1]} of client {found[0]!r}" if found else f"a {type(payload).__name__}"
            raise ValueError(f"{path}: not state {version} of client {client_id!r}: it holds {held}")
        state = payload.get("state")
        if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
            raise ValueError(f"{path}: not state {version} of client {client_id!r}: its state is not a dict of tensors")
        return state

    def __setitem__(self, client_id: str, state: ClientState) -> None:
        """Writes the client's next state to a new file; the tensors are not kept."""
        version = self._versions.get(client_id, 0) + 1
        path = self.directory / state_file_name(client_id, version)
        partial = path.with_name(path.name + ".partial")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:  # a file object: torch's own writer reports a full disk as RuntimeError
                torch.save({"client_id": client_id, "version": version, "state": dict(state)}, file)
            os.replace(partial, path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise StateWriteError(f"{path}: cannot write the state of client {client_id!r} "
                                  f"({error.strerror or error})") from None
        self._versions[client_id] = version
        self._unsynced.append(path)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._versions

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._versions))

    def __len__(self) -> int:
        return len(self._versions)

    def files(self) -> dict[str, str]:
        """Each client's current file name, by client id in sorted order: what a checkpoint names.

        Every file written since the last call is fsynced first (with its directory), so a
        checkpoint written after this never names a file a power loss could take back.
        """
        for path in self._unsynced:
            _fsync(path)
        if self._unsynced:
            _fsync(self.directory)
            _fsync(self.directory.parent)  # the directory itself may be new
        self._unsynced.clear()
        return {client_id: state_file_name(client_id, self._versions[client_id]) for client_id in self}

    def remove_unreferenced(self) -> None:
        """Removes the state files (and side files) of no current state: those superseded, and those a run
        killed after its last checkpoint wrote. Call it once a checkpoint naming the current states is on disk."""
        current = {state_file_name(client_id, version) for client_id, version in self._versions.items()}
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.endswith((".pt", ".pt.partial")) and path.name not in current:
                    path.unlink(missing_ok=True)


class ClientStates:
    """An engine's store of client states, by client id; handed out for checkpoints, taken back on resume."""

    _states: dict[str, ClientState] | DiskStates

    def client_states(self) -> Mapping[str, ClientState]:
        """Every state held, by client id in sorted order.

        In memory, a dict whose tensors are the engine's (read, do not write); on disk, the
        ``DiskStates`` itself, which reads a state from its file when asked for it.
        """
        if isinstance(self._states, DiskStates):
            return self._states
        return {client_id: self._states[client_id] for client_id in sorted(self._states)}

    def restore_client_states(self, states: Mapping[str, ClientState]) -> None:
        """Replaces the states held with ``states``, as if the rounds that made them had run here.

        A ``DiskStates`` is kept as the store, and the engine's new states go to its files;
        any other mapping (a checkpoint's dict) is copied into memory.
        """
        if isinstance(states, DiskStates):
            self._states = states
        else:
            self._states = {client_id: dict(state) for client_id, state in states.items()}
