"""Turn a float model into a quantized one for a target: trace, fold, insert quantizers."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .cost.bits import BitAssignment
from .cost.memory import buffer_bytes, plan_buffers
from .cost.targets import Target, as_target, weight_granularity_for
from .granularity import shape_for
from .graph.convert import trace
from .graph.ir import REQUANTIZING_OPS
from .graph.views import with_views
from .nn.model import QuantLayer, QuantModel
from .quantizers.fixed import ActQuantizer, FixedWeightQuantizer


def quantize(model: nn.Module, target: str | Target, input_shape: tuple[int, ...], bits=8, act_bits=None,
             weight_granularity: str | None = None) -> QuantModel:
    """Convert a float model into a quantized model for ``target`` (fixed bit-widths; a weight
    group of 3 bits or fewer takes the least-squares scale of its max-abs range and narrower
    candidates, a wider one the max-abs range)."""
    t = as_target(target)
    act_bits = bits if act_bits is None else act_bits
    gran = weight_granularity_for(t, weight_granularity)
    for b in _values(bits):
        if b not in t.weight_bits:
            raise ValueError(f"{b}-bit weights are not supported by {t.name}; supported: {', '.join(map(str, t.weight_bits))}")
    for grid in act_bits.values() if isinstance(act_bits, dict) else [act_bits]:
        allowed = t.act_bits_of(torch.as_tensor(grid).numel())
        for b in _values(grid):
            if b not in allowed:
                raise ValueError(f"{b}-bit activations are not supported by {t.name}; supported: {', '.join(map(str, allowed))}")
    return convert(model, input_shape, t.numerics, bits, act_bits, gran, t.act_granularities[0], t)


def _values(bits) -> list[int]:
    if isinstance(bits, dict):
        return sorted({int(v) for b in bits.values() for v in torch.as_tensor(b).flatten().tolist()})
    return sorted({int(v) for v in torch.as_tensor(bits).flatten().tolist()})


def bits_tensor_for(bits, granularity: str, shape: tuple[int, ...]):
    """A bit-width tensor of ``granularity`` over ``shape``, filled with ``bits`` unless ``bits``
    is already a tensor/array (then it is used as given)."""
    import numpy as np
    import torch

    if isinstance(bits, (int, float)):
        return torch.full(shape_for(granularity, shape), float(bits))
    return torch.as_tensor(np.asarray(bits), dtype=torch.float32)


def convert(model: nn.Module, input_shape: tuple[int, ...], numerics: str = "scaled",
            weight_bits=8, act_bits=8, weight_granularity: str = "per-channel",
            act_granularity: str = "per-tensor", target: str | Target = "generic", views: bool = True) -> QuantModel:
    """Quantize ``model`` with fixed bit-widths.

    ``weight_bits`` / ``act_bits``: an int for every layer, or a dict ``{node name: int or
    tensor}`` (nodes missing from the dict get 8). Tensors give the granularity by their shape.
    """
    def pick(spec, name):
        return spec.get(name, 8) if isinstance(spec, dict) else spec

    def weight_quantizer(node, weight):
        bits = bits_tensor_for(pick(weight_bits, node.name), weight_granularity, node.weight_shape)
        return FixedWeightQuantizer(node.weight_shape, bits, numerics, range_rule="mse")

    def act_quantizer(node):
        bits = bits_tensor_for(pick(act_bits, node.name), act_granularity, node.out_shape)
        return ActQuantizer(node.out_shape, bits, numerics, clip=activation_clip(node))

    return convert_with(model, input_shape, numerics, weight_quantizer, act_quantizer, target, views)


def activation_clip(node) -> tuple[float, float]:
    """The range a fused activation (ReLU6, Hardtanh) bounds its output to."""
    return (node.attrs.get("act_min", float("-inf")), node.attrs.get("act_max", float("inf")))


def convert_with(model: nn.Module, input_shape: tuple[int, ...], numerics: str,
                 weight_quantizer: Callable, act_quantizer: Callable, target: str | Target = "generic",
                 views: bool = True) -> QuantModel:
    """Quantize ``model`` with quantizers a method builds: ``weight_quantizer(node, folded float
    weight)`` for every conv/linear node and ``act_quantizer(node)`` for every node that
    requantizes (the input included). A channel slice of a per-tensor grid whose first element
    lies on the target's buffer alignment becomes a view (``graph.views``: no quantizer, no copy)
    unless, with every activation at the target's widest width, a copy plans a smaller arena
    (``views=False``: every slice a copy onto its own grid)."""
    t = as_target(target)
    graph, params = trace(model, tuple(input_shape))
    layers = {}
    for node in graph.weighted():
        p = params[node.name]
        layers[node.name] = QuantLayer(p.weight, p.bias, weight_quantizer(node, p.weight), p.fold_ratio)
    acts = {node.name: act_quantizer(node) for node in graph if node.op in REQUANTIZING_OPS}
    uniform = {name for name, q in acts.items() if math.prod(q.bits_shape()) == 1} if views else set()
    # decided at the target's widest activations, not at the method's first bits: a saved model built
    # again from its own bits must take the same views
    widest = {n.name: torch.full((1,) * len(n.out_shape), float(max(t.act_bits))) for n in graph if n.name in acts}
    graph = with_views(graph, t.act_containers, t.alignment, uniform, arena=lambda g: _arena(g, widest, t))
    acts = {name: q for name, q in acts.items() if graph[name].op in REQUANTIZING_OPS}
    return QuantModel(graph, layers, acts, numerics, t.name)


def _arena(graph, act_bits: dict, t: Target) -> int:
    """The planned arena of ``graph`` with these activation bits (the nodes it requantizes)."""
    a = BitAssignment({}, {name: b for name, b in act_bits.items() if graph[name].op in REQUANTIZING_OPS})
    return plan_buffers(graph, buffer_bytes(graph, a, t), t).arena
