"""The training engine and checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import NonFiniteError, RunResult, TrainConfig, TrainConfigError, Trainer, seed_everything, train

__all__ = ["CheckpointError", "NonFiniteError", "RunResult", "TrainConfig", "TrainConfigError", "Trainer",
           "load_checkpoint", "save_checkpoint", "seed_everything", "train"]
