"""fedmeta: federated learning personalization, after Jiang, Konečný, Rush and Kannan (2019),
"Improving Federated Learning Personalization via Model Agnostic Meta Learning"."""

__version__ = "0.1.0"
__all__ = ["Experiment", "__version__"]


def __getattr__(name: str):
    """``fedmeta.Experiment``, imported on first use: ``import fedmeta`` alone loads no torch."""
    if name == "Experiment":
        from fedmeta.experiment.experiment import Experiment

        return Experiment
    raise AttributeError(f"module 'fedmeta' has no attribute {name!r}")
