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
"""

from __future__ import annotations

import multiprocessing.reduction
import warnings
import weakref
from collections import deque
from typing import Any, NamedTuple, Sequence

from fedmeta.client_work import ClientFailure, ClientWork, Result, check_on_error
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import single_threaded
from fedmeta.params import Params


class WorkerError(RuntimeError):
    """A client's worker (process or actor) died every time it ran the client."""


class Finished(NamedTuple):
    """A task's end, as a backend reports it.

    ``outcome`` is ``("ok", result)``, ``("error", exception, traceback)`` or
    ``("died", cause)``; ``token`` is whatever the backend's ``_dispatch`` returned.
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


class ParallelEngine:
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
            return self._run(work, weights, clients, seeds, on_error)

    def _run(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
             seeds: Sequence[int], on_error: str) -> list[Result | ClientFailure]:
        self._begin(work, weights)
        pending = deque(sorted(range(len(clients)), key=lambda i: -clients[i].num_train))
        results: list[Any] = [None] * len(clients)
        deaths = [0] * len(clients)
        failure: tuple[int, Exception, str] | None = None
        running = 0

        def dispatch(worker: int) -> None:
            nonlocal running
            position = pending.popleft()
            self._dispatch(worker, position, clients[position], seeds[position])
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
        if failure is not None:
            position, error, remote_traceback = failure
            if remote_traceback and hasattr(error, "add_note"):
                error.add_note(f"in a {self.noun}, running client {clients[position].client_id!r}:\n"
                               f"{remote_traceback}")
            raise error
        return results

    def _begin(self, work: ClientWork, weights: Params) -> None:
        """Makes ``work`` and ``weights`` available to every worker for the tasks that follow."""
        raise NotImplementedError

    def _dispatch(self, worker: int, position: int, client: ClientData, seed: int) -> None:
        """Starts the client's task on an idle worker."""
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
