"""hls4ml export of fixed-point (power-of-two) integer programs, bit-exact in hls4ml's C++ emulation.

The integer program is rebuilt as a float PyTorch model whose weights and biases lie exactly on
their power-of-two grids, converted with hls4ml's PyTorch converter, and given one ``ap_fixed``
type per layer and role, derived from the program so that every step is exact or rounds the way
the reference does:

* input ``ap_[u]fixed<b, b-f, AP_RND_CONV, AP_SAT>`` (round half to even, saturate: the input
  quantizer);
* weights / biases: the layer's finest grid and widest range (exact values; hls4ml writes them as
  decimal text with as many decimals as fractional bits, which is exact on the grid);
* accumulator: every product's fractional bits and the proven worst-case range (no wrap);
* layer result: the output grid with ``AP_RND`` (half up, the fixed-point requantization) and
  ``AP_SAT`` (the clamp); with a ReLU, the layer keeps a wide signed result and the ReLU layer's
  result carries the saturating output type;
* average pooling: an accumulator with ``log2(window) + 2`` extra fractional bits, result rounding
  ``AP_RND_INF`` (half away from zero, as the integer kernels divide).

hls4ml 1.3 pads max pooling with the bit pattern ``x[width-1] = 1``, the most negative value of a
signed type but a large positive one of an unsigned type: a tensor a padded max pooling reads is
carried in a signed type one bit wider (same values and saturation; noted in the artifact).

A tensor with per-element (or per-channel) grids, the input included, goes through hls4ml's
``FixedPointQuantizer`` layer (``hls4ml_elements``): the producing layer keeps its exact result and
the quantizer rounds every element once onto its own grid (the input: from a port type wide enough
that truncating a double to it changes no rounding). Not expressible, hence ``ExportError``:
``scaled`` numerics (integer multiplier + shift per channel), clamps other than ReLU / the type's
own range (ReLU6, Hardtanh where they bind), grouped or dilated and 1-D convolutions, average pooling
that leaves the padding out of its mean. Padding a layer cannot take itself (one side more than the
other: 'same' with an even kernel; zeros an average pooling counts) is hls4ml's ZeroPadding2D layer
before it. What hls4ml stores
differently but exactly is noted: its PyTorch converter takes one type per layer and role, so
weights of channels with different scales or widths share the layer's widest type.

``compile()`` builds the C++ emulation with g++; :meth:`Hls4mlExporter.run` calls the compiled
library directly (ctypes, the same entry point hls4ml's ``predict`` uses) and returns the output
integers. Export checks the artifact against the NumPy reference on the run's sample inputs.
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import glob
import io
import keyword
import logging
import math
import operator
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..lower import IntGraph, IntNode
from ..numerics import bits_for_range, qrange
from .base import Artifact, ExportError, ExportInput
from .hls4ml_elements import element_masks, element_quantizer, register, wide_input_frac
from .names import identifiers

log = logging.getLogger(__name__)

PROJECT = "myproject"
PROJECT_DIR = "hls4ml_prj"
BACKEND = "Vivado"



def _frac(scale: float, what: str) -> int:
    f = -math.log2(scale)
    if f != round(f):
        raise ExportError(f"{what}: scale {scale} is not a power of two; hls4ml's ap_fixed types need "
                          f"power-of-two scales (fixed numerics)")
    return int(round(f))


def fixed_type(width: int, frac: int, signed: bool = True, rounding: str | None = None,
               saturation: str | None = None) -> str:
    """``ap_fixed<W, I[, Q, O]>`` text with ``I = W - frac`` integer bits (sign included)."""
    name = "ap_fixed" if signed else "ap_ufixed"
    args = [str(width), str(width - frac)]
    if rounding or saturation:
        args += [rounding or "AP_TRN", saturation or "AP_WRAP"]
    return f"{name}<{','.join(args)}>"


class _Tensor:
    """A tensor of the program as hls4ml sees it: integers on ``2**-frac`` within ``[lo, hi]``."""

    def __init__(self, frac: int, lo: int, hi: int, signed: bool, bits: int | None = None):
        self.frac, self.lo, self.hi, self.signed = frac, int(lo), int(hi), signed
        self.bits = bits if bits is not None else bits_for_range(self.lo, self.hi, signed)

    def type(self, rounding: str | None = None, saturation: str | None = None) -> str:
        return fixed_type(self.bits, self.frac, self.signed, rounding, saturation)

    @property
    def max_abs(self) -> int:
        return max(abs(self.lo), abs(self.hi))


#: Merges are functions, not modules: per graph op, the name hls4ml gives each after its torch.fx node
#: (``add``, ``cat_1``) and the functions the real-valued network calls for it (which fx records)
_MERGES = {"add": ("add", (operator.add, torch.add)), "concat": ("cat", (torch.cat,))}


class _RealNet(nn.Module):
    """The integer program in real values: conv/linear with on-grid weights, ReLU, pooling, add.
    Its modules are registered under their hls4ml layer names (:func:`_layer_keys`)."""

    def __init__(self, ig: IntGraph, layers: dict[str, nn.Module], names: dict[str, str], relus: dict[str, str],
                 quants: dict[str, str], pads: dict[str, str]):
        super().__init__()
        self.order = [(n.name, n.op, list(n.inputs), names.get(n.name), relus.get(n.name), quants.get(n.name),
                       pads.get(n.name)) for n in ig.nodes]
        self.output = ig.output
        for key, module in layers.items():
            self.add_module(key, module)

    def forward(self, x):
        env = {}
        for name, op, inputs, key, relu, quant, pad in self.order:
            if op == "input":
                y = x
            elif key is None:  # a flatten of a flat input
                y = env[inputs[0]]
            elif op in ("add", "concat"):
                y = env[inputs[0]] + env[inputs[1]] if op == "add" else _pairwise_cat([env[i] for i in inputs])
            else:
                y = getattr(self, key)(getattr(self, pad)(env[inputs[0]]) if pad else env[inputs[0]])
            if relu:
                y = getattr(self, relu)(y)
            env[name] = getattr(self, quant)(y) if quant else y
        return env[self.output]


def _pairwise_cat(parts: list) -> torch.Tensor:
    """``torch.cat`` two at a time: hls4ml merges two tensors per layer."""
    y = parts[0]
    for part in parts[1:]:
        y = torch.cat([y, part], dim=1)
    return y


def _layer_keys(ig: IntGraph) -> dict:
    """hls4ml layer names: ``{node: name}`` and ``{(node, "relu"): name}`` of the ReLU a conv,
    linear or add may need. hls4ml names a layer after the torch.fx node of its module, and fx
    lower-cases and renames what is not a plain identifier, so each is the node name made a
    lower-case identifier (``features.3`` -> ``features_3``, ``0.0`` -> ``n0_0``), distinct, and
    none a name fx or hls4ml has a use for (``x``, ``add``, ``add_1``, ..., Python's builtins)."""
    texts: dict = {}
    for n in ig.nodes:
        if n.op != "input":
            texts[n.name] = n.name
        if n.op in ("conv", "linear", "add", "concat"):
            texts[(n.name, "relu")] = f"{n.name}_relu"
        if n.op in ("conv", "avgpool"):
            texts[(n.name, "pad")] = f"{n.name}_pad"
        if n.grid is not None:
            texts[(n.name, "quant")] = f"{n.name}_quant"
    n_merges = sum(n.op in _MERGES for n in ig.nodes)
    reserved = (set(keyword.kwlist) | set(dir(builtins)) | set(dir(_RealNet)) | {"order", "output", "x"}
                | {f"{fx}{'' if i == 0 else f'_{i}'}" for fx, _ in _MERGES.values() for i in range(n_merges + 1)})
    return identifiers(texts, reserved, lower=True)


def _out_tensor(node: IntNode) -> _Tensor:
    g = node.grid
    if g.post_shift is not None or np.size(np.unique(np.asarray(g.bits))) > 1:
        raise ExportError(f"node {node.name!r}: per-element activation precision; hls4ml types one activation "
                          f"tensor per layer (one ap_fixed type), so per-element saturation cannot be expressed")
    bits = int(np.asarray(g.bits).flat[0])
    lo, hi = np.unique(np.asarray(g.lo)), np.unique(np.asarray(g.hi))
    if lo.size > 1 or hi.size > 1:
        raise ExportError(f"node {node.name!r}: per-element output clamps cannot be expressed in hls4ml")
    return _Tensor(_frac(g.scale, node.name), int(lo[0]), int(hi[0]), g.signed, bits)


def _activation(node: IntNode) -> str:
    return node.attrs.get("activation", "identity")


def _check_activation(node: IntNode, t: _Tensor) -> str:
    """The hls4ml activation that, with the saturating output type, reproduces the clamp."""
    act = _activation(node)
    qlo, qhi = qrange(t.bits, t.signed)
    if act == "identity" and (t.lo, t.hi) == (qlo, qhi):
        return "identity"
    if act == "relu" and (t.lo, t.hi) == (max(qlo, 0), qhi):
        return "relu"
    raise ExportError(f"node {node.name!r}: activation {act!r} clamping to [{t.lo}, {t.hi}] on a {t.bits}-bit grid "
                      f"is not expressible as an hls4ml activation plus a saturating ap_fixed type")


def flat_inputs(ig: IntGraph) -> set[str]:
    """The network inputs only flattened (an MLP on images): hls4ml gets them flat. Its channels-last
    conversion reorders the first dense layer's weights for a flattened image input as if its rows
    and columns were swapped (a 784-64-32-10 MNIST MLP missed on 2,528 of 2,560 outputs)."""
    inputs = [n for n in ig.nodes if n.op == "input"]
    return {i.name for i in inputs if len(i.out_shape) > 1
            and all(n.op == "flatten" for n in ig.nodes if i.name in n.inputs)}


def _plan(ig: IntGraph):
    """Torch modules, hls4ml layer names and precisions, and every type the design holds (tensors and
    the input port); raises ExportError on what is not exact."""
    if ig.numerics != "fixed":
        raise ExportError(f"hls4ml export needs fixed-point numerics (power-of-two scales, e.g. target "
                          f"fpga-hls4ml); this run uses {ig.numerics!r} numerics (per-channel integer "
                          f"multiplier and shift), which ap_fixed types cannot express")
    tensors: dict[str, _Tensor] = {}
    layers: dict[str, nn.Module] = {}
    names: dict[str, str] = {}
    relus: dict[str, str] = {}  # our node -> its ReLU layer's name
    quants: dict[str, str] = {}  # our node -> its per-element quantizer layer's name
    pads: dict[str, str] = {}  # our node -> the zero-padding layer before it (padding hls4ml's layer cannot do)
    wide: list[_Tensor] = []  # a per-element input's port type
    inner_types: dict[str, str] = {}  # a concat of three or more: the type of its pairwise joins before the last
    keys = _layer_keys(ig)
    precision: dict[str, dict[str, str]] = {}  # hls4ml layer name -> {role: type}
    node_layer: dict[str, str] = {}  # our node -> hls4ml layer holding its output
    notes: list[str] = []
    signed_carrier = _padded_maxpool_sources(ig)
    flat = flat_inputs(ig)

    def carry(node: IntNode, t: _Tensor, relu: bool) -> _Tensor:
        """hls4ml 1.3 pads max pooling with ``x[width-1] = 1``: the most negative value of a signed
        type, but a large positive one of an unsigned type. Tensors that a padded max pooling reads
        are carried in a signed type one bit wider (same values, same saturation at the top) where
        a ReLU or the layer's own result keeps them non-negative."""
        if node.name not in signed_carrier or t.signed:
            return t
        if not relu:
            raise ExportError(f"node {node.name!r}: an unsigned tensor read by a padded max pooling; hls4ml pads "
                              f"unsigned types with a large positive value, and this layer has no ReLU to keep a "
                              f"signed carrier non-negative")
        notes.append(f"{node.name}: carried as signed {t.bits + 1}-bit ap_fixed (values of its unsigned {t.bits}-bit "
                     f"grid): hls4ml 1.3 pads max pooling of unsigned types with a large positive value")
        return _Tensor(t.frac, t.lo, t.hi, True, t.bits + 1)

    def zero_pad(node: IntNode, before: tuple, after: tuple, t_in: _Tensor) -> None:
        """A ZeroPadding2D layer (``nn.ConstantPad2d``) before ``node``: exact, in the input's type."""
        pkey = pads[node.name] = keys[(node.name, "pad")]
        layers[pkey] = nn.ConstantPad2d((before[1], after[1], before[0], after[0]), 0.0)
        precision[pkey] = {"result": t_in.type()}
        notes.append(f"{node.name}: padding {tuple(before)} before, {tuple(after)} after as hls4ml's ZeroPadding2D "
                     f"layer {pkey!r}")

    def per_element(node: IntNode, exact: _Tensor, relu: bool, rounding: str) -> _Tensor | None:
        """Where ``node``'s output has per-element grids: its layer keeps the ``exact`` result
        (after the ReLU, if any), and a per-element quantizer layer casts every element onto its own
        grid, into the tensor's common type. None where one type holds the tensor."""
        masks = element_masks(node, relu)
        if masks is None:
            return None
        qkey = quants[node.name] = keys[(node.name, "quant")]
        layers[qkey] = element_quantizer(masks, rounding, flat=node.name in flat or len(node.out_shape) == 1)
        g = node.grid
        shift = 0 if g.post_shift is None else np.broadcast_to(np.asarray(g.post_shift, np.int64), node.out_shape)
        lo = int((np.broadcast_to(np.asarray(g.lo, np.int64), node.out_shape) << shift).min())
        hi = int((np.broadcast_to(np.asarray(g.hi, np.int64), node.out_shape) << shift).max())
        common = carry(node, _Tensor(_frac(g.scale, node.name), lo, hi, g.signed), relu=True)
        precision[qkey] = {"result": common.type()}
        if relu:
            relu_key = relus[node.name] = keys[(node.name, "relu")]
            layers[relu_key] = nn.ReLU()
            precision[relu_key] = {"result": exact.type()}
        node_layer[node.name] = qkey
        tensors[node.name] = common
        notes.append(f"{node.name}: per-element precision through hls4ml's FixedPointQuantizer layer {qkey!r} "
                     f"(io_parallel)")
        return common

    for node in ig.nodes:
        key = keys.get(node.name)
        op = node.op
        if op == "input":
            masks = element_masks(node, relu=False)
            if masks is not None:  # a port wide enough for one exact rounding per element (wide_input_frac)
                k, b, i = masks
                frac = wide_input_frac((b - i)[b > 0])
                port = _Tensor(frac, 0, 0, True, bits=int(i.max()) + 1 + frac)
                wide.append(port)
                precision["x"] = {"result": port.type("AP_TRN", "AP_SAT")}
                per_element(node, port, relu=False, rounding="RND_CONV")
                continue
            t = carry(node, _out_tensor(node), relu=False)
            tensors[node.name] = t
            precision["x"] = {"result": t.type("AP_RND_CONV", "AP_SAT")}
            continue
        names[node.name] = key
        if op in ("conv", "linear"):
            t_in = tensors[node.inputs[0]]
            w_int = np.asarray(node.params["weight"], dtype=np.int64)
            c_out = w_int.shape[0]
            acc_scale = np.asarray(node.params["acc_scale"], dtype=np.float64).reshape(-1)
            in_scale = 2.0 ** -t_in.frac
            f_c = np.array([_frac(s / in_scale, node.name) for s in acc_scale])  # weight channel fractions
            f_w = int(f_c.max())
            w_units = w_int.reshape(c_out, -1) << (f_w - f_c)[:, None]
            bias = np.asarray(node.params["bias"], dtype=np.int64).reshape(-1)
            b_units = bias << (f_w - f_c)
            f_acc = t_in.frac + f_w
            acc_bound = int((np.abs(w_units).sum(axis=1) * t_in.max_abs + np.abs(b_units)).max())
            w_t = _Tensor(f_w, -int(np.abs(w_units).max()), int(np.abs(w_units).max()), True)
            b_t = _Tensor(f_acc, -int(np.abs(b_units).max()), int(np.abs(b_units).max()), True)
            acc_t = _Tensor(f_acc, -acc_bound, acc_bound, True)
            w_real = (w_int * (2.0 ** -f_c).reshape((-1,) + (1,) * (w_int.ndim - 1)))
            b_real = bias * 2.0 ** -(t_in.frac + f_c)
            # float64 modules: hls4ml reads their values as they are, and a bias at the accumulator's
            # precision can need more than float32's 24 significant bits (an MNIST MLP's did)
            for arr, what in ((w_int, "weights"), (bias, "biases")):
                if int(np.abs(arr).max(initial=0)) >= 2 ** 53:
                    raise ExportError(f"node {node.name!r}: {what} need more than the 53 significant bits of "
                                      f"float64, which hls4ml's PyTorch converter reads")
            if op == "linear":
                m = nn.Linear(w_int.shape[1], c_out, dtype=torch.float64)
            else:
                a = node.attrs
                if a["dims"] != 2:
                    raise ExportError(f"node {node.name!r}: only 2-D convolutions are exported to hls4ml")
                if a["groups"] != 1 or any(d != 1 for d in a["dilation"]):
                    raise ExportError(f"node {node.name!r}: grouped or dilated convolutions are not supported by "
                                      f"hls4ml's PyTorch converter")
                padding = a["padding"]
                if a.get("padding_after") not in (None, a["padding"]):  # 'same' with an even kernel: one side more
                    zero_pad(node, a["padding"], a["padding_after"], t_in)
                    padding = 0
                m = nn.Conv2d(w_int.shape[1], c_out, a["kernel_size"], a["stride"], padding, dtype=torch.float64)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(w_real))
                m.bias.copy_(torch.from_numpy(b_real))
            layers[key] = m
            precision[key] = {"weight": w_t.type(), "bias": b_t.type(), "accum": acc_t.type()}
            if len(set(f_c.tolist())) > 1 or w_t.bits > 16:
                notes.append(f"{node.name}: per-channel weight scales 2^-{f_c.min()}..2^-{f_c.max()} share one "
                             f"hls4ml weight type {w_t.type()} ({w_t.bits} bits per weight in hls4ml's storage; "
                             f"values exact)")
            if per_element(node, acc_t, _activation(node) == "relu", "RND") is not None:
                precision[key]["result"] = acc_t.type()  # exact: every element rounds in its quantizer
                continue
            t_out = _out_tensor(node)
            act = _check_activation(node, t_out)
            t_out = carry(node, t_out, act == "relu")
            if act == "relu":
                shift = f_acc - t_out.frac
                r = -(-acc_bound // (1 << shift)) + 1 if shift >= 0 else acc_bound << -shift
                precision[key]["result"] = _Tensor(t_out.frac, -r, r, True).type("AP_RND", "AP_SAT")
                relu = relus[node.name] = keys[(node.name, "relu")]
                layers[relu] = nn.ReLU()
                precision[relu] = {"result": t_out.type("AP_RND", "AP_SAT")}
                node_layer[node.name] = relu
            else:
                precision[key]["result"] = t_out.type("AP_RND", "AP_SAT")
                node_layer[node.name] = key
            tensors[node.name] = t_out
        elif op == "maxpool":
            a = node.attrs
            if a["dims"] != 2:
                raise ExportError(f"node {node.name!r}: only 2-D pooling is exported to hls4ml")
            t = tensors[node.inputs[0]]
            layers[key] = nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"])
            precision[key] = {"result": t.type(), "accum": t.type()}
            tensors[node.name] = t
            node_layer[node.name] = key
        elif op == "avgpool":
            a = node.attrs
            if a["dims"] != 2:
                raise ExportError(f"node {node.name!r}: only 2-D pooling is exported to hls4ml")
            if any(a["padding"]) and not a.get("count_include_pad", True):
                raise ExportError(f"node {node.name!r}: average pooling over the window's elements inside the input "
                                  f"(count_include_pad=False) is not exported to hls4ml, whose pooling divides by "
                                  f"the window's size; export this model to C or QONNX")
            t = carry(node, tensors[node.inputs[0]], relu=tensors[node.inputs[0]].lo >= 0)
            if any(a["padding"]):  # zeros counted in the mean (count_include_pad): padding, then the pooling
                zero_pad(node, a["padding"], a["padding"], t)
            n = int(np.prod(a["kernel_size"]))
            extra = int(math.ceil(math.log2(n))) + 2
            s_bound = n * t.max_abs << extra
            layers[key] = nn.AvgPool2d(a["kernel_size"], a["stride"])
            precision[key] = {"result": t.type("AP_RND_INF", "AP_SAT"),
                              "accum": _Tensor(t.frac + extra, -s_bound, s_bound, True).type()}
            tensors[node.name] = t
            node_layer[node.name] = key
        elif op == "zeropad":  # hls4ml's ZeroPadding2D, in the input's type (exact)
            a = node.attrs
            if a["dims"] != 2:
                raise ExportError(f"node {node.name!r}: only 2-D zero padding is exported to hls4ml; export this "
                                  f"model to C or QONNX")
            t = tensors[node.inputs[0]]
            layers[key] = nn.ConstantPad2d((a["padding"][1], a["padding_after"][1], a["padding"][0],
                                            a["padding_after"][0]), 0.0)
            precision[key] = {"result": t.type()}
            tensors[node.name] = _Tensor(t.frac, min(t.lo, 0), max(t.hi, 0), t.signed, t.bits)
            node_layer[node.name] = key
            notes.append(f"{node.name}: zeros around the positions as hls4ml's ZeroPadding2D layer {key!r}")
        elif op == "flatten" and node.inputs[0] in flat:
            names[node.name] = None  # the input arrives flat (flat_inputs): nothing for hls4ml to do
            tensors[node.name] = tensors[node.inputs[0]]
        elif op == "flatten":
            t = tensors[node.inputs[0]]
            layers[key] = nn.Flatten()
            precision[key] = {"result": t.type()}
            tensors[node.name] = t
            node_layer[node.name] = key
        elif op in ("add", "concat"):
            # the sum, or the inputs side by side, on the finest input grid (exact); the output
            # type's rounding and saturation (or the per-element quantizer) then requantize it
            ins = [tensors[i] for i in node.inputs]
            f = max(t.frac for t in ins)
            scaled = [t.max_abs << (f - t.frac) for t in ins]
            bound = sum(scaled) if op == "add" else max(scaled)
            exact = _Tensor(f, -bound, bound, True)
            if op == "concat" and len(ins) > 2:  # the pairwise joins before the last keep the exact type
                inner_types[node.name] = exact.type()
            if per_element(node, exact, _activation(node) == "relu", "RND") is not None:
                precision[key] = {"result": exact.type()}
                continue
            t_out = _out_tensor(node)
            act = _check_activation(node, t_out)
            t_out = carry(node, t_out, act == "relu")
            if act == "relu":
                shift = f - t_out.frac
                r = -(-bound // (1 << shift)) + 1 if shift >= 0 else bound << -shift
                precision[key] = {"result": _Tensor(t_out.frac, -r, r, True).type("AP_RND", "AP_SAT")}
                relu = relus[node.name] = keys[(node.name, "relu")]
                layers[relu] = nn.ReLU()
                precision[relu] = {"result": t_out.type("AP_RND", "AP_SAT")}
                node_layer[node.name] = relu
            else:
                precision[key] = {"result": t_out.type("AP_RND", "AP_SAT")}
                node_layer[node.name] = key
            tensors[node.name] = t_out
        elif op == "act" and element_masks(node, _activation(node) == "relu") is not None:
            if _activation(node) != "relu":
                raise ExportError(f"node {node.name!r}: a standalone {_activation(node)!r} requantization has no "
                                  f"hls4ml layer")
            names[node.name] = None  # the ReLU and the quantizer do it all
            per_element(node, tensors[node.inputs[0]], True, "RND")
        elif op == "act":
            t_out = _out_tensor(node)
            act = _check_activation(node, t_out)
            t_out = carry(node, t_out, act == "relu")
            if act != "relu":
                raise ExportError(f"node {node.name!r}: a standalone {act!r} requantization has no hls4ml layer")
            layers[key] = nn.ReLU()
            precision[key] = {"result": t_out.type("AP_RND", "AP_SAT")}
            tensors[node.name] = t_out
            node_layer[node.name] = key
        elif op in ("slice", "narrow"):
            raise ExportError(f"node {node.name!r}: a channel slice has no hls4ml layer in its PyTorch converter; "
                              f"export this model to C or QONNX")
        elif op == "pad":
            raise ExportError(f"node {node.name!r}: zero channels (F.pad along the channels) have no hls4ml layer in "
                              f"its PyTorch converter; export this model to C or QONNX")
        elif op == "mul":
            raise ExportError(f"node {node.name!r}: a product (squeeze-and-excitation) has no exact hls4ml layer here "
                              f"(hls4ml multiplies tensors of one shape, in its own result type); export this model to "
                              f"C or QONNX")
        elif op == "table":
            raise ExportError(f"node {node.name!r}: {node.attrs['function']} is deployed as a lookup table of our own, "
                              f"and hls4ml computes its activations with its own tables and types, which do not "
                              f"reproduce it bit for bit; export this model to C or QONNX, or use ReLU for hls4ml")
        else:
            raise ExportError(f"node {node.name!r}: op {op!r} has no hls4ml export")
    return layers, names, relus, quants, pads, precision, node_layer, list(tensors.values()) + wide, notes, inner_types


def _name_merges(model: nn.Module, ig: IntGraph, names: dict, precision: dict, node_layer: dict,
                 inner_types: dict) -> None:
    """Sums and concatenations are functions, not modules: hls4ml names them after torch.fx's nodes
    (``add``, ``add_1``, ``cat``...).
    A module's layer is named after its fx node, which must be its own name (weights are looked up by it)."""
    traced = torch.fx.symbolic_trace(model)
    renamed = [(n.target, n.name) for n in traced.graph.nodes if n.op == "call_module" and n.name != n.target]
    if renamed:
        raise ExportError(f"torch.fx renames the hls4ml layers {renamed}; their weights and types would be lost")
    for op, (_, functions) in _MERGES.items():
        fx_nodes = [n.name for n in traced.graph.nodes if n.op == "call_function" and n.target in functions]
        ours = [n for n in ig.nodes if n.op == op]
        joins = [len(n.inputs) - 1 for n in ours]  # fx nodes per node: one per pairwise join
        if len(fx_nodes) != sum(joins):
            raise ExportError(f"could not match the graph's {len(ours)} {op} nodes to torch.fx nodes {fx_nodes}")
        for node, n_joins in zip(ours, joins):
            mine, fx_nodes = fx_nodes[:n_joins], fx_nodes[n_joins:]
            for inner in mine[:-1]:
                precision[inner] = {"result": inner_types[node.name]}
            key = names[node.name]
            precision[mine[-1]] = precision.pop(key)
            if node_layer[node.name] == key:
                node_layer[node.name] = mine[-1]


def _padded_maxpool_sources(ig: IntGraph) -> set[str]:
    """Nodes whose output type a padded max pooling reads (through pass-through max pooling/flatten)."""
    out = set()
    for node in ig.nodes:
        if node.op == "maxpool" and any(node.attrs["padding"]):
            src = node.inputs[0]
            while ig[src].op in ("maxpool", "flatten"):
                src = ig[src].inputs[0]
            out.add(src)
    return out


def _default_type(types: list[_Tensor]) -> str:
    """A type wide enough to hold every tensor and port type exactly (layers hls4ml inserts, e.g.
    transposes)."""
    frac = max(t.frac for t in types)
    ints = max(t.bits - t.frac for t in types)
    return fixed_type(ints + frac + 1, frac, True)


def _library(prj: Path) -> Path:
    libs = sorted(glob.glob(str(prj / "firmware" / f"{PROJECT}-*.so")), key=os.path.getmtime)
    if not libs:
        raise ExportError(f"no compiled hls4ml library in {prj / 'firmware'}")
    return Path(libs[-1])


_LIBS: dict[tuple, ctypes.CDLL] = {}


def _load(lib_path: Path) -> ctypes.CDLL:
    """Load the compiled model from a private copy: the dynamic loader would hand back a stale
    image for a path it has already loaded (hls4ml recompiles in place, e.g. to trace)."""
    st = os.stat(lib_path)
    key = (str(Path(lib_path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _LIBS:
        fd, copy = tempfile.mkstemp(suffix=".so", prefix="mixprec_hls4ml_")
        os.close(fd)
        shutil.copyfile(lib_path, copy)
        _LIBS[key] = ctypes.cdll.LoadLibrary(copy)
        os.unlink(copy)  # stays mapped
    return _LIBS[key]


def _channels_first(v: np.ndarray) -> np.ndarray:
    """A batch of hls4ml's channels-last tensors (the design converts the whole network) channels
    first, as the graph has them; feature vectors as they are."""
    return np.moveaxis(v, -1, 1) if v.ndim > 2 else v


def _output(y: np.ndarray, shape) -> np.ndarray:
    """hls4ml's flat outputs (untransposed: channels last) as ``(len(y),) + shape``."""
    shape = tuple(int(d) for d in shape)
    return _channels_first(y.reshape((len(y),) + shape[1:] + shape[:1]))


def _call_library(lib_path: Path, x: np.ndarray, n_out: int) -> np.ndarray:
    lib = _load(lib_path)
    fn = getattr(lib, f"{PROJECT}_double")
    fn.restype = None
    fn.argtypes = [np.ctypeslib.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")] * 2
    flat = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    out = np.zeros((len(x), n_out), dtype=np.float64)
    for i in range(len(x)):
        row = np.zeros(n_out, dtype=np.float64)
        fn(np.ascontiguousarray(flat[i]), row)
        out[i] = row
    return out


class _TraceData(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p)]


def _trace_library(lib_path: Path, x: np.ndarray, n_out: int, layers: dict, n_traced: int) -> dict[str, np.ndarray]:
    """Every traced layer's output (float64, hls4ml's channels-last shapes) per input, read through
    the trace hooks hls4ml compiles in with ``TraceOutput`` (what ``ModelGraph.trace`` does, without
    recompiling)."""
    lib = _load(lib_path)
    fn = getattr(lib, f"{PROJECT}_double")
    fn.restype = None
    fn.argtypes = [np.ctypeslib.ndpointer(ctypes.c_double, flags="C_CONTIGUOUS")] * 2
    lib.allocate_trace_storage.argtypes = [ctypes.c_size_t]
    lib.allocate_trace_storage.restype = None
    lib.collect_trace_output.argtypes = [ctypes.POINTER(_TraceData)]
    lib.collect_trace_output.restype = None
    lib.free_trace_storage.argtypes = None
    lib.free_trace_storage.restype = None
    flat = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    out: dict[str, list] = {name: [] for name in layers}
    data = (_TraceData * n_traced)()
    lib.allocate_trace_storage(ctypes.sizeof(ctypes.c_double))
    try:
        for i in range(len(x)):
            fn(np.ascontiguousarray(flat[i]), np.zeros(n_out, dtype=np.float64))
            lib.collect_trace_output(data)
            for item in data:
                name = item.name.decode() if item.name else None  # unused slots stay empty
                if name in layers and item.data:
                    arr = np.ctypeslib.as_array(ctypes.cast(item.data, ctypes.POINTER(ctypes.c_double)),
                                                shape=tuple(layers[name]))
                    out[name].append(np.array(arr))
    finally:
        lib.free_trace_storage()
    return {name: np.asarray(v) for name, v in out.items() if v}


class Hls4mlExporter:
    """Fixed-point integer program -> hls4ml project (Vivado backend, io_parallel, latency),
    compiled to its C++ bit-accurate emulation."""

    format = "hls4ml"

    def export(self, inp: ExportInput, out_dir) -> Artifact:
        import hls4ml

        from ..execute import reference

        ig: IntGraph = inp.graph
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        layers, names, relus, quants, pads, precision, node_layer, types, notes, inner_types = _plan(ig)
        register()
        model = _RealNet(ig, layers, names, relus, quants, pads).eval()
        _name_merges(model, ig, names, precision, node_layer, inner_types)
        t0 = time.perf_counter()
        input_shape = (int(np.prod(inp.input_shape)),) if flat_inputs(ig) else tuple(inp.input_shape)
        with contextlib.redirect_stdout(io.StringIO()):
            config = hls4ml.utils.config_from_pytorch_model(
                model, input_shape, granularity="name", backend=BACKEND,
                default_precision=_default_type(types), channels_last_conversion="full", transpose_outputs=False)
        config["Model"]["BitExact"] = False  # our types are exact by construction: no re-derivation
        layer_cfg = config["LayerName"]
        missing = [k for k in precision if k not in layer_cfg]
        if missing:
            raise ExportError(f"hls4ml's PyTorch parser did not produce layers {missing} "
                              f"(got {list(layer_cfg)}); the mapping to ap_fixed types would be lost")
        for lname, prec in precision.items():
            for role, typ in prec.items():
                if role not in layer_cfg[lname].get("Precision", {}) and lname != "x":
                    raise ExportError(f"hls4ml layer {lname!r} has no {role!r} precision to set "
                                      f"(has {list(layer_cfg[lname].get('Precision', {}))})")
                layer_cfg[lname].setdefault("Precision", {})[role] = typ
            layer_cfg[lname]["Trace"] = True
        prj = out / PROJECT_DIR
        if prj.exists():
            shutil.rmtree(prj)  # a fresh project: no stale library from an earlier export
        chatter = io.StringIO()  # hls4ml prints its topology and build progress
        with contextlib.redirect_stdout(chatter):
            try:
                hls_model = hls4ml.converters.convert_from_pytorch_model(
                    model, hls_config=config, output_dir=str(prj), project_name=PROJECT, backend=BACKEND,
                    io_type="io_parallel")
            except Exception as exc:  # hls4ml's own limits, e.g. its line buffers for convolutions that
                raise ExportError(    # branch from the network input: name them rather than a traceback
                    f"hls4ml {hls4ml.__version__} could not convert this model ({type(exc).__name__}: {exc}); "
                    f"C and QONNX export it exactly") from exc
            self._check_types(hls_model, precision)
            hls_model.config.trace_output = True  # compile the trace hooks in: run(keep=True) reads layer outputs
            hls_model.compile()
        log.debug("hls4ml: %s", chatter.getvalue())
        t_compile = time.perf_counter() - t0
        out_node = ig[ig.output]
        n_out = int(np.prod(out_node.out_shape))
        lib = _library(prj)
        x = np.asarray(inp.x_sample, dtype=np.float32)
        want = reference(ig, x)
        got = self._integers(_output(_call_library(lib, x, n_out), out_node.out_shape), ig)
        bad = int((got != want.reshape(got.shape)).sum())
        if bad:
            raise ExportError(f"hls4ml's compiled model differs from the reference on {bad} of {want.size} outputs "
                              f"of the {len(x)} sample inputs; the conversion is not exact")
        traced = {layer.name: [int(d) for d in layer.get_output_variable().shape] for layer in hls_model.get_layers()
                  if layer.get_attr("function_cpp", None) and layer.get_attr("trace", False)}
        n_traced = sum(len(layer.get_variables()) for layer in hls_model.get_layers()
                       if layer.get_attr("function_cpp", None) and layer.get_attr("trace", False))
        types = {lname: dict(prec) for lname, prec in precision.items()}
        notes = notes + [f"bit-exact on the {len(x)} sample inputs at export (compiled C++ emulation vs the "
                         f"NumPy reference)",
                         "hls4ml precision is per layer and role; mixprec's per-channel weight widths are stored "
                         "with the layer's widest type (values exact)"]
        details = {"project": PROJECT_DIR, "library": str(lib.relative_to(out)), "backend": BACKEND,
                   "io_type": "io_parallel", "precision": types, "node_layers": node_layer,
                   "output_scale": ig.output_scale, "output_shape": list(out_node.out_shape),
                   "traced_layers": traced, "n_traced": n_traced,
                   "compile_seconds": t_compile}
        files = [str(p.relative_to(out)) for p in sorted(prj.rglob("*")) if p.is_file()
                 and p.suffix in (".h", ".cpp", ".so", ".tcl", ".txt", ".yml")]
        return Artifact("hls4ml", out, files, notes, details)

    @staticmethod
    def _check_types(hls_model, precision: dict) -> None:
        """Every type we set is the one hls4ml will compile (its optimizers must not override them)."""
        from hls4ml.model.types import FixedPrecisionType

        for layer in hls_model.get_layers():
            for role, want in precision.get(layer.name, {}).items():
                if role == "result":
                    got = layer.get_output_variable().type.precision
                elif f"{role}_t" in layer.types:
                    got = layer.types[f"{role}_t"].precision
                else:
                    raise ExportError(f"hls4ml layer {layer.name!r} has no {role} type (set {want})")
                n = 5 if want.count(",") >= 3 else 3  # rounding/saturation compared where we set them
                if not isinstance(got, FixedPrecisionType) or _fields(got)[:n] != _parse(want)[:n]:
                    raise ExportError(f"hls4ml changed the {role} type of layer {layer.name!r} to {got} (set {want})")

    @staticmethod
    def _integers(y: np.ndarray, ig: IntGraph) -> np.ndarray:
        q = np.round(y / ig.output_scale)
        if not np.array_equal(q * ig.output_scale, y):
            raise ExportError("hls4ml outputs are not on the output grid")
        return q.astype(np.int64)

    def run(self, artifact: Artifact, x, keep: bool = False):
        d = artifact.details
        path = Path(artifact.path)
        x = np.asarray(x, dtype=np.float32)
        n_out = int(np.prod(d["output_shape"]))
        y = _call_library(path / d["library"], x, n_out)
        out = np.round(_output(y, d["output_shape"]) / d["output_scale"]).astype(np.int64)
        if not keep:
            return out
        traces = _trace_library(path / d["library"], x, n_out, d["traced_layers"], d["n_traced"])
        ints = {}
        for node, lname in d["node_layers"].items():
            if lname not in traces:
                continue
            frac = _frac_of(d["precision"][lname]["result"])
            ints[node] = np.round(_channels_first(traces[lname]) * 2.0**frac).astype(np.int64)
        return out, ints


def _parse(t: str) -> tuple:
    """(width, integer bits, signed, rounding, saturation) of an ``ap_[u]fixed<...>`` text."""
    args = [a.strip() for a in t[t.index("<") + 1:t.index(">")].split(",")]
    rnd = args[2].replace("AP_", "") if len(args) > 2 else "TRN"
    sat = args[3].replace("AP_", "") if len(args) > 3 else "WRAP"
    return int(args[0]), int(args[1]), not t.startswith("ap_ufixed"), rnd, sat


def _fields(p) -> tuple:
    return (int(p.width), int(p.integer), bool(p.signed), str(p.rounding_mode).replace("AP_", ""),
            str(p.saturation_mode).replace("AP_", ""))


def _frac_of(t: str) -> int:
    args = t[t.index("<") + 1:t.index(">")].split(",")
    return int(args[0]) - int(args[1])
