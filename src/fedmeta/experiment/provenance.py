"""What a run ran with and when: versions, the source commit, the CPU and the vector units torch used, the time.

A run directory's ``provenance.json`` holds one such record for the process that started
the run and one for each that resumed it, since a resume may run another fedmeta, torch or
machine (see ``fedmeta.experiment.run_dir.add_provenance``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import fedmeta


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the millisecond (``2026-12-05T08:02:51.123+00:00``): readable, sorts as text,
    and ``datetime.fromisoformat`` reads it on every Python fedmeta supports."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _output(command: list[str], cwd: Path | None = None) -> str | None:
    """What ``command`` prints, stripped; None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> tuple[str | None, bool | None]:
    """The commit of the git checkout fedmeta is imported from, and whether its tracked files differ from it.

    (None, None) when fedmeta is installed from a wheel or git is missing. The package's
    own ``__init__.py`` must be tracked by that checkout: a site-packages inside some other
    repository (a virtual environment in a project) is not fedmeta's source.
    """
    package = Path(fedmeta.__file__).resolve().parent
    if _output(["git", "ls-files", "--error-unmatch", "__init__.py"], package) is None:
        return None, None
    commit = _output(["git", "rev-parse", "HEAD"], package)
    if commit is None:
        return None, None
    changes = _output(["git", "status", "--porcelain", "--untracked-files=no"], package)
    return commit, None if changes is None else bool(changes)


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo (Linux) or sysctl (macOS) gives it; else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        brand = _output(["sysctl", "-n", "machdep.cpu.brand_string"])
        if brand:
            return brand
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """This process: when it began the run's work, fedmeta, torch and Python versions, the source, the machine."""
    commit, modified = source_commit()
    return {
        "at": utc_now(),
        "fedmeta": fedmeta.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_modified": modified,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512, AVX2, ...: speed and bits vary with it
        "cpus": os.cpu_count(),
        "platform": operating_system(),
    }


def operating_system() -> str:
    """The system, architecture and C library ("Linux-x86_64-with-glibc2.36"): what decides which wheels run.

    Not the kernel's release, which says nothing about a run's numbers and names the host's build.
    """
    libc, version = platform.libc_ver()
    return "-".join([platform.system(), platform.machine(), *([f"with-{libc}{version}"] if libc else [])])
