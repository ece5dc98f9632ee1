"""A run's data checked against its model before the run claims its folder.

Every check ends in one ``DatasetError`` line that names the array, the data and the fix, so the
corrected command reruns into the same ``--out``: values are finite, each sample has the model's
declared input shape (a missing or trailing channel axis of size 1 is added or moved, and the log
says so: no element changes place), the model runs on it and outputs class scores, and the labels
index those scores.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..data import DatasetError, Splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def check_finite(data: Splits, source: str) -> None:
    for split in SPLITS:
        x = getattr(data, f"x_{split}")
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            sample = int(bad.reshape(len(x), -1).any(dim=1).nonzero()[0])
            raise DatasetError(f"data {source}: x_{split} holds {int(bad.sum())} NaN or infinite value(s) (the first "
                               f"in sample {sample}); remove those samples or replace the values before training")


def same_but_unit_axes(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether shapes ``a`` and ``b`` differ only by axes of size 1 (a reshape moves no element)."""
    return a != b and [d for d in a if d != 1] == [d for d in b if d != 1]


def fit_input_shape(data: Splits, declared: tuple[int, ...] | None, source: str, model: str) -> Splits:
    """``data`` with samples of the model's ``declared`` shape (None: the model declares none)."""
    shape = data.input_shape
    if declared is None or tuple(declared) == shape:
        return data
    declared = tuple(declared)
    if same_but_unit_axes(shape, declared):
        log.info("data %s: samples of shape %s taken as the model's %s (an axis of size 1 added or moved)",
                 source, shape, declared)
        return dataclasses.replace(data, **{f"x_{s}": getattr(data, f"x_{s}").reshape(-1, *declared) for s in SPLITS})
    hint = ""
    if len(shape) == len(declared) > 1 and shape[:-1] == declared[1:]:
        order = ", ".join(map(str, (0, len(shape), *range(1, len(shape)))))
        hint = (f" They look channels-last ({shape[-1]} channels; the model takes {declared[0]}): store them "
                f"channels-first, e.g. x.transpose({order}) in NumPy, with the model's channel count.")
    raise DatasetError(f"data {source}: samples have shape {shape}, but model {model} takes {declared} (no batch "
                       f"axis).{hint or ' Prepare the data in that shape or choose a model built for yours.'}")


def model_outputs(model: nn.Module, input_shape: tuple[int, ...], source: str, name: str) -> int:
    """The number of class scores ``model`` outputs for one sample of ``input_shape``."""
    was_training = model.training
    model.eval()  # a train-mode BatchNorm would move its statistics
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *input_shape)))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"model {name} does not run on samples of shape {tuple(input_shape)} from data {source}: "
                           f"{first.rstrip('.')}. Give data in the shape the model takes") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DatasetError(f"model {name} outputs {got} for one sample; a classifier outputs (1, classes)")
    return int(out.shape[1])


def check_labels(data: Splits, outputs: int, source: str, name: str) -> None:
    """Labels index the model's ``outputs`` class scores; fewer classes than scores is only noted."""
    for split in SPLITS:
        y = getattr(data, f"y_{split}")
        if len(y) and int(y.max()) >= outputs:
            raise DatasetError(f"data {source}: y_{split} holds labels up to {int(y.max())}, but model {name} outputs "
                               f"{outputs} class scores; build the model for {int(y.max()) + 1} classes (e.g. "
                               f"{_with_classes(name, int(y.max()) + 1)}) or relabel the data to 0..{outputs - 1}")
    if data.num_classes > outputs:
        raise DatasetError(f"data {source} names {data.num_classes} classes, but model {name} outputs {outputs} class "
                           f"scores; build the model for {data.num_classes} classes (e.g. "
                           f"{_with_classes(name, data.num_classes)})")
    if data.num_classes < outputs:
        log.warning("data %s has %d classes; model %s outputs %d class scores (the extra ones are never the answer)",
                    source, data.num_classes, name, outputs)


def _with_classes(name: str, n: int) -> str:
    base, _, args = name.partition("[")
    args = [a for a in args.rstrip("]").split(",") if a.strip() and not a.strip().startswith("num_classes=")]
    return f"--model '{base}[{', '.join(args + [f'num_classes={n}'])}]'"


def prepare(data: Splits, model: nn.Module, declared: tuple[int, ...] | None, source: str, name: str) -> Splits:
    """Every check of this module, in order; returns ``data`` with the model's input shape."""
    check_finite(data, source)
    data = fit_input_shape(data, declared, source, name)
    check_labels(data, model_outputs(model, data.input_shape, source, name), source, name)
    return data
