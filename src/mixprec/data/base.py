"""Dataset registry and the split container every loader returns."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class DatasetError(ValueError):
    """A dataset is missing, truncated or corrupt; the message names the file."""


@dataclass
class Splits:
    """Tensors of one dataset: inputs are float32 (N, *input_shape), labels int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, reproducibly."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(len(idx) * fraction))
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> Path | None:
    value = data_dir or os.environ.get("MIXPREC_DATA")
    return Path(value).expanduser() if value else None


_LOADERS: dict[str, Callable[..., Splits]] = {}


def register(name: str):
    def deco(fn):
        _LOADERS[name] = fn
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Splits:
    """Load a dataset by name (see :func:`list_datasets`)."""
    from . import digits  # noqa: F401  (registers)

    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _LOADERS[name](data_dir=data_dir_from_env(data_dir), seed=seed)
