"""The Ray engine: client work on Ray actors, one per CPU of a Ray cluster, each single-threaded.

It is the process engine spread over machines, and gives the same results bit for bit:

- Client data goes into Ray's object store once, when the engine starts: one object
  holding every client's tensors as numpy arrays, which actors on the same node map
  without a copy (a node fetches the object once, for all its actors). Each actor
  holds every client, so any actor can run any client; a task names its client by id,
  and a client the actors do not hold is sent with its task.
- A client's state (stateful work) is held by the driver and goes with its task, its new
  state with the result, as numpy arrays; so any actor can run any client.
- Per ``map``, the weights (and the work) go into the object store once; every task
  refers to them. What comes back is the update's delta, as arrays, and its metrics.
- There is one actor per CPU of the cluster (or ``workers``), each reserving one
  CPU and running torch on one thread; Ray spreads them over the nodes.
- Tasks go out longest client first, each to the next free actor, one task per actor
  at a time; every result lands at its client's position, so results (and whatever is
  aggregated from them, in order) depend neither on the number of actors nor on which
  node ran a client.

An actor that dies (its process killed, its node lost) is replaced by a new one, started
the same way with the same clients (from the object store) wherever the cluster has a CPU
free, and the client it was running runs again. An actor that died between maps is found,
and replaced, when its next task fails; that client then runs again too. A client's work
depends only on (weights, client, seed), so the result is the one it would have been. A
client whose actor dies under it ``client_retries + 1`` times in one ``map`` is given up
on: ``WorkerError`` (or, when collecting errors, a ``ClientFailure``).

Where the cluster is: ``address`` is what ``ray.init`` takes (``"auto"``, ``"HOST:PORT"``
of a head node this machine belongs to, ``"ray://HOST:10001"`` for Ray Client); without
one, a Ray instance already started in this process is used, or a local one is started
and stopped with the engine. Every node needs the same Python environment (fedmeta
installed), as Ray runs the work in the nodes' own interpreters.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import traceback
import weakref
from collections import Counter
from typing import Any, Mapping

import torch
from torch import nn

from fedmeta.client_work import ClientUpdate, ClientWork, run_stateful
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine.execution import ClientsOnDevice, Execution
from fedmeta.engine.parallel import (
    Finished, ParallelEngine, StateArrays, picklable, state_arrays, state_tensors, to_array, to_tensor,
)
from fedmeta.params import Params

INSTALL_HINT = 'pip install "fedmeta[ray]"'

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError
except ImportError as _error:  # pragma: no cover - exercised where ray is missing
    raise ImportError(f"the Ray engine needs Ray: {INSTALL_HINT}") from _error

ClientArrays = tuple[Any, Any, Any, Any]  # train x, train y, test x, test y
READY_TIMEOUT_S = 300


def client_arrays(client: ClientData) -> ClientArrays:
    """A client's tensors as arrays: a view into a packed block pickles only its own bytes."""
    return (to_array(client.train.x), to_array(client.train.y), to_array(client.test.x), to_array(client.test.y))


def _client(client_id: str, arrays: ClientArrays) -> ClientData:
    tx, ty, sx, sy = (to_tensor(a) for a in arrays)
    return ClientData(client_id, Examples(tx, ty), Examples(sx, sy))


class _Actor:
    """Holds the model and every client; runs one client at a time on one thread."""

    def __init__(self, shared: tuple[nn.Module, Mapping[str, ClientArrays]], execution: Execution) -> None:
        torch.set_num_threads(1)
        model, clients = shared
        self.model = execution.prepare(copy.deepcopy(model))
        self.execution = execution
        self.clients = {cid: _client(cid, arrays) for cid, arrays in clients.items()}
        self.on_device = ClientsOnDevice(execution.device)
        context = ray.get_runtime_context()
        self.where = (context.get_node_id(), ray.util.get_node_ip_address(), os.getpid())

    def ready(self) -> tuple[str, str, int]:
        """(node id, node IP, process id)."""
        return self.where

    def run(self, shared: tuple[ClientWork, Mapping[str, Any], bool], position: int, client_id: str,
            client: ClientArrays | None, seed: int, state: StateArrays | None) -> tuple:
        work, weights, stateful = shared
        node = self.where[0]
        try:
            data = self.on_device(self.clients[client_id] if client is None else _client(client_id, client))
            weights = self.execution.to_device({k: to_tensor(v) for k, v in weights.items()})
            state = self.execution.to_device(state_tensors(state))
            with self.execution.context():
                if stateful:
                    result, new_state = self.execution.output(run_stateful(work, self.model, weights, data, state,
                                                                           seed))
                else:
                    result, new_state = self.execution.output(work(self.model, weights, data, seed)), None
            if isinstance(result, ClientUpdate):
                result = result._replace(delta={k: to_array(v) for k, v in result.delta.items()})
            return "ok", position, node, result, state_arrays(new_state)
        except Exception as error:  # sent back, where it is raised with the client named
            return "error", position, node, picklable(error), traceback.format_exc()


def _shutdown(actors: list, refs: list, started_ray: bool) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone, or Ray already shut down
            pass
    actors.clear()
    refs.clear()
    if started_ray and ray.is_initialized():
        ray.shutdown()


def _connect(address: str | None) -> bool:
    """Connects to (or starts) Ray; returns whether this call started or joined it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a warning about GPUs
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if address is None and not os.environ.get("RAY_ADDRESS"):  # a new local instance (RAY_ADDRESS: Ray joins that)
        options["include_dashboard"] = False
    ray.init(address=address, **options)
    return True


class RayEngine(ParallelEngine):
    """Maps client work over Ray actors; see the module docstring for how.

    Args:
        model: the model every actor trains (each actor has its own copy, made once).
        clients: the clients the actors hold; ``map`` may also be given other clients,
            which are then sent with their task.
        workers: number of actors (one CPU each); default one per CPU of the cluster.
        address: the Ray cluster to join (what ``ray.init`` takes); default: the Ray
            instance this process already started, or a new local one.
        execution: memory layout and precision of client work.
        client_retries: how many times one ``map`` runs a client again after its actor
            died under it.
        announce: print one line to stderr saying where the actors run.
    """

    noun = "Ray actor"

    def __init__(self, model: nn.Module, clients: Mapping[str, ClientData], *, workers: int | None = None,
                 address: str | None = None, execution: Execution = Execution(), client_retries: int = 2,
                 announce: bool = False) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"a Ray engine needs at least 1 actor, got {workers}")
        if client_retries < 0:
            raise ValueError(f"client_retries must be >= 0, got {client_retries}")
        started_ray = _connect(address)
        self._actors: list = []
        self._refs: list = []
        self._tasks: dict[Any, tuple[int, int, str]] = {}  # running task -> (actor, position, client id)
        self._finalizer = weakref.finalize(self, _shutdown, self._actors, self._refs, started_ray)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            self._gpus_per_actor = 1 if execution.device.startswith("cuda") else 0
            if self._gpus_per_actor:  # one actor per GPU of the cluster, each on a core
                gpus = int(ray.cluster_resources().get("GPU", 0))
                workers = max(min(gpus, cpus), 1) if workers is None else workers
                if workers > gpus:
                    raise ValueError(f"{workers} Ray actors on engine.device = 'cuda' need {workers} GPUs, but the "
                                     f"Ray cluster has {gpus}: use fewer workers, or add GPU nodes")
            workers = max(cpus, 1) if workers is None else workers
            if workers > cpus:
                raise ValueError(f"{workers} Ray actors need {workers} CPUs, but the Ray cluster has {cpus}: "
                                 "use fewer workers, or add nodes")
            self.workers = workers
            self.client_retries = client_retries
            self._clients = clients
            self._states = {}
            data = ray.put((model, {cid: client_arrays(c) for cid, c in clients.items()}))
            self._refs.append(data)  # held as long as the engine: a replacement actor reads it again
            self._execution = execution
            for _ in range(workers):
                self._actors.append(self._start_actor())
            try:
                self.placement: list[tuple[str, str, int]] = ray.get([a.ready.remote() for a in self._actors],
                                                                     timeout=READY_TIMEOUT_S)
            except GetTimeoutError:
                free = int(ray.available_resources().get("CPU", 0))
                raise RuntimeError(f"{workers} Ray actors did not start within {READY_TIMEOUT_S} s; the Ray cluster "
                                   f"has {free} of its {cpus} CPUs free (others hold the rest)") from None
        except BaseException:
            self.close()
            raise
        self.clients_per_node: Counter[str] = Counter()
        if announce:
            print(f"fedmeta: ray engine: {self.describe()}", file=sys.stderr, flush=True)

    def _start_actor(self) -> Any:
        # an actor given a GPU sees only that one (Ray sets its CUDA_VISIBLE_DEVICES), as "cuda"
        return (ray.remote(_Actor).options(num_cpus=1, num_gpus=self._gpus_per_actor, max_restarts=0,
                                           scheduling_strategy="SPREAD")
                .remote(self._refs[0], self._execution))

    def _replace(self, actor: int) -> None:
        # in place: the finalizer holds the list
        with contextlib.suppress(Exception):
            ray.kill(self._actors[actor], no_restart=True)
        self._actors[actor] = self._start_actor()

    def describe(self) -> str:
        """Where the actors run: ``2 actors on 2 nodes: 127.0.0.1 (node 1a2b3c4d, 1 actor), ...``."""
        nodes = Counter((node, ip) for node, ip, _ in self.placement)
        by_address = sorted(nodes.items(), key=lambda item: item[0][::-1])
        parts = [f"{ip} (node {node[:8]}, {n} actor{'s' * (n > 1)})" for (node, ip), n in by_address]
        return (f"{len(self.placement)} actor{'s' * (len(self.placement) > 1)} on {len(nodes)} "
                f"node{'s' * (len(nodes) > 1)}: " + ", ".join(parts))

    def _begin(self, work: ClientWork, weights: Params, stateful: bool) -> None:
        self._shared = ray.put((work, {k: to_array(v) for k, v in weights.items()}, stateful))

    def _dispatch(self, worker: int, position: int, client: ClientData, seed: int,
                  state: StateArrays | None) -> None:
        held = self._clients.get(client.client_id) is client
        task = self._actors[worker].run.remote(self._shared, position, client.client_id,
                                               None if held else client_arrays(client), seed, state)
        self._tasks[task] = (worker, position, client.client_id)

    def _wait(self) -> list[Finished]:
        [task], _ = ray.wait(list(self._tasks), num_returns=1)
        actor, position, client_id = self._tasks.pop(task)
        try:
            status, _, node, *payload = ray.get(task)
        except RayActorError as error:  # its process or node died (now, or since the last map)
            return [Finished(actor, position, ("died", type(error).__name__), None)]
        except RayError as error:  # the task itself failed in Ray (its result could not be sent back)
            return [Finished(actor, position, ("error", RuntimeError(f"client {client_id!r}: {error}"), ""), None)]
        self.clients_per_node[node] += 1
        return [Finished(actor, position, (status, *payload), node)]

    def _unpack(self, done: Finished, result: Any) -> Any:
        if isinstance(result, ClientUpdate):
            return result._replace(delta={k: to_tensor(v, copy=True) for k, v in result.delta.items()})
        return result
