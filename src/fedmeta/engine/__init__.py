"""Engines run client work; nothing else in fedmeta knows how it is run."""

from fedmeta.engine.execution import Execution
from fedmeta.engine.local import ClientFailure, InProcessEngine
from fedmeta.engine.process import ProcessEngine, WorkerError, default_workers

__all__ = ["ClientFailure", "Execution", "InProcessEngine", "ProcessEngine", "WorkerError", "default_workers"]
