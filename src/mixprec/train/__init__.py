"""The one training loop every method uses, with checkpoints and callbacks."""
from .loop import TrainConfig, batches, evaluate_accuracy, fit
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "batches", "evaluate_accuracy", "fit", "load_checkpoint", "save_checkpoint"]
