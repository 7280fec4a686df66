"""The client states an engine keeps for stateful client work (``map_stateful``).

Every engine keeps them in the process that calls ``map_stateful`` and sends a client's
state with its task, so that any worker can run any client (the scheduling that makes
results independent of the number of workers) and a client rerun after its worker died
starts from the state it had. A state changes only when its client's work returns; a
client whose work raised keeps the state it had.
"""

from __future__ import annotations

from typing import Mapping

from fedmeta.client_work import ClientState


class ClientStates:
    """An engine's store of client states, by client id; handed out for checkpoints, taken back on resume."""

    _states: dict[str, ClientState]

    def client_states(self) -> dict[str, ClientState]:
        """Every state held, by client id in sorted order (the tensors are the engine's: read, do not write)."""
        return {client_id: self._states[client_id] for client_id in sorted(self._states)}

    def restore_client_states(self, states: Mapping[str, ClientState]) -> None:
        """Replaces the states held with ``states`` (a checkpoint's), as if the rounds that made them had run here."""
        self._states = {client_id: dict(state) for client_id, state in states.items()}
