"""The quantized model: a mixprec graph with float parameters and quantizers.

Training mode runs fake quantization with straight-through gradients. Evaluation mode lowers the
model to integers once (cached until the next ``train()``/``load_state_dict``) and runs the
integer program with torch kernels, so what you evaluate is bit-for-bit what the NumPy reference
and every exported artifact compute: the accuracy you measure is the deployed accuracy.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..execute import TorchKernels, explicit_padding, run
from ..graph.functions import table_function
from ..graph.ir import Graph, zeropad_sides
from ..lower import IntGraph, lower
from ..quantizers.base import QParams, Quantizer, fake_quant, round_ste

_ACTIVATIONS = {
    "identity": lambda x, lo, hi: x,
    "relu": lambda x, lo, hi: F.relu(x),
    "relu6": lambda x, lo, hi: F.relu6(x),
    "hardtanh": lambda x, lo, hi: F.hardtanh(x, lo, hi),
}


_ESCAPES = {"%": "%25", "/": "%2F", ".": "/"}
_UNESCAPES = {"%25": "%", "%2F": "/", "/": "."}


def module_key(name: str) -> str:
    """The key a node is registered under in :class:`NodeDict`, and :func:`node_name` its inverse.

    Node names are module paths (``features.3``), and a module name cannot contain ``.``, so the
    key writes every ``.`` as ``/`` (``%`` and ``/`` of a name as ``%25`` and ``%2F``, which keeps
    it reversible): checkpoints read ``layers.features/3.weight``.

    >>> module_key("layer1.0.conv2"), node_name(module_key("layer1.0.conv2"))
    ('layer1/0/conv2', 'layer1.0.conv2')
    """
    return re.sub(r"[%/.]", lambda m: _ESCAPES[m.group()], name)


def node_name(key: str) -> str:
    """The node name a :func:`module_key` stands for."""
    return re.sub(r"%25|%2F|/", lambda m: _UNESCAPES[m.group()], key)


class NodeDict(nn.ModuleDict):
    """A ``ModuleDict`` keyed by graph node names: every method takes and gives node names; the
    modules are registered under their :func:`module_key` (what ``state_dict`` keys show)."""

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[module_key(name)]

    def __setitem__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name!r}: {type(module).__name__} is not a Module")
        # registered directly: a node name may be a Module attribute too ("eval", "type"), which
        # add_module refuses for attribute access that a NodeDict never uses
        self._modules[module_key(name)] = module

    def __delitem__(self, name: str) -> None:
        del self._modules[module_key(name)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and module_key(name) in self._modules

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> list[str]:
        return [node_name(k) for k in self._modules]

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(node_name(k), m) for k, m in self._modules.items()]

    def pop(self, name: str) -> nn.Module:
        return self._modules.pop(module_key(name))


class LayerNamesError(RuntimeError):
    """A state dict whose layers are not the model's (see :meth:`QuantModel.load_state_dict`)."""


class QuantLayer(nn.Module):
    """Float weight and bias of a conv/linear node (BatchNorm folded) and its weight quantizer.

    ``fold_ratio`` is what folding the BatchNorm multiplied the weight by (``||folded|| /
    ||float||``). Adam steps every element by about the learning rate whatever its size, so a
    weight folding shrank takes a relatively larger step than the float phase gave it: on int8
    inputs (magnitude ~128) a DS-CNN's first folded conv weights are ~3e-3, QAT at lr 5e-4 moved
    them by 83% in 10 epochs (the other layers by 0.5-5%), and a keyword-spotting model fell from
    73% to chance. :meth:`QuantModel.weight_parameters` scales such a weight's step by the ratio.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, quantizer: Quantizer, fold_ratio: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.quantizer = quantizer
        self.fold_ratio = float(fold_ratio)

    def qparams(self) -> QParams:
        return self.quantizer.qparams(self.weight)

    def gated_bias(self, hard: bool) -> torch.Tensor:
        """The bias times the quantizer's output gate where it has one (a channel a method may
        prune loses its bias with it); ``hard``: the gate of the model lowering takes."""
        gate = self.quantizer.output_gate(hard)
        return self.bias if gate is None else self.bias * gate.to(self.bias.dtype)


class QuantModel(nn.Module):
    def __init__(self, graph: Graph, layers: dict[str, QuantLayer], act_quantizers: dict[str, Quantizer],
                 numerics: str, target_name: str = "generic"):
        super().__init__()
        self.graph = graph
        self.numerics = numerics
        self.target_name = target_name
        self.layers = NodeDict(layers)  # keyed by node name (``features.3``), see module_key
        self.act_quantizers = NodeDict(act_quantizers)
        # channels removed by ``mixprec.prune``: per weighted layer {"channels": n, "kept": [i, ...]},
        # indices of the full-width model the graph was traced from; None where none were removed
        self.pruning: dict[str, dict] | None = None
        self._int_graph: IntGraph | None = None
        self._int_graph_torch: IntGraph | None = None

    # -- structure -------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input.out_shape

    def act_quantizer(self, name: str) -> Quantizer:
        return self.act_quantizers[self.graph.grid_source(name)]

    def weight_parameters(self) -> list[dict]:
        """Weights and biases of every layer (what trains when the bits stay frozen), as optimiser
        parameter groups: a weight that BatchNorm folding shrank steps at ``lr * fold_ratio``
        (``lr_scale``, read by the training loop), the float phase's step relative to its size.
        Folding that enlarged a weight keeps the run's learning rate: a relatively smaller step
        than the float phase's is what QAT always took."""
        plain, groups = [], []
        for layer in self.layers.values():
            if layer.fold_ratio < 1.0:
                groups.append({"params": [layer.weight], "lr_scale": layer.fold_ratio})
                plain.append(layer.bias)
            else:
                plain += [layer.weight, layer.bias]
        return [{"params": plain}] + groups

    def weight_bits(self) -> dict[str, torch.Tensor]:
        return {name: layer.quantizer.bits() for name, layer in self.layers.items()}

    def act_bits(self) -> dict[str, torch.Tensor]:
        return {name: q.bits() for name, q in self.act_quantizers.items()}

    def act_shifts(self) -> dict[str, torch.Tensor]:
        """Post-shifts of the activation grids where they are not all zero (fixed-point numerics with
        per-channel or finer scales): ``log2(scale_e / finest scale)``, as lowering places each
        element's code on its tensor's common grid (``lower.OutputGrid.post_shift``). Empty before
        calibration (no grid yet). The cost model sizes pooled buffers with them."""
        out = {}
        for name, q in self.act_quantizers.items():
            try:
                scale = q.qparams().scale.detach().double()
            except RuntimeError:  # not calibrated
                continue
            shift = torch.round(torch.log2(scale / scale.amin()))
            if bool((shift != 0).any()):
                out[name] = shift.float()
        return out

    # -- training path ---------------------------------------------------------------------
    @torch.no_grad()  # the bias grid follows the weight and input grids but trains neither
    def _bias_qparams(self, layer: QuantLayer, in_name: str) -> QParams:
        s_in = self.act_quantizer(in_name).qparams().scale.amin()  # the common (finest) grid
        wqp = layer.qparams()
        channel = wqp.full(tuple(layer.weight.shape)).scale.reshape(layer.weight.shape[0], -1).amin(1)
        return QParams((s_in * channel).reshape(-1), torch.full_like(channel, 32.0), signed=True)

    def _weighted(self, node, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[node.name]
        w = layer.quantizer(layer.weight)  # the method's own gradients (equal to fake_quant(weight, wqp) in value)
        b = fake_quant(layer.gated_bias(hard=False), self._bias_qparams(layer, node.inputs[0]))
        if node.op == "linear":
            return F.linear(x, w, b)
        a = node.attrs
        conv = F.conv1d if a["dims"] == 1 else F.conv2d
        x, padding = explicit_padding(x, a)
        return conv(x, w, b, a["stride"], padding, a["dilation"], a["groups"])

    def _fake_quant_step(self, node, args: list[torch.Tensor]) -> torch.Tensor:
        op, a = node.op, node.attrs
        if op == "input":
            return self.act_quantizers["input"](args[0])
        if op == "maxpool":
            fn = F.max_pool1d if a["dims"] == 1 else F.max_pool2d
            return fn(args[0], a["kernel_size"], a["stride"], a["padding"])
        if op == "avgpool":
            fn = F.avg_pool1d if a["dims"] == 1 else F.avg_pool2d
            scale = self.act_quantizer(node.inputs[0]).qparams().scale.amin().detach()
            mean = fn(args[0], a["kernel_size"], a["stride"], a["padding"],
                      count_include_pad=a.get("count_include_pad", True))
            return round_ste(mean / scale) * scale  # stays on its grid
        if op == "flatten":
            return torch.flatten(args[0], 1)
        if op == "zeropad":  # zeros lie on every grid
            return F.pad(args[0], zeropad_sides(a))
        if op == "narrow":  # a view: the input's channels on the input's grid
            return args[0][:, a["start"]:a["stop"]]
        if op in ("conv", "linear"):
            y = self._weighted(node, args[0])
        elif op == "add":
            y = args[0] + args[1]
        elif op == "concat":
            y = torch.cat(args, dim=1)
        elif op == "mul":
            a_, b_ = args
            y = a_ * b_.reshape(tuple(b_.shape) + (1,) * (a_.dim() - b_.dim()))
        elif op == "table":
            y = table_function(a)(args[0])
        elif op == "slice":
            y = args[0][:, a["start"]:a["stop"]]
        elif op == "pad":  # zeros lie on every grid: padding before or after the requantization is the same
            y = F.pad(args[0], (0, 0) * (args[0].dim() - 2) + (a["before"], a["after"]))
        else:  # act
            y = args[0]
        y = _ACTIVATIONS[a["activation"]](y, a.get("act_min"), a.get("act_max"))
        return self.act_quantizers[node.name](y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.integer_forward(x)
        env: dict[str, torch.Tensor] = {}
        for node in self.graph:
            args = [x] if node.op == "input" else [env[i] for i in node.inputs]
            env[node.name] = self._fake_quant_step(node, args)
        return env[self.graph.output]

    # -- integer path ----------------------------------------------------------------------
    def lower(self) -> IntGraph:
        """The integer program of the current parameters (cached until they may change)."""
        if self._int_graph is None:
            with torch.no_grad():
                weights = {n: (l.weight, l.gated_bias(hard=True)) for n, l in self.layers.items()}
                wqp = {n: l.qparams() for n, l in self.layers.items()}
                aqp = {n: q.qparams() for n, q in self.act_quantizers.items()}
                self._int_graph = lower(self.graph, weights, wqp, aqp, self.numerics)
        return self._int_graph

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the integer program with torch kernels and return real values (int * scale)."""
        if self._int_graph_torch is None or self._int_graph is None:
            device = x.device
            self._int_graph_torch = self.lower().map_arrays(lambda a: torch.as_tensor(a, device=device))
        with torch.no_grad():
            y = run(self._int_graph_torch, x, TorchKernels)
        return y.to(torch.float32) * self._int_graph_torch.output_scale

    def invalidate(self) -> None:
        """Forget the cached integer program (call after changing parameters in eval mode)."""
        self._int_graph = None
        self._int_graph_torch = None

    def train(self, mode: bool = True):
        self.invalidate()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``strict``, a state dict of other layers raises
        :class:`LayerNamesError` naming both sets of layers."""
        self.invalidate()
        if strict:
            self._check_layer_names(state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _check_layer_names(self, state_dict) -> None:
        theirs = {node_name(k.split(".")[1]) for k in state_dict if k.startswith(("layers.", "act_quantizers."))}
        ours = set(self.layers.keys()) | set(self.act_quantizers.keys())
        if theirs == ours:
            return
        raise LayerNamesError(
            f"the state dict's layers ({', '.join(sorted(theirs - ours)) or 'none'}) are not this model's "
            f"({', '.join(sorted(ours - theirs)) or 'none'}). A checkpoint written by mixprec before layers "
            f"took the names of the model's modules (torch.fx names such as '_0_0', or 'features_3' for "
            f"'features.3') does not load: run the search again (--float-from OLD_RUN starts it from the "
            f"old run's float model)")

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Observe activation ranges on some batches (fake-quant path, no weight updates)."""
        was_training = self.training
        super().train(True)
        for xb in batches:
            self.forward(xb[0] if isinstance(xb, (tuple, list)) else xb)
        self.train(was_training)

