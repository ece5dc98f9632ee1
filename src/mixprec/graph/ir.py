"""The graph every part of mixprec shares: conversion builds it, cost models read it,
lowering turns it into integer operations, export walks it.

A graph is a list of nodes in execution order. Each node produces exactly one tensor,
named after the node; the network input is the node named ``"input"`` (op ``"input"``).
Shapes never include the batch dimension.

Node names are the user's: the path of the module a node comes from, as ``model.named_modules()``
names it (``conv1``, ``features.3``, ``layer1.0.conv2``), or for a function call the path of the
module that makes it plus the operation (``layer1.0.add``, ``add``, ``flatten``); unique within a
graph (see ``graph.convert.user_name``). Every report, checkpoint and artifact names layers so;
generated code escapes them (``features.3`` -> ``features_3``, ``mixprec.export.names``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

# Ops that carry weights (and so a weight quantizer, a bias and requantization).
WEIGHTED_OPS = ("conv", "linear")
# Ops whose output lives on a new grid (they own an output quantizer).
REQUANTIZING_OPS = ("input", "conv", "linear", "add", "mul", "concat", "slice", "pad", "table", "act")
# Ops whose output keeps the grid and bits of their input (no quantizer of their own;
# average pooling divides its integer window sum back onto the input grid).
PASSTHROUGH_OPS = ("maxpool", "avgpool", "zeropad", "flatten", "narrow")
# Ops whose output reuses the input buffer in memory (a view, not a copy; narrow: from an offset).
ALIAS_OPS = ("flatten", "narrow")
ALL_OPS = REQUANTIZING_OPS + PASSTHROUGH_OPS


def zeropad_sides(attrs: dict) -> tuple[int, ...]:
    """A ``zeropad`` node's padding as ``F.pad`` takes it: (before, after) per dim, last dim first."""
    return tuple(q for d in reversed(range(attrs["dims"])) for q in (attrs["padding"][d], attrs["padding_after"][d]))


@dataclass
class Node:
    """One operation.

    attrs by op:
      conv:    kernel_size (tuple), stride, padding, dilation (tuples, one entry per spatial dim),
               groups (int), dims (1 or 2), activation (str, fused: relu|relu6|hardtanh|identity),
               act_min / act_max (floats, hardtanh bounds; relu6 gives 0/6)
      linear:  activation, act_min, act_max
      add:     activation, act_min, act_max
      mul:     activation, act_min, act_max   (a product: the second input has the first's shape, or is
               a per-channel vector (C,) broadcast over the first's positions)
      concat:  activation, act_min, act_max   (inputs joined along dim 0, the channels, in order)
      slice:   start, stop (channels of the input), activation, act_min, act_max   (a copy onto its own grid)
      narrow:  start, stop (channels of the input)   (a view: the input's grid and memory from channel
               ``start`` on, what a slice becomes where the target's buffers allow it: ``graph.views``)
      pad:     before, after (zero channels added before and after the input's), activation, act_min,
               act_max   (the input's channels copied onto its own grid between them)
      table:   function (a name of graph.functions), its parameters (negative_slope, approximate,
               alpha), activation, act_min, act_max   (an elementwise function as a lookup table)
      act:     activation, act_min, act_max   (a standalone activation that could not be fused)
      maxpool/avgpool: kernel_size, stride, padding (tuples), dims; avgpool: count_include_pad (False:
               divide by the window's elements inside the input; absent: by the kernel size, as PyTorch)
      zeropad: dims, padding, padding_after (zeros before and after the positions of each spatial dim,
               first dim first; on the input's grid: what zero padding no convolution takes becomes)
      flatten: nothing
      input:   nothing
    """

    name: str
    op: str
    inputs: list[str]
    out_shape: tuple[int, ...]
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    weight_shape: tuple[int, ...] | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def out_numel(self) -> int:
        return prod(self.out_shape)

    @property
    def has_weights(self) -> bool:
        return self.op in WEIGHTED_OPS

    @property
    def out_channels(self) -> int:
        return self.out_shape[0]

    @property
    def macs(self) -> int:
        """Multiply-accumulates per inference: one per weight element per output position."""
        if not self.has_weights:
            return 0
        positions = prod(self.out_shape[1:]) if self.op == "conv" else 1
        return prod(self.weight_shape) * positions


@dataclass
class Graph:
    nodes: list[Node]
    output: str
    # a softmax / log_softmax the model applies to its output, left out of the graph: monotone, so the
    # deployed integer logits keep the argmax ("" when the model returns its logits)
    output_transform: str = ""

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    def users(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def weighted(self) -> list[Node]:
        return [n for n in self.nodes if n.has_weights]

    def grid_source(self, name: str) -> str:
        """The node whose quantizer defines the grid of tensor ``name``
        (follows pass-through ops such as maxpool and flatten back to their producer)."""
        node = self[name]
        while node.op in PASSTHROUGH_OPS:
            node = self[node.inputs[0]]
        return node.name

    def buffer_source(self, name: str) -> str:
        """The node that owns the memory buffer of tensor ``name`` (follows aliasing views)."""
        node = self[name]
        while node.op in ALIAS_OPS:
            node = self[node.inputs[0]]
        return node.name
