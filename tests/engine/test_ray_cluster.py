"""The Ray engine on a two-node Ray cluster on this machine, started with ``ray start`` as a person would.

The head node and the second node each get one CPU and their own loopback address
(127.0.0.2 and 127.0.0.3: Ray replaces 127.0.0.1 with the machine's outward address),
so two actors run on two nodes that talk over loopback only. Every process the cluster
starts stays in the process group of its ``ray start --block``; teardown ends those
groups, and then any process left that names this cluster's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fedmeta.engine import InProcessEngine, RayEngine  # noqa: E402
from fedmeta.experiment.checkpoint import load_checkpoint  # noqa: E402
from fedmeta.experiment.run import run_experiment  # noqa: E402

import engine_cases  # noqa: E402
from engine_cases import assert_same_bits, image_clients_by_id, new_model, train_rounds  # noqa: E402

RAY = Path(sys.executable).parent / "ray"
FEDMETA = Path(sys.executable).parent / "fedmeta"
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    return env


def start_node(log: Path, *args: str) -> subprocess.Popen:
    """``ray start --block ...`` in a process group of its own (which every process it starts joins)."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                                 f"--dashboard-agent-listen-port={free_port()}", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)


def stop(nodes: list[subprocess.Popen], marker: str) -> None:
    """Ends the nodes' process groups, then whatever process still names ``marker`` (ours alone)."""
    for node in nodes:
        with _quiet():
            os.killpg(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for node in nodes:
        try:
            node.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with _quiet():
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    for pid in pids_naming(marker):
        with _quiet():
            os.kill(pid, signal.SIGKILL)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        return kind is not None and issubclass(kind, ProcessLookupError)


def pids_naming(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each; yields the head's address."""
    temp_dir = tempfile.mkdtemp(prefix="fedmeta-ray-")  # short: Ray's socket paths live under it
    port = free_port()
    address = f"{HEAD_IP}:{port}"
    nodes = []
    try:
        nodes.append(start_node(Path(temp_dir) / "head.log", "--head", f"--port={port}",
                                f"--node-ip-address={HEAD_IP}", f"--temp-dir={temp_dir}",
                                "--include-dashboard=false", f"--dashboard-port={free_port()}",
                                f"--ray-client-server-port={free_port()}"))
        nodes.append(start_node(Path(temp_dir) / "node.log", f"--address={address}", f"--node-ip-address={NODE_IP}"))
        wait_for_nodes(address, 2, nodes, temp_dir)
        yield address
    finally:
        stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not pids_naming(temp_dir)


def wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen], temp_dir: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dead = [n for n in nodes if n.poll() is not None]
        assert not dead, (Path(temp_dir) / "head.log").read_text(errors="replace")[-3000:]
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError:
            time.sleep(1)
            continue
        try:
            while time.monotonic() < deadline:
                if sum(n["Alive"] for n in ray.nodes()) >= count:
                    return
                time.sleep(0.5)
        finally:
            ray.shutdown()
    raise TimeoutError(f"the Ray cluster at {address} did not have {count} nodes within 120 s")


@pytest.fixture(autouse=True)
def by_value():
    """This module's model and work travel to the actors by value (the nodes cannot import a test module)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(engine_cases)
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(engine_cases)


@pytest.mark.slow
def test_without_an_address_the_engine_starts_a_local_instance_and_stops_it():
    assert not ray.is_initialized()
    clients = image_clients_by_id()
    expected = train_rounds(InProcessEngine(new_model()), clients, rounds=1)

    with RayEngine(new_model(), clients, workers=1) as engine:
        assert ray.is_initialized()
        rounds = train_rounds(engine, clients, rounds=1)

    assert not ray.is_initialized()
    assert_same_bits(rounds[0], expected[0])


@pytest.mark.slow
@pytest.mark.bits
def test_actors_on_two_nodes_give_the_bits_of_the_in_process_engine(cluster):
    clients = image_clients_by_id()
    expected = train_rounds(InProcessEngine(new_model()), clients)

    with RayEngine(new_model(), clients, address=cluster) as engine:
        placement = engine.describe()
        rounds = train_rounds(engine, clients)
        ran_on = dict(engine.clients_per_node)

    assert placement.startswith(f"2 actors on 2 nodes: {HEAD_IP} (node ")
    assert f"{NODE_IP} (node " in placement
    assert len(ran_on) == 2 and sum(ran_on.values()) == 15  # both nodes ran clients, every client ran once
    assert_same_bits(rounds[0], expected[0])
    assert rounds[1] == expected[1]
    assert not ray.is_initialized()  # the engine joined the cluster, and left it


@pytest.mark.slow
@pytest.mark.bits
def test_fedmeta_run_on_the_cluster_has_the_bits_of_a_run_in_process(cluster, tmp_path, tiny_config, tiny_settings):
    in_process = run_experiment(tiny_config(tmp_path / "local"), progress=False)

    run = subprocess.run(
        [str(FEDMETA), "run", "--no-progress",
         *tiny_settings(tmp_path / "ray", "engine.kind=ray", "engine.workers=2", f"engine.address={cluster}")],
        capture_output=True, text=True, env=ray_env(), timeout=300)

    assert run.returncode == 0, run.stderr
    assert "fedmeta: ray engine: 2 actors on 2 nodes: " in run.stderr
    [run_dir] = (tmp_path / "ray").iterdir()
    _, weights, rounds_done = load_checkpoint(run_dir / "checkpoint.pt")
    assert rounds_done == 3
    assert_same_bits(weights, in_process.weights)
