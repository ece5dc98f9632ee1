"""Compute cost of a layer: MACs, BOPs, EBOPs, cycles and energy, differentiable in the bits.

- BOPs: every MAC costs ``b_in * b_w``: ``positions * sum_e b_w[e] * b_in[cin(e)]``.
- EBOPs (HGQ): each multiplier counted once, no spatial factor: ``sum_e b_w[e] * b_in[cin(e)]``;
  dense: ``sum_ij b_in[i] * b_w[i, j]``. Pass ``effective_bits(w_int)`` as weight bits for the
  deployed figure, or nominal bits.
- Cycles: per output channel ``MACs_c / macs_per_cycle[b_a][b_w_c]`` at the table entry of the next
  supported width up (0-bit channels: pruned, 0 cycles), plus elementwise work of add/act/pool.
- Energy: ``cycles / clock_hz * power_mw`` is mJ; times 1e3 is uJ.

Input activation bits are reduced to one value per input channel (the maximum over positions: a
multiplier must take the widest input it sees; HGQ does the same for convolutions).

>>> import torch
>>> from mixprec.graph.ir import Node
>>> fc = Node("fc", "linear", ["x"], (2,), [(3,)], (2, 3))
>>> float(ebops(fc, torch.tensor([[2.0]]), torch.tensor([4.0])))  # 6 weights * 2 * 4
48.0
>>> effective_bits(torch.tensor([0, 1, -1, 3, 4, -8])).tolist()
[0.0, 1.0, 1.0, 2.0, 1.0, 1.0]
"""
from __future__ import annotations

from math import prod

import torch

from ..granularity import expand
from ..graph.ir import Node
from .rounding import EPS, ste
from .targets import Target


def effective_bits(w_int: torch.Tensor) -> torch.Tensor:
    """Bits a constant multiplier by the integer weight ``k`` needs: from its highest to its lowest
    set bit (no sign bit), 0 for ``k = 0``. Trailing zeros are a shift, free in hardware, so a
    weight costs the same on its own fixed-point grid as on a layer's common finer grid (where
    lowering puts HGQ's per-element grids); on its own grid this is at most HGQ's ``relu(I + f)``."""
    mag = w_int.detach().abs().to(torch.int64)
    low = mag & -mag  # the lowest set bit
    top = torch.floor(torch.log2(mag.clamp_min(1).to(torch.float64)))
    bits = top - torch.log2(low.clamp_min(1).to(torch.float64)) + 1
    return torch.where(mag > 0, bits, torch.zeros_like(bits)).to(torch.float32)


def positions(node: Node) -> int:
    """Output positions a weighted node evaluates each weight at (1 for linear)."""
    return prod(node.out_shape[1:]) if node.op == "conv" else 1


def _in_shape(node: Node) -> tuple[int, ...]:
    if not node.in_shapes:
        raise ValueError(f"node {node.name!r} has no in_shapes; the compute cost needs its input shape")
    return tuple(node.in_shapes[0])


def input_channel_bits(node: Node, in_bits: torch.Tensor) -> torch.Tensor:
    """Input activation bits per input channel (conv: dim 0; linear: the feature dim), max over the rest."""
    shape = _in_shape(node)
    full = expand(in_bits, shape)
    if node.op == "conv":
        return full.reshape(shape[0], -1).amax(dim=1)
    return full.reshape(-1, shape[-1]).amax(dim=0)


def weight_input_bits(node: Node, in_bits: torch.Tensor) -> torch.Tensor:
    """``b_in[cin(e)]`` for every weight element ``e``, broadcastable to ``node.weight_shape``.

    Grouped / depthwise conv: output channel ``o`` of group ``g = o // (C_out / groups)`` reads input
    channels ``g * (C_in / groups) + j`` for its ``j``-th weight input slot.
    """
    cin = input_channel_bits(node, in_bits)
    if node.op == "linear":
        return cin.reshape(1, -1)
    cout, cin_g = node.weight_shape[:2]
    groups = node.attrs.get("groups", 1)
    arange = lambda n: torch.arange(n, device=cin.device)  # noqa: E731
    index = (arange(cout) // (cout // groups))[:, None] * cin_g + arange(cin_g)[None, :]
    return cin[index].reshape((cout, cin_g) + (1,) * (len(node.weight_shape) - 2))


def ebops(node: Node, wbits: torch.Tensor, in_bits: torch.Tensor) -> torch.Tensor:
    """HGQ effective bit operations: ``sum_e b_w[e] * b_in[cin(e)]`` (no spatial factor)."""
    return (expand(wbits, node.weight_shape) * weight_input_bits(node, in_bits)).sum()


def bops(node: Node, wbits: torch.Tensor, in_bits: torch.Tensor) -> torch.Tensor:
    """Bit operations: ``b_in * b_w`` summed over every MAC (EBOPs times output positions)."""
    return ebops(node, wbits, in_bits) * positions(node)


# ----------------------------------------------------------------------------- latency


def cycles_per_mac(target: Target, a_bits: torch.Tensor, w_bits: torch.Tensor) -> torch.Tensor:
    """``1 / macs_per_cycle`` at the next supported widths up (0 weight bits: 0), broadcast over inputs.

    Forward: the table entry (widths above the table use its largest entry). Backward: the gradient
    of the bilinear interpolation of the table over the widths (weight width 0 = 0 cycles), so a
    narrower width that is faster in the table gets a gradient towards it. At a table width the
    slope is that of the segment below it (what stepping down would save).
    """
    keys_a = sorted(target.macs_per_cycle)
    keys_w = [0] + sorted(next(iter(target.macs_per_cycle.values())))
    like = {"dtype": torch.float32, "device": w_bits.device}
    grid = torch.tensor([[0.0] + [1.0 / target.macs_per_cycle[a][w] for w in keys_w[1:]] for a in keys_a], **like)
    a_bits, w_bits = (t.contiguous() for t in torch.broadcast_tensors(a_bits.to(**like), w_bits.to(**like)))
    ka, kw = torch.tensor(keys_a, **like), torch.tensor(keys_w, **like)
    exact = grid[_key_index(a_bits, ka), _key_index(w_bits, kw)]
    return ste(exact, _bilinear(grid, ka, kw, a_bits, w_bits))


def _key_index(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(x.detach() - EPS, keys).clamp_max(len(keys) - 1)


def _interp_coords(x: torch.Tensor, keys: torch.Tensor):
    if len(keys) == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    hi = torch.bucketize(x.detach(), keys).clamp(1, len(keys) - 1)
    lo = hi - 1
    return lo, hi, (x - keys[lo]) / (keys[hi] - keys[lo])


def _bilinear(grid, ka, kw, a, w) -> torch.Tensor:
    a0, a1, ta = _interp_coords(a, ka)
    w0, w1, tw = _interp_coords(w, kw)
    low = grid[a0, w0] * (1 - tw) + grid[a0, w1] * tw
    high = grid[a1, w0] * (1 - tw) + grid[a1, w1] * tw
    return low * (1 - ta) + high * ta


def mac_cycles(node: Node, wbits: torch.Tensor, in_bits: torch.Tensor, target: Target) -> torch.Tensor:
    """Cycles of a weighted node: ``sum_c MACs_c / macs_per_cycle[b_a][b_w_c]``.

    ``b_w_c`` is the widest weight of channel ``c`` (a kernel runs one width per channel), ``b_a`` the
    widest input activation; a channel of all-0 bits is pruned and costs nothing.
    """
    cout = node.weight_shape[0]
    w_c = expand(wbits, node.weight_shape).reshape(cout, -1).amax(dim=1)
    a = input_channel_bits(node, in_bits).amax()
    return (node.macs / cout) * cycles_per_mac(target, a, w_c).sum()


def elementwise_ops(node: Node) -> int:
    """Elementwise work of a non-MAC op: one op per output element (add, mul, concat, slice, pad, zeropad, table, act), times the window
    for pooling; 0 for input, flatten and narrow (views) and weighted ops (requantization is in their MAC rate)."""
    if node.op in ("add", "mul", "concat", "slice", "pad", "zeropad", "table", "act"):
        return node.out_numel
    if node.op in ("maxpool", "avgpool"):
        return node.out_numel * prod(node.attrs["kernel_size"])
    return 0


def elementwise_cycles(node: Node, target: Target) -> float:
    return elementwise_ops(node) / target.elementwise_per_cycle


def energy_uj(cycles: torch.Tensor | float, target: Target) -> torch.Tensor | float:
    """Energy in microjoules: ``cycles / clock_hz`` seconds at ``power_mw`` milliwatts gives mJ; x 1e3 -> uJ.

    >>> from mixprec.cost.targets import load_target
    >>> round(energy_uj(1e6, load_target("mpic")), 6)  # 4 ms at 5.4 mW
    21.6
    """
    return cycles / target.clock_hz * target.power_mw * 1e3
