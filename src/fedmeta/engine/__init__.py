"""Engines run client work; nothing else in fedmeta knows how it is run."""

from fedmeta.engine.local import InProcessEngine

__all__ = ["InProcessEngine"]
