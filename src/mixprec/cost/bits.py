"""Bit-widths of a whole graph: one tensor per weighted node and one per produced tensor.

A bits tensor tiles the value it describes (``granularity.expand``): shape ``(1, 1, 1, 1)`` is
per-tensor, ``(C, 1, 1, 1)`` per-channel, the full shape per-element. Bits are float tensors so
they can carry gradients from a learned quantizer; 0 weight bits means pruned.

Under fixed-point numerics an activation's elements may lie on grids of different coarseness
(power-of-two scales per channel or element): element ``e`` stores a ``b_e``-bit code whose value
on the tensor's common (finest) grid is ``code << shift_e`` (``lower.OutputGrid.post_shift``).
The assignment carries these post-shifts where they are not zero; they change nothing but the
storage of pooled outputs (``act_storage_bits``), which hold values of several grids.

>>> from mixprec.graph.ir import Graph, Node
>>> g = Graph([Node("input", "input", [], (4,)),
...            Node("fc", "linear", ["input"], (2,), [(4,)], (2, 4))], output="fc")
>>> a = uniform(g, weight_bits=4, act_bits=8)
>>> a.weight["fc"].shape, act_bits(a, g, "fc").item()
(torch.Size([1, 1]), 8.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..granularity import check_compatible, expand, reduce_to, shape_for
from ..graph.ir import PASSTHROUGH_OPS, Graph, zeropad_sides
from .targets import Target


@dataclass
class BitAssignment:
    weight: dict[str, torch.Tensor]  # weighted node -> bits tiling node.weight_shape
    act: dict[str, torch.Tensor]  # node -> bits of its output, tiling node.out_shape ("input" included)
    # node -> post-shift of each element's grid (fixed numerics), tiling node.out_shape; absent: 0
    act_shift: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> "BitAssignment":
        return BitAssignment({k: v.detach() for k, v in self.weight.items()},
                             {k: v.detach() for k, v in self.act.items()},
                             {k: v.detach() for k, v in self.act_shift.items()})


def assignment(qm) -> BitAssignment:
    """The model's bits (and its activation grids' post-shifts) as the cost model takes them
    (``qm``: a :class:`mixprec.nn.model.QuantModel`)."""
    return BitAssignment(qm.weight_bits(), qm.act_bits(), qm.act_shifts())


def uniform(graph: Graph, weight_bits: float, act_bits: float, granularity: str = "per-tensor",
            act_granularity: str = "per-tensor") -> BitAssignment:
    """The same width everywhere, as bits tensors of the given granularities."""
    weight = {n.name: torch.full(shape_for(granularity, n.weight_shape), float(weight_bits))
              for n in graph.weighted()}
    act = {n.name: torch.full(shape_for(act_granularity, n.out_shape), float(act_bits))
           for n in graph if n.op not in PASSTHROUGH_OPS}
    return BitAssignment(weight, act)


def min_assignment(graph: Graph, target: Target, allow_pruning: bool = False,
                   weight_granularity: str | None = None) -> BitAssignment:
    """The smallest widths ``target`` supports everywhere, at ``weight_granularity`` (default: the
    target's coarsest) and the coarsest activation granularity.

    Weights take the smallest width that holds values. With ``allow_pruning`` (where the target
    allows it) every weighted layer but the last keeps only its first group, as the budget step
    may leave it: a layer of zeros is no model, and no output channel is pruned. Per element, a
    group is one weight and any weight may be 0 bits, the output layer's too (its channels keep
    their biases): every layer keeps one weight.
    """
    gran = weight_granularity or _coarsest(target.weight_granularities)
    a = uniform(graph, target.min_weight_bits, target.min_act_bits, gran, _coarsest(target.act_granularities))
    if allow_pruning and target.allows_pruning:
        last = graph.weighted()[-1].name if graph.weighted() else None
        for name, bits in a.weight.items():
            if gran == "per-element":
                bits.view(-1)[1:] = 0.0
            elif name != last and bits.shape[0] > 1:
                bits[1:] = 0.0
    return a


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

    Pass-through nodes (maxpool, flatten, narrow) without an entry take the bits of their grid source,
    reshaped onto their own output: flatten keeps the element order, narrow its channels; maxpool keeps per-channel
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
    src = act_bits(assignment, graph, node.inputs[0])
    if node.op == "narrow":
        return _channels(src, graph[node.inputs[0]].out_shape, node.attrs)
    return _onto(src, graph[node.inputs[0]].out_shape, node.out_shape)


def _channels(t: torch.Tensor, src_shape: tuple[int, ...], attrs: dict) -> torch.Tensor:
    """A view's channels ``start:stop`` of a per-tensor-or-finer tensor tiling ``src_shape``."""
    if t.numel() == 1 or t.shape[0] == 1:
        return t
    return expand(t, src_shape)[attrs["start"]:attrs["stop"]]


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


# ----------------------------------------------------------------------------- storage


POOL_OPS = ("maxpool", "avgpool")


def act_shift(assignment: BitAssignment, graph: Graph, name: str) -> torch.Tensor | None:
    """Post-shift of each element of the tensor produced by ``name`` as its buffer holds it
    (``value = code << shift`` on the common grid), tiling ``out_shape``; None where all are 0.

    Requantizing nodes and the input: the assignment's entry. Maxpool: the coarsest grid of each
    window's elements (the window minimum: every candidate value lies on it); avgpool: 0 (the
    rounded mean lies on the common grid); flatten: its source's, in the same element order; zeropad:
    its source's, each zero on its nearest element's.
    """
    node = graph[name]
    if node.op not in PASSTHROUGH_OPS:
        shift = assignment.act_shift.get(name)
        if shift is None or not bool((shift != 0).any()):
            return None
        check_compatible(tuple(shift.shape), node.out_shape)
        return shift
    src = node.inputs[0]
    shift = act_shift(assignment, graph, src)
    if shift is None or node.op == "avgpool":
        return None
    if node.op == "narrow":
        return _channels(shift, graph[src].out_shape, node.attrs)
    full = expand(shift, graph[src].out_shape)
    if node.op == "flatten":
        return full.reshape(node.out_shape)
    if node.op == "zeropad":  # each element keeps its grid; a zero lies on its neighbour's (a channel's stays one)
        return F.pad(full.double()[None], zeropad_sides(node.attrs), mode="replicate")[0].to(full.dtype)
    pooled = -_window_max(-full.double(), node.attrs)
    return pooled if bool((pooled != 0).any()) else None


def act_storage_bits(assignment: BitAssignment, graph: Graph, name: str) -> torch.Tensor:
    """Bits each element of the tensor produced by ``name`` takes in its buffer, tiling ``out_shape``.

    ``act_bits``, except for pooling over a grid with post-shifts: a pooled element holds the value
    of (maxpool) or the mean of (avgpool) elements ``j`` of its window, each ``b_j + shift_j`` bits
    wide on the common grid, stored relative to its own post-shift ``s`` (``act_shift``), hence

        storage_e = max_{j in window(e)} (b_j + shift_j) - s_e

    (two's complement ranges nest, so the widest element bounds the mean too), computed per element
    and kept at the source's granularity when that holds it. Differentiable in the bits (a window
    maximum); the shifts are constants of the grids.

    >>> from mixprec.graph.ir import Graph, Node
    >>> g = Graph([Node("input", "input", [], (1, 4)),
    ...            Node("pool", "avgpool", ["input"], (1, 2), [(1, 4)],
    ...                 attrs={"dims": 1, "kernel_size": (2,), "stride": (2,), "padding": (0,)})], output="pool")
    >>> a = BitAssignment({}, {"input": torch.tensor([[4.0, 2.0, 4.0, 4.0]])},
    ...                   {"input": torch.tensor([[0.0, 2.0, 0.0, 0.0]])})
    >>> act_storage_bits(a, g, "pool").tolist()  # 2-bit codes << 2 need 4 bits; the mean of 4-bit values 4
    [[4.0, 4.0]]
    """
    node = graph[name]
    if name in assignment.act or node.op not in PASSTHROUGH_OPS:
        return act_bits(assignment, graph, name)
    src = node.inputs[0]
    src_shape = graph[src].out_shape
    bits = act_storage_bits(assignment, graph, src)
    shift = act_shift(assignment, graph, src) if node.op in POOL_OPS else None
    if node.op == "narrow":
        return _channels(bits, src_shape, node.attrs)
    if shift is None:
        return _onto(bits, src_shape, node.out_shape)
    wide = expand(bits, src_shape) + expand(shift, src_shape).to(bits)
    need = _window_max(wide, node.attrs)
    own = act_shift(assignment, graph, name)
    if own is not None:
        need = need - own.to(need)
    return reduce_to(need, _common_tiling([bits, shift], node.out_shape), "amax")


def _window_max(x: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Maximum over each pooling window of a (C, *spatial) tensor (padding never wins)."""
    fn = F.max_pool1d if attrs["dims"] == 1 else F.max_pool2d
    return fn(x[None], attrs["kernel_size"], attrs["stride"], attrs["padding"])[0]


def _common_tiling(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The coarsest parameter shape over ``shape`` whose groups every tensor is constant on:
    per-tensor, one entry per channel group (per-channel / per-slice), else per-element."""
    firsts = set()
    for t in tensors:
        padded = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
        if any(d != 1 for d in padded[1:]):
            return tuple(shape)
        if padded[0] != 1:
            firsts.add(padded[0])
    if len(firsts) > 1:
        return tuple(shape)
    return (firsts.pop() if firsts else 1,) + (1,) * (len(shape) - 1)
