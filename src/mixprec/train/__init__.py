"""The one training loop every method uses, with checkpoints, rollback and data parallelism."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import World, resolve_device, world
from .loop import Callback, Trainer, TrainConfig, TrainingDiverged, batches, evaluate_accuracy, fit

__all__ = ["Callback", "CheckpointError", "Trainer", "TrainConfig", "TrainingDiverged", "World", "batches",
           "evaluate_accuracy", "fit", "load_checkpoint", "resolve_device", "save_checkpoint", "world"]
