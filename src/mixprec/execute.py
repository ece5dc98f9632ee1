"""Execute an :class:`~mixprec.lower.IntGraph` on integers.

One interpreter, two sets of kernels: :class:`NumpyKernels` is the reference (int64 im2col
matrix products, written independently of torch), :class:`TorchKernels` runs the same integer
program with torch (float32 or float64 convolutions chosen so that every integer sum is exact; on a
GPU, float32 ones as a plain GEMM without TF32), which is how a quantized model evaluates. Rounding, saturation and requantization come from
:mod:`mixprec.numerics` in both. :func:`verify_against_reference` counts the outputs where a
quantized model's evaluation differs from the reference.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .graph.ir import zeropad_sides
from .lower import IntGraph, IntNode
from .numerics import div_round_away, quantize, requantize, saturate

if TYPE_CHECKING:
    from .nn.model import QuantModel


class NumpyKernels:
    """Reference integer kernels on int64 NumPy arrays."""

    name = "numpy"

    @staticmethod
    def asint(x) -> np.ndarray:
        return np.asarray(x, dtype=np.int64)

    @staticmethod
    def _windows(x: np.ndarray, kernel, stride, padding, dilation, fill: int, padding_after=None) -> np.ndarray:
        """(N, C, *out, *kernel) sliding windows of a 1-D or 2-D feature map (``padding`` before each
        spatial dim, ``padding_after`` after it: the same unless given)."""
        dims = len(kernel)
        pad = [(0, 0), (0, 0)] + [(p, q) for p, q in zip(padding, padding_after or padding)]
        x = np.pad(x, pad, constant_values=fill)
        span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + dims)))
        out_sl = tuple(slice(None, None, s) for s in stride)
        ker_sl = tuple(slice(None, None, d) for d in dilation)
        return win[(slice(None), slice(None)) + out_sl + ker_sl]

    @classmethod
    def conv(cls, x, w, attrs) -> np.ndarray:
        dims, groups = attrs["dims"], attrs["groups"]
        win = cls._windows(x, attrs["kernel_size"], attrs["stride"], attrs["padding"], attrs["dilation"], 0,
                           attrs.get("padding_after"))
        n, c = win.shape[:2]
        out_sp = win.shape[2:2 + dims]
        o = w.shape[0]
        cg, og = c // groups, o // groups
        # (N, G, Cg, *out, *k) -> (G, N*out, Cg*k) @ (G, Cg*k, Og)
        win = win.reshape((n, groups, cg) + win.shape[2:])
        perm = (1, 0) + tuple(range(3, 3 + dims)) + (2,) + tuple(range(3 + dims, 3 + 2 * dims))
        cols = win.transpose(perm).reshape(groups, n * int(np.prod(out_sp)), -1)
        wm = w.reshape(groups, og, -1).transpose(0, 2, 1)
        acc = np.matmul(cols, wm)  # (G, N*out, Og), exact int64
        acc = acc.reshape((groups, n) + tuple(out_sp) + (og,))
        acc = np.moveaxis(acc, 0, -2).reshape((n,) + tuple(out_sp) + (o,))  # channel = g * Og + j
        return np.moveaxis(acc, -1, 1)

    @staticmethod
    def linear(x, w) -> np.ndarray:
        return np.matmul(x, w.T)

    @classmethod
    def maxpool(cls, x, attrs) -> np.ndarray:
        dims = attrs["dims"]
        win = cls._windows(x, attrs["kernel_size"], attrs["stride"], attrs["padding"], (1,) * dims,
                           np.iinfo(np.int64).min)
        return win.max(axis=tuple(range(-dims, 0)))

    @classmethod
    def sumpool(cls, x, attrs) -> np.ndarray:
        dims = attrs["dims"]
        win = cls._windows(x, attrs["kernel_size"], attrs["stride"], attrs["padding"], (1,) * dims, 0)
        return win.sum(axis=tuple(range(-dims, 0)))

    @staticmethod
    def flatten(x) -> np.ndarray:
        return x.reshape(x.shape[0], -1)

    @staticmethod
    def concat(parts) -> np.ndarray:
        return np.concatenate(parts, axis=1)

    @staticmethod
    def pad_channels(x, before: int, after: int) -> np.ndarray:
        return np.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))

    @staticmethod
    def zeropad(x, attrs) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, 0)] + list(zip(attrs["padding"], attrs["padding_after"])))


#: Every integer below this magnitude is exact in float32 (24-bit significand)
FLOAT32_EXACT = 2 ** 24


def exact_float_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The cheapest float type in which a conv/linear of integer ``x`` and ``w`` is exact.

    float32 when no partial sum can reach 2**24 (then every one of them is an exactly
    representable integer, whatever the order of summation; the bound is sum |w| per output channel
    times max |x|); otherwise float64, exact below 2**53.
    """
    if x.numel() == 0:
        return torch.float64
    bound = w.abs().flatten(1).sum(1).max().double() * x.abs().max().double()
    return torch.float32 if bound < FLOAT32_EXACT else torch.float64


def uses_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a float32-exact convolution on ``device`` must run as im2col + matrix product.

    A GPU's convolution libraries may pick transform-domain algorithms (Winograd, FFT) whose
    intermediate values are not integers, so exactness would not follow from the bound; a plain
    GEMM with TF32 off (``ieee_float32``) sums products of integers only. CPU convolutions are
    direct or GEMM-based and stay as they are; float64 (a bound at or above 2**24) keeps the
    library convolution, exact in float64 whatever it does below 2**53."""
    return device.type != "cpu" and dtype == torch.float32


@contextmanager
def ieee_float32():
    """Float32 matrix products in full IEEE precision (no TF32) for the duration."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def explicit_padding(x: torch.Tensor, attrs: dict) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` zero-padded where a convolution pads one side of a dim more than the other
    (``padding_after``), and the padding left for the convolution itself (then none)."""
    before, after = tuple(attrs["padding"]), tuple(attrs.get("padding_after") or attrs["padding"])
    if after == before:
        return x, before
    pads = [p for b, a in reversed(list(zip(before, after))) for p in (b, a)]  # F.pad: last dim first
    return F.pad(x, pads), (0,) * len(before)


def gemm_conv(x: torch.Tensor, w: torch.Tensor, attrs: dict) -> torch.Tensor:
    """A (grouped, strided, dilated, padded) 1-d or 2-d convolution as im2col + batched matrix
    product, in the dtype of ``x`` and ``w``."""
    x, padding_ = explicit_padding(x, attrs)
    attrs = {**attrs, "padding": padding_}
    one_d = attrs["dims"] == 1
    if one_d:
        x, w = x.unsqueeze(2), w.unsqueeze(2)
    def pair(values, unit: int):  # a 1-d convolution is a 2-d one over a height of 1
        return (unit, *values) if one_d else tuple(values)
    kernel = tuple(w.shape[2:])
    stride, padding, dilation = pair(attrs["stride"], 1), pair(attrs["padding"], 0), pair(attrs["dilation"], 1)
    n, groups, c_out = x.shape[0], attrs["groups"], w.shape[0]
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C_in*k, L)
    cols = cols.reshape(n, groups, -1, cols.shape[-1])
    with ieee_float32():
        y = torch.matmul(w.reshape(groups, c_out // groups, -1), cols)  # (N, g, C_out/g, L)
    h_out, w_out = (_out_size(x.shape[2 + d], kernel[d], stride[d], padding[d], dilation[d]) for d in range(2))
    y = y.reshape(n, c_out, h_out, w_out)
    return y.squeeze(2) if one_d else y


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class TorchKernels:
    """The same integer kernels with torch, in a float type that holds every accumulator exactly."""

    name = "torch"

    @staticmethod
    def asint(x) -> torch.Tensor:
        return torch.as_tensor(x).to(torch.int64)

    @staticmethod
    def conv(x, w, attrs) -> torch.Tensor:
        dt = exact_float_dtype(x, w)
        if uses_gemm(x.device, dt):
            return gemm_conv(x.to(dt), w.to(dt), attrs).round().to(torch.int64)
        fn = F.conv1d if attrs["dims"] == 1 else F.conv2d
        x, padding = explicit_padding(x.to(dt), attrs)
        y = fn(x, w.to(dt), None, attrs["stride"], padding, attrs["dilation"], attrs["groups"])
        return y.round().to(torch.int64)

    @staticmethod
    def linear(x, w) -> torch.Tensor:
        dt = exact_float_dtype(x, w)
        with ieee_float32():
            return F.linear(x.to(dt), w.to(dt)).round().to(torch.int64)

    @staticmethod
    def maxpool(x, attrs) -> torch.Tensor:
        fn = F.max_pool1d if attrs["dims"] == 1 else F.max_pool2d
        return fn(x.double(), attrs["kernel_size"], attrs["stride"], attrs["padding"]).to(torch.int64)

    @staticmethod
    def sumpool(x, attrs) -> torch.Tensor:
        if attrs["dims"] == 1:
            y = F.avg_pool1d(x.double(), attrs["kernel_size"], attrs["stride"], attrs["padding"],
                             count_include_pad=True) * attrs["kernel_size"][0]
        else:
            y = F.avg_pool2d(x.double(), attrs["kernel_size"], attrs["stride"], attrs["padding"],
                             count_include_pad=True, divisor_override=1)
        return y.round().to(torch.int64)

    @staticmethod
    def flatten(x) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    @staticmethod
    def concat(parts) -> torch.Tensor:
        return torch.cat(parts, dim=1)

    @staticmethod
    def pad_channels(x, before: int, after: int) -> torch.Tensor:
        return F.pad(x, (0, 0) * (x.dim() - 2) + (before, after))

    @staticmethod
    def zeropad(x, attrs) -> torch.Tensor:
        return F.pad(x, zeropad_sides(attrs))


def quantize_input(x, node: IntNode):
    """Real network input -> integers on the input node's grid (round half to even, saturate)."""
    g = node.grid
    q = saturate(quantize(x, g.elem_scale, g.bits, g.signed), g.lo, g.hi)
    return q if g.post_shift is None else q << g.post_shift


def _finish(acc, node: IntNode):
    g = node.grid
    return requantize(acc, node.params["requant"], g.lo, g.hi, g.post_shift)


def step(node: IntNode, args: list, k) -> object:
    """Run one integer node with kernels ``k``."""
    op, p = node.op, node.params
    if op == "conv":
        return _finish(k.conv(args[0], p["weight"], node.attrs) + p["bias"], node)
    if op == "linear":
        return _finish(k.linear(args[0], p["weight"]) + p["bias"], node)
    if op == "add":
        a, b = args
        if "left_shift" in p:  # TFLite-Micro add: headroom shift, rescale both, sum, rescale
            a = p["requant_a"].apply(a << p["left_shift"])
            b = p["requant_b"].apply(b << p["left_shift"])
            return _finish(a + b, node)
        return _finish((a << p["align_a"]) + (b << p["align_b"]), node)
    if op == "concat":  # each input rescaled onto its channels of the output grid, then joined
        return k.concat([requantize(a, p[f"requant_{i}"], p[f"lo_{i}"], p[f"hi_{i}"], p.get(f"post_shift_{i}"))
                         for i, a in enumerate(args)])
    if op == "mul":  # codes multiplied (a per-channel vector broadcast over positions), then requantized
        a, b = args
        return _finish(a * b.reshape(tuple(b.shape) + (1,) * (a.ndim - b.ndim)), node)
    if op == "table":  # each element's code looks up its group's table
        x = args[0] if "in_shift" not in p else args[0] >> p["in_shift"]
        y = p["table"][x + p["offset"]]
        return y if node.grid.post_shift is None else y << node.grid.post_shift
    if op == "act":
        return _finish(args[0], node)
    if op == "slice":  # channels start:stop, rescaled onto the slice's grid
        return _finish(args[0][:, node.attrs["start"]:node.attrs["stop"]], node)
    if op == "pad":  # the input rescaled onto its channels of the output grid, zero channels around them
        inner = requantize(args[0], p["requant"], p["lo"], p["hi"], p.get("post_shift"))
        return k.pad_channels(inner, node.attrs["before"], node.attrs["after"])
    if op == "maxpool":
        return k.maxpool(args[0], node.attrs)
    if op == "avgpool":
        # integer programs saved before padded pooling hold no divisor: the kernel size then
        return div_round_away(k.sumpool(args[0], node.attrs), p.get("divisor", int(np.prod(node.attrs["kernel_size"]))))
    if op == "flatten":
        return k.flatten(args[0])
    if op == "zeropad":  # zeros around the positions, on the input's grid
        return k.zeropad(args[0], node.attrs)
    if op == "narrow":  # channels start:stop as they are (a view of the input's buffer)
        return args[0][:, node.attrs["start"]:node.attrs["stop"]]
    raise ValueError(f"integer graph has unknown op {op!r} in node {node.name!r}")


def run(graph: IntGraph, x, kernels=NumpyKernels, keep: bool = False):
    """Integer output of ``graph`` on real input ``x`` (batch first).

    Returns the output integers, or ``(output, {node name: integers})`` when ``keep`` is set
    (to find the first layer where two implementations diverge).
    """
    env = {}
    for node in graph.nodes:
        if node.op == "input":
            env[node.name] = quantize_input(x, node)
        else:
            env[node.name] = step(node, [env[i] for i in node.inputs], kernels)
    out = env[graph.output]
    return (out, env) if keep else out


def reference(graph: IntGraph, x: np.ndarray, keep: bool = False):
    """The oracle: NumPy integer execution of a lowered model."""
    return run(graph, np.asarray(x), NumpyKernels, keep)


#: Input values per evaluation batch on a CPU. The integer path works on int64 tensors: at 512
#: CIFAR images a ResNet-8 activation is 64 MB, so every elementwise op streams from RAM and
#: page-faults a fresh allocation; at about 40 images one stays in cache and is reused (an
#: evaluation about 5x faster, measured). Small inputs keep large batches (per-batch overhead).
CPU_EVAL_VALUES = 2 ** 17


def eval_batch_size(device: torch.device, x: torch.Tensor) -> int:
    """Evaluation batch for inputs like ``x`` (batch first): 512 on an accelerator; on a CPU
    about :data:`CPU_EVAL_VALUES` input values, 32 to 512 samples."""
    if torch.device(device).type != "cpu":
        return 512
    return max(32, min(512, CPU_EVAL_VALUES // max(x[0].numel() if len(x) else 1, 1)))


def verify_against_reference(qm: QuantModel, x: torch.Tensor) -> int:
    """Number of outputs where the model's evaluation differs from the NumPy reference (want 0)."""
    qm.eval()
    ig = qm.lower()
    mismatches, batch = 0, eval_batch_size("cpu", x)  # cache-sized batches
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        with torch.no_grad():
            got = qm(xb).numpy()
        want = (reference(ig, xb.numpy()) * ig.output_scale).astype(np.float32)
        mismatches += int((got != want).sum())
    return mismatches
