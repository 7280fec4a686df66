"""The in-process engine: clients one after another on one reused model."""

from __future__ import annotations

import traceback
from functools import partial
from typing import Any, Callable, Sequence

from torch import nn

from fedmeta.client_work import (
    ClientFailure, ClientWork, Result, StatefulWork, check_on_error, run_stateful,
)
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import ClientsOnDevice, Execution
from fedmeta.engine.states import ClientStates
from fedmeta.params import Params


class InProcessEngine(ClientStates):
    """Maps a pure function of (model, weights, client, seed) over clients, in order.

    The one model object is reused for every client; the work loads weights into it.
    Nothing runs in parallel, which makes this the engine to debug with.

    ``batched=True`` runs work that can (``CohortWork``: plain SGD client updates on a
    model without buffers or dropout) as one batched computation over every client of
    a map, on all of torch's threads; its results equal the per-client ones up to float
    rounding. Other work runs client by client as before.
    """

    def __init__(self, model: nn.Module, execution: Execution = Execution(), *, batched: bool = False) -> None:
        self.model = execution.prepare(model)
        self.execution = execution
        self.batched = batched
        self._on_device = ClientsOnDevice(execution.device)
        self._states = {}

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """Runs ``work`` on every client; results are in the order of ``clients``.

        With ``on_error="collect"`` a client whose work raises gets a ``ClientFailure``
        at its position and the others still run; ``"raise"`` lets the error through.
        """
        check_on_error(on_error)
        weights = self.execution.to_device(weights)
        if self.batched and hasattr(work, "map_cohort"):
            try:
                cohort = work.map_cohort(self.model, weights, [self._on_device(c) for c in clients], seeds)
            except Exception:
                if on_error == "raise":
                    raise
                cohort = None  # client by client, to find which clients fail
            if cohort is not None:
                return self.execution.output(cohort)
        with self.execution.context():
            return [self._attempt(partial(work, self.model, weights, self._on_device(client), seed),
                                  client.client_id, on_error)
                    for client, seed in zip(clients, seeds, strict=True)]

    def map_stateful(self, work: StatefulWork, weights: Params, clients: Sequence[ClientData],
                     seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """``map`` for work with client state: each client starts from the state it was left in.

        A client never seen starts from ``work.init_client_state(weights)``; a client
        whose work returned keeps its new state, one whose work raised keeps the old.
        States are read and kept outside the client's work, as the parallel engines do: a
        state file that cannot be read or written stops the map, whatever ``on_error``.
        """
        check_on_error(on_error)
        results: list[Result | ClientFailure] = []
        weights = self.execution.to_device(weights)
        with self.execution.context():
            for client, seed in zip(clients, seeds, strict=True):
                state = self.execution.to_device(self._states.get(client.client_id))
                outcome = self._attempt(partial(run_stateful, work, self.model, weights, self._on_device(client),
                                                state, seed), client.client_id, on_error)
                if not isinstance(outcome, ClientFailure):
                    outcome, self._states[client.client_id] = outcome
                results.append(outcome)
        return results

    def _attempt(self, run: Callable[[], Any], client_id: str, on_error: str) -> Any:
        """``run()`` brought to the CPU; with ``on_error="collect"``, a ``ClientFailure`` in place of what it raises."""
        try:
            return self.execution.output(run())
        except Exception as error:
            if on_error == "raise":
                raise
            return ClientFailure(client_id, error, traceback.format_exc())

    def close(self) -> None:
        """Releases nothing: here for the interface every engine shares."""

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
