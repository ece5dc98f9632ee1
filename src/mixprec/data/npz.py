"""Arrays from an ``.npz`` file (``load_dataset("npz:PATH")``): features prepared elsewhere,
such as keyword-spotting MFCCs of shape (N, 1, 49, 10).

The file holds ``x_train, y_train, x_val, y_val, x_test, y_test``; or ``x_train, y_train,
x_test, y_test`` (validation held out of train); or just ``x, y`` (a stratified 80/10/10 split).
An optional ``classes`` array names the labels. Inputs are used as stored (cast to float32),
unless the file holds ``mean`` and/or ``std``: the normalisation of your own choosing, applied here
as ``x = (x - mean) / std`` (in float64) and recorded with the run, so the deployed model's input
helpers apply it to raw sensor values too. Each is a scalar or one value per channel (axis 1 of
``x``, e.g. shape (C,) or (C, 1, 1)); the one left out is 0 (mean) or 1 (std).
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from .base import DatasetError, Preprocessing, Splits, stratified_split, tensor

log = logging.getLogger(__name__)

SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
NORMALISATION_KEYS = ("mean", "std")


def _locate(path: str | os.PathLike, data_dir) -> Path:
    p = Path(path).expanduser()
    looked = [p]
    if not p.is_absolute() and data_dir:
        looked.append(Path(data_dir).expanduser() / p)
    for candidate in looked:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"npz: {p.name} not found; looked in: {', '.join(str(c) for c in looked)}")


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def _labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DatasetError(f"{path}: {key} must be a 1-d array of integer labels, got {y.dtype}{y.shape}")
    if y.size and (np.any(y < 0) or np.any(y != np.round(y))):
        raise DatasetError(f"{path}: {key} holds labels that are not non-negative integers")
    return y.astype(np.int64)


def _split_arrays(arrays: dict[str, np.ndarray], path: Path, seed: int, val_fraction: float,
                  test_fraction: float) -> dict[str, np.ndarray]:
    keys = set(arrays)
    if set(SPLIT_KEYS) <= keys:
        return {k: arrays[k] for k in SPLIT_KEYS}
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        y = _labels(arrays["y_train"], "y_train", path)
        train, val = stratified_split(y, int(round(val_fraction * len(y))), seed)
        x = arrays["x_train"]
        return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val],
                "x_test": arrays["x_test"], "y_test": arrays["y_test"]}
    if {"x", "y"} <= keys:
        x, y = arrays["x"], _labels(arrays["y"], "y", path)
        if len(x) != len(y):
            raise DatasetError(f"{path}: x has {len(x)} samples but y has {len(y)}")
        rest, test = stratified_split(y, int(round(test_fraction * len(y))), seed)
        train, val = stratified_split(y[rest], int(round(val_fraction * len(y))), seed + 1)
        train, val = rest[train], rest[val]
        return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val],
                "x_test": x[test], "y_test": y[test]}
    raise DatasetError(f"{path}: needs arrays x, y (or x_train, y_train, [x_val, y_val,] x_test, y_test); "
                       f"it holds {', '.join(sorted(keys)) or 'nothing'}")


def _preprocessing(arrays: dict[str, np.ndarray], channels: int, path: Path) -> Preprocessing:
    """The file's own ``mean`` / ``std`` (identity without them), checked against the channels."""
    given = {}
    for key in NORMALISATION_KEYS:
        if key not in arrays:
            continue
        a = arrays[key]
        if not np.issubdtype(a.dtype, np.number) or a.size not in (1, channels):
            raise DatasetError(f"{path}: {key} is {a.dtype}{a.shape}; it must be a number or one per channel "
                               f"({channels}: axis 1 of x)")
        given[key] = a.astype(np.float64).reshape(-1)
    if not given:
        return Preprocessing(raw="the npz file's x as stored")
    try:
        return Preprocessing(1.0, given.get("mean", 0.0), given.get("std", 1.0),
                             raw="the npz file's x as stored, before its mean and std")
    except ValueError as e:  # non-finite values or a std <= 0
        raise DatasetError(f"{path}: {e}") from None


def load_npz(path: str | os.PathLike, data_dir=None, seed: int = 0, val_fraction: float = 0.1,
             test_fraction: float = 0.1) -> Splits:
    """Splits from an ``.npz`` (see the module docstring); num_classes is the largest label + 1."""
    path = _locate(path, data_dir)
    arrays = _read(path)
    parts = _split_arrays(arrays, path, seed, val_fraction, test_fraction)
    x_train = parts["x_train"]
    pre = _preprocessing(arrays, x_train.shape[1] if x_train.ndim >= 2 else 0, path)
    out = {}
    for split in ("train", "val", "test"):
        x, y = parts[f"x_{split}"], _labels(parts[f"y_{split}"], f"y_{split}", path)
        if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or len(x) != len(y):
            raise DatasetError(f"{path}: x_{split} {x.dtype}{x.shape} does not match y_{split} of {len(y)} labels")
        if not pre.is_identity and x.shape[1:] == x_train.shape[1:]:  # other shapes are refused below
            x = pre.apply(x)
        out[split] = tensor(x.astype(np.float32, copy=False)), tensor(y)
    if out["train"][0].shape[1:] != out["val"][0].shape[1:] or out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise DatasetError(f"{path}: the splits' inputs differ in shape: "
                           + ", ".join(f"{s} {tuple(out[s][0].shape[1:])}" for s in out))
    num_classes = 1 + max((int(y.max()) for _, y in out.values() if len(y)), default=0)
    classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else None
    if classes is not None and len(classes) < num_classes:
        raise DatasetError(f"{path}: {len(classes)} class names for labels up to {num_classes - 1}")
    log.info("npz %s: %s", path, {s: len(y) for s, (_, y) in out.items()})
    return Splits(path.stem, *out["train"], *out["val"], *out["test"],
                  len(classes) if classes else num_classes, classes, preprocessing=pre)
