"""Physical channel pruning: a quantized model whose 0-bit output channels are gone.

A weighted layer's output channel whose weights all sit at 0 bits is *pruned*; pruning removes it
whole, bias included, as the pruning methods train it (a pruned channel outputs ``act(0) = 0``).
:func:`prune_channels` returns an ordinary, narrower :class:`~mixprec.nn.model.QuantModel` that
computes exactly what :func:`zero_pruned_biases` (the model with the bias of every channel that
carries no signal set to 0) computes, on every output and every kept channel of every tensor.

Which channels go is :mod:`mixprec.graph.channels`' ``alive_channels``: through pooling, ``act``
and flatten (a channel is a block of ``prod(S)`` features of the following linear), across the
producers a residual add ties (a channel goes only where every tied producer pruned it: a pruned
channel whose tied partner is live stays, at 0 bits with zero bias), and through grouped
convolutions (a depthwise channel whose input channel is removed is removed, its bias with it).

The grids have no zero point (symmetric or unsigned from 0), so a real 0 is the integer 0 and a
removed channel contributes nothing to its consumers, provided every node it passes maps 0 to 0:
an activation bounded away from 0 (hardtanh with a positive lower bound) is refused. So are a
pruned output layer (its channels are the outputs), a layer with every channel pruned, and what the
IR cannot express (a depthwise channel pruned while its input channel is kept, a grouped conv whose
groups would end up unequal), each with a ``ValueError`` naming the layer.

The quantizers must be fixed-bit ones (``FixedWeightQuantizer``, ``ActQuantizer``: freeze a learned
model first; a ``TypeError`` says so). Their bits and ranges are sliced with the channels: per-tensor
ones stay, per-slice ones stay per slice where the kept channels cover their slices equally (else
one per kept channel), finer ones lose the removed rows and columns.

Kept channels keep their integers. A weight range is measured over a whole row, the columns that
read removed channels included, so where removing those columns would move a row's scale the new
layer's ``FixedWeightQuantizer`` holds the old one while the row's bits stay
(``FixedWeightQuantizer.hold``); elsewhere it takes its range from the sliced weights, as before.
A calibrated model's integer program is compared with the unpruned one's on the kept channels, and
a pruning that would still change it (a per-channel activation grid or a per-element weight grid
whose finest or widest entry is removed) is refused.

The narrower model records what was removed: ``model.pruning`` names, per weighted layer, its
channels in the full-width model (the one the registry builds) and the ones kept, composed over
successive prunings. A checkpoint saves the record, and rebuilding replays it on a fresh full-width
model with :func:`keep_channels`, the structural step :func:`prune_channels` takes too, before the
saved state loads (``mixprec.search.saved``).

>>> import torch, mixprec
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> qm = mixprec.quantize(net, "generic", (4,), bits={"0": torch.tensor([[8.0], [0.0], [8.0]])}, act_bits=8)
>>> qm.calibrate([torch.randn(8, 4)])
>>> result = prune_channels(qm)
>>> result.kept["0"], tuple(result.model.layers["0"].weight.shape), tuple(result.model.layers["2"].weight.shape)
((0, 2), (2, 4), (2, 2))
>>> result.model.pruning["0"], qm.pruning
({'channels': 3, 'kept': [0, 2]}, None)
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .granularity import expand
from .graph.channels import ChannelMap, alive_channels, channel_map, live_columns
from .graph.ir import REQUANTIZING_OPS, Graph, Node
from .lower import IntGraph
from .nn.model import QuantLayer, QuantModel
from .numerics import Requant
from .quantizers.fixed import ActQuantizer, FixedWeightQuantizer


@dataclass(frozen=True)
class PruneResult:
    """The narrower model and, per weighted layer, the indices of its kept output channels in the
    model pruned (the model's own ``pruning`` counts them in the full-width model: the same where
    that one was not pruned before)."""

    model: QuantModel
    kept: dict[str, tuple[int, ...]]
    channels: dict[str, int]  # each layer's output channels before pruning

    def removed(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(sorted(set(range(self.channels[n])) - set(k))) for n, k in self.kept.items()}

    def to_json(self) -> dict:
        """Per layer its channel count before pruning and the channels kept (for ``result.json``)."""
        return {n: {"channels": self.channels[n], "kept": list(k)} for n, k in self.kept.items()}


def pruned_rows(qm: QuantModel) -> dict[str, np.ndarray]:
    """Per weighted layer, bool (C_out,): the output channels whose weights all have 0 bits."""
    out = {}
    for name, layer in qm.layers.items():
        shape = tuple(layer.weight.shape)
        bits = expand(layer.quantizer.bits().detach().round().cpu(), shape).reshape(shape[0], -1)
        out[name] = (bits <= 0).all(1).numpy()
    return out


def zero_pruned_biases(qm: QuantModel) -> QuantModel:
    """A copy of ``qm`` with the bias of every channel that carries no signal at 0: the pruned ones,
    and grouped-conv channels whose group reads only pruned channels (what :func:`prune_channels`
    computes exactly)."""
    return _zeroed(qm, _live(channel_map(qm.graph), pruned_rows(qm)))


def prune_channels(qm: QuantModel) -> PruneResult:
    """``qm`` without its pruned channels (see the module docstring); ``qm`` is left as it is."""
    graph, cmap = qm.graph, channel_map(qm.graph)
    pruned = pruned_rows(qm)
    _refuse_output_and_empty_layers(graph, cmap, pruned)
    alive = alive_channels(graph, pruned, cmap)
    kept = {n.name: tuple(int(i) for i in np.flatnonzero(alive[n.name])) for n in graph.weighted()}
    source = _zeroed(qm, _live(cmap, pruned))
    model = keep_channels(source, kept)
    _refuse_changed_integers(source, model, alive)
    return PruneResult(model, kept, {n.name: n.out_channels for n in graph.weighted()})


def keep_channels(qm: QuantModel, kept: dict[str, Sequence[int]]) -> QuantModel:
    """``qm`` narrowed to the ``kept`` output channels of each weighted layer (indices of ``qm``'s
    channels; a layer not named keeps those its inputs leave it), and the weight columns that read
    them: the structural step of :func:`prune_channels`, and what a checkpoint of a pruned model
    replays on the full-width model (``mixprec.search.saved.rebuild_quantized``). Weights, biases,
    bits and ranges are sliced as they are; a kept row whose range a removed column set holds its
    grid (``FixedWeightQuantizer.hold``). The narrower model's ``pruning`` records the kept
    channels against the full-width model (``qm.pruning`` composed with this pruning; None where
    nothing was ever removed).

    Kept channels the channel map would not leave are refused with a ``ValueError`` naming the
    layer (a channel kept on one side of an add only, a grouped channel kept whose inputs are all
    removed), as are the output layer's channels and what the IR cannot express."""
    graph, cmap = qm.graph, channel_map(qm.graph)
    alive = _alive_keeping(graph, cmap, kept)
    _refuse_nonzero_activations(graph, alive)
    groups = {n.name: _kept_groups(n, alive) for n in graph.weighted() if n.op == "conv" and n.attrs["groups"] > 1}
    cols = {n.name: live_columns(graph, alive, n.name, cmap) for n in graph.weighted()}
    new_graph = _narrower_graph(graph, alive, cols, groups)
    layers = {n.name: _narrower_layer(qm.layers[n.name], new_graph[n.name], alive[n.name], cols[n.name])
              for n in graph.weighted()}
    acts = {n: _narrower_act(q, new_graph[n], alive[n]) for n, q in qm.act_quantizers.items()}
    model = QuantModel(new_graph, layers, acts, qm.numerics, qm.target_name)
    model.train(qm.training)
    model.pruning = _record(qm, alive)
    return model


# ----------------------------------------------------------------------------- which channels


def _live(cmap: ChannelMap, pruned: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per tensor, bool over its dim 0: the channels that carry a signal (``ChannelMap.live``)."""
    keep = {n: torch.from_numpy((~p).astype(float)) for n, p in pruned.items()}
    return {n: v.numpy() > 0.5 for n, v in cmap.live(keep).items()}


def _zeroed(qm: QuantModel, live: dict[str, np.ndarray]) -> QuantModel:
    out = copy.deepcopy(qm)
    with torch.no_grad():
        for name, layer in out.layers.items():
            dead = torch.from_numpy(~live[name]).to(layer.bias.device)
            layer.bias[dead] = 0.0
    out.invalidate()
    return out


def _alive_keeping(graph: Graph, cmap: ChannelMap, kept: dict[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Per tensor, the channels stored when each weighted layer keeps only its ``kept`` channels:
    exactly those where a layer is named."""
    unknown = sorted(set(kept) - {n.name for n in graph.weighted()})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no such weighted layer in this model")
    rows = {}
    for node in graph.weighted():
        n = node.out_channels
        idx = list(kept.get(node.name, range(n)))
        if any(not 0 <= int(i) < n for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"{node.name}: cannot keep channels {list(idx)} of its {n}: give distinct indices "
                             f"0..{n - 1}")
        rows[node.name] = np.isin(np.arange(n), np.asarray(idx, dtype=np.int64))
    for name in cmap.producers(graph.output):
        if name in rows and not rows[name].all():
            raise ValueError(f"{name}: the output layer's channels are the network's outputs and cannot be removed")
    alive = alive_channels(graph, {n: ~r for n, r in rows.items()}, cmap)
    for node in graph.weighted():
        if not alive[node.name].any():
            raise ValueError(f"{node.name}: every output channel is removed (its inputs are); keep at least one")
        if node.name in kept and not np.array_equal(alive[node.name], rows[node.name]):
            raise ValueError(f"{node.name}: channels {np.flatnonzero(rows[node.name]).tolist()} cannot be kept alone; "
                             f"the channel map keeps {np.flatnonzero(alive[node.name]).tolist()} (a channel stays "
                             f"while a producer tied to it through an add keeps it, and a grouped convolution's "
                             f"channel goes with its group's inputs)")
    return alive


def _record(qm: QuantModel, alive: dict[str, np.ndarray]) -> dict[str, dict] | None:
    """The narrower model's ``pruning``: per weighted layer its channels in the full-width model and
    the ones kept, ``qm.pruning`` composed with ``alive``."""
    weighted = list(qm.graph.weighted())
    if all(alive[n.name].all() for n in weighted):
        return copy.deepcopy(qm.pruning)
    before = qm.pruning or {n.name: {"channels": n.out_channels, "kept": list(range(n.out_channels))}
                            for n in weighted}
    return {n.name: {"channels": int(before[n.name]["channels"]),
                     "kept": [int(before[n.name]["kept"][i]) for i in np.flatnonzero(alive[n.name])]}
            for n in weighted}


def _refuse_output_and_empty_layers(graph: Graph, cmap: ChannelMap, pruned: dict[str, np.ndarray]) -> None:
    for name in cmap.producers(graph.output):
        if name in pruned and pruned[name].any():
            raise ValueError(f"{name}: the output layer's channels are the network's outputs and cannot be pruned "
                             f"(channels {np.flatnonzero(pruned[name]).tolist()} have 0 bits)")
    for name, rows in pruned.items():
        if rows.all():
            raise ValueError(f"{name}: every output channel is pruned; keep at least one")


def _refuse_nonzero_activations(graph: Graph, alive: dict[str, np.ndarray]) -> None:
    """A removed channel must be 0 wherever it goes: every node that requantizes it maps 0 to 0."""
    for node in graph:
        if node.op in REQUANTIZING_OPS and not alive[node.name].all():
            lo, hi = node.attrs.get("act_min", float("-inf")), node.attrs.get("act_max", float("inf"))
            if lo > 0 or hi < 0:
                raise ValueError(f"{node.name}: its activation ({node.attrs.get('activation')} to [{lo}, {hi}]) maps "
                                 f"0 to {min(max(0.0, lo), hi)}, so a removed channel would still add to its "
                                 f"consumers; pruning needs act(0) = 0")


def _kept_groups(node: Node, alive: dict[str, np.ndarray]) -> int:
    """The groups a grouped conv keeps; refuses what a conv of equal groups cannot compute."""
    g, src = node.attrs["groups"], node.inputs[0]
    ins, outs = alive[src].reshape(g, -1), alive[node.name].reshape(g, -1)
    n_in, n_out = ins.sum(1), outs.sum(1)
    depthwise = ins.shape[1] == 1
    for k in range(g):
        if n_out[k] == 0 and n_in[k] > 0:
            if depthwise:
                raise ValueError(f"{node.name}: depthwise channel {k} is pruned while its input channel ({k} of "
                                 f"{src!r}) is kept; a depthwise convolution cannot skip an input channel: prune "
                                 f"that channel as well, or keep this one")
            raise ValueError(f"{node.name}: group {k} loses every output channel while {int(n_in[k])} of its input "
                             f"channels are kept; a grouped convolution cannot skip input channels")
        if n_out[k] > 0 and n_in[k] == 0:
            raise ValueError(f"{node.name}: group {k} keeps output channels (tied through an add to live ones) but "
                             f"reads only removed input channels; a grouped convolution cannot express it")
    used = n_out > 0
    if len(set(n_in[used].tolist())) > 1 or len(set(n_out[used].tolist())) > 1:
        raise ValueError(f"{node.name}: its groups would end up unequal (input channels per group "
                         f"{n_in[used].tolist()}, output channels per group {n_out[used].tolist()}), which a grouped "
                         f"convolution cannot express")
    return int(used.sum())


# ----------------------------------------------------------------------------- the narrower model


def _narrower_graph(graph: Graph, alive: dict, cols: dict, groups: dict) -> Graph:
    shapes = {n.name: (int(alive[n.name].sum()),) + tuple(n.out_shape[1:]) for n in graph}
    nodes = []
    for node in graph:
        attrs, weight_shape = dict(node.attrs), node.weight_shape
        if node.has_weights:
            rows = alive[node.name]
            weight_shape = (int(rows.sum()), int(cols[node.name][rows][0].sum())) + tuple(node.weight_shape[2:])
        if node.name in groups:
            attrs["groups"] = groups[node.name]
        nodes.append(replace(node, out_shape=shapes[node.name], in_shapes=[shapes[i] for i in node.inputs],
                             weight_shape=weight_shape, attrs=attrs))
    return Graph(nodes, graph.output, graph.output_transform)


def _slice_rows_cols(t: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """A tensor of a weight's shape without the removed rows and, per kept row, the removed columns
    (rows keep equal column counts: ``_kept_groups``)."""
    r = torch.from_numpy(rows).to(t.device)
    kept = t[r]
    return kept[torch.from_numpy(cols[rows]).to(t.device)].reshape((kept.shape[0], -1) + tuple(t.shape[2:]))


def _slice_weight_param(p: torch.Tensor, shape: tuple[int, ...], rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """A parameter tiling a weight of ``shape`` (bits, scales) for the kept rows and columns: sliced
    along dim 0 where it is one per row or coarser (``_slice_channels``), expanded and sliced like
    the weight where it varies within a row."""
    p = p.reshape((1,) * (len(shape) - p.dim()) + tuple(p.shape))
    if any(n > 1 for n in p.shape[1:]):
        return _slice_rows_cols(expand(p, shape).clone(), rows, cols)
    return _slice_channels(p, shape[0], rows)


def _slice_channels(p: torch.Tensor, channels: int, rows: np.ndarray) -> torch.Tensor:
    """A parameter with one entry per slice of consecutive channels along dim 0 (bits, scales,
    ranges; per tensor, per slice or per channel) for the kept channels: the entries that cover
    some, while each covers as many (a per-slice one stays per slice), else one per kept channel."""
    if p.dim() == 0 or p.shape[0] == 1:
        return p.clone()
    counts = rows.reshape(p.shape[0], -1).sum(1)
    used = counts > 0
    if len(set(counts[used].tolist())) == 1:
        return p[torch.from_numpy(used).to(p.device)].clone()
    return expand(p, (channels,) + tuple(p.shape[1:]))[torch.from_numpy(rows).to(p.device)].clone()


def _narrower_layer(layer: QuantLayer, node: Node, rows: np.ndarray, cols: np.ndarray) -> QuantLayer:
    if rows.all() and cols.all():
        return copy.deepcopy(layer)
    q = layer.quantizer
    if not isinstance(q, FixedWeightQuantizer):
        raise TypeError(f"{node.name}: prune_channels takes fixed-bit weight quantizers, got {type(q).__name__}: "
                        "freeze the model first (mixprec.search.learned.freeze)")
    shape = tuple(layer.weight.shape)
    with torch.no_grad():
        weight = _slice_rows_cols(layer.weight.detach(), rows, cols)
        bias = layer.bias.detach()[torch.from_numpy(rows).to(layer.bias.device)]
        bits = _slice_weight_param(q.bits().detach(), shape, rows, cols)
        before = _slice_weight_param(q.qparams(layer.weight.detach()).scale.detach(), shape, rows, cols)
        quantizer = FixedWeightQuantizer(node.weight_shape, bits, q.numerics, q.range_rule).to(bits.device)
        after = quantizer.qparams(weight).scale
    if tuple(after.shape) != tuple(before.shape) or not torch.equal(after, before):
        quantizer.hold(before)  # the removed columns set some row's range
    return QuantLayer(weight, bias, quantizer, layer.fold_ratio)


def _narrower_act(q, node: Node, rows: np.ndarray):
    if rows.all():
        return copy.deepcopy(q)
    if not isinstance(q, ActQuantizer):
        raise TypeError(f"{node.name}: prune_channels takes fixed-bit activation quantizers, got {type(q).__name__}: "
                        "freeze the model first (mixprec.search.learned.freeze)")
    channels = len(rows)
    new = ActQuantizer(node.out_shape, _slice_channels(q.bits().detach(), channels, rows), q.numerics, q.momentum,
                       q.clip).to(q.bits_param.device)
    new.running_min = _slice_channels(q.running_min.detach(), channels, rows)
    new.running_max = _slice_channels(q.running_max.detach(), channels, rows)
    new.observed.copy_(q.observed)
    new.set_observing(q.observing)
    return new


# ----------------------------------------------------------------------------- the exactness check


def _refuse_changed_integers(before: QuantModel, after: QuantModel, alive: dict) -> None:
    """The pruned model's integer program must be the unpruned one's on the kept channels (checked
    where the model is calibrated, so that it lowers)."""
    try:
        old, new = before.lower(), after.lower()
    except RuntimeError:  # activation quantizers not calibrated: nothing to lower yet
        return
    cols = {n.name: live_columns(before.graph, alive, n.name) for n in before.graph.weighted()}
    where = _first_difference(old, new, alive, cols)
    if where is None:
        return
    name, what = where
    why = ("its activation grid takes its scale or headroom from the widest bits or finest step of a removed "
           "channel (per-channel or finer activation bits): give the removed channels no wider bits than the kept "
           "ones" if what.startswith("activation") else
           "a kept row's finest weight step sits in a removed column (per-element fixed-point weights), or its "
           "input grid changed: use per-channel weight bits")
    raise ValueError(f"{name}: removing channels would change the integers of the channels it keeps ({what}): {why}")


def _first_difference(old: IntGraph, new: IntGraph, alive: dict, cols: dict) -> tuple[str, str] | None:
    for n in new.nodes:
        o, rows = old[n.name], alive[n.name]

        def same(a, b) -> bool:
            return np.array_equal(_full(a, o.out_shape)[rows], _full(b, n.out_shape))

        if n.grid is not None:
            g0, g1 = o.grid, n.grid
            if g0.scale != g1.scale or g0.signed != g1.signed:
                return n.name, "activation grid scale"
            for field in ("bits", "lo", "hi", "elem_scale", "post_shift"):
                a, b = getattr(g0, field), getattr(g1, field)
                if not same(0 if a is None else a, 0 if b is None else b):
                    return n.name, f"activation grid {field}"
        for key, v in o.params.items():
            w = n.params[key]
            if key == "offset":  # a table's offsets: the tables themselves are compared element by element
                continue
            if key == "table":
                ok = np.array_equal(_element_tables(o, o.out_shape)[rows], _element_tables(n, n.out_shape))
            elif key == "weight":
                ok = np.array_equal(_slice_rows_cols(torch.from_numpy(v), rows, cols[n.name]).numpy(), w)
            elif isinstance(v, Requant):
                ok = v.kind == w.kind and same(v.multiplier, w.multiplier) and same(v.shift, w.shift)
            elif isinstance(v, np.ndarray):
                ok = same(v, w)
            else:
                ok = v == w
            if not ok:
                return n.name, key
    return None


def _element_tables(node, shape: tuple[int, ...]) -> np.ndarray:
    """A ``table`` node's lookup table per element, ``shape + (256,)`` (offsets are a group's table
    start minus the input code base, -128 or 0, so ``offset // 256`` is the group)."""
    tables = np.asarray(node.params["table"]).reshape(-1, 256)
    return tables[np.broadcast_to(node.params["offset"], shape) // 256]


def _full(a, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` broadcast to a tensor of ``shape`` (a 1-d array of one entry per channel along dim 0)."""
    a = np.asarray(a)
    if a.ndim == 1 and len(shape) > 1 and a.shape[0] == shape[0] > 1:
        a = a.reshape((shape[0],) + (1,) * (len(shape) - 1))
    return np.broadcast_to(a, shape)
