"""Engines run client work; nothing else in fedmeta knows how it is run.

``RayEngine`` is imported on first use, so that ``import fedmeta`` never imports Ray.
"""

from typing import Any

from fedmeta.engine.execution import Execution
from fedmeta.engine.local import ClientFailure, InProcessEngine
from fedmeta.engine.parallel import WorkerError
from fedmeta.engine.process import ProcessEngine, default_workers

__all__ = ["ClientFailure", "Execution", "InProcessEngine", "ProcessEngine", "RayEngine", "WorkerError",
           "default_workers"]


def __getattr__(name: str) -> Any:
    if name == "RayEngine":
        from fedmeta.engine.ray_engine import RayEngine

        return RayEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
