"""Configs, the run loop, checkpoints and metrics: the layer the CLI calls."""

from fedmeta.experiment.config import (
    AlgorithmConfig, ConfigError, DataConfig, EvaluationConfig, ExperimentConfig, ModelConfig,
    config_from_dict, config_to_dict, config_to_toml, load_config,
)
from fedmeta.experiment.checkpoint import load_checkpoint
from fedmeta.experiment.run import RunResult, evaluate_checkpoint, run_experiment

__all__ = [
    "AlgorithmConfig", "ConfigError", "DataConfig", "EvaluationConfig", "ExperimentConfig", "ModelConfig",
    "RunResult", "config_from_dict", "config_to_dict", "config_to_toml", "evaluate_checkpoint",
    "load_checkpoint", "load_config", "run_experiment",
]
