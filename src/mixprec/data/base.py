"""Dataset registry and the split container every loader returns."""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..bracketed import NotKeyValue, split_bracketed, typed


class DatasetError(ValueError):
    """A dataset is missing, truncated or corrupt; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """What a loader did to raw values to make the model's inputs, so a device can do the same:

    ``x = (raw / raw_divisor - mean[c]) / std[c]``

    computed in float64, where ``c`` is the channel: axis 1 of the loader's (N, C, ...) arrays, that
    is consecutive blocks of ``numel / C`` elements of a sample in row-major order (so the record
    holds whatever axes of size 1 a model adds). One ``mean`` or ``std`` entry applies to every
    channel. A divisor rather than a factor: ``raw / 255`` is what the image loaders compute, and
    ``raw * (1 / 255)`` differs from it in the last bit for some pixels. The default is the
    identity: the model takes the raw values as they are.
    """

    raw_divisor: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    raw: str = "the model's inputs as given"  # what the raw values are, for the people deploying

    def __post_init__(self):
        object.__setattr__(self, "mean", _floats(self.mean))
        object.__setattr__(self, "std", _floats(self.std))
        object.__setattr__(self, "raw_divisor", float(self.raw_divisor))
        n = {len(self.mean), len(self.std)} - {1}
        if not self.mean or not self.std or len(n) > 1:
            raise ValueError(f"preprocessing mean has {len(self.mean)} entries and std {len(self.std)}; "
                             "give one per channel, or one for all")
        values = (self.raw_divisor, *self.mean, *self.std)
        if not all(math.isfinite(v) for v in values) or self.raw_divisor <= 0 or min(self.std) <= 0:
            raise ValueError(f"preprocessing needs finite values, a positive raw_divisor and positive std; got "
                             f"raw_divisor {self.raw_divisor}, mean {self.mean}, std {self.std}")

    @property
    def channels(self) -> int:
        return max(len(self.mean), len(self.std))

    @property
    def is_identity(self) -> bool:
        return self.raw_divisor == 1.0 and set(self.mean) == {0.0} and set(self.std) == {1.0}

    def per_channel(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` with one entry per channel each."""
        c = self.channels
        return tuple(self.mean * (c // len(self.mean))), tuple(self.std * (c // len(self.std)))

    def apply(self, raw) -> np.ndarray:
        """Raw values (N, ...) to the model's inputs, float64 (the device helpers compute the same)."""
        raw = np.asarray(raw)
        numel = int(np.prod(raw.shape[1:], dtype=np.int64))
        if raw.ndim < 2 or numel % self.channels:
            raise ValueError(f"raw values of shape {raw.shape} do not split into {self.channels} channels "
                             "(batch first: (N, C, ...))")
        x = raw.astype(np.float64).reshape(len(raw), self.channels, numel // self.channels)
        mean, std = (np.array(v, np.float64)[:, None] for v in self.per_channel())
        return ((x / self.raw_divisor - mean) / std).reshape(raw.shape)

    def to_dict(self) -> dict:
        return {"raw": self.raw, "raw_divisor": self.raw_divisor, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """The record ``to_dict`` wrote (other keys, such as the input grid's, are ignored)."""
        return cls(d.get("raw_divisor", 1.0), tuple(d.get("mean", (0.0,))), tuple(d.get("std", (1.0,))),
                   d.get("raw", cls.raw))


def preprocessing_record(pre: Preprocessing | None, ig) -> dict:
    """``result.json``'s ``preprocessing`` (and the C export's): the data loader's normalisation and
    the quantized model's input grid of the lowered program ``ig``, what a device needs to turn raw
    values into the integers ``model_run`` takes. Every grid is symmetric: the zero point is 0."""
    g = ig["input"].grid
    elem = np.asarray(g.elem_scale, dtype=np.float64)
    record = {**(pre or Preprocessing(raw="not recorded by the data loader: the identity is assumed")).to_dict(),
              "formula": "x = (raw / raw_divisor - mean[c]) / std[c] in float64, c the channel (axis 1); "
                         "input_q = round_half_even(x / input_scale), saturated to [input_min, input_max]",
              "input_scale": float(g.scale), "input_zero_point": 0,
              "input_min": int(np.min(g.lo)), "input_max": int(np.max(g.hi)),
              "input_bits": int(np.max(g.bits)), "input_signed": bool(g.signed)}
    if elem.size > 1 and not np.all(elem == elem.reshape(-1)[0]):
        # fixed point with per-channel or per-element input precision: each element has its own scale
        record["input_scale_per_element"] = True
    return record


def _floats(values: float | Sequence[float] | np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))


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
    # What the loader did to the raw values (None: not recorded, e.g. Splits made by hand); it
    # travels into result.json and the C export's input helpers.
    preprocessing: Preprocessing | None = None

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
    name, given = split_options(name)
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}, npz:PATH")
    loader = _LOADERS[name]
    params = inspect.signature(loader).parameters
    known = [p for p in params if p not in ("data_dir", "seed", "download")]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise DatasetError(f"dataset {name!r} has no option {', '.join(unknown)}; its options: "
                           f"{', '.join(known) or 'none'} (as in {name}[{known[0] if known else 'key'}=...])")
    typed = {k: _typed(name, k, v, params[k].default) for k, v in given.items()}
    return loader(data_dir=data_dir_from_env(data_dir), seed=seed, **typed, **options)


def _typed(dataset: str, key: str, text: str, default):
    """An option's text as its default's type (bool, int, float; else the text)."""
    try:
        return typed(text, default)
    except ValueError as err:
        raise DatasetError(f"dataset {dataset!r}: option {key}={text!r} {err}") from None


def split_options(name: str) -> tuple[str, dict[str, str]]:
    """``"mnist[scale=unit]"`` -> ``("mnist", {"scale": "unit"})``: loader options in the data name,
    so a run's config and its command line carry them (the model names' parser, with data's checks).

    >>> split_options("mnist[scale=unit, val_size=1000]")
    ('mnist', {'scale': 'unit', 'val_size': '1000'})
    """
    if "[" not in name:
        return name, {}
    base = name.partition("[")[0]
    if not name.endswith("]"):
        raise DatasetError(f"dataset {name!r}: options go in brackets at the end, as in {base}[scale=unit]")
    try:
        base, options = split_bracketed(name)
    except NotKeyValue as bad:
        raise DatasetError(f"dataset {name!r}: option {bad.item!r} is not KEY=VALUE") from None
    return base.strip(), options
