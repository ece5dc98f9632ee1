"""Model registry: names -> builders, with the example input shape the converter needs.

A model is named either by a registered name (``list_models()``) or as
``"package.module:function"``: a function, importable from the Python path, that returns an
``nn.Module``. Keyword arguments of ``get_model`` are passed to the function. Such a
function declares its input shape (no batch dimension) as an attribute::

    def my_net(num_classes=10):
        return nn.Sequential(...)
    my_net.input_shape = (1, 28, 28)

Without it, ``input_shape("package.module:function")`` raises and the caller must give the
shape explicitly.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mixprec.bracketed import NotKeyValue, split_bracketed

from mixprec.models.imagenet import efficientnet_lite0, mobilenet_v2
from mixprec.models.small import digits_cnn, digits_mlp, jet_mlp, lenet5, mnist_mlp
from mixprec.models.tiny import dscnn, fc_autoencoder, mobilenetv1_025, resnet8


@dataclass(frozen=True)
class ModelSpec:
    """A buildable model and what the rest of the library needs to know about it."""

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...] | None  # without batch dim; None when unknown (user model)
    num_classes: int | None = None  # None: the output is not a class-score vector
    dataset: str = ""  # hint for the data loaders, e.g. "cifar10"
    source: str = ""  # where the architecture comes from


_SPECS = (
    ModelSpec("digits-cnn", digits_cnn, (1, 8, 8), 10, "digits", "mixprec (own design)"),
    ModelSpec("lenet5", lenet5, (1, 28, 28), 10, "mnist", "LeCun et al. 1998"),
    ModelSpec("resnet8", resnet8, (3, 32, 32), 10, "cifar10", "MLPerf Tiny IC"),
    ModelSpec("dscnn", dscnn, (1, 49, 10), 12, "speech_commands", "MLPerf Tiny KWS"),
    ModelSpec("mobilenetv1-0.25", mobilenetv1_025, (3, 96, 96), 2, "vww", "MLPerf Tiny VWW"),
    ModelSpec("fc-autoencoder", fc_autoencoder, (640,), None, "toyadmos", "MLPerf Tiny AD"),
    ModelSpec("jet-mlp", jet_mlp, (16,), 5, "jets", "hls4ml / HGQ jet tagging"),
    ModelSpec("mnist-mlp", mnist_mlp, (1, 28, 28), 10, "mnist", "HGQ2 / hls4ml MNIST MLP 784-64-32-10"),
    ModelSpec("digits-mlp", digits_mlp, (1, 8, 8), 10, "digits", "MLP 64-32-32-10"),
    ModelSpec("mobilenetv2", mobilenet_v2, (3, 224, 224), 1000, "imagenet", "torchvision"),
    ModelSpec("efficientnet-lite0", efficientnet_lite0, (3, 224, 224), 1000, "imagenet", "timm"),
)
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def list_models() -> list[str]:
    """Registered model names, in registration order (small to large)."""
    return list(MODELS)


def split_arguments(name: str) -> tuple[str, dict]:
    """``"lenet5[width=0.5]"`` -> ``("lenet5", {"width": 0.5})``: builder arguments in a model name,
    so a run's config names a resized model (numbers become int or float, the rest stay text)."""
    try:
        base, items = split_bracketed(name)
    except NotKeyValue:
        raise ValueError(f"model {name!r}: write arguments as name[key=value,...], e.g. lenet5[width=0.5]") from None
    return base, {key: _number(value) for key, value in items.items()}


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name or of a ``"package.module:function"`` reference (builder
    arguments in brackets are allowed and ignored here)."""
    name, _ = split_arguments(name)
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        return _import_spec(name)
    raise ValueError(
        f"Unknown model {name!r}. Available: {', '.join(MODELS)}. A model of your own can be "
        "given as 'package.module:function', a function returning an nn.Module; set "
        "`function.input_shape = (C, H, W)` on it or pass the input shape explicitly."
    )


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a fresh, randomly initialized model; ``kwargs`` (and arguments in the name's
    brackets, ``resnet8[width=8]``) go to its builder."""
    _, named = split_arguments(name)
    try:
        model = get_spec(name).builder(**{**named, **kwargs})
    except TypeError as exc:
        if not named:
            raise
        raise ValueError(f"model {name!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def input_shape(name: str) -> tuple[int, ...]:
    """The model's default input shape, without the batch dimension."""
    shape = get_spec(name).input_shape
    if shape is None:
        raise ValueError(
            f"{name!r} does not declare its input shape: set `input_shape = (C, H, W)` on the "
            "function (no batch dimension) or pass the shape explicitly."
        )
    return shape


def _import_from_cwd(module_name: str):
    """``importlib.import_module``, also finding modules in the current directory as ``python -m``
    does (a console script's path lacks it): ``mixprec search --model mypkg.nets:Net`` from the
    project's root."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def _import_spec(reference: str) -> ModelSpec:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Expected 'package.module:function', got {reference!r}")
    try:
        builder = getattr(_import_from_cwd(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import model {reference!r}: {err} (the module is looked up on the Python path "
                         f"and in the current directory)") from err
    if not callable(builder):
        raise TypeError(f"{reference!r} is not callable")
    return ModelSpec(reference, builder, _shape_attr(builder), source=reference)


def _shape_attr(builder: Callable) -> tuple[int, ...] | None:
    shape = getattr(builder, "input_shape", None)
    if shape is None:
        return None
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes without the batch dim, got {shape}")
    return shape
