"""What every engine with workers shares: ``map``'s checks, the scheduling loop, closing.

The loop hands tasks out longest client first, each to the next free worker, so one big
client does not leave a worker idle at the end of a round; every result lands at its
client's position, so results (and whatever is aggregated from them, in order) depend
neither on the number of workers nor on where a client ran. A worker that dies under a
client is replaced and the client runs again, up to ``client_retries`` times in one
``map``; a client's work depends only on (weights, client, seed), so the result is the
one it would have been.

A backend (worker processes, Ray actors) supplies five steps: ``_begin`` a map,
``_dispatch`` a task to a worker, ``_wait`` for tasks to end, ``_replace`` a dead worker
and ``_unpack`` a result.

For stateful work (``map_stateful``) the client states stay here, in the parent
(``fedmeta.engine.states``): a client's state travels with its task as arrays and its new
state comes back with the result, so any worker can run any client and the bits do not
depend on where it ran.
"""

from __future__ import annotations

import multiprocessing.reduction
import warnings
import weakref
from collections import deque
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from fedmeta.client_work import ClientFailure, ClientState, ClientWork, Result, StatefulWork, check_on_error
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import single_threaded
from fedmeta.engine.states import ClientStates
from fedmeta.params import Params

StateArrays = dict[str, Any]
"""A client state as numpy arrays: pickled as plain bytes, where a tensor would go through shared memory."""


class WorkerError(RuntimeError):
    """A client's worker (process or actor) died every time it ran the client."""


class Finished(NamedTuple):
    """A task's end, as a backend reports it.

    ``outcome`` is ``("ok", result, new state arrays or None)``, ``("error", exception,
    traceback)`` or ``("died", cause)``; ``token`` is whatever the backend's ``_dispatch`` returned.
    """

    worker: int
    position: int
    outcome: tuple
    token: Any


def picklable(error: Exception) -> Exception:
    """The error itself if it pickles, else a RuntimeError carrying its type and message."""
    try:
        multiprocessing.reduction.ForkingPickler.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def to_array(tensor: torch.Tensor) -> Any:
    """A numpy array of the tensor (pickled as bytes, mapped without a copy by Ray)."""
    tensor = tensor.detach()
    try:
        return tensor.contiguous().numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): pickled as a tensor of its own
        return tensor.clone()


def to_tensor(array: Any, *, copy: bool = False) -> torch.Tensor:
    """The tensor of ``to_array``'s array; without ``copy`` it shares the array's memory."""
    if isinstance(array, torch.Tensor):
        return array.clone() if copy else array
    if copy:
        return torch.from_numpy(np.array(array))
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # read-only object store memory: nothing in client work writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def state_arrays(state: ClientState | None) -> StateArrays | None:
    return None if state is None else {k: to_array(v) for k, v in state.items()}


def state_tensors(arrays: StateArrays | None, *, copy: bool = False) -> ClientState | None:
    return None if arrays is None else {k: to_tensor(v, copy=copy) for k, v in arrays.items()}


class ParallelEngine(ClientStates):
    """Maps client work over workers; a subclass is a backend (see the module docstring).

    A subclass sets ``workers``, ``client_retries`` and ``_finalizer`` (which closes it),
    and names its workers in ``noun`` ("worker", "Ray actor") for messages.
    """

    noun = "worker"
    workers: int
    client_retries: int
    _finalizer: weakref.finalize

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """Runs ``work`` on every client; results are in the order of ``clients``.

        With ``on_error="collect"`` a client whose work raises (or whose workers keep
        dying) gets a ``ClientFailure`` at its position and the others still run;
        ``"raise"`` raises the first such error once the running clients are done.
        """
        return self._checked(work, weights, clients, seeds, on_error, stateful=False)

    def map_stateful(self, work: StatefulWork, weights: Params, clients: Sequence[ClientData],
                     seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """``map`` for work with client state: each client starts from the state it was left in.

        A client never seen starts from ``work.init_client_state(weights)`` (made in the
        worker); a client whose work returned keeps its new state, one whose work raised
        (or whose workers kept dying) keeps the old.
        """
        return self._checked(work, weights, clients, seeds, on_error, stateful=True)

    def _checked(self, work: ClientWork | StatefulWork, weights: Params, clients: Sequence[ClientData],
                 seeds: Sequence[int], on_error: str, *, stateful: bool) -> list[Result | ClientFailure]:
        check_on_error(on_error)
        if len(clients) != len(seeds):
            raise ValueError(f"got {len(clients)} clients but {len(seeds)} seeds")
        if not self._finalizer.alive:
            raise RuntimeError("this engine is closed")
        if not clients:
            return []
        # the parent's own work is small copies: an idle multi-threaded pool would spin
        # after each one, on the cores the workers need
        with single_threaded():
            return self._run(work, weights, clients, seeds, on_error, stateful)

    def _run(self, work: ClientWork | StatefulWork, weights: Params, clients: Sequence[ClientData],
             seeds: Sequence[int], on_error: str, stateful: bool) -> list[Result | ClientFailure]:
        self._begin(work, weights, stateful)
        pending = deque(sorted(range(len(clients)), key=lambda i: -clients[i].num_train))
        results: list[Any] = [None] * len(clients)
        deaths = [0] * len(clients)
        failure: tuple[int, Exception, str] | None = None
        running = 0

        def dispatch(worker: int) -> None:
            nonlocal running
            position = pending.popleft()
            client = clients[position]
            state = state_arrays(self._states.get(client.client_id)) if stateful else None
            self._dispatch(worker, position, client, seeds[position], state)
            running += 1

        for worker in range(min(self.workers, len(clients))):
            dispatch(worker)
        while running:
            for done in self._wait():
                running -= 1
                position, client_id = done.position, clients[done.position].client_id
                status, *payload = done.outcome
                if status == "died":
                    self._replace(done.worker)
                    deaths[position] += 1
                    story = f"{self.noun} {done.worker} died ({payload[0]}) while running client {client_id!r}"
                    if deaths[position] <= self.client_retries:
                        warnings.warn(f"{story}; replaced it and running the client again", RuntimeWarning)
                        pending.appendleft(position)
                    else:
                        status, payload = "error", [WorkerError(
                            f"{story}, {deaths[position]} times: giving up on the client"), ""]
                if pending and failure is None:
                    dispatch(done.worker)  # before copying the result out, so the worker keeps busy
                if status == "died":
                    continue
                if status == "error":
                    if on_error == "collect":
                        results[position] = ClientFailure(client_id, *payload)
                    else:
                        failure = failure or (position, *payload)
                    continue
                results[position] = self._unpack(done, payload[0])
                if stateful:
                    self._states[client_id] = state_tensors(payload[1], copy=True)
        if failure is not None:
            position, error, remote_traceback = failure
            if remote_traceback and hasattr(error, "add_note"):
                error.add_note(f"in a {self.noun}, running client {clients[position].client_id!r}:\n"
                               f"{remote_traceback}")
            raise error
        return results

    def _begin(self, work: ClientWork | StatefulWork, weights: Params, stateful: bool) -> None:
        """Makes ``work`` and ``weights`` available to every worker for the tasks that follow.

        With ``stateful``, workers run the work with ``run_stateful`` and send the new
        state back as arrays (``state_arrays``) beside the result.
        """
        raise NotImplementedError

    def _dispatch(self, worker: int, position: int, client: ClientData, seed: int,
                  state: StateArrays | None) -> None:
        """Starts the client's task on an idle worker; ``state`` is the client's (None: never seen, or stateless)."""
        raise NotImplementedError

    def _wait(self) -> list[Finished]:
        """Blocks until at least one running task ends; returns the ended ones."""
        raise NotImplementedError

    def _replace(self, worker: int) -> None:
        """Starts a new worker in a dead one's place, ready for the current map's tasks."""
        raise NotImplementedError

    def _unpack(self, done: Finished, result: Any) -> Any:
        """The result as the caller gets it (an update's delta copied out of transport)."""
        return result

    def close(self) -> None:
        """Stops the workers; the engine cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> ParallelEngine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
