"""Bit-widths of a whole graph: one tensor per weighted node and one per produced tensor.

A bits tensor tiles the value it describes (``granularity.expand``): shape ``(1, 1, 1, 1)`` is
per-tensor, ``(C, 1, 1, 1)`` per-channel, the full shape per-element. Bits are float tensors so
they can carry gradients from a learned quantizer; 0 weight bits means pruned.

>>> from mixprec.graph.ir import Graph, Node
>>> g = Graph([Node("input", "input", [], (4,)),
...            Node("fc", "linear", ["input"], (2,), [(4,)], (2, 4))], output="fc")
>>> a = uniform(g, weight_bits=4, act_bits=8)
>>> a.weight["fc"].shape, act_bits(a, g, "fc").item()
(torch.Size([1, 1]), 8.0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import check_compatible, expand, shape_for
from ..graph.ir import PASSTHROUGH_OPS, Graph
from .targets import Target


@dataclass
class BitAssignment:
    weight: dict[str, torch.Tensor]  # weighted node -> bits tiling node.weight_shape
    act: dict[str, torch.Tensor]  # node -> bits of its output, tiling node.out_shape ("input" included)

    def detach(self) -> "BitAssignment":
        return BitAssignment({k: v.detach() for k, v in self.weight.items()},
                             {k: v.detach() for k, v in self.act.items()})


def uniform(graph: Graph, weight_bits: float, act_bits: float, granularity: str = "per-tensor",
            act_granularity: str = "per-tensor") -> BitAssignment:
    """The same width everywhere, as bits tensors of the given granularities."""
    weight = {n.name: torch.full(shape_for(granularity, n.weight_shape), float(weight_bits))
              for n in graph.weighted()}
    act = {n.name: torch.full(shape_for(act_granularity, n.out_shape), float(act_bits))
           for n in graph if n.op not in PASSTHROUGH_OPS}
    return BitAssignment(weight, act)


def min_assignment(graph: Graph, target: Target, allow_pruning: bool = False) -> BitAssignment:
    """The smallest widths ``target`` supports everywhere, at its coarsest granularities.

    Weights take the smallest non-zero width unless ``allow_pruning`` (then 0: every weight pruned).
    """
    wbits = 0 if allow_pruning and target.allows_pruning else target.min_weight_bits
    return uniform(graph, wbits, target.min_act_bits, _coarsest(target.weight_granularities),
                   _coarsest(target.act_granularities))


def _coarsest(granularities: tuple[str, ...]) -> str:
    order = ("per-tensor", "per-slice", "per-channel", "per-element")
    return min(granularities, key=order.index)


def weight_bits(assignment: BitAssignment, graph: Graph, name: str) -> torch.Tensor:
    """The weight bits of node ``name`` (a clear error if the assignment lacks them)."""
    if name not in assignment.weight:
        raise KeyError(f"bit assignment has no weight bits for weighted node {name!r}")
    bits = assignment.weight[name]
    check_compatible(tuple(bits.shape), graph[name].weight_shape)
    return bits


def act_bits(assignment: BitAssignment, graph: Graph, name: str) -> torch.Tensor:
    """Bits of the tensor produced by ``name``, tiling its ``out_shape``.

    Pass-through nodes (maxpool, flatten) without an entry take the bits of their grid source,
    reshaped onto their own output: flatten keeps the element order; maxpool keeps per-channel
    bits, and per-element bits are reduced to the channel maximum (the pooled element's grid is
    not known statically; the widest is the safe figure).
    """
    node = graph[name]
    if name in assignment.act:
        bits = assignment.act[name]
        check_compatible(tuple(bits.shape), node.out_shape)
        return bits
    if node.op not in PASSTHROUGH_OPS:
        raise KeyError(f"bit assignment has no activation bits for node {name!r} (op {node.op!r})")
    return _onto(act_bits(assignment, graph, node.inputs[0]), graph[node.inputs[0]].out_shape, node.out_shape)


def _onto(bits: torch.Tensor, src_shape: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Bits of a source tensor carried onto a pass-through output of ``shape``."""
    if bits.numel() == 1:
        return bits.reshape((1,) * len(shape))
    if len(src_shape) == len(shape):  # maxpool: same channels, pooled positions
        if bits.dim() == len(shape) and all(b == 1 for b in bits.shape[1:]):
            return bits
        per_channel = expand(bits, src_shape).reshape(src_shape[0], -1).amax(dim=1)
        return per_channel.reshape((src_shape[0],) + (1,) * (len(shape) - 1))
    return expand(bits, src_shape).reshape(shape)  # flatten: same elements, new shape
