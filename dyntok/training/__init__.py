"""Training: one loop for every method, with resumable safetensors checkpoints and torchrun/DDP."""
from .trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
