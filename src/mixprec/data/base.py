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
    classes: tuple[str, ...] | None = None
    # A batched training augmentation, applied by the training loop to each training batch:
    # augment(x_batch, cpu_generator) -> x_batch. Random numbers are drawn on the CPU from the
    # generator (reproducible whatever the device) and moved to x_batch.device.
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def stratified_split(y: np.ndarray, fraction: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, reproducibly.

    An ``int`` holds out exactly that many samples (the usual "5000 of the training set"),
    shared between classes in proportion to their sizes by largest remainder.
    """
    y = np.asarray(y)
    classes = np.unique(y)
    if isinstance(fraction, (int, np.integer)) and not isinstance(fraction, bool):
        if not 0 <= fraction <= len(y):
            raise ValueError(f"cannot hold out {fraction} of {len(y)} samples")
        counts = _apportion(np.array([np.count_nonzero(y == c) for c in classes]), int(fraction))
    else:
        counts = [None] * len(classes)
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c, count in zip(classes, counts):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(len(idx) * fraction)) if count is None else int(count)
        held.append(idx[:n])
        keep.append(idx[n:])
    empty = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep or [empty])), np.sort(np.concatenate(held or [empty]))


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``sizes`` that sum exactly to ``total``."""
    exact = sizes * total / max(int(sizes.sum()), 1)
    shares = np.floor(exact).astype(np.int64)
    # Ties go to the earlier class, so the result does not depend on sort stability.
    order = np.lexsort((np.arange(len(sizes)), -(exact - shares)))
    shares[order[: total - int(shares.sum())]] += 1
    return shares


def tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the (made contiguous) array's memory."""
    return torch.from_numpy(np.ascontiguousarray(a))


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> Path | None:
    value = data_dir or os.environ.get("MIXPREC_DATA")
    return Path(value).expanduser() if value else None


_LOADERS: dict[str, Callable[..., Splits]] = {}


def register(name: str):
    def deco(fn):
        _LOADERS[name] = fn
        return fn
    return deco


def _register_all() -> None:
    # Imported here, not at module level, so importing mixprec.data stays cheap.
    from . import cifar, digits, jets, mnist, npz  # noqa: F401  (registers)


def list_datasets() -> list[str]:
    _register_all()
    return sorted(_LOADERS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0, **options) -> Splits:
    """Load a dataset by name (see :func:`list_datasets`), or arrays from ``"npz:PATH"``.

    ``options`` go to the loader (``download=True`` fetches missing official files).
    """
    _register_all()
    if name.startswith("npz:"):
        from .npz import load_npz

        # A relative PATH is also looked for under the data directory.
        return load_npz(name[len("npz:"):], data_dir_from_env(data_dir), seed=seed, **options)
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}, npz:PATH")
    return _LOADERS[name](data_dir=data_dir_from_env(data_dir), seed=seed, **options)
