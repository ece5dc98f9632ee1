"""Static checks of an integer program before export: can any int32 intermediate overflow?

Deployed kernels (the C library, CMSIS-NN, TFLite-Micro) accumulate in int32 where the NumPy
reference uses int64, so they agree only when no int32 intermediate can overflow. These pure
functions bound every such intermediate over *all* inputs (worst case, not the test set) from the
integer ranges the grids allow:

* conv / linear accumulator: ``|bias| + sum over the receptive field of |w| * max|x|`` per output
  channel (the bound holds for every partial sum too, whatever the summation order);
* TFLite-style requantization ``MultiplyByQuantizedMultiplier``: the accumulator shifted left by the
  positive part of the shift (``x * 2**left`` is an int32 product there);
* TFLite-style add: both inputs shifted left by ``left_shift``, each rescaled, their sum, and the
  final requantization's left shift; the fixed-point add: both aligned inputs and their sum;
* average pooling: the window sum (plus the rounding half).

Power-of-two requantization (``fixed`` numerics) is done with 64-bit intermediates by the C
library, so only its int32 input is constrained. Bounds are computed in float64 (exact for integers
below 2**53; anything larger overflows int32 anyway).

>>> import numpy as np
>>> from mixprec.lower import IntGraph, IntNode, OutputGrid
>>> from mixprec.numerics import Requant
>>> g8 = lambda shape: OutputGrid(1.0, np.array(8), True, np.array(-128), np.array(127), np.array(1.0))
>>> rq = Requant("tflm", np.array([1 << 30]), np.array([-10]))
>>> fc = IntNode("fc", "linear", ["input"], {}, (2,), g8((2,)),
...              {"weight": np.full((2, 1000), 30000), "bias": np.zeros(2, np.int64), "requant": rq})
>>> ig = IntGraph([IntNode("input", "input", [], {}, (1000,), g8((1000,))), fc], "fc", "scaled", 1.0)
>>> check_int32(ig)
Traceback (most recent call last):
...
mixprec.export.base.ExportError: layer 'fc' (linear): the worst-case int32 accumulator is 3840000000 > 2147483647...
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..execute import NumpyKernels
from ..lower import IntGraph, IntNode
from ..numerics import INT32_MAX
from .base import ExportError

LIMIT = float(INT32_MAX)


@dataclass
class Bound:
    """The worst-case magnitude of one int32 intermediate of one layer."""

    layer: str
    op: str
    what: str
    bound: float

    @property
    def ok(self) -> bool:
        return self.bound <= LIMIT

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "what": self.what, "bound": int(self.bound),
                "headroom_bits": float(np.log2(LIMIT / max(self.bound, 1.0)))}


def _full(a, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(a, dtype=np.float64), shape)


def _grid_range(node: IntNode) -> tuple[np.ndarray, np.ndarray]:
    g = node.grid
    shape = node.out_shape
    p = 0 if g.post_shift is None else np.asarray(g.post_shift)
    scale = _full(np.exp2(p), shape)
    return _full(g.lo, shape) * scale, _full(g.hi, shape) * scale


def _window(x: np.ndarray, attrs: dict, fill: float) -> np.ndarray:
    """(C, *out, *kernel) windows of one (C, *spatial) array."""
    dims = attrs["dims"]
    win = NumpyKernels._windows(x[None], attrs["kernel_size"], attrs["stride"], attrs["padding"], (1,) * dims, fill)
    return win[0]


def value_ranges(ig: IntGraph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (lo, hi)``: every integer each element of each tensor can take (float64 arrays of
    the node's ``out_shape``), over all inputs. Requantizing nodes give their clamp range on the
    common grid; pooling, zero padding, flatten and views follow their input."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in ig.nodes:
        if node.grid is not None:
            out[node.name] = _grid_range(node)
            continue
        lo, hi = out[node.inputs[0]]
        if node.op == "flatten":
            out[node.name] = (lo.reshape(node.out_shape), hi.reshape(node.out_shape))
        elif node.op == "narrow":
            cut = slice(node.attrs["start"], node.attrs["stop"])
            out[node.name] = (lo[cut], hi[cut])
        elif node.op == "zeropad":
            sides = [(0, 0)] + list(zip(node.attrs["padding"], node.attrs["padding_after"]))
            out[node.name] = (np.pad(np.broadcast_to(lo, ig[node.inputs[0]].out_shape), sides),
                              np.pad(np.broadcast_to(hi, ig[node.inputs[0]].out_shape), sides))
        elif node.op in ("maxpool", "avgpool"):
            fill = 0.0 if node.op == "avgpool" else None  # maxpool ignores padding
            dims = tuple(range(-node.attrs["dims"], 0))
            wlo = _window(lo, node.attrs, np.inf if fill is None else fill).min(axis=dims)
            whi = _window(hi, node.attrs, -np.inf if fill is None else fill).max(axis=dims)
            out[node.name] = (wlo.reshape(node.out_shape), whi.reshape(node.out_shape))
        else:
            raise ExportError(f"layer {node.name!r}: op {node.op!r} has no integer range rule")
    return out


def _absmax(r: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.maximum(np.abs(r[0]), np.abs(r[1]))


def _left(shift, shape) -> np.ndarray:
    return np.exp2(np.maximum(_full(shift, shape), 0.0))


def _rescaled(x_abs: np.ndarray, rq, shape) -> np.ndarray:
    """A bound on ``|requant(x)|`` for ``|x| <= x_abs`` (tflm: ``x * M * 2**(shift-31)``, rounded)."""
    m = _full(rq.multiplier, shape)
    return np.floor(x_abs * m * np.exp2(_full(rq.shift, shape) - 31.0)) + 1.0


def accumulator_bound(node: IntNode, x_abs: np.ndarray) -> np.ndarray:
    """Worst-case ``|acc|`` per output channel of a conv/linear node given ``max|x|`` per input element."""
    w = np.abs(np.asarray(node.params["weight"], dtype=np.float64))
    bias = np.abs(np.asarray(node.params["bias"], dtype=np.float64)).reshape(-1)
    cout = w.shape[0]
    if node.op == "linear":
        return bias + w @ x_abs.reshape(-1)
    groups = node.attrs["groups"]
    ch = x_abs.reshape(x_abs.shape[0], -1).max(axis=1)  # per input channel
    cig, cog = ch.size // groups, cout // groups
    per_in = w.reshape(cout, cig, -1).sum(axis=2)  # sum of |w| per (out, in-of-group) channel
    group_of = np.arange(cout) // cog
    x_of = ch.reshape(groups, cig)[group_of]  # (cout, cig)
    return bias + (per_in * x_of).sum(axis=1)


def int32_bounds(ig: IntGraph) -> list[Bound]:
    """Every constrained int32 intermediate of ``ig`` with its worst-case magnitude."""
    ranges = value_ranges(ig)
    bounds: list[Bound] = []

    def add(node, what, value):
        bounds.append(Bound(node.name, node.op, what, float(np.max(value)) if np.size(value) else 0.0))

    for node in ig.nodes:
        p, shape = node.params, node.out_shape
        if node.op in ("conv", "linear"):
            acc = accumulator_bound(node, _absmax(ranges[node.inputs[0]]))
            add(node, "accumulator", acc)
            if p["requant"].kind == "tflm" and np.max(p["requant"].shift) > 0:
                acc_full = _full(acc.reshape((-1,) + (1,) * (len(shape) - 1)), shape)
                add(node, "requantization input x * 2**left_shift", acc_full * _left(p["requant"].shift, shape))
        elif node.op in ("act", "slice"):
            x = _absmax(ranges[node.inputs[0]])
            if node.op == "slice":
                x = x[node.attrs["start"]:node.attrs["stop"]]
            add(node, "input", x)
            if p["requant"].kind == "tflm" and np.max(p["requant"].shift) > 0:
                add(node, "requantization input x * 2**left_shift", x * _left(p["requant"].shift, shape))
        elif node.op == "mul":
            a, b = (_absmax(ranges[i]) for i in node.inputs)
            prod_ = a * b.reshape(b.shape + (1,) * (a.ndim - b.ndim))
            add(node, "product", prod_)
            if p["requant"].kind == "tflm" and np.max(p["requant"].shift) > 0:
                add(node, "requantization input x * 2**left_shift", prod_ * _left(p["requant"].shift, shape))
        elif node.op in ("concat", "pad"):  # each input rescaled onto its channels of the output grid
            parts = [("", node.inputs[0], p["requant"])] if node.op == "pad" else \
                [(f" {i}", src, p[f"requant_{i}"]) for i, src in enumerate(node.inputs)]
            for label, src, rq in parts:
                x = _absmax(ranges[src])
                add(node, f"input{label}", x)
                if rq.kind == "tflm" and np.max(rq.shift) > 0:
                    add(node, f"requantization input{label} x * 2**left_shift", x * _left(rq.shift, x.shape))
        elif node.op == "add":
            a, b = (_absmax(ranges[i]) for i in node.inputs)
            if "left_shift" in p:
                ls = 2.0 ** p["left_shift"]
                add(node, f"input a << {p['left_shift']}", a * ls * _left(p["requant_a"].shift, shape))
                add(node, f"input b << {p['left_shift']}", b * ls * _left(p["requant_b"].shift, shape))
                total = _rescaled(a * ls, p["requant_a"], shape) + _rescaled(b * ls, p["requant_b"], shape)
                add(node, "sum of the rescaled inputs", total)
                add(node, "requantization input x * 2**left_shift", total * _left(p["requant"].shift, shape))
            else:
                sa, sb = a * 2.0 ** p["align_a"], b * 2.0 ** p["align_b"]
                add(node, f"input a << {p['align_a']}", sa)
                add(node, f"input b << {p['align_b']}", sb)
                add(node, "sum of the aligned inputs", sa + sb)
        elif node.op == "avgpool":
            x = _absmax(ranges[node.inputs[0]])
            n = int(np.prod(node.attrs["kernel_size"]))
            dims = tuple(range(-node.attrs["dims"], 0))
            add(node, "window sum (+ rounding half)", _window(x, node.attrs, 0.0).sum(axis=dims) + n // 2)
    return bounds


def check_int32(ig: IntGraph) -> list[Bound]:
    """Raise :class:`ExportError` naming the layer and the bound if any int32 intermediate could
    overflow; otherwise return every bound (for the artifact's details)."""
    bounds = int32_bounds(ig)
    bad = [b for b in bounds if not b.ok]
    if bad:
        lines = [f"layer {b.layer!r} ({b.op}): the worst-case int32 {b.what} is {int(b.bound)} > {INT32_MAX}"
                 for b in bad]
        raise ExportError("; ".join(lines) + " (int32 overflow possible: lower the bit-widths of the weights or "
                          "inputs of these layers, or split them)")
    return bounds
