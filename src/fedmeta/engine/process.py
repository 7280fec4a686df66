"""The parallel engine: worker processes, one per core, each with single-threaded torch.

Small clients leave a multi-threaded kernel little to split, so a core per client is
faster than all cores on one client. What crosses process boundaries is kept minimal:

- Client data is handed to the workers once, when they start (inherited on fork, so
  never copied; pickled once per worker with spawn). A task names its client by id.
- Weights go through one shared-memory buffer that the parent fills once per ``map``.
- A training update's delta comes back through a shared-memory slot of its worker (two
  per worker, used in turn, so the parent copies one out while the worker fills the
  other); only metrics travel through the pipe, and any entry of the delta that is not
  a weight of the model (SCAFFOLD's control delta), as arrays.
- A client's state (stateful work) goes to its worker through a shared-memory slot of
  the worker, and its new state comes back through another (two per worker, used in turn,
  as for deltas); the parent holds the states (``ParallelEngine``). Only entries that are
  not shaped as a weight of the model go through the pipe, as numpy arrays. Through the
  pipe (pickled, read 64 kB at a time), Ditto's personal model of FEMNIST's CNN, 6.8 MB,
  took 15-35 ms per client and round on 2 shared cores; through the slots, 3-11
  (``benchmarks/README.md``, "Clients with state").

While workers run, the parent itself stays on one thread: its work is small copies,
and an idle multi-threaded pool spins after each copy, stealing the cores the workers
need (measured: 17% of a core without this, 2.5% with it; ``benchmarks/README.md``).

Scheduling (longest client first, results in client order) and the replacement of a
worker that dies (killed, out of memory, a crash in native code) are ``ParallelEngine``'s;
a replacement starts the same way, with the same clients.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import math
import multiprocessing
import os
import signal
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from fedmeta.client_work import ClientState, ClientUpdate, ClientWork, run_stateful
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import ClientsOnDevice, Execution
from fedmeta.engine.parallel import (
    Finished, ParallelEngine, StateArrays, picklable, state_tensors, to_array, to_tensor,
)
from fedmeta.params import Params, get_weights

SLOTS_PER_WORKER = 2
PARENT_CHECK_SECONDS = 1.0


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


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor in shared memory whose pages are taken only once written (``share_memory_`` writes them all).

    So the state slots cost no memory in a run without client state.
    """
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _pack_state(state: ClientState, slots: Params, at: tuple[int, ...]) -> StateArrays:
    """The state as its message carries it: an entry shaped as a weight is copied into ``slots[name][at]``
    and sent as None, any other as an array."""
    packed: StateArrays = {}
    with torch.no_grad():
        for name, tensor in state.items():
            slot = slots[name][at] if name in slots else None
            if slot is not None and slot.shape == tensor.shape and slot.dtype == tensor.dtype:
                slot.copy_(tensor)
                packed[name] = None
            else:
                packed[name] = to_array(tensor)
    return packed


def _unpack_state(packed: StateArrays, slots: Params, at: tuple[int, ...]) -> StateArrays:
    """``_pack_state``'s state again, its entries sent as None being views of ``slots[name][at]``."""
    return {name: slots[name][at] if array is None else array for name, array in packed.items()}


def _worker_loop(index: int, conn: Connection, parent_pid: int, model: nn.Module,
                 clients: Mapping[str, ClientData], weights: Params, slots: Params, states_in: Params,
                 states_out: Params, execution: Execution) -> None:
    """Runs tasks until told to stop: (position, client id, client or None, seed, slot, packed state or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    torch.set_num_threads(1)
    if any(t.is_shared() for t in model.state_dict().values()):
        # spawn pickles the model through shared memory: every worker would train the same tensors
        model = copy.deepcopy(model)
    model = execution.prepare(model)
    on_device = ClientsOnDevice(execution.device)
    work: ClientWork | None = None
    stateful = False
    task_weights = weights
    while True:
        message = _next_message(conn, parent_pid)
        if message is None:
            return
        kind, payload = message
        if kind == "work":  # sent once the map's weights are in the shared buffer
            work, stateful = payload
            task_weights = execution.to_device(weights)  # moved once per map, not per client
            continue
        position, client_id, client, seed, slot, state = payload
        try:
            data = on_device(client if client is not None else clients[client_id])
            state = None if state is None else execution.to_device(
                state_tensors(_unpack_state(state, states_in, (index,))))
            with execution.context():
                if stateful:
                    result, new_state = execution.output(run_stateful(work, model, task_weights, data, state, seed))
                else:
                    result, new_state = execution.output(work(model, task_weights, data, seed)), None
            if isinstance(result, ClientUpdate):
                rest = {}  # what the slots do not hold (SCAFFOLD's control delta) goes through the pipe
                with torch.no_grad():
                    for name, delta in result.delta.items():
                        if name in slots:
                            slots[name][index, slot].copy_(delta)
                        else:
                            rest[name] = to_array(delta)
                result = result._replace(delta=rest)
            packed = None if new_state is None else _pack_state(new_state, states_out, (index, slot))
            conn.send(("ok", position, result, packed))
        except Exception as error:  # sent to the parent, which raises it with the client named
            conn.send(("error", position, picklable(error), traceback.format_exc()))


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
        start_method: ``"fork"`` (default where available and client work runs on the
            CPU: workers share the data without copying and start at once) or ``"spawn"``
            (the default for a GPU, which a forked process cannot use).
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
            forkable = "fork" in multiprocessing.get_all_start_methods() and execution.on_cpu
            start_method = "fork" if forkable else "spawn"
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
        # a worker reads a client's state during its task only, so one slot in suffices; out, two in turn
        self._states_in = {k: _shared_empty((workers, *v.shape), v.dtype) for k, v in template.items()}
        self._states_out = {k: _shared_empty((workers, SLOTS_PER_WORKER, *v.shape), v.dtype)
                            for k, v in template.items()}
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.Process] = []
        self._work: tuple[ClientWork, bool] | None = None
        self._states = {}
        self._running: dict[int, tuple[int, int]] = {}  # worker -> (position, slot)
        self._turn = [0] * workers  # each worker's next slot
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
            args=(index, child_end, os.getpid(), self._model, self._clients, self._weights, self._slots,
                  self._states_in, self._states_out, self._execution.for_worker(index)),
        )
        process.start()
        child_end.close()
        return parent_end, process

    def _begin(self, work: ClientWork, weights: Params, stateful: bool) -> None:
        for worker, process in enumerate(self._processes):
            if not process.is_alive():  # died between maps, running nothing of ours
                self._reap(worker)
                self._replace(worker)
        if stateful:
            # the states the last map replaced: glibc would keep most of their pages, and the
            # parent would hold about twice the states' bytes (Ditto on FEMNIST, benchmarks/README.md)
            _return_freed_memory()
        with torch.no_grad():
            for name, shared in self._weights.items():
                shared.copy_(weights[name])
        self._work = (work, stateful)
        for worker in range(self.workers):
            self._send(worker, ("work", self._work))

    def _send(self, worker: int, message: tuple) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # a worker that just died shows as end-of-file in _wait, which reschedules its task
            self._conns[worker].send(message)

    def _dispatch(self, worker: int, position: int, client: ClientData, seed: int,
                  state: StateArrays | None) -> None:
        held = self._clients.get(client.client_id) is client
        if state is not None:
            state = _pack_state(state_tensors(state), self._states_in, (worker,))
        slot = self._turn[worker]
        self._turn[worker] = (slot + 1) % SLOTS_PER_WORKER
        self._send(worker, ("task", (position, client.client_id, None if held else client, seed, slot, state)))
        self._running[worker] = (position, slot)

    def _wait(self) -> list[Finished]:
        finished = []
        for conn in wait([self._conns[w] for w in self._running]):
            worker = self._conns.index(conn)
            position, slot = self._running.pop(worker)
            try:
                status, _, *payload = conn.recv()
            except (EOFError, ConnectionResetError):
                status, payload = "died", [f"exit code {self._reap(worker)}"]
            if status == "ok" and payload[1] is not None:
                payload[1] = _unpack_state(payload[1], self._states_out, (worker, slot))
            finished.append(Finished(worker, position, (status, *payload), slot))
        return finished

    def _reap(self, worker: int) -> int | None:
        """Makes sure a dead worker's process is gone; returns its exit code."""
        dead = self._processes[worker]
        dead.join(timeout=5)
        if dead.is_alive():  # its pipe broke but it lingers: it holds nothing we need
            dead.kill()
            dead.join()
        return dead.exitcode

    def _replace(self, worker: int) -> None:
        self._conns[worker].close()
        with _forking(self._start_method):
            # in place: the finalizer holds these lists
            self._conns[worker], self._processes[worker] = self._start_worker(worker)
        if self._work is not None:
            self._send(worker, ("work", self._work))

    def _unpack(self, done: Finished, result: Any) -> Any:
        if isinstance(result, ClientUpdate):
            delta = {k: s[done.worker, done.token].clone() for k, s in self._slots.items()}
            return result._replace(delta=delta | {k: to_tensor(v, copy=True) for k, v in result.delta.items()})
        return result
