"""The parallel engine: worker processes, one per core, each with single-threaded torch.

Small clients leave a multi-threaded kernel little to split, so a core per client is
faster than all cores on one client. What crosses process boundaries is kept minimal:

- Client data is handed to the workers once, when they start (inherited on fork, so
  never copied; pickled once per worker with spawn). A task names its client by id.
- Weights go through one shared-memory buffer that the parent fills once per ``map``.
- A training update's delta comes back through a shared-memory slot of its worker (two
  per worker, used in turn, so the parent copies one out while the worker fills the
  other); only metrics travel through the pipe.

While workers run, the parent itself stays on one thread: its work is small copies,
and an idle multi-threaded pool spins after each copy, stealing the cores the workers
need (measured: 17% of a core without this, 2.5% with it; ``benchmarks/README.md``).

Tasks go out longest client first, each to the next free worker, so one big client
does not leave a core idle at the end of a round. Every result lands at its client's
position, so results (and whatever is aggregated from them, in order) do not depend on
the number of workers.

A worker that dies (killed, out of memory, a crash in native code) is replaced by a new
one, started the same way with the same clients, and its client runs again there. A
client's work depends only on (weights, client, seed), so the result is the one it would
have been. A client whose worker dies under it ``client_retries + 1`` times in one ``map``
is given up on: ``WorkerError`` (or, when collecting errors, a ``ClientFailure``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import signal
import traceback
import warnings
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import Execution
from fedmeta.engine.local import ClientFailure, ClientWork, Result, check_on_error
from fedmeta.params import Params, get_weights

SLOTS_PER_WORKER = 2
PARENT_CHECK_SECONDS = 1.0


class WorkerError(RuntimeError):
    """A client's worker process died (killed, out of memory) every time it ran the client."""


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _next_message(conn: Connection, parent_pid: int) -> Any:
    """The parent's next message; None (stop) once the parent is gone.

    The pipe alone does not tell: workers forked later inherit copies of the parent's
    end, so it stays open after the parent dies (killed, say), and workers would wait
    on it forever, holding their memory.
    """
    while not conn.poll(PARENT_CHECK_SECONDS):
        if os.getppid() != parent_pid:
            return None
    return conn.recv()


def _worker_loop(index: int, conn: Connection, parent_pid: int, model: nn.Module,
                 clients: Mapping[str, ClientData], weights: Params, slots: Params, execution: Execution) -> None:
    """Runs tasks until told to stop: (position, client id, client or None, seed, slot)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    torch.set_num_threads(1)
    if any(t.is_shared() for t in model.state_dict().values()):
        # spawn pickles the model through shared memory: every worker would train the same tensors
        model = copy.deepcopy(model)
    model = execution.prepare(model)
    work: ClientWork | None = None
    while True:
        message = _next_message(conn, parent_pid)
        if message is None:
            return
        kind, payload = message
        if kind == "work":
            work = payload
            continue
        position, client_id, client, seed, slot = payload
        try:
            with execution.context():
                result = work(model, weights, client if client is not None else clients[client_id], seed)
            if isinstance(result, ClientUpdate):
                with torch.no_grad():
                    for name, delta in result.delta.items():
                        slots[name][index, slot].copy_(delta)
                result = result._replace(delta=None)
            conn.send(("ok", position, result))
        except Exception as error:  # sent to the parent, which raises it with the client named
            conn.send(("error", position, _picklable(error), traceback.format_exc()))


def _picklable(error: Exception) -> Exception:
    try:
        multiprocessing.reduction.ForkingPickler.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _return_freed_memory() -> None:
    """Hands freed heap pages back to the OS, where glibc would keep them.

    Loading data frees as much as it keeps (per-client arrays packed into blocks); a
    forked worker would inherit those pages and count them in its memory.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@contextlib.contextmanager
def _forking(start_method: str) -> Iterator[None]:
    """Where workers start: with fork, nothing the children inherit is touched afterwards."""
    if start_method == "fork":
        _return_freed_memory()
    gc.freeze()  # the collector would otherwise write to every inherited object, copying its page
    try:
        yield
    finally:
        gc.unfreeze()


def _shutdown(processes: list[multiprocessing.Process], conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
            process.join()
    for conn in conns:
        conn.close()


class ParallelEngine:
    """What every engine with workers shares: ``map``'s checks and front, and closing.

    A subclass runs a checked, non-empty map in ``_run`` and closes through ``_finalizer``.
    """

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
        with _single_threaded():
            return self._run(work, weights, clients, seeds, on_error)

    def close(self) -> None:
        """Stops the workers; the engine cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> ParallelEngine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class ProcessEngine(ParallelEngine):
    """Maps client work over worker processes; see the module docstring for how.

    Args:
        model: the model every worker trains (each worker has its own copy, made once).
        clients: the clients the workers hold; ``map`` may also be given other clients,
            which are then sent with their task.
        workers: number of worker processes; default one per core.
        execution: memory layout and precision of client work.
        client_retries: how many times one ``map`` runs a client again on a replacement
            worker after its worker died under it.
        start_method: ``"fork"`` (default where available: workers share the data
            without copying and start at once) or ``"spawn"``.
    """

    def __init__(self, model: nn.Module, clients: Mapping[str, ClientData], *, workers: int | None = None,
                 execution: Execution = Execution(), client_retries: int = 2,
                 start_method: str | None = None) -> None:
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"a process engine needs at least 1 worker, got {workers}")
        if client_retries < 0:
            raise ValueError(f"client_retries must be >= 0, got {client_retries}")
        if start_method is None:
            start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.workers = workers
        self.client_retries = client_retries
        self._start_method = start_method
        self._context = multiprocessing.get_context(start_method)
        self._model = model
        self._execution = execution
        self._clients = clients
        template = get_weights(model)
        self._weights = {k: torch.empty_like(v, memory_format=torch.contiguous_format).share_memory_()
                         for k, v in template.items()}
        self._slots = {k: torch.empty((workers, SLOTS_PER_WORKER, *v.shape), dtype=v.dtype).share_memory_()
                       for k, v in template.items()}
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.Process] = []
        with _forking(start_method):
            for index in range(workers):
                conn, process = self._start_worker(index)
                self._conns.append(conn)
                self._processes.append(process)
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)

    def _start_worker(self, index: int) -> tuple[Connection, multiprocessing.Process]:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_worker_loop, name=f"fedmeta-worker-{index}", daemon=True,
            args=(index, child_end, os.getpid(), self._model, self._clients, self._weights, self._slots, self._execution),
        )
        process.start()
        child_end.close()
        return parent_end, process

    def _replace(self, worker: int) -> int | None:
        """Starts a new worker in a dead one's place; returns the dead one's exit code."""
        dead = self._processes[worker]
        dead.join(timeout=5)
        if dead.is_alive():  # its pipe broke but it lingers: it holds nothing we need
            dead.kill()
            dead.join()
        self._conns[worker].close()
        with _forking(self._start_method):
            # in place: the finalizer holds these lists
            self._conns[worker], self._processes[worker] = self._start_worker(worker)
        return dead.exitcode

    def _run(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
             seeds: Sequence[int], on_error: str) -> list[Result | ClientFailure]:
        for worker, process in enumerate(self._processes):
            if not process.is_alive():  # died between maps, running nothing of ours
                self._replace(worker)
        with torch.no_grad():
            for name, shared in self._weights.items():
                shared.copy_(weights[name])

        def send(worker: int, message: tuple) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # a worker that just died shows as end-of-file below, which reschedules its task
                self._conns[worker].send(message)

        for worker in range(self.workers):
            send(worker, ("work", work))
        pending = deque(sorted(range(len(clients)), key=lambda i: -clients[i].num_train))
        results: list[Any] = [None] * len(clients)
        running: dict[int, tuple[int, int]] = {}  # worker -> (position, slot)
        turn = [0] * self.workers
        deaths = [0] * len(clients)
        failure: tuple[int, Exception, str] | None = None

        def dispatch(worker: int) -> None:
            position = pending.popleft()
            client = clients[position]
            held = self._clients.get(client.client_id) is client
            slot = turn[worker]
            turn[worker] = (slot + 1) % SLOTS_PER_WORKER
            task = (position, client.client_id, None if held else client, seeds[position], slot)
            send(worker, ("task", task))
            running[worker] = (position, slot)

        for worker in range(min(self.workers, len(clients))):
            dispatch(worker)
        while running:
            for conn in wait([self._conns[w] for w in running]):
                worker = self._conns.index(conn)
                position, slot = running.pop(worker)
                try:
                    status, _, *payload = conn.recv()
                except (EOFError, ConnectionResetError):
                    client_id = clients[position].client_id
                    exit_code = self._replace(worker)
                    send(worker, ("work", work))
                    deaths[position] += 1
                    if deaths[position] <= self.client_retries:
                        warnings.warn(f"worker {worker} died (exit code {exit_code}) while running client "
                                      f"{client_id!r}; replaced it and running the client again", RuntimeWarning)
                        pending.appendleft(position)
                        status = "died"
                    else:
                        status, payload = "error", [WorkerError(
                            f"worker {worker} died (exit code {exit_code}) while running client {client_id!r}, "
                            f"{deaths[position]} times: giving up on the client"), ""]
                if pending and failure is None:
                    dispatch(worker)  # before copying the result out, so the worker keeps busy
                if status == "died":
                    continue
                if status == "error":
                    if on_error == "collect":
                        results[position] = ClientFailure(clients[position].client_id, *payload)
                    else:
                        failure = failure or (position, *payload)
                    continue
                result = payload[0]
                if isinstance(result, ClientUpdate):
                    result = result._replace(delta={k: s[worker, slot].clone() for k, s in self._slots.items()})
                results[position] = result
        if failure is not None:
            position, error, remote_traceback = failure
            if remote_traceback and hasattr(error, "add_note"):
                error.add_note(f"in a worker, running client {clients[position].client_id!r}:\n{remote_traceback}")
            raise error
        return results

