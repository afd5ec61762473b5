"""Training: the typed config, the strategies as data, the loop, checkpoints."""

from phi3v.train.config import ConfigError, TrainConfig, load_config
from phi3v.train.loop import TrainingError, train
from phi3v.train.strategy import STRATEGIES, apply_strategy

__all__ = ["STRATEGIES", "ConfigError", "TrainConfig", "TrainingError", "apply_strategy", "load_config", "train"]
