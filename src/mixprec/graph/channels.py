"""Which output channels feed which weight columns: the channel map a pruning method and the cost
of a pruned model read.

A weighted layer's output channel at 0 bits is *pruned*. A channel of a tensor is

- *live* (carries a signal): at the network input always; at a conv / linear output while its
  channel is not pruned and, for a grouped conv (depthwise included), while some input channel of
  its group is live (a group with no live input computes nothing, as PLiNIO and MPIC treat a
  depthwise channel; a dense layer left without live inputs is no model and keeps its channels);
  at an add output while the channel of any input is live; through pooling, ``act`` and flatten
  unchanged, and through a lookup table (``table``) whose function maps 0 to 0; at a concat,
  product, channel slice or channel pad output, or a table's that maps 0 elsewhere (sigmoid: a pruned channel becomes a constant
  0.5), always (they are producers of new channels);
- *alive* (stored, hence read): while the channel is live at any producer *tied* to it. The
  producers (input, conv, linear) whose outputs meet at an add, directly or through pooling,
  ``act`` or other adds, form a *tie group*: channel ``c`` of every tensor of the group is kept
  while any one of them carries channel ``c``, so a pruned channel frees its consumers' weight
  columns only when every tied channel is pruned. A tie group a concat, product, slice, pad or such a table reads is
  *pinned*: every channel stays alive (a pruned one at 0 bits with a zero bias), since the concat's
  output keeps a place for each channel of each input (the table's a constant of each).

Channel ``c`` of a tensor is index ``c`` of its first dimension; flatten spreads channel ``c`` of
a ``(C, *S)`` tensor over the ``prod(S)`` consecutive features from ``c * prod(S)``. Weight column
``j`` of a conv's output channel ``o`` (dim 1 of the weight) reads input channel
``(o // (C_out / groups)) * (C_in / groups) + j``; column ``j`` of a linear reads feature ``j``.

Every function works on probabilities: ``keep[layer]`` is the probability that each output
channel is not pruned, and AND / OR of channels are taken as products of independent events. With
0/1 values this is exact boolean logic (``alive_channels``).

>>> from mixprec.graph.ir import Graph, Node
>>> g = Graph([Node("input", "input", [], (4,)), Node("a", "linear", ["input"], (3,), [(4,)], (3, 4)),
...            Node("b", "linear", ["a"], (2,), [(3,)], (2, 3))], output="b")
>>> import numpy as np
>>> alive = alive_channels(g, {"a": np.array([False, True, False]), "b": np.zeros(2, bool)})
>>> alive["a"].tolist(), live_columns(g, alive, "b")[0].tolist()
([True, False, True], [True, False, True])
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch

from .functions import maps_zero_to_zero
from .ir import WEIGHTED_OPS, Graph, Node

PRODUCER_OPS = ("input", "concat") + WEIGHTED_OPS  # the ops whose output channels are new
CHANNEL_PRESERVING_OPS = ("maxpool", "avgpool", "act", "table")


def produces_channels(node: Node) -> bool:
    """Whether ``node``'s output channels are new (its own tie group, every channel live): the input,
    conv / linear, concat, a product, a channel slice (copy or view), zeros around the channels or the
    positions (a pruned channel's constant would not be constant there), and a lookup table that does not map
    0 to 0."""
    return node.op in PRODUCER_OPS or node.op in ("mul", "slice", "narrow", "pad", "zeropad") or \
        (node.op == "table" and not maps_zero_to_zero(node.attrs))


def pins_inputs(node: Node) -> bool:
    """Whether ``node`` keeps every channel of its inputs alive: a concat, a product, a slice, a pad (of
    channels or positions), a table that maps 0 elsewhere."""
    return node.op in ("concat", "mul", "slice", "narrow", "pad", "zeropad") or \
        (node.op == "table" and not maps_zero_to_zero(node.attrs))


@dataclass(frozen=True)
class ChannelMap:
    """The static channel structure of a graph (see the module docstring)."""

    graph: Graph
    tie: dict[str, int]  # tensor -> its tie group (index into ``groups``)
    groups: list[tuple[str, ...]]  # producers of each tie group, in execution order
    block: dict[str, int]  # tensor -> dim-0 entries per channel of its tie group (flatten: prod(S))
    pinned: frozenset = frozenset()  # tie groups a concat reads: every channel stays alive
    always_live: frozenset = frozenset()  # producers without weights (input, concat, ...): every channel live

    def producers(self, name: str) -> tuple[str, ...]:
        """The producers tied to tensor ``name`` (``name`` itself where it is a producer)."""
        return self.groups[self.tie[name]]

    def tie_groups(self) -> list[tuple[str, ...]]:
        """Producers that must be pruned together to free a channel: the groups of two or more."""
        return [g for g in self.groups if len(g) > 1]

    def column_sources(self, layer: str) -> np.ndarray:
        """``(C_out, C_in / groups)`` for a conv, ``(C_out, F)`` for a linear: the index of the input
        tensor's dim 0 that weight column ``j`` of output channel ``o`` reads."""
        node = self.graph[layer]
        cout, cols = node.weight_shape[:2]
        if node.op == "linear":
            return np.broadcast_to(np.arange(cols), (cout, cols))
        per_group = cout // node.attrs.get("groups", 1)
        return (np.arange(cout) // per_group)[:, None] * cols + np.arange(cols)[None, :]

    def columns_per_channel(self, layer: str) -> int:
        """Consecutive weight columns one input channel feeds (after a flatten: its ``prod(S)``)."""
        return self.block[self.graph[layer].inputs[0]]

    # -- channel states ------------------------------------------------------------------------------
    def live(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probability that each channel of each tensor is live, ``keep[layer]`` (C_out,) the
        probability that each output channel is not pruned (missing layers: never pruned)."""
        out: dict[str, torch.Tensor] = {}
        for node in self.graph:
            out[node.name] = self._live_at(node, out, keep)
        return out

    def alive(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probability that each channel of each tensor is stored: any tied producer has it live."""
        group_alive = [torch.ones_like(live[producers[0]]) if g in self.pinned else _any([live[p] for p in producers])
                       for g, producers in enumerate(self.groups)]
        return {n.name: group_alive[self.tie[n.name]].repeat_interleave(self.block[n.name]) for n in self.graph}

    def tied_live(self, live: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        """Probability that a producer tied to ``layer`` other than itself has each channel live (a
        pinned group: a concat reading it keeps every channel, as if live)."""
        if self.tie[layer] in self.pinned:
            return torch.ones_like(live[layer])
        others = [live[p] for p in self.producers(layer) if p != layer]
        return _any(others) if others else torch.zeros_like(live[layer])

    def _live_at(self, node: Node, live: dict, keep: dict) -> torch.Tensor:
        if node.name in self.always_live:  # decided once in channel_map: live() runs every search step
            return torch.ones(node.out_channels, dtype=torch.float64)
        ins = [live[i] for i in node.inputs]
        if node.op in WEIGHTED_OPS:
            own = keep[node.name].double() if node.name in keep else torch.ones(node.out_channels, dtype=torch.float64)
            grouped = node.op == "conv" and node.attrs.get("groups", 1) > 1
            return own * _any_of_rows(ins[0][torch.from_numpy(self.column_sources(node.name))]) if grouped else own
        if node.op == "add":
            return _any(ins)
        if node.op == "flatten":
            return ins[0].repeat_interleave(prod(self.graph[node.inputs[0]].out_shape[1:]))
        return ins[0]


def channel_map(graph: Graph) -> ChannelMap:
    """The tie groups and channel blocks of ``graph``."""
    parent: dict[str, str] = {}
    block: dict[str, int] = {}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for node in graph:
        parent[node.name] = node.name
        if produces_channels(node):
            block[node.name] = 1
            continue
        src = graph[node.inputs[0]]
        if node.op == "flatten":
            block[node.name] = block[src.name] * prod(src.out_shape[1:])
        elif node.op in CHANNEL_PRESERVING_OPS or node.op == "add":
            block[node.name] = block[src.name]
        else:
            raise ValueError(f"node {node.name!r}: no channel rule for op {node.op!r}")
        if any(block[i] != block[src.name] for i in node.inputs):
            raise ValueError(f"add {node.name!r} sums tensors of different channel layouts")
        for i in node.inputs:
            parent[root(i)] = root(node.name)
    ids: dict[str, int] = {}
    groups: list[list[str]] = []
    for node in graph:
        r = root(node.name)
        if r not in ids:
            ids[r] = len(groups)
            groups.append([])
        if produces_channels(node):
            groups[ids[r]].append(node.name)
    pinned = frozenset(ids[root(i)] for n in graph if pins_inputs(n) for i in n.inputs)
    always_live = frozenset(n.name for n in graph if produces_channels(n) and not n.has_weights)
    return ChannelMap(graph, {n.name: ids[root(n.name)] for n in graph}, [tuple(g) for g in groups], block, pinned,
                      always_live)


def _any(probs: list[torch.Tensor]) -> torch.Tensor:
    """P(any) of independent events (exact OR on 0/1)."""
    if len(probs) == 1:
        return probs[0]
    return 1.0 - torch.stack([1.0 - p for p in probs]).prod(0)


def _any_of_rows(probs: torch.Tensor) -> torch.Tensor:
    return 1.0 - (1.0 - probs).prod(1)


# ----------------------------------------------------------------------------- boolean helpers


def alive_channels(graph: Graph, pruned: dict[str, np.ndarray],
                   cmap: ChannelMap | None = None) -> dict[str, np.ndarray]:
    """Which channels of each tensor are stored when ``pruned[layer]`` (bool, (C_out,)) output
    channels are pruned (layers not given: none)."""
    cmap = cmap or channel_map(graph)
    keep = {n: torch.from_numpy(~np.asarray(p, dtype=bool)).double() for n, p in pruned.items()}
    return {n: v.numpy() > 0.5 for n, v in cmap.alive(cmap.live(keep)).items()}


def live_columns(graph: Graph, alive: dict[str, np.ndarray], layer: str, cmap: ChannelMap | None = None) -> np.ndarray:
    """``(C_out, columns)`` bool: the weight columns of ``layer`` whose input channel is stored (a
    column is freed when its channel is not; rows are the layer's own ``alive[layer]``)."""
    cmap = cmap or channel_map(graph)
    return np.asarray(alive[graph[layer].inputs[0]])[cmap.column_sources(layer)]


def tie_groups(graph: Graph) -> list[tuple[str, ...]]:
    """Producers whose channels are tied through adds (see ``ChannelMap.tie_groups``)."""
    return channel_map(graph).tie_groups()
