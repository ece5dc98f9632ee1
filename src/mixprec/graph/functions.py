"""Elementwise functions deployed as lookup tables (graph op ``table``): one registry, by name.

Each entry is a torch function of a float tensor and the node's attrs. Training applies it to the
fake-quantized tensor; lowering evaluates it in float64 on every code of the input grid and rounds
the results onto the output grid, so the deployed model (NumPy reference, torch, C, QONNX) reads a
table of 256 entries per input/output grid, as TFLite-Micro's int8 kernels do, and every
implementation gives the same integers.

>>> import torch
>>> table_function({"function": "leaky_relu", "negative_slope": 0.25})(torch.tensor([-2.0, 3.0])).tolist()
[-0.5, 3.0]
>>> maps_zero_to_zero({"function": "sigmoid"}), maps_zero_to_zero({"function": "hardswish"})
(False, True)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: name -> f(x, attrs)
TABLE_FUNCTIONS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "leaky_relu": lambda x, a: F.leaky_relu(x, a.get("negative_slope", 0.01)),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "hardswish": lambda x, a: F.hardswish(x),
    "hardsigmoid": lambda x, a: F.hardsigmoid(x),
    "silu": lambda x, a: F.silu(x),
    "gelu": lambda x, a: F.gelu(x, approximate=a.get("approximate", "none")),
    "elu": lambda x, a: F.elu(x, a.get("alpha", 1.0)),
}


def table_function(attrs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a ``table`` node's attrs name, with its parameters bound."""
    fn = TABLE_FUNCTIONS[attrs["function"]]
    return lambda x: fn(x, attrs)


def maps_zero_to_zero(attrs: dict) -> bool:
    """Whether f(0) = 0: a pruned (all-zero) channel stays zero through the table, so its consumers'
    columns can go; sigmoid and hardsigmoid give 0.5 and keep them."""
    return float(table_function(attrs)(torch.zeros(1, dtype=torch.float64))) == 0.0
