"""The NanoGPT speedrun record trainer: `speedrun.config.TrainConfig` (every knob) and
`speedrun.train.train(cfg, report) -> TrainResult`. Importing it touches no GPU, Ray or MLflow."""

from .config import TrainConfig

__all__ = ["TrainConfig"]
