"""Flower's executables as separate processes for the deployment tests: start, log, stop, wait for a port.

Each process runs in its own session, so stopping it (SIGTERM, then SIGKILL) also stops the
ServerApp and ClientApp processes it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CONNECTION = "fedmeta-test"
SUPERNODE = Path(__file__).with_name("flower_supernode.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Starts Flower's executables with their output in log files; ``stop`` ends every one."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.env = directory, env
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, executable: str, *args: str) -> subprocess.Popen:
        """Starts ``executable`` of Flower's; a SuperNode as ``flower_supernode`` (it polls more often)."""
        command = ([sys.executable, str(SUPERNODE)] if executable == "flower-supernode"
                   else [str(BIN / executable)])
        with open(self.directory / f"{name}.log", "wb") as log:
            process = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT,
                                       env=self.env, start_new_session=True)
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)[-3000:]}" for name, _ in self.started)

    def stop(self) -> None:
        for _, process in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before listening on port {port}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout:g} s")
