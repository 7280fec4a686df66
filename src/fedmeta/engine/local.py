"""The in-process engine: clients one after another on one reused model."""

from __future__ import annotations

import traceback
from typing import Any, Callable, Sequence

from torch import nn

from fedmeta.client_work import (
    ClientFailure, ClientWork, Result, StatefulWork, check_on_error, run_stateful,
)
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import Execution
from fedmeta.engine.states import ClientStates
from fedmeta.params import Params


class InProcessEngine(ClientStates):
    """Maps a pure function of (model, weights, client, seed) over clients, in order.

    The one model object is reused for every client; the work loads weights into it.
    Nothing runs in parallel, which makes this the engine to debug with.
    """

    def __init__(self, model: nn.Module, execution: Execution = Execution()) -> None:
        self.model = execution.prepare(model)
        self.execution = execution
        self._states = {}

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """Runs ``work`` on every client; results are in the order of ``clients``.

        With ``on_error="collect"`` a client whose work raises gets a ``ClientFailure``
        at its position and the others still run; ``"raise"`` lets the error through.
        """
        return self._each(lambda client, seed: work(self.model, weights, client, seed), clients, seeds, on_error)

    def map_stateful(self, work: StatefulWork, weights: Params, clients: Sequence[ClientData],
                     seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """``map`` for work with client state: each client starts from the state it was left in.

        A client never seen starts from ``work.init_client_state(weights)``; a client
        whose work returned keeps its new state, one whose work raised keeps the old.
        """
        def run(client: ClientData, seed: int) -> Any:
            result, self._states[client.client_id] = run_stateful(
                work, self.model, weights, client, self._states.get(client.client_id), seed)
            return result

        return self._each(run, clients, seeds, on_error)

    def _each(self, run: Callable[[ClientData, int], Any], clients: Sequence[ClientData], seeds: Sequence[int],
              on_error: str) -> list[Result | ClientFailure]:
        check_on_error(on_error)
        results: list[Result | ClientFailure] = []
        with self.execution.context():
            for client, seed in zip(clients, seeds, strict=True):
                try:
                    results.append(run(client, seed))
                except Exception as error:
                    if on_error == "raise":
                        raise
                    results.append(ClientFailure(client.client_id, error, traceback.format_exc()))
        return results

    def close(self) -> None:
        """Releases nothing: here for the interface every engine shares."""

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
