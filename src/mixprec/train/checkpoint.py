"""Checkpoints written atomically and read back without unpickling arbitrary objects."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing or unreadable; the message names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write to a temporary file and rename, so a killed process never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a mixprec checkpoint: {exc}") from exc
