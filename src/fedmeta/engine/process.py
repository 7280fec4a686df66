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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import signal
import traceback
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import Execution
from fedmeta.engine.local import ClientWork, Result
from fedmeta.params import Params, get_weights

SLOTS_PER_WORKER = 2


class WorkerError(RuntimeError):
    """A worker process died (was killed, ran out of memory) while running a client."""


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_loop(index: int, conn: Connection, model: nn.Module, clients: Mapping[str, ClientData],
                 weights: Params, slots: Params, execution: Execution) -> None:
    """Runs tasks until told to stop: (position, client id, client or None, seed, slot)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    torch.set_num_threads(1)
    model = execution.prepare(model)
    work: ClientWork | None = None
    while True:
        message = conn.recv()
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


class ProcessEngine:
    """Maps client work over worker processes; see the module docstring for how.

    Args:
        model: the model every worker trains (each worker has its own copy, made once).
        clients: the clients the workers hold; ``map`` may also be given other clients,
            which are then sent with their task.
        workers: number of worker processes; default one per core.
        execution: memory layout and precision of client work.
        start_method: ``"fork"`` (default where available: workers share the data
            without copying and start at once) or ``"spawn"``.
    """

    def __init__(self, model: nn.Module, clients: Mapping[str, ClientData], *, workers: int | None = None,
                 execution: Execution = Execution(), start_method: str | None = None) -> None:
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"a process engine needs at least 1 worker, got {workers}")
        if start_method is None:
            start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(start_method)
        self.workers = workers
        self._clients = clients
        template = get_weights(model)
        self._weights = {k: torch.empty_like(v, memory_format=torch.contiguous_format).share_memory_()
                         for k, v in template.items()}
        self._slots = {k: torch.empty((workers, SLOTS_PER_WORKER, *v.shape), dtype=v.dtype).share_memory_()
                       for k, v in template.items()}
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.Process] = []
        if start_method == "fork":
            _return_freed_memory()
        gc.freeze()  # the collector would otherwise write to every inherited object, copying its page
        for index in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_loop, name=f"fedmeta-worker-{index}", daemon=True,
                args=(index, child_end, model, clients, self._weights, self._slots, execution),
            )
            process.start()
            child_end.close()
            self._conns.append(parent_end)
            self._processes.append(process)
        gc.unfreeze()
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int]) -> list[Result]:
        """Runs ``work`` on every client; results are in the order of ``clients``."""
        if len(clients) != len(seeds):
            raise ValueError(f"got {len(clients)} clients but {len(seeds)} seeds")
        if not self._finalizer.alive:
            raise RuntimeError("this engine is closed")
        if not clients:
            return []
        with _single_threaded():
            return self._run(work, weights, clients, seeds)

    def _run(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
             seeds: Sequence[int]) -> list[Result]:
        with torch.no_grad():
            for name, shared in self._weights.items():
                shared.copy_(weights[name])
        for conn in self._conns:
            conn.send(("work", work))
        pending = deque(sorted(range(len(clients)), key=lambda i: -clients[i].num_train))
        results: list[Any] = [None] * len(clients)
        running: dict[int, tuple[int, int]] = {}  # worker -> (position, slot)
        turn = [0] * self.workers
        failure: tuple[int, Exception, str] | None = None

        def dispatch(worker: int) -> None:
            position = pending.popleft()
            client = clients[position]
            held = self._clients.get(client.client_id) is client
            slot = turn[worker]
            turn[worker] = (slot + 1) % SLOTS_PER_WORKER
            task = (position, client.client_id, None if held else client, seeds[position], slot)
            self._conns[worker].send(("task", task))
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
                    self._processes[worker].join(timeout=5)
                    self.close()
                    raise WorkerError(
                        f"worker {worker} died (exit code {self._processes[worker].exitcode}) while running "
                        f"client {clients[position].client_id!r}"
                    ) from None
                if pending and failure is None:
                    dispatch(worker)  # before copying the result out, so the worker keeps busy
                if status == "error":
                    failure = failure or (position, *payload)
                    continue
                result = payload[0]
                if isinstance(result, ClientUpdate):
                    result = result._replace(delta={k: s[worker, slot].clone() for k, s in self._slots.items()})
                results[position] = result
        if failure is not None:
            position, error, remote_traceback = failure
            if hasattr(error, "add_note"):
                error.add_note(f"in a worker, running client {clients[position].client_id!r}:\n{remote_traceback}")
            raise error
        return results

    def close(self) -> None:
        """Stops the workers; the engine cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

