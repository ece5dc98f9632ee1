"""QONNX export: the integer program as an ONNX graph with QONNX ``Quant`` nodes, bit-exact.

How the graph is laid out (and why it is exact):

* **Weights** keep their true quantizers: ``Quant(W, scale, 0, bits, signed=1, narrow=1)`` with
  the per-channel scale tensor and the bit width of the layer (``W`` holds ``k * scale`` in
  float32, so the Quant recovers every ``k``). A second, scale-1 ``Quant`` after dividing by the
  channel scale gives the integer weights, typed ``INT<b>`` for qonnx's datatype inference (the
  same Div / scale-1 Quant split that qonnx's ``ExtractQuantScaleZeroPt`` produces).
* **Activations** travel as integers held in float32 ("carrier" tensors), each produced by a
  scale-1 ``Quant`` with the tensor's bit width and signedness: it clips to the range and types
  the tensor ``INT<b>``/``UINT<b>``, so qonnx sees every MAC's precision pair. The network input
  is quantized by a ``Quant`` with its true scale, computed in float64 like the reference.
* **Accumulation**: ``Conv``/``Gemm`` in float32 on integer values are exact while every partial
  sum stays below 2**24, in any summation order (ONNX Runtime's CPU kernels sum products: im2col
  + GEMM or direct convolution; a Winograd or FFT convolution would not be exact). The exporter
  proves the bound per layer from the integer weights and the input range and refuses
  (``ExportError``) otherwise: ONNX Runtime has no double or wide-integer Conv. Bias, requantization (TFLite-Micro multiplier +
  shift with its double rounding, or the fixed-point shift rounding half up), clamps and average
  pooling division then run on int64 with integer ONNX ops (Mul, Add, Mod, exact Div, Where,
  Max/Min) whose results are exact; int64 overflow is bounded statically too.

The graph is produced by the torch dynamo exporter: the Quant node and the integer kernels are
``torch.library`` custom ops with onnxscript translations. Run with
``qonnx.core.onnx_exec.execute_onnx``; :meth:`QonnxExporter.run` returns the output integers.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..execute import explicit_padding
from ..granularity import expand, reduce_to
from ..graph.ir import zeropad_sides
from ..lower import IntGraph, IntNode
from ..numerics import (bits_for_range, div_round_away, multiply_by_quantized_multiplier, qrange, saturate, shift_round)
from .base import Artifact, ExportError, ExportInput
from .names import identifiers

log = logging.getLogger(__name__)

QONNX_DOMAIN = "qonnx.custom_op.general"
FLOAT32_EXACT = 2**24  # integers below this add exactly in float32
INT64_SAFE = 2**62
POOL_EXACT = 2**20  # AveragePool's mean times the window size rounds back to the sum below this
MODEL_FILE = "model.onnx"
EXPORT_BATCH = 1


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mixprec_qonnx::quant", mutates_args=())
def quant_op(x: torch.Tensor, scale: torch.Tensor, zeropt: torch.Tensor, bitwidth: torch.Tensor,
             signed: int, narrow: int) -> torch.Tensor:
    """QONNX ``Quant`` (rounding ROUND = half to even); float32 output like qonnx's executor."""
    lo, hi = qrange(bitwidth.to(torch.float64), bool(signed), bool(narrow))
    y = x / scale + zeropt
    y = torch.minimum(torch.maximum(y, lo.to(y.dtype)), hi.to(y.dtype))
    return ((torch.round(y) - zeropt) * scale).to(torch.float32)


@quant_op.register_fake
def _(x, scale, zeropt, bitwidth, signed, narrow):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


@torch.library.custom_op("mixprec_qonnx::mbqm", mutates_args=())
def mbqm_op(x: torch.Tensor, left: torch.Tensor, multiplier: torch.Tensor, pot: torch.Tensor,
            threshold: torch.Tensor) -> torch.Tensor:
    """TFLite-Micro ``MultiplyByQuantizedMultiplier`` on int64 (``left = 2**max(shift, 0)``,
    ``pot = 2**max(-shift, 0)``, ``threshold = (pot - 1) >> 1``)."""
    shift = torch.log2(left.double()).round().long() - torch.log2(pot.double()).round().long()
    return multiply_by_quantized_multiplier(x, multiplier, shift)


@mbqm_op.register_fake
def _(x, left, multiplier, pot, threshold):
    return torch.empty_like(x)


@torch.library.custom_op("mixprec_qonnx::shift_round", mutates_args=())
def shift_round_op(x: torch.Tensor, half: torch.Tensor, pot: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``floor((x + half) / pot) * left`` on int64: the fixed-point shift rounding half up."""
    shift = torch.log2(pot.double()).round().long() - torch.log2(left.double()).round().long()
    return shift_round(x, shift)


@shift_round_op.register_fake
def _(x, half, pot, left):
    return torch.empty_like(x)


@torch.library.custom_op("mixprec_qonnx::div_round_away", mutates_args=())
def div_round_away_op(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return div_round_away(x, n)


@div_round_away_op.register_fake
def _(x, n):
    return torch.empty_like(x)


@torch.library.custom_op("mixprec_qonnx::clip_int", mutates_args=())
def clip_int_op(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return saturate(x, lo, hi)


@clip_int_op.register_fake
def _(x, lo, hi):
    return torch.empty_like(x)


def _quant_schema():
    """An ONNX OpSchema for QONNX ``Quant`` (not registered globally; onnxscript needs one to emit it)."""
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    return OpSchema(
        "Quant", QONNX_DOMAIN, 1,
        inputs=[P("X", "T1"), P("scale", "T1"), P("zeropt", "T1"), P("bitwidth", "T1")],
        outputs=[P("Y", "T2")],
        type_constraints=[("T1", ["tensor(float)", "tensor(double)"], "input and quantizer parameters"),
                          ("T2", ["tensor(float)"], "qonnx executes Quant to float32")],
        attributes=[OpSchema.Attribute("signed", OpSchema.AttrType.INT, "signed range"),
                    OpSchema.Attribute("narrow", OpSchema.AttrType.INT, "drop the most negative code"),
                    OpSchema.Attribute("rounding_mode", OpSchema.AttrType.STRING, "ROUND: half to even")])


def _translations() -> dict:
    """onnxscript translations: QONNX ``Quant`` and integer kernels made of standard ONNX ops whose
    int64 results are exact (``Div`` only ever divides exact multiples)."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    qonnx_quant = Op(Opset(QONNX_DOMAIN, 1), "Quant", _quant_schema())

    def i64(v: int):
        return op.Constant(value_int=int(v))

    def floor_div(x, d):  # exact: x - mod(x, d) is a multiple of d; Mod(fmod=0) has d's sign
        r = op.Mod(x, d)
        return op.Div(op.Sub(x, r), d), r

    def quant(x, scale, zeropt, bitwidth, signed: int, narrow: int):
        return qonnx_quant(x, scale, zeropt, bitwidth, signed=signed, narrow=narrow, rounding_mode="ROUND")

    def mbqm(x, left, multiplier, pot, threshold):
        ab = op.Mul(op.Mul(x, left), multiplier)
        nudge = op.Where(op.GreaterOrEqual(ab, i64(0)), i64(1 << 30), i64(1 - (1 << 30)))
        v = op.Add(ab, nudge)
        mag, _ = floor_div(op.Abs(v), i64(1 << 31))  # |v| // 2**31 ...
        high = op.Where(op.Less(v, i64(0)), op.Neg(mag), mag)  # ... signed: truncation toward zero
        fl, rem = floor_div(high, pot)  # RoundingDivideByPOT: floor, then up when past the threshold
        thr = op.Add(threshold, op.Cast(op.Less(high, i64(0)), to=7))
        return op.Add(fl, op.Cast(op.Greater(rem, thr), to=7))

    def shift_round_(x, half, pot, left):
        fl, _ = floor_div(op.Add(x, half), pot)
        return op.Mul(fl, left)

    def div_round_away_(x, n):
        half = op.Div(n, i64(2))  # n > 0: exact floor
        q, _ = floor_div(op.Add(op.Abs(x), half), n)
        return op.Where(op.GreaterOrEqual(x, i64(0)), q, op.Neg(q))

    def clip_int(x, lo, hi):
        return op.Min(op.Max(x, lo), hi)

    ops = torch.ops.mixprec_qonnx
    return {ops.quant.default: quant, ops.mbqm.default: mbqm, ops.shift_round.default: shift_round_,
            ops.div_round_away.default: div_round_away_, ops.clip_int.default: clip_int}


# ----------------------------------------------------------------------------- the program


def _i64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def _batched(a: np.ndarray) -> np.ndarray:
    """Prefix a batch dimension of 1 to a parameter that broadcasts against one sample."""
    return np.asarray(a)[None]


@dataclass
class _ActSpec:
    """How a requantizing node's integers are clipped and typed."""

    bits: int  # the scale-1 Quant's (scalar) bit width
    signed: bool
    clip: tuple[np.ndarray, np.ndarray] | None  # explicit int64 clamp when narrower than the Quant's range
    post: np.ndarray | None  # left shift onto the common grid (per-element precision)
    note: str | None = None


@dataclass
class _WeightGroup:
    channels: np.ndarray  # output channel indices
    w_real: np.ndarray  # float32, k * scale
    scale: np.ndarray  # float32, the quantizer's scale (per channel or per tensor), broadcastable
    channel_scale: np.ndarray  # float32, dividing onto the integer weights
    bits: int
    w_int: np.ndarray


@dataclass
class _Plan:
    steps: list[tuple[IntNode, dict]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs: dict[str, int] = field(default_factory=dict)  # per tensor: bound on |integer|
    bits: dict[str, tuple[int, bool]] = field(default_factory=dict)  # per tensor: Quant width, signed
    weight_bits: dict[str, int] = field(default_factory=dict)  # per weighted node: sum of element bits
    acc_bounds: dict[str, int] = field(default_factory=dict)  # per weighted node: bound on |partial sums|


def _act_spec(node: IntNode) -> _ActSpec:
    g = node.grid
    bits = np.asarray(g.bits)
    lo, hi = np.asarray(g.lo, dtype=np.int64), np.asarray(g.hi, dtype=np.int64)
    if g.post_shift is None and np.all(bits == bits.flat[0]):
        b = int(bits.flat[0])
        if b < 1 or (b == 1 and g.signed):
            raise ExportError(f"node {node.name!r}: a {b}-bit {'signed' if g.signed else 'unsigned'} activation "
                              f"has no QONNX Quant equivalent (a signed 1-bit Quant is bipolar)")
        qlo, qhi = qrange(b, g.signed)
        clip = None if (np.all(lo == qlo) and np.all(hi == qhi)) else (lo, hi)
        return _ActSpec(b, g.signed, clip, None)
    post = None if g.post_shift is None else np.asarray(g.post_shift, dtype=np.int64)
    shifted_lo = lo << (post if post is not None else 0)
    shifted_hi = hi << (post if post is not None else 0)
    b = bits_for_range(int(shifted_lo.min()), int(shifted_hi.max()), g.signed)
    note = (f"{node.name}: per-element activation bits {int(bits.min())}..{int(bits.max())}; its scale-1 Quant "
            f"carries {b} bits (one scalar width per Quant node), the per-element ranges are clamped exactly "
            f"with integer Max/Min")
    return _ActSpec(b, g.signed, (lo, hi), post, note)


def _bound(spec: _ActSpec) -> int:
    lo, hi = spec.clip if spec.clip is not None else qrange(spec.bits, spec.signed)
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    if spec.post is not None:
        lo, hi = lo << spec.post, hi << spec.post
    return int(max(np.abs(lo).max(), np.abs(hi).max()))


def _weight_groups(node: IntNode, qm) -> list[_WeightGroup]:
    """Split a weighted node's output channels by bit width (a QONNX Quant has one scalar width)."""
    layer = qm.layers[node.name]
    w = layer.weight.detach().double()
    shape = tuple(w.shape)
    qp = layer.qparams()
    full = qp.full(shape)
    scale = full.scale.detach().double()
    bits = full.bits.detach().round().to(torch.int64)
    lo, hi = qrange(bits, True, qp.narrow)
    k = torch.clamp(torch.round(w / scale), lo, hi)
    channel_scale = reduce_to(scale, (shape[0],) + (1,) * (len(shape) - 1), "amin")
    w_int = torch.round(k * scale / channel_scale).to(torch.int64).numpy()
    if not np.array_equal(w_int, node.params["weight"]):
        raise ExportError(f"node {node.name!r}: the quantized model's weights do not match its integer program")
    per_channel = bits.reshape(shape[0], -1)
    if not bool((per_channel == per_channel[:, :1]).all()):
        raise ExportError(f"node {node.name!r}: weight bit widths vary within an output channel; a QONNX Quant "
                          f"node takes one scalar bit width (qonnx 1.0 executes and types only scalar widths), "
                          f"so per-element widths cannot be expressed")
    ch_bits = per_channel[:, 0].numpy()
    sc = scale.reshape(shape[0], -1).numpy()
    if not bool((sc == sc[:, :1]).all()):
        raise ExportError(f"node {node.name!r}: weight scales vary within an output channel")
    groups = []
    values = sorted(set(ch_bits.tolist()))
    if len(values) > 1 and node.op == "conv" and node.attrs["groups"] != 1:
        raise ExportError(f"node {node.name!r}: a grouped convolution with channels of different weight widths "
                          f"({values}) cannot be split into one Quant per width")
    kk = k.numpy()
    ch_scale = channel_scale.numpy()
    per_tensor = qp.scale.numel() == 1  # keep the quantizer's own granularity
    for b in values:
        if b <= 1:
            raise ExportError(f"node {node.name!r}: {b}-bit weights (pruned, all zero) have no QONNX Quant "
                              f"equivalent: a signed 1-bit Quant is bipolar (+-1) and 0 bits is undefined")
        idx = np.nonzero(ch_bits == b)[0]
        s = sc[idx, :1].reshape((len(idx),) + (1,) * (len(shape) - 1))
        if per_tensor:
            s = s[:1]
        s32 = s.astype(np.float32)
        if not np.array_equal(s32.astype(np.float64), s):
            raise ExportError(f"node {node.name!r}: weight scale is not a float32 value")
        groups.append(_WeightGroup(idx, (kk[idx] * s).astype(np.float32), s32,
                                   ch_scale[idx].astype(np.float32), int(b), w_int[idx]))
    return groups


def _requant_buffers(rq) -> dict[str, np.ndarray]:
    if rq.kind == "tflm":
        shift = np.asarray(rq.shift, dtype=np.int64)
        pot = np.int64(1) << np.maximum(-shift, 0)
        return {"left": _batched(np.int64(1) << np.maximum(shift, 0)),
                "mult": _batched(np.asarray(rq.multiplier, dtype=np.int64)),
                "pot": _batched(pot), "thr": _batched((pot - 1) >> 1)}
    shift = np.asarray(rq.shift, dtype=np.int64)
    right = np.maximum(shift, 0)
    return {"half": _batched(np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 0)),
            "pot": _batched(np.int64(1) << right), "left": _batched(np.int64(1) << np.maximum(-shift, 0))}


def _requant_bound(rq, acc_bound: np.ndarray | int) -> int:
    """Largest |intermediate| of the requantization on accumulators bounded by ``acc_bound``."""
    acc_bound = np.asarray(acc_bound, dtype=object)
    if rq.kind == "tflm":
        shift = np.asarray(rq.shift, dtype=np.int64)
        left = np.vectorize(lambda s: 1 << max(int(s), 0), otypes=[object])(shift)
        prod = acc_bound * left * np.asarray(rq.multiplier, dtype=np.int64).astype(object)
        return int(np.max(prod)) + (1 << 31)
    shift = np.asarray(rq.shift, dtype=np.int64)
    right = np.vectorize(lambda s: max(int(s), 0), otypes=[object])(shift)
    left = np.vectorize(lambda s: 1 << max(-int(s), 0), otypes=[object])(shift)
    pot = np.vectorize(lambda r: 1 << r, otypes=[object])(right)
    return int(max(np.max(acc_bound + pot), np.max((acc_bound // pot + 1) * left)))


class _Program(nn.Module):
    """The integer program as torch ops the dynamo exporter turns into the QONNX graph."""

    def __init__(self, ig: IntGraph, qm, plan: _Plan, keep: list[str]):
        super().__init__()
        self.ig = ig
        self.plan = plan
        self.keep = keep
        self.register_buffer("one", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero", torch.zeros((), dtype=torch.float32))
        self.register_buffer("output_scale", torch.tensor(ig.output_scale, dtype=torch.float32))
        self._names: dict[tuple[str, str], str] = {}
        self._ids = identifiers([n.name for n in ig.nodes])  # features.3 -> features_3, distinct
        for node, p in plan.steps:
            for key, value in p.get("buffers", {}).items():
                self._buf(node.name, key, value)

    def _buf(self, node: str, key: str, value) -> None:
        name = f"{self._ids[node]}__{key}"
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        self.register_buffer(name, t.clone())
        self._names[(node, key)] = name

    def b(self, node: str, key: str) -> torch.Tensor:
        return getattr(self, self._names[(node, key)])

    # -- pieces ----------------------------------------------------------------------------
    def _typed(self, name: str, v: torch.Tensor, spec: _ActSpec) -> torch.Tensor:
        """int64 values -> clamp, shift, float32 carrier typed by a scale-1 Quant."""
        if spec.clip is not None:
            v = clip_int_op(v, self.b(name, "lo"), self.b(name, "hi"))
        if spec.post is not None:
            v = v * self.b(name, "post")
        return quant_op(v.to(torch.float32), self.one, self.zero, self.b(name, "qbits"), int(spec.signed), 0)

    def _requant(self, name: str, acc: torch.Tensor, kind: str, prefix: str = "") -> torch.Tensor:
        b = lambda k: self.b(name, prefix + k)  # noqa: E731
        if kind == "tflm":
            return mbqm_op(acc, b("left"), b("mult"), b("pot"), b("thr"))
        return shift_round_op(acc, b("half"), b("pot"), b("left"))

    def _weighted(self, node: IntNode, p: dict, x: torch.Tensor) -> torch.Tensor:
        accs = []
        for gi, grp in enumerate(p["groups"]):
            g = f"g{gi}_"
            wq = quant_op(self.b(node.name, g + "w"), self.b(node.name, g + "w_scale"), self.zero,
                          self.b(node.name, g + "w_bits"), 1, 1)
            wi = quant_op(wq / self.b(node.name, g + "w_channel_scale"), self.one, self.zero,
                          self.b(node.name, g + "w_bits"), 1, 1)
            if node.op == "linear":
                accs.append(F.linear(x, wi, self.b(node.name, g + "zero_bias")))
            else:
                a = node.attrs
                conv = F.conv1d if a["dims"] == 1 else F.conv2d
                xp, padding = explicit_padding(x, a)  # one side padded more: an ONNX Pad before the Conv
                accs.append(conv(xp, wi, None, a["stride"], padding, a["dilation"], a["groups"]))
        acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=1)
        if "order" in p:
            acc = torch.index_select(acc, 1, self.b(node.name, "order"))
        acc = acc.to(torch.int64) + self.b(node.name, "bias")
        return self._typed(node.name, self._requant(node.name, acc, p["kind"]), p["spec"])

    def forward(self, x: torch.Tensor):
        env: dict[str, torch.Tensor] = {}
        for node, p in self.plan.steps:
            op, name = node.op, node.name
            if op == "input":
                xq = quant_op(x.to(torch.float64), self.b(name, "in_scale64"), self.b(name, "zero64"),
                              self.b(name, "in_bits64"), int(p["spec"].signed), 0)
                xi = quant_op(xq / self.b(name, "in_scale"), self.one, self.zero, self.b(name, "in_bits"),
                              int(p["spec"].signed), 0)
                if p["spec"].clip is not None or p["spec"].post is not None:
                    xi = self._typed(name, xi.to(torch.int64), p["spec"])
                env[name] = xi
            elif op in ("conv", "linear"):
                env[name] = self._weighted(node, p, env[node.inputs[0]])
            elif op in ("act", "slice"):
                x_in = env[node.inputs[0]].to(torch.int64)
                if op == "slice":  # a Slice of channels, then the requantization onto its grid
                    x_in = x_in[:, node.attrs["start"]:node.attrs["stop"]]
                env[name] = self._typed(name, self._requant(name, x_in, p["kind"]), p["spec"])
            elif op == "pad":  # the input requantized onto its channels of the grid, zero channels around (Pad)
                y = self._requant(name, env[node.inputs[0]].to(torch.int64), p["kind"])
                y = F.pad(y, (0, 0) * (y.dim() - 2) + (node.attrs["before"], node.attrs["after"]))
                env[name] = self._typed(name, y, p["spec"])
            elif op == "mul":  # codes multiplied in int64 (a per-channel vector unsqueezed), then requantized
                a, c = (env[i].to(torch.int64) for i in node.inputs)
                while c.dim() < a.dim():
                    c = c.unsqueeze(-1)
                env[name] = self._typed(name, self._requant(name, a * c, p["kind"]), p["spec"])
            elif op == "table":  # each element's code looks up its group's table (Gather)
                x_in = env[node.inputs[0]].to(torch.int64)
                if p["in_shift"]:
                    x_in = torch.div(x_in, self.b(name, "in_div"), rounding_mode="floor")
                y = F.embedding(x_in + self.b(name, "offset"), self.b(name, "table")).squeeze(-1)
                env[name] = self._typed(name, y, p["spec"])
            elif op == "concat":  # each input rescaled onto its channels of the output grid (Concat)
                parts = [self._requant(name, env[i].to(torch.int64), p["kind"], f"c{k}_")
                         for k, i in enumerate(node.inputs)]
                env[name] = self._typed(name, torch.cat(parts, dim=1), p["spec"])
            elif op == "add":
                a, c = (env[i].to(torch.int64) for i in node.inputs)
                if p["kind"] == "tflm":
                    a = self._requant(name, a * self.b(name, "lshift"), "tflm", "a_")
                    c = self._requant(name, c * self.b(name, "lshift"), "tflm", "b_")
                    s = a + c
                else:
                    s = a * self.b(name, "align_a") + c * self.b(name, "align_b")
                env[name] = self._typed(name, self._requant(name, s, p["kind"]), p["spec"])
            elif op == "maxpool":
                a = node.attrs
                pool = F.max_pool1d if a["dims"] == 1 else F.max_pool2d
                env[name] = pool(env[node.inputs[0]], a["kernel_size"], a["stride"], a["padding"])
            elif op == "avgpool":
                a = node.attrs
                x_in = env[node.inputs[0]]
                if p["global"]:
                    s = x_in.to(torch.int64).sum(dim=tuple(range(2, x_in.dim())), keepdim=True)
                else:
                    pool = F.avg_pool1d if a["dims"] == 1 else F.avg_pool2d  # padding counted: the sum is mean * n
                    s = torch.round(pool(x_in, a["kernel_size"], a["stride"], a["padding"], count_include_pad=True)
                                    * float(p["n"])).to(torch.int64)
                q = div_round_away_op(s, self.b(name, "divisor"))
                env[name] = quant_op(q.to(torch.float32), self.one, self.zero, self.b(name, "qbits"),
                                     int(p["signed"]), 0)
            elif op == "flatten":
                env[name] = torch.flatten(env[node.inputs[0]], 1)
            elif op == "zeropad":  # a Pad of the positions with zeros, on the input's grid
                env[name] = F.pad(env[node.inputs[0]], zeropad_sides(node.attrs))
            elif op == "narrow":  # a Slice of channels, on the input's grid
                env[name] = env[node.inputs[0]][:, node.attrs["start"]:node.attrs["stop"]]
            else:
                raise ExportError(f"node {name!r}: op {op!r} has no QONNX lowering")
        out = env[self.ig.output] * self.output_scale
        return (out,) + tuple(env[n] for n in self.keep)


# ----------------------------------------------------------------------------- planning


def plan_program(inp: ExportInput) -> _Plan:
    """Check every exactness condition and collect the constants of each node."""
    ig: IntGraph = inp.graph
    qm = inp.qm
    plan = _Plan()
    kind = {"scaled": "tflm", "fixed": "pow2"}[ig.numerics]
    for node in ig.nodes:
        p: dict = {"buffers": {}}
        buf = p["buffers"]
        if node.grid is not None:
            spec = _act_spec(node)
            p["spec"] = spec
            if spec.note:
                plan.notes.append(spec.note)
            buf["qbits"] = torch.tensor(float(spec.bits))
            if spec.clip is not None:
                buf["lo"], buf["hi"] = (_i64(_batched(c)) for c in spec.clip)
            if spec.post is not None:
                buf["post"] = _i64(_batched(np.int64(1) << spec.post))
            plan.max_abs[node.name] = _bound(spec)
            plan.bits[node.name] = (spec.bits, spec.signed)
        op = node.op
        if op == "input":
            g = node.grid
            es = np.asarray(g.elem_scale, dtype=np.float64)
            if not np.array_equal(es.astype(np.float32).astype(np.float64), es):
                raise ExportError("input: the input scale is not a float32 value")
            bits = np.asarray(g.bits)
            in_bits = int(bits.max())
            buf["in_scale64"] = torch.from_numpy(_batched(es).copy())
            buf["in_scale"] = torch.from_numpy(_batched(es).astype(np.float32))
            buf["zero64"] = torch.zeros((), dtype=torch.float64)
            buf["in_bits64"] = torch.tensor(float(in_bits), dtype=torch.float64)
            buf["in_bits"] = torch.tensor(float(in_bits))
        elif op in ("conv", "linear"):
            groups = _weight_groups(node, qm)
            x_bound = plan.max_abs[node.inputs[0]]
            w_int = node.params["weight"]
            acc_bound = np.abs(w_int).reshape(w_int.shape[0], -1).sum(axis=1) * x_bound
            worst = int(acc_bound.max())
            plan.acc_bounds[node.name] = worst
            if worst >= FLOAT32_EXACT:
                raise ExportError(
                    f"node {node.name!r}: the accumulator can reach {worst} >= 2**24 (sum |w| * max|x|); "
                    f"ONNX Conv/Gemm run in float32 in ONNX Runtime (no double or wide-integer Conv), so "
                    f"the sum would round. Narrower weights or activations make it exact.")
            bias = np.asarray(node.params["bias"], dtype=np.int64)
            full_bound = acc_bound.reshape(np.shape(bias)) + np.abs(bias)
            if _requant_bound(node.params["requant"], full_bound) >= INT64_SAFE:
                raise ExportError(f"node {node.name!r}: requantization intermediates could overflow int64")
            p["groups"] = groups
            p["kind"] = kind
            for gi, grp in enumerate(groups):
                g = f"g{gi}_"
                buf[g + "w"] = torch.from_numpy(grp.w_real)
                buf[g + "w_scale"] = torch.from_numpy(grp.scale)
                buf[g + "w_channel_scale"] = torch.from_numpy(grp.channel_scale)
                buf[g + "w_bits"] = torch.tensor(float(grp.bits))
                if op == "linear":
                    buf[g + "zero_bias"] = torch.zeros(len(grp.channels))
            order = np.concatenate([grp.channels for grp in groups])
            if not np.array_equal(order, np.arange(len(order))):
                buf["order"] = _i64(np.argsort(order))
                p["order"] = True
            buf["bias"] = _i64(_batched(bias))
            buf.update({k: _i64(v) for k, v in _requant_buffers(node.params["requant"]).items()})
            plan.weight_bits[node.name] = int(sum(int(grp.bits) * grp.w_int.size for grp in groups))
            if len(groups) > 1:
                plan.notes.append(f"{node.name}: output channels split into {len(groups)} Conv/Gemm nodes by weight "
                                  f"width ({[g.bits for g in groups]}), one Quant per width")
        elif op in ("act", "slice", "pad"):
            src = plan.max_abs[node.inputs[0]]
            if _requant_bound(node.params["requant"], src) >= INT64_SAFE:
                raise ExportError(f"node {node.name!r}: requantization intermediates could overflow int64")
            p["kind"] = kind
            buf.update({k: _i64(v) for k, v in _requant_buffers(node.params["requant"]).items()})
        elif op == "mul":
            a_bound, b_bound = (plan.max_abs[i] for i in node.inputs)
            if _requant_bound(node.params["requant"], a_bound * b_bound) >= INT64_SAFE:
                raise ExportError(f"node {node.name!r}: requantization intermediates could overflow int64")
            p["kind"] = kind
            buf.update({k: _i64(v) for k, v in _requant_buffers(node.params["requant"]).items()})
        elif op == "table":
            pr = node.params
            buf["table"] = torch.from_numpy(np.asarray(pr["table"], dtype=np.float32)[:, None])  # codes: exact
            buf["offset"] = _i64(_batched(pr["offset"]))
            p["in_shift"] = "in_shift" in pr
            if p["in_shift"]:
                buf["in_div"] = _i64(_batched(np.int64(1) << np.asarray(pr["in_shift"], dtype=np.int64)))
        elif op == "concat":
            p["kind"] = kind
            for k, src in enumerate(node.inputs):
                rq = node.params[f"requant_{k}"]
                if _requant_bound(rq, plan.max_abs[src]) >= INT64_SAFE:
                    raise ExportError(f"node {node.name!r}: requantization intermediates could overflow int64")
                buf.update({f"c{k}_{key}": _i64(v) for key, v in _requant_buffers(rq).items()})
        elif op == "add":
            pr = node.params
            p["kind"] = kind
            bounds = [plan.max_abs[i] for i in node.inputs]
            if kind == "tflm":
                lshift = 1 << int(pr["left_shift"])
                buf["lshift"] = _i64(lshift)
                for pre, rq, bd in (("a_", pr["requant_a"], bounds[0]), ("b_", pr["requant_b"], bounds[1])):
                    if _requant_bound(rq, bd * lshift) >= INT64_SAFE:
                        raise ExportError(f"node {node.name!r}: add rescaling could overflow int64")
                    buf.update({pre + k: _i64(v) for k, v in _requant_buffers(rq).items()})
                s_bound = 4 * max(bounds) * lshift
            else:
                buf["align_a"] = _i64(1 << int(pr["align_a"]))
                buf["align_b"] = _i64(1 << int(pr["align_b"]))
                s_bound = bounds[0] * (1 << int(pr["align_a"])) + bounds[1] * (1 << int(pr["align_b"]))
            if _requant_bound(pr["requant"], s_bound) >= INT64_SAFE:
                raise ExportError(f"node {node.name!r}: requantization intermediates could overflow int64")
            buf.update({k: _i64(v) for k, v in _requant_buffers(pr["requant"]).items()})
        elif op == "maxpool":
            plan.max_abs[node.name] = plan.max_abs[node.inputs[0]]
            plan.bits[node.name] = plan.bits[node.inputs[0]]
        elif op == "avgpool":
            a = node.attrs
            n = int(np.prod(a["kernel_size"]))
            in_shape = ig[node.inputs[0]].out_shape
            p["global"] = (tuple(a["kernel_size"]) == tuple(in_shape[1:]) and not any(a["padding"]))
            p["n"] = n
            x_bound = plan.max_abs[node.inputs[0]]
            if not p["global"] and n * x_bound >= POOL_EXACT:
                raise ExportError(f"node {node.name!r}: window sums can reach {n * x_bound} >= 2**20; AveragePool "
                                  f"computes a float32 mean that would not round back to the exact sum")
            bits, signed = plan.bits[node.inputs[0]]
            buf["divisor"] = _i64(_batched(node.params.get("divisor", n)))
            buf["qbits"] = torch.tensor(float(bits))
            p["signed"] = signed
            plan.max_abs[node.name] = x_bound
            plan.bits[node.name] = (bits, signed)
        elif op in ("flatten", "narrow", "zeropad"):  # the input's values (a bound on every element of a view too)
            plan.max_abs[node.name] = plan.max_abs[node.inputs[0]]
            plan.bits[node.name] = plan.bits[node.inputs[0]]
        else:
            raise ExportError(f"node {node.name!r}: op {op!r} has no QONNX lowering")
        plan.steps.append((node, p))
    return plan


# ----------------------------------------------------------------------------- ONNX plumbing


def _keep_name(node: str) -> str:
    return f"int__{node}"


def _name_nodes(graph, keep: list[str]) -> None:
    """Name every ONNX node after the layer it computes, ``<layer>/<OpType>`` (``features.3/Conv``;
    ``_1``, ``_2``, ... for an op type the layer uses again): a node belongs to the layer whose
    output (``int__<layer>``) it produces or first leads to; the final scaling to ``output``."""
    layer_of = {_keep_name(n): n for n in keep}
    users: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            users.setdefault(t, []).append(node)
    owner: dict[int, str] = {}
    for node in reversed(graph.node):  # topological order: a node's users are already owned
        own = next((layer_of[t] for t in node.output if t in layer_of), None)
        if own is None:
            found = [owner[id(u)] for t in node.output for u in users.get(t, []) if id(u) in owner]
            own = found[0] if found else "output"
        owner[id(node)] = own
    count: dict[tuple[str, str], int] = {}
    for node in graph.node:
        key = (owner[id(node)], node.op_type)
        k = count[key] = count.get(key, -1) + 1
        node.name = f"{key[0]}/{key[1]}" + (f"_{k}" if k else "")


def _export_onnx(program: _Program, input_shape: tuple[int, ...], keep: list[str]):
    x = torch.zeros((EXPORT_BATCH,) + tuple(input_shape))
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" warnings
    try:
        onnx_program = _dynamo_export(program, x, keep)
    finally:
        registry_log.setLevel(level)
    return onnx_program.model_proto


def _dynamo_export(program, x, keep):
    return torch.onnx.export(
        program, (x,), dynamo=True, custom_translation_table=_translations(), input_names=["input"],
        output_names=["output"] + [_keep_name(n) for n in keep], opset_version=18, verbose=False,
        report=False, optimize=True)


def _finish_model(proto, out_path: Path, keep: list[str], meta: dict):
    """Clean up with qonnx (shapes, constants folded except Quant), drop the per-node outputs
    (their tensors keep their names), name the nodes after the layers, attach metadata and save."""
    from onnx import helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import RemoveStaticGraphInputs, RemoveUnusedTensors
    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(proto)
    model = model.transform(InferShapes())
    model = model.transform(FoldConstants(exclude_op_types=["Quant"]))
    keep_names = {_keep_name(n) for n in keep}
    for out in [o for o in model.graph.output if o.name in keep_names]:
        model.graph.output.remove(out)
    model = model.transform(RemoveUnusedTensors())
    model = model.transform(RemoveStaticGraphInputs())
    _name_nodes(model.graph, keep)
    model = model.transform(InferShapes())
    helper.set_model_props(model.model, {"mixprec." + k: json.dumps(v) for k, v in meta.items()})
    model.save(str(out_path))
    return model


def _execute(model, x: np.ndarray, want: list[str]) -> dict[str, np.ndarray]:
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes

    m = model.transform(ChangeBatchSize(len(x))).transform(InferShapes())
    iname = m.graph.input[0].name
    ctx = execute_onnx(m, {iname: x}, return_full_exec_context=len(want) > 1)
    return {k: ctx[k] for k in want}


def weight_bit_count(ig: IntGraph, qm) -> int:
    """Our count of weight storage bits: the sum of every conv/linear weight element's bits."""
    total = 0
    for node in ig.nodes:
        if node.op in ("conv", "linear"):
            layer = qm.layers[node.name]
            total += int(expand(layer.quantizer.bits().detach().round(), tuple(layer.weight.shape)).sum())
    return total


def inference_cost(model_path: Path) -> dict:
    """qonnx's inference cost of an exported model (zero weights are not discounted: mixprec stores them)."""
    from qonnx.util.inference_cost import inference_cost as qonnx_cost

    res = qonnx_cost(str(model_path), discount_sparsity=False)
    return res["total_cost"]


class QonnxExporter:
    """Integer program -> QONNX model (``model.onnx``) executed bit-exactly by qonnx."""

    format = "qonnx"

    def export(self, inp: ExportInput, out_dir) -> Artifact:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ig = inp.graph
        plan = plan_program(inp)
        keep = [n.name for n in ig.nodes]
        program = _Program(ig, inp.qm, plan, keep).eval()
        with torch.no_grad():
            proto = _export_onnx(program, inp.input_shape, keep)
        meta = {"numerics": ig.numerics, "output_scale": ig.output_scale, "output_node": ig.output,
                "node_tensors": {n: _keep_name(n) for n in keep}}
        model = _finish_model(proto, out / MODEL_FILE, keep, meta)
        t_export = time.perf_counter() - t0
        cost = inference_cost(out / MODEL_FILE)
        ours = weight_bit_count(ig, inp.qm)
        ops: dict[str, int] = {}
        for n in model.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        notes = list(plan.notes)
        worst = max(plan.acc_bounds.values(), default=0)
        notes.append(f"bit-exact by construction: float32 Conv/Gemm partial sums are integers of magnitude <= {worst} "
                     f"(< 2**24, bound proven per layer), requantization ({ig.numerics} numerics) in int64 ONNX ops")
        if cost.get("total_mem_w_bits") != ours:
            notes.append(f"qonnx inference_cost weight bits {cost.get('total_mem_w_bits')} differ from mixprec's {ours}")
        details = {"onnx_ops": ops, "quant_nodes": ops.get("Quant", 0), "weight_bits": ours,
                   "accumulator_bounds": plan.acc_bounds,
                   "inference_cost": {k: v for k, v in cost.items() if isinstance(v, (int, float, str))},
                   "output_scale": ig.output_scale, "node_tensors": meta["node_tensors"],
                   "export_seconds": t_export, "model_bytes": (out / MODEL_FILE).stat().st_size}
        return Artifact("qonnx", out, [MODEL_FILE], notes, details)

    def run(self, artifact: Artifact, x, keep: bool = False):
        from qonnx.core.modelwrapper import ModelWrapper

        model = ModelWrapper(str(Path(artifact.path) / MODEL_FILE))
        meta = {p.key[len("mixprec."):]: json.loads(p.value) for p in model.model.metadata_props
                if p.key.startswith("mixprec.")}
        x = np.asarray(x, dtype=np.float32)
        oname = model.graph.output[0].name
        tensors = meta["node_tensors"] if keep else {}
        res = _execute(model, x, [oname] + list(tensors.values()))
        y = np.round(res[oname].astype(np.float64) / meta["output_scale"]).astype(np.int64)
        if not keep:
            return y
        return y, {n: np.round(res[t]).astype(np.int64) for n, t in tensors.items()}
