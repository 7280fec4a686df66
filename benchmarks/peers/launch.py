"""The command lines that run a peer system on a workload, for the benchmark driver.

Each peer lives in its own virtualenv under ``benchmarks/.venvs/`` (made by
``benchmarks/setup_peers.sh``) and prints one ``BENCH_RESULT`` line like fedmeta's own
systems. The driver runs the command with cwd and PYTHONPATH set to the repo root.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Workload

PEERS = ("pfl", "flower")


class Unsupported(Exception):
    """The peer cannot run this workload the way fedmeta does; the message says why."""


def command(system: str, workload: Workload, workers: int, data_dir: Path, repo_root: Path) -> list[str]:
    """The argv that runs ``system`` on ``workload`` with ``workers`` processes.

    pfl runs one torchrun process per worker (a plain process for one worker, pfl's
    single-process mode); Flower runs one process that starts ``workers`` Ray actors.
    """
    if system not in PEERS:
        raise ValueError(f"unknown peer system {system!r}: expected one of {PEERS}")
    if workload.kind not in ("train", "personalize"):
        raise Unsupported(f"{system}: no adapter for workload kind {workload.kind!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    venv = Path(repo_root) / "benchmarks" / ".venvs" / system
    if not (venv / "bin" / "python").exists():
        raise FileNotFoundError(f"{venv} is missing: run benchmarks/setup_peers.sh")
    args = ["--workload", workload.name, "--data-dir", str(data_dir), "--workers", str(workers)]
    module = f"benchmarks.peers.{system}_system"
    if system == "pfl" and workers > 1:
        return [str(venv / "bin" / "torchrun"), "--standalone", "--nproc-per-node", str(workers), "-m", module, *args]
    return [str(venv / "bin" / "python"), "-m", module, *args]
