"""Float ``nn.Module`` -> mixprec graph, through torch.fx.

Tracing finds the layers; BatchNorm is folded into the conv/linear before it; an activation
directly after a conv, linear or add (with no other user) is fused into it, because integer
kernels apply it as the output clamp. Anything else is an error that names the node.

Nodes are named after the user's model (see :func:`user_name`): a module call takes the module's
path as ``model.named_modules()`` names it (``conv1``, ``features.3``, ``layer1.0.conv2``; a conv or
linear keeps it with its folded BatchNorm and fused activation), a function or method call the
path of the module whose ``forward`` makes it plus the operation torch.fx names it after
(``layer1.0.add``; ``add``, ``flatten``, ``relu`` in the model's own ``forward``).
"""
from __future__ import annotations

import logging
import operator
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .ir import Graph, Node

log = logging.getLogger(__name__)

SUPPORTED = (
    "Conv1d, Conv2d (grouped, depthwise; zero padding as ints, tuples, 'valid' or 'same'), Linear, "
    "BatchNorm1d/2d (after a conv or linear), ReLU, ReLU6, Hardtanh (modules, functions, in place), "
    "Identity, Dropout, MaxPool1d/2d, AvgPool1d/2d (padding counted or not), AdaptiveAvgPool1d/2d "
    "(output size dividing the input), and their F.* forms (F.conv1d/conv2d/linear with the model's "
    "parameters); Flatten, torch.flatten(x, 1), x.view(x.size(0), -1), reshape / squeeze to (batch, "
    "features); x.mean((2, 3)) as global average pooling; residual add (a + b, torch.add, +=); "
    "torch.cat along channels (dim=1); channel slices (x[:, a:b], torch.split, torch.chunk along dim 1); "
    "position steps (x[:, :, ::2, ::2]); "
    "products of two tensors of one shape, or of a tensor and a per-channel vector (squeeze-and-excitation: "
    "x * s.view(b, c, 1, 1)); LeakyReLU, Sigmoid, Tanh, Hardswish, Hardsigmoid, SiLU, GELU, ELU (modules "
    "and functions, as 256-entry lookup tables on 8-bit codes); zero padding (F.pad, nn.ZeroPad2d, "
    "nn.ConstantPad*d with 0) folded into the convolution reading it, else around the positions, and zero channels "
    "added (F.pad(x, (0, 0, 0, 0, a, b))); a softmax or log_softmax at the "
    "output (left out: the deployed model returns the logits)"
)

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
                         "relu": "relu", F.relu_: "relu", torch.relu_: "relu", "relu_": "relu",
                         F.hardtanh_: "hardtanh"}
_IN_PLACE = (F.relu_, torch.relu_, "relu_", F.hardtanh_, "add_", F.leaky_relu_, "sigmoid_", "tanh_")
# functions deployed as lookup tables (graph.functions): the name, and the function form's arguments
# after the input (a module's attributes have the same names)
_TABLE_MODULES = {nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
                  nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.GELU: "gelu", nn.ELU: "elu"}
_TABLE_ARGS = {"leaky_relu": ("negative_slope",), "gelu": ("approximate",), "elu": ("alpha",)}
_TABLE_FUNCTIONS = {F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", "leaky_relu": "leaky_relu",
                    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                    torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", "tanh_": "tanh", F.hardswish: "hardswish",
                    F.hardsigmoid: "hardsigmoid", F.silu: "silu", F.gelu: "gelu", F.elu: "elu", F.elu_: "elu"}
_ADD_TARGETS = (operator.add, torch.add, operator.iadd, "add", "add_")
_CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate)
_MUL_TARGETS = (operator.mul, torch.mul, operator.imul, "mul", "mul_")
_SPLIT_TARGETS = (torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split")
_FLATTEN_TARGETS = (torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze", torch.squeeze,
                    "unsqueeze", torch.unsqueeze)
_IGNORED_MODULES = (nn.Dropout, nn.Identity)
_IGNORED_FUNCTIONS = (F.dropout, "contiguous", "clone", "detach")
_MEAN_TARGETS = (torch.mean, "mean")
# softmax-like functions: left out at the output (monotone), refused elsewhere
_OUTPUT_TRANSFORMS = {F.softmax: "softmax", torch.softmax: "softmax", "softmax": "softmax",
                      F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", "log_softmax": "log_softmax"}
_OUTPUT_TRANSFORM_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}
# pooling: op, spatial dims, and the functional form's arguments after the input, in order
_POOL_MODULES = {nn.MaxPool1d: ("maxpool", 1), nn.MaxPool2d: ("maxpool", 2), nn.AvgPool1d: ("avgpool", 1),
                 nn.AvgPool2d: ("avgpool", 2), nn.AdaptiveAvgPool1d: ("adaptive", 1),
                 nn.AdaptiveAvgPool2d: ("adaptive", 2)}
_MAX_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_WEIGHTED_FUNCTIONS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.linear: "linear"}
_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_POOL_FUNCTIONS = {F.max_pool1d: ("maxpool", 1, _MAX_ARGS), F.max_pool2d: ("maxpool", 2, _MAX_ARGS),
                   F.avg_pool1d: ("avgpool", 1, _AVG_ARGS), F.avg_pool2d: ("avgpool", 2, _AVG_ARGS),
                   F.adaptive_avg_pool1d: ("adaptive", 1, ("output_size",)),
                   F.adaptive_avg_pool2d: ("adaptive", 2, ("output_size",))}
_FUSABLE_PRODUCERS = ("conv", "linear", "add", "concat", "table", "mul")


class UnsupportedLayerError(ValueError):
    """A node of the traced model has no quantized counterpart."""


@dataclass
class FloatParams:
    """Float weight and bias of a weighted node, BatchNorm already folded in."""

    weight: torch.Tensor
    bias: torch.Tensor
    # ||folded weight|| / ||float weight||: what folding multiplied the weight by (1 without a
    # BatchNorm). Inputs of magnitude ~128 make a first layer's folded weights ~1e-3 (see QuantLayer)
    fold_ratio: float = 1.0


def _activation_bounds(kind: str, module_or_kwargs) -> tuple[float, float]:
    if kind == "relu":
        return 0.0, float("inf")
    if kind == "relu6":
        return 0.0, 6.0
    if kind == "hardtanh":
        get = (lambda k, d: getattr(module_or_kwargs, k, d)) if isinstance(module_or_kwargs, nn.Module) \
            else (lambda k, d: module_or_kwargs.get(k, d))
        return float(get("min_val", -1.0)), float(get("max_val", 1.0))
    return float("-inf"), float("inf")


def _pair(v, dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm):
    """Fold a BatchNorm (running statistics) into the preceding layer's weight and bias.

    >>> conv = nn.Conv2d(1, 2, 1, bias=False); bn = nn.BatchNorm2d(2).eval()
    >>> w, b = fold_batchnorm(conv.weight, torch.zeros(2), bn)
    >>> torch.allclose(bn(conv(torch.ones(1, 1, 1, 1))).flatten(), (w.flatten() + b))
    True
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    w = weight * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = (bias - bn.running_mean) * factor + beta
    return w.detach().clone(), b.detach().clone()


_FX_COUNTER = re.compile(r"_\d+$")  # what torch.fx appends to tell repeated calls apart (add_1)


def user_name(n: fx.Node) -> str:
    """What the user calls fx node ``n``: the module path of a module call (or of an attribute),
    ``input`` for the model's input, else the path of the module whose ``forward`` calls the
    function or method, dot, the operation fx names it after (``layer1.0.add``, or ``add`` in the
    model's own ``forward``); part ``i`` of a ``split`` / ``chunk``, that call's name, dot, ``i``
    (``chunk.1``); an indexing ``x[:, a:b]``, ``slice`` (fx says ``getitem``). Not unique: a module
    called twice, or two sums in one ``forward``."""
    if n.op == "placeholder":
        return "input"
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].target in _SPLIT_TARGETS:
        return f"{user_name(n.args[0])}.{n.args[1]}"
    if n.op in ("call_module", "get_attr"):
        return str(n.target)
    if n.op == "output":
        return n.name
    op = "slice" if n.target is operator.getitem else _FX_COUNTER.sub("", n.name) or n.name  # x[:, a:b]
    scope = _enclosing_module(n)
    return f"{scope}.{op}" if scope else op


def _enclosing_module(n: fx.Node) -> str:
    """The path of the innermost module whose ``forward`` made the call ('' for the model's own)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, value = next(reversed(stack.items()))
    return value[0] if isinstance(value, tuple) else key  # torch >= 2.1: (path, type)


class _Names:
    """Unique node names in graph order: a node takes its :func:`user_name` unless an earlier node
    has it or it is the path of another module the model calls, else the first free ``<name>_1``,
    ``<name>_2``, ... (a module called twice: ``conv``, ``conv_1``). Deterministic: the same model
    gets the same names in every run."""

    def __init__(self, graph: fx.Graph):
        self.reserved = {str(n.target) for n in graph.nodes if n.op == "call_module"} | {"input"}
        self.used: set[str] = set()

    def take(self, n: fx.Node) -> str:
        want = user_name(n)
        own = n.op in ("call_module", "placeholder")  # ``want`` is this node's own module path / "input"
        name, k = want, 0
        while name in self.used or (name in self.reserved and not (own and name == want)):
            k += 1
            name = f"{want}_{k}"
        self.used.add(name)
        return name


class _Builder:
    def __init__(self, traced: fx.GraphModule):
        self.traced = traced
        self.modules = dict(traced.named_modules())
        self.nodes: list[Node] = []
        self.params: dict[str, FloatParams] = {}
        self.name_of: dict[fx.Node, str] = {}  # fx node -> ir node name whose tensor it is
        self.fused_act: set[str] = set()
        self.names = _Names(traced.graph)
        self.output_kind = ""  # a softmax / log_softmax left out at the output
        self.pads: dict[fx.Node, tuple[int, ...]] = {}  # zero padding folded into the conv reading it
        self.splits: dict[fx.Node, list[tuple[int, int]]] = {}  # torch.split / chunk: the channels of each part

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, n: fx.Node) -> tuple[int, ...]:
        meta = n.meta.get("tensor_meta")
        return tuple(meta.shape[1:])

    def fail(self, n: fx.Node, why: str = "") -> None:
        what = type(self.modules[n.target]).__name__ if n.op == "call_module" else _callable_name(n.target)
        name = n.name if n.op == "placeholder" else user_name(n)  # a second input: its argument's name
        where = source_line(n)
        hint = "" if why else _HINTS.get(what, "")
        raise UnsupportedLayerError(
            f"unsupported operation in node '{name}' ({n.op}: {what}){f' at {where}' if where else ''}"
            f"{': ' + why if why else ''}{'; ' + hint if hint else ''}. Supported: {SUPPORTED}.")

    def add(self, fx_node: fx.Node, op: str, inputs: list[str], out_shape: tuple | None = None, **kw) -> Node:
        """A node for ``fx_node`` (its shape unless ``out_shape``: one fx call made of two nodes)."""
        name = self.names.take(fx_node)
        node = Node(name=name, op=op, inputs=inputs, out_shape=out_shape or self.shape(fx_node),
                    in_shapes=[self._ir(i).out_shape for i in inputs], **kw)
        self.nodes.append(node)
        self.name_of[fx_node] = name
        return node

    def _ir(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def src(self, n: fx.Node) -> str:
        if not isinstance(n, fx.Node) or n not in self.name_of:
            raise UnsupportedLayerError(f"input {n!r} is not a tensor produced by a supported op. Supported: {SUPPORTED}.")
        return self.name_of[n]

    def alias(self, n: fx.Node, source: fx.Node) -> None:
        self.name_of[n] = self.src(source)

    # -- node kinds ------------------------------------------------------------------------
    def weighted(self, n: fx.Node, m: nn.Module) -> None:
        if not isinstance(m, nn.Linear) and m.padding_mode != "zeros":
            self.fail(n, f"padding_mode={m.padding_mode!r}: only zero padding is supported (padding_mode='zeros')")
        conv = None if isinstance(m, nn.Linear) else dict(stride=m.stride, padding=m.padding, dilation=m.dilation,
                                                          groups=m.groups)
        self.weighted_node(n, m.weight, m.bias, conv)

    def weighted_node(self, n: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict | None) -> None:
        """A conv (``conv``: stride, padding, dilation, groups as PyTorch takes them) or linear node with
        its float weight and bias (zeros without one)."""
        bias = bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0])
        if conv is None:
            node = self.add(n, "linear", [self.src(n.args[0])], weight_shape=tuple(weight.shape),
                            attrs={"activation": "identity"})
        else:
            dims = weight.dim() - 2
            kernel, dilation = tuple(weight.shape[2:]), _pair(conv.get("dilation", 1), dims)
            before, after = self.conv_padding(n, conv.get("padding", 0), kernel, dilation)
            folded = self.pads.get(n.args[0], ((0,) * dims, (0,) * dims))
            before = tuple(p + q for p, q in zip(before, folded[0]))
            after = tuple(p + q for p, q in zip(after, folded[1]))
            node = self.add(n, "conv", [self.src(n.args[0])], weight_shape=tuple(weight.shape), attrs={
                "dims": dims, "kernel_size": kernel, "stride": _pair(conv.get("stride", 1), dims),
                "padding": before, "dilation": dilation, "groups": int(conv.get("groups", 1)),
                "activation": "identity", **({"padding_after": after} if after != before else {})})
        node.attrs.update(act_min=float("-inf"), act_max=float("inf"))
        self.params[node.name] = FloatParams(weight.detach().clone(), bias)

    def pad(self, n: fx.Node, pads, mode: str = "constant", value: float = 0.0) -> None:
        """Zero padding of the tensor (``F.pad``, ``nn.ZeroPad2d``, ``nn.ConstantPad*d`` with 0): folded
        into the convolution that reads it (the same zeros), each side of each dim as given, or where
        something else reads it too, a ``zeropad`` node (the input's grid, zeros around); zero channels
        added before and after the input's (``F.pad(x, (0, 0, 0, 0, a, b))``, the CIFAR ResNets'
        parameter-free shortcut): a ``pad`` node."""
        sides = 2 * (len(self.shape(n)) - 1)
        pads = list(_pair(pads, sides))  # (left, right[, top, bottom]): last dim first, earlier dims may be left out
        if len(pads) > sides + 2:
            self.fail(n, f"padding {tuple(pads)} pads the batch dim")
        pads += [0] * (sides + 2 - len(pads))
        pads, channels = pads[:sides], pads[sides:]
        if mode != "constant" or value != 0:
            self.fail(n, f"only zero padding folds into the next convolution (this one: {mode}, {value})")
        if any(channels):
            if any(pads) or any(c < 0 for c in channels):
                self.fail(n, f"padding {tuple(pads + channels)}: zero channels are added alone (no cropping, no "
                             "spatial padding in the same call: pad the positions in a call of their own)")
            self.add(n, "pad", [self.src(n.args[0])], attrs={"before": int(channels[0]), "after": int(channels[1]),
                                                           "activation": "identity", "act_min": float("-inf"),
                                                           "act_max": float("inf")})
            return
        if any(p < 0 for p in pads):
            self.fail(n, f"padding {tuple(pads)} crops (a negative pad): slice the positions instead")
        before, after = tuple(reversed(pads[::2])), tuple(reversed(pads[1::2]))  # first dim first
        users = self._fx_users(n)
        to_conv = all(u.op == "call_module" and isinstance(self.modules[u.target], (nn.Conv1d, nn.Conv2d))
                      or u.target in (F.conv1d, F.conv2d) for u in users)
        if users and to_conv:
            self.pads[n] = (before, after)
            self.alias(n, n.args[0])
            return
        self.add(n, "zeropad", [self.src(n.args[0])], attrs={"dims": len(before), "padding": before,
                                                              "padding_after": after})

    def functional_weighted(self, n: fx.Node, kind: str) -> None:
        """``F.conv1d/conv2d/linear`` with the model's own parameters as weight and bias."""
        a = _bound(n, ("weight", "bias") if kind == "linear" else _CONV_ARGS)
        tensors = {k: self.parameter(n, a.get(k)) for k in ("weight", "bias")}
        if tensors["weight"] is None:
            self.fail(n, f"F.{kind} needs a parameter of the model as its weight (an nn.Parameter attribute)")
        self.weighted_node(n, tensors["weight"], tensors["bias"], None if kind == "linear" else a)

    def parameter(self, n: fx.Node, arg) -> torch.Tensor | None:
        """The model parameter a call's argument reads (None for None); refused for a computed tensor."""
        if arg is None:
            return None
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            self.fail(n, "its weight and bias must be parameters of the model, not computed tensors")
        try:
            return self.traced.get_parameter(arg.target)
        except AttributeError:  # a buffer
            return self.traced.get_buffer(arg.target)

    def conv_padding(self, n: fx.Node, padding, kernel: tuple, dilation: tuple) -> tuple[tuple, tuple]:
        """Zero padding per spatial dim, before and after: ints and tuples as given, ``'valid'`` none,
        ``'same'`` half the dilated kernel on each side, an even kernel's extra element after (as
        PyTorch pads it)."""
        if padding == "valid":
            return (0,) * len(kernel), (0,) * len(kernel)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
        p = _pair(padding, len(kernel))
        return p, p

    def batchnorm(self, n: fx.Node, bn: nn.Module) -> None:
        producer = self.src(n.args[0])
        prod = self._ir(producer)
        if prod.op not in ("conv", "linear") or producer in self.fused_act or len(self._fx_users(n.args[0])) != 1:
            self.fail(n, "BatchNorm must directly follow a Conv or Linear whose output has no other user")
        p = self.params[producer]
        before = float(p.weight.norm())
        p.weight, p.bias = fold_batchnorm(p.weight, p.bias, bn)
        p.fold_ratio = float(p.weight.norm()) / before if before > 0 else 1.0
        self.alias(n, n.args[0])

    def activation(self, n: fx.Node, kind: str, bounds: tuple[float, float]) -> None:
        producer = self.src(n.args[0])
        prod = self._ir(producer)
        fusable = (prod.op in _FUSABLE_PRODUCERS and producer not in self.fused_act
                   and len(self._fx_users(n.args[0])) == 1)
        if fusable:
            prod.attrs.update(activation=kind, act_min=bounds[0], act_max=bounds[1])
            self.fused_act.add(producer)
            self.alias(n, n.args[0])
        else:
            self.add(n, "act", [producer], attrs={"activation": kind, "act_min": bounds[0], "act_max": bounds[1]})

    def table(self, n: fx.Node, kind: str, given: dict) -> None:
        """An elementwise function deployed as a lookup table (``graph.functions``): its parameters
        from ``given`` (a module's attributes or a call's arguments, by PyTorch's names)."""
        params = {k: given[k] for k in _TABLE_ARGS.get(kind, ()) if given.get(k) is not None}
        params = {k: v if isinstance(v, str) else float(v) for k, v in params.items()}
        self.add(n, "table", [self.src(n.args[0])], attrs={
            "function": kind, **params, "activation": "identity", "act_min": float("-inf"), "act_max": float("inf")})

    def pool(self, n: fx.Node, kind: str, dims: int, a: dict) -> None:
        """A pooling node from its arguments ``a`` (a module's attributes or a function's arguments,
        by PyTorch's names); what the integer kernels cannot do is refused by name."""
        src = self.src(n.args[0])
        in_shape = self._ir(src).out_shape
        a = {k: self.static(n, v) for k, v in a.items()}  # F.avg_pool2d(x, x.size()[3])
        if kind == "adaptive":
            out = _pair(a["output_size"], dims)
            spatial = in_shape[1:]
            if any(o is None or s % o for o, s in zip(out, spatial)):
                self.fail(n, f"adaptive output size {a['output_size']} must divide the input size {spatial}")
            kernel = tuple(s // o for s, o in zip(spatial, out))
            self.add(n, "avgpool", [src], attrs={"dims": dims, "kernel_size": kernel, "stride": kernel,
                                                 "padding": (0,) * dims})
            return
        kernel = _pair(a["kernel_size"], dims)
        stride = _pair(a.get("stride") or a["kernel_size"], dims)  # None and () mean the kernel size
        padding = _pair(a.get("padding", 0), dims)
        if a.get("ceil_mode"):
            self.fail(n, "ceil_mode=True is not supported")
        if kind == "maxpool":
            if a.get("return_indices"):
                self.fail(n, "return_indices=True is not supported")
            if _pair(a.get("dilation", 1), dims) != (1,) * dims:
                self.fail(n, "dilated max pooling is not supported")
        else:
            if a.get("divisor_override") is not None:
                self.fail(n, "divisor_override is not supported")
        attrs = {"dims": dims, "kernel_size": kernel, "stride": stride, "padding": padding}
        if kind == "avgpool" and any(padding) and not a.get("count_include_pad", True):
            attrs["count_include_pad"] = False  # the mean of the window's elements inside the input
        self.add(n, kind, [src], attrs=attrs)

    def static(self, n: fx.Node, value):
        """An argument of ``n`` as a constant: a shape query of a tensor (``x.size()[3]``, ``x.shape[2]``)
        is its traced value, a tuple or list one element at a time; any other computed value is refused."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.static(n, v) for v in value)
        if not isinstance(value, fx.Node):
            return value
        if not _is_shape_query(value):
            self.fail(n, f"its argument {value.name!r} is computed from tensors; give a constant")
        if value.op == "call_function" and value.target is operator.getitem:
            return self.static(n, value.args[0])[value.args[1]]
        shape = tuple(value.args[0].meta["tensor_meta"].shape)
        if value.op == "call_method" and (len(value.args) > 1 or "dim" in value.kwargs):
            return shape[value.kwargs.get("dim", value.args[1] if len(value.args) > 1 else None)]
        return shape

    def global_mean(self, n: fx.Node) -> None:
        """``x.mean((2, 3))`` (``keepdim`` either way) over every spatial dim: global average pooling,
        then a flatten to (batch, channels) unless the dims are kept."""
        a = _bound(n, ("dim", "keepdim", "dtype"))
        in_shape = self.shape(n.args[0])
        rank = len(in_shape) + 1
        dims = a.get("dim")
        dims = {d % rank for d in (dims if isinstance(dims, (tuple, list)) else [dims])} if dims is not None else None
        if len(in_shape) not in (2, 3) or dims != set(range(2, rank)):
            self.fail(n, f"only a mean over every spatial dim (global average pooling, e.g. x.mean((2, 3)) of a "
                         f"(batch, channels, height, width) tensor) is supported; this one reduces dims "
                         f"{sorted(dims) if dims else 'all'} of {(None,) + in_shape}")
        spatial = tuple(in_shape[1:])
        pooled = (in_shape[0],) + (1,) * len(spatial)
        node = self.add(n, "avgpool", [self.src(n.args[0])], out_shape=pooled, attrs={
            "dims": len(spatial), "kernel_size": spatial, "stride": spatial, "padding": (0,) * len(spatial)})
        if not a.get("keepdim", False):
            self.add(n, "flatten", [node.name])

    def output_transform(self, n: fx.Node, kind: str) -> None:
        """A softmax / log_softmax whose result the model returns: left out of the graph (both are
        monotone, so the integer logits keep the argmax), said in the log and the result."""
        if [u.op for u in n.users] != ["output"]:
            self.fail(n, f"{kind} is supported only as the model's last operation (left out there: the deployed "
                         f"model returns the logits); elsewhere it has no integer kernel")
        if len(self.shape(n)) != 1:
            self.fail(n, f"{kind} over a {len(self.shape(n))}-D output; the model must return (batch, classes)")
        self.output_kind = kind
        log.info("the model's %s at the output is left out: the deployed model returns the integer logits "
                 "(same argmax)", kind)
        self.alias(n, n.args[0])

    def flatten(self, n: fx.Node) -> None:
        in_shape = self.shape(n.args[0])
        out_shape = self.shape(n)
        if out_shape == in_shape:  # squeeze of no size-1 dim, view to the same shape
            self.alias(n, n.args[0])
            return
        if _unit_dims_only(in_shape, out_shape) and all(u.target in _FLATTEN_TARGETS for u in self._fx_users(n)):
            self.alias(n, n.args[0])  # x.squeeze(-1).squeeze(-1): a step of a flatten, which the last one makes
            return
        if len(in_shape) == 1 and _unit_dims_only(in_shape, out_shape) and out_shape[0] == in_shape[0] \
                and all(u.target in _MUL_TARGETS for u in self._fx_users(n)):
            self.alias(n, n.args[0])  # s.view(b, c, 1, 1): a per-channel vector the product broadcasts
            return
        if len(out_shape) != 1 or out_shape[0] != torch.Size(in_shape).numel():
            self.fail(n, f"only flattening to (batch, features) is supported, got {in_shape} -> {out_shape}")
        if len(in_shape) == 1:
            self.alias(n, n.args[0])
        else:
            self.add(n, "flatten", [self.src(n.args[0])])

    def add_op(self, n: fx.Node) -> None:
        args = [a for a in n.args if a is not None]
        if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args) or n.kwargs.get("alpha", 1) != 1:
            self.fail(n, "only the sum of two tensors is supported")
        if self.shape(args[0]) != self.shape(args[1]):
            self.fail(n, "broadcasting add is not supported")
        self.add(n, "add", [self.src(a) for a in args],
                 attrs={"activation": "identity", "act_min": float("-inf"), "act_max": float("inf")})

    def mul(self, n: fx.Node) -> None:
        """The product of two tensors of one shape, or of a feature map and a per-channel vector
        (``x * s.view(b, c, 1, 1)``, either order): integer codes multiplied, then requantized."""
        args = [a for a in n.args if a is not None]
        if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
            self.fail(n, "only the product of two tensors is supported (a constant factor belongs in the layer before)")
        srcs = [self.src(a) for a in args]
        shapes = [self._ir(s_).out_shape for s_ in srcs]

        def per_channel(gate, x):  # (C,) or (C, 1, 1): one value per channel of x
            return gate != x and gate[0] == x[0] and all(d == 1 for d in gate[1:]) and len(gate) in (1, len(x))

        if per_channel(shapes[0], shapes[1]):  # the gate first: s * x
            srcs, shapes = srcs[::-1], shapes[::-1]
        if shapes[0] != shapes[1] and not per_channel(shapes[1], shapes[0]):
            self.fail(n, f"a product of shapes {shapes[0]} and {shapes[1]}: only equal shapes, or a feature map times a "
                         f"per-channel vector (squeeze-and-excitation) are supported")
        self.add(n, "mul", srcs, out_shape=shapes[0],
                 attrs={"activation": "identity", "act_min": float("-inf"), "act_max": float("inf")})

    def split(self, n: fx.Node) -> None:
        """``torch.split(x, size or sizes, dim=1)``, ``torch.chunk(x, n, dim=1)``: the channel range of each
        part, which the ``x_parts[i]`` reading it turns into a slice node."""
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)  # the third argument of all three
        shape = self.shape(n.args[0])
        if int(dim) % (len(shape) + 1) != 1:
            self.fail(n, "only splitting along the channel dim (dim=1) is supported")
        bounds, start = [], 0
        for part in n.meta["tensor_meta"]:  # shape propagation recorded each part
            bounds.append((start, start + part.shape[1]))
            start += part.shape[1]
        self.splits[n] = bounds
        self.name_of[n] = self.src(n.args[0])  # the parts read its tensor

    def getitem(self, n: fx.Node) -> None:
        """``parts[i]`` of a split, or ``x[:, a:b]`` / ``x[:, a:b, ...]``: a slice of channels (a copy
        onto the slice's own grid)."""
        source, index = n.args
        if source in self.splits:
            start, stop = self.splits[source][index]
        else:
            items = index if isinstance(index, tuple) else (index,)
            items = [i for i in items if i is not Ellipsis] if items and items[-1] is Ellipsis else list(items)
            rest = items[2:]
            if items[:2] == [slice(None)] * 2 and rest and self.subsample(n, source, rest):
                return
            if len(items) < 2 or items[0] != slice(None) or not isinstance(items[1], slice) \
                    or any(i != slice(None) for i in rest) or items[1].step not in (None, 1):
                self.fail(n, "only channel slices x[:, a:b] (no step, every other dim whole) and position "
                                 "steps x[:, :, ::2, ::2] are supported")
            start, stop, _ = items[1].indices(self.shape(source)[0])
        src = self.src(source)
        if (start, stop) == (0, self._ir(src).out_shape[0]):
            self.alias(n, source)
            return
        self.add(n, "slice", [src], attrs={"start": int(start), "stop": int(stop), "activation": "identity",
                                          "act_min": float("-inf"), "act_max": float("inf")})

    def subsample(self, n: fx.Node, source: fx.Node, items: list) -> bool:
        """``x[:, :, ::s]`` / ``x[:, :, ::s, ::t]`` (every position from the first, in steps): a max
        pooling of one-element windows at those strides, the same values. False if it is no such index."""
        dims = len(self.shape(source)) - 1
        whole = [slice(None)] * (dims - len(items))
        if len(items) > dims or not all(isinstance(i, slice) and i.start in (None, 0) and i.stop is None
                                        and (i.step or 1) >= 1 for i in items):
            return False
        stride = tuple(int(i.step or 1) for i in items + whole)
        if stride == (1,) * dims:
            self.alias(n, source)
        else:
            self.add(n, "maxpool", [self.src(source)], attrs={"dims": dims, "kernel_size": (1,) * dims,
                                                               "stride": stride, "padding": (0,) * dims})
        return True

    def concat(self, n: fx.Node) -> None:
        """``torch.cat`` of two or more tensors along the channel dim (dim 1 of the batch-first
        tensor, the features of a flattened one): each input is requantized onto the output's grid."""
        a = _bound(n, ("dim",))
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            self.fail(n, "torch.cat needs a list of tensors the model computes")
        rank = len(self.shape(n)) + 1
        if int(a.get("dim", 0)) % rank != 1:
            self.fail(n, f"only concatenation along the channel dim (dim=1) is supported, this one joins dim "
                         f"{a.get('dim', 0)} of a {rank}-D tensor")
        if len(tensors) == 1:
            self.alias(n, tensors[0])
            return
        self.add(n, "concat", [self.src(t) for t in tensors],
                 attrs={"activation": "identity", "act_min": float("-inf"), "act_max": float("inf")})

    def _fx_users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if not _is_shape_query(u)]

    # -- dispatch --------------------------------------------------------------------------
    def visit(self, n: fx.Node) -> None:
        if n.op == "placeholder":  # trace() has already refused models with several inputs
            self.add(n, "input", [])
        elif n.op == "call_module":
            self.module(n, self.modules[n.target])
        elif n.op in ("call_function", "call_method"):
            self.function(n)
        elif n.op == "get_attr":
            if any(not (_is_shape_query(u) or u.target in _WEIGHTED_FUNCTIONS) for u in n.users):
                self.fail(n, "parameters used outside a supported layer")
        elif n.op == "output":
            pass
        else:
            self.fail(n)

    def module(self, n: fx.Node, m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            self.weighted(n, m)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.batchnorm(n, m)
        elif type(m) in _ACTIVATION_MODULES:
            kind = _ACTIVATION_MODULES[type(m)]
            self.activation(n, kind, _activation_bounds(kind, m))
        elif isinstance(m, _IGNORED_MODULES):
            self.alias(n, n.args[0])
        elif type(m) in _TABLE_MODULES:
            self.table(n, _TABLE_MODULES[type(m)], vars(m))
        elif type(m) in _POOL_MODULES:
            kind, dims = _POOL_MODULES[type(m)]
            self.pool(n, kind, dims, vars(m))
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)):
            self.pad(n, m.padding, value=getattr(m, "value", 0.0))
        elif type(m) in _OUTPUT_TRANSFORM_MODULES:
            self.output_transform(n, _OUTPUT_TRANSFORM_MODULES[type(m)])
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                self.fail(n, "Flatten must flatten everything after the batch dimension")
            self.flatten(n)
        else:
            self.fail(n)

    def function(self, n: fx.Node) -> None:
        t = n.target
        if _is_shape_query(n):
            return  # only feeds shape arguments of view/reshape
        if t in _IN_PLACE and not n.users:
            self.fail(n, "an in-place operation whose result is not used: torch.fx does not see it change its "
                         "input, so the layers after it would read the value before it; write x = x.relu_() "
                         "or x = F.relu(x)")
        if t in _ADD_TARGETS:
            self.add_op(n)
        elif t in _CAT_TARGETS:
            self.concat(n)
        elif t in _MUL_TARGETS:
            self.mul(n)
        elif t in _SPLIT_TARGETS:
            self.split(n)
        elif t is operator.getitem:
            self.getitem(n)
        elif t in _ACTIVATION_FUNCTIONS:
            kind = _ACTIVATION_FUNCTIONS[t]
            self.activation(n, kind, _activation_bounds(kind, dict(n.kwargs)))
        elif t in _FLATTEN_TARGETS:
            self.flatten(n)
        elif t in _TABLE_FUNCTIONS:
            kind = _TABLE_FUNCTIONS[t]
            self.table(n, kind, _bound(n, _TABLE_ARGS.get(kind, ())))
        elif t is F.pad:
            a = _bound(n, ("pad", "mode", "value"))
            self.pad(n, a["pad"], a.get("mode", "constant"), a.get("value") or 0.0)
        elif t in _WEIGHTED_FUNCTIONS:
            self.functional_weighted(n, _WEIGHTED_FUNCTIONS[t])
        elif t in _POOL_FUNCTIONS:
            kind, dims, names = _POOL_FUNCTIONS[t]
            self.pool(n, kind, dims, _bound(n, names))
        elif t in _MEAN_TARGETS:
            self.global_mean(n)
        elif t in _OUTPUT_TRANSFORMS:
            self.output_transform(n, _OUTPUT_TRANSFORMS[t])
        elif t in _IGNORED_FUNCTIONS:
            self.alias(n, n.args[0])
        else:
            self.fail(n)


#: The closest supported way to write what is refused, by the layer's or function's name
_HINTS = {
    "LSTM": "recurrent layers are not supported; a 1-D convolution (nn.Conv1d) over time is",
    "GRU": "recurrent layers are not supported; a 1-D convolution (nn.Conv1d) over time is",
    "Upsample": "upsampling is not supported", "interpolate": "upsampling is not supported",
    "LayerNorm": "only BatchNorm right after a conv or linear is supported (folded into it)",
    "matmul": "use nn.Linear",
}


def _is_shape_query(n: fx.Node) -> bool:
    """``x.size()``, ``x.size(0)``, ``x.shape``, ``x.shape[0]``: they feed shape arguments only."""
    if n.op == "call_method" and n.target == "size":
        return True
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return True
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
        and _is_shape_query(n.args[0])


def _callable_name(target) -> str:
    """``F.max_pool2d`` -> ``max_pool2d``; a method's name stays as it is."""
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def source_line(n: fx.Node) -> str:
    """Where in the user's code ``n`` comes from (``nets.py:17 `x = F.gelu(x)```), from the stack trace
    the tracer recorded; '' when none was."""
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', n.stack_trace or "")
              if f"{os.sep}torch{os.sep}" not in f[0]]  # the tracer's own frames
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} `{code.strip()}`"


def _unit_dims_only(a: tuple, b: tuple) -> bool:
    """Whether shapes ``a`` and ``b`` differ in size-1 dims only."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _bound(n: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments after the input, by PyTorch's parameter ``names``: positional then keyword."""
    return {**dict(zip(names, n.args[1:])), **n.kwargs}


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Graph, dict[str, FloatParams]]:
    """Trace ``model`` (its float state) into a mixprec graph plus float parameters per weighted node.

    ``input_shape`` excludes the batch dimension. The model is traced in eval mode so BatchNorm
    running statistics are what gets folded.
    """
    was_training = model.training
    model.eval()  # also through shape propagation: the traced modules are the model's own, and a
    try:          # BatchNorm in train mode would fold a zero batch into its running statistics
        try:
            tracer = fx.Tracer()
            tracer.record_stack_traces = True  # errors can name the user's line
            graph = tracer.trace(model)
            traced = fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as exc:  # tracing errors come from user code: keep the cause
            raise UnsupportedLayerError(f"torch.fx could not trace the model: {exc}. Models must be free of "
                                        f"data-dependent control flow. Supported: {SUPPORTED}.") from exc
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        if len(placeholders) > 1:  # before shape propagation, which would fail on the missing inputs
            _Builder(traced).fail(placeholders[1], "models with more than one input are not supported")
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros((2,) + tuple(input_shape)))
    finally:
        model.train(was_training)
    builder = _Builder(traced)
    output = None
    for n in traced.graph.nodes:
        builder.visit(n)
        if n.op == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node):
                builder.fail(n, "the model must return a single tensor")
            output = builder.src(out)
    graph = Graph(builder.nodes, output, builder.output_kind)
    log.debug("traced %d nodes, %d weighted", len(graph), len(graph.weighted()))
    return graph, builder.params
