"""scikit-learn's bundled 8x8 handwritten digits (1797 images): no download, the quick demo."""
from __future__ import annotations

import numpy as np
import torch

from .base import Preprocessing, Splits, register, stratified_split

PREPROCESSING = Preprocessing(16.0, raw="8x8 pixel counts 0..16 (one channel)")


@register("digits")
def load_digits(data_dir=None, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Splits:
    """Pixels scaled from 0..16 to [0, 1], shape (1, 8, 8); stratified test and validation splits."""
    from sklearn.datasets import load_digits as sk_load

    ds = sk_load()
    x = (ds.images.astype(np.float32) / 16.0)[:, None]
    y = ds.target.astype(np.int64)
    rest, test = stratified_split(y, test_fraction, seed)
    train_i, val_i = stratified_split(y[rest], val_fraction, seed + 1)
    train, val = rest[train_i], rest[val_i]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Splits("digits", t(x[train]), t(y[train]), t(x[val]), t(y[val]), t(x[test]), t(y[test]), 10,
                  preprocessing=PREPROCESSING)
