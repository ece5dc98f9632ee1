"""Finished runs as users meet them: ``load_run(dir)`` and ``evaluate(run_or_model, x, y)``.

A run directory (``mixprec search --out DIR``) holds the configuration, the quantized model
(``checkpoints/quantized.pt``) and ``result.json``, whose ``preprocessing`` says what turns raw
sensor values into the model's input integers: the data loader's normalisation
(:class:`mixprec.data.Preprocessing`) and the input grid (scale, zero point, range).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.base import Preprocessing
from .nn.model import QuantModel

if TYPE_CHECKING:
    from .search.config import RunConfig

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A folder is not a finished run, or its inputs do not fit its model; one line says which."""


@dataclass(frozen=True)
class Run:
    """A finished run: its folder, configuration, quantized model (eval mode: the integer
    program), ``result.json`` and the preprocessing its data loader applied (None for runs from
    before mixprec recorded it)."""

    dir: Path
    config: RunConfig
    model: QuantModel
    result: dict
    preprocessing: Preprocessing | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model.input_shape)


def load_run(run_dir: str | Path) -> Run:
    """The finished run in ``run_dir``; :class:`RunError` when it is not one."""
    from .search.saved import load_run as load_parts
    from .train import CheckpointError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such folder")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); give the --out folder of `mixprec search`")
    if not (run_dir / "checkpoints" / "quantized.pt").is_file():
        raise RunError(f"{run_dir} holds no quantized model (checkpoints/quantized.pt): the run did not finish; "
                       f"`mixprec search ... --out {run_dir} --resume` finishes it")
    try:
        config, model, result = load_parts(run_dir)
    except CheckpointError as exc:
        raise RunError(_first_line(exc)) from None
    pre = result.get("preprocessing")
    return Run(run_dir, config, model, result, Preprocessing.from_dict(pre) if pre else None)


def evaluate(run_or_model: Run | QuantModel, x, y, *, raw: bool = False, batch_size: int | None = None) -> float:
    """Integer-exact top-1 accuracy of a run's (or a quantized) model on inputs ``x`` and labels ``y``.

    ``x`` (NumPy or torch, batch first) holds the model's inputs, as the run's data loader gives
    them (``mixprec.data.load_dataset(...).x_test``); shapes that differ from the model's only by
    axes of size 1 are taken as its shape. With ``raw=True`` (a ``Run`` only) ``x`` holds raw
    values (pixels 0..255, sensor readings, ...) and the run's recorded preprocessing is applied
    first, in float64, exactly as the exported C helper ``<prefix>_quantize_input`` does.
    """
    model, pre = _model_and_preprocessing(run_or_model, raw)
    x = _inputs(x, model.input_shape, pre)
    y = _labels(y, len(x))
    from .train import evaluate_accuracy

    return evaluate_accuracy(model, x, y, batch_size=batch_size)


def _model_and_preprocessing(run_or_model, raw: bool) -> tuple[QuantModel, Preprocessing | None]:
    if isinstance(run_or_model, Run):
        if raw and run_or_model.preprocessing is None:
            raise RunError(f"{run_or_model.dir} records no preprocessing (a run from before mixprec recorded it): "
                           "give the model's inputs, normalised as its data loader does, with raw=False")
        return run_or_model.model, run_or_model.preprocessing if raw else None
    if not isinstance(run_or_model, QuantModel):
        raise RunError(f"evaluate takes a Run (mixprec.load_run) or a quantized model (mixprec.quantize), "
                       f"not {type(run_or_model).__name__}")
    if raw:
        raise RunError("raw=True needs a Run (mixprec.load_run): a quantized model alone does not know its "
                       "data's preprocessing")
    return run_or_model, None


def _inputs(x, input_shape: tuple[int, ...], pre: Preprocessing | None) -> torch.Tensor:
    """``x`` as a tensor of the model's input shape; raw values preprocessed (float64, as in C)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    want = tuple(input_shape)
    _check_inputs(x, want)
    if pre is not None:
        try:
            x = pre.apply(x)
        except ValueError as exc:
            raise RunError(f"x: {exc}") from None
    elif not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)  # integer features (raw int8 MFCCs, say) as they are: exact
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *want)


def _check_inputs(x: np.ndarray, want: tuple[int, ...]) -> None:
    from .search.preflight import same_but_unit_axes

    shape = tuple(x.shape[1:])
    if x.ndim == 0 or len(x) == 0:
        raise RunError(f"x holds no samples (shape {x.shape}); give a batch of shape (N, {_dims(want)})")
    if shape != want and not same_but_unit_axes(shape, want):
        raise RunError(f"x has samples of shape {shape}, but the model takes {want}; give x of shape "
                       f"(N, {_dims(want)}), batch first")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise RunError(f"x holds {x.dtype} values; give real numbers")
    if shape != want:
        log.info("x: samples of shape %s taken as the model's %s (an axis of size 1 added or moved)", shape, want)


def _labels(y, n: int) -> torch.Tensor:
    y = y.detach().cpu() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if y.dim() != 1 or len(y) != n:
        raise RunError(f"y has shape {tuple(y.shape)}; give one integer label per sample of x: shape ({n},)")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise RunError("y holds labels that are not integers")
    return y.to(torch.int64)


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
