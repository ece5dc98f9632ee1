"""Integer lowering: a quantized model -> integer weights, int32 biases, requantization parameters.

The result (:class:`IntGraph`) is executed by :mod:`mixprec.execute` with NumPy kernels (the
reference) or torch kernels (the quantized model's evaluation mode), and walked by exporters.
All parameters are NumPy int64 arrays shaped to broadcast against the tensors they act on.
:func:`save_integer_model` writes a model's lowered program to ``.npz`` plus JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .granularity import expand, reduce_to
from .graph.functions import table_function
from .graph.ir import Graph
from .numerics import INT32_MAX, INT32_MIN, Requant, add_left_shift, make_requant, qrange

if TYPE_CHECKING:
    from .nn.model import QuantModel

REQUANT_KIND = {"scaled": "tflm", "fixed": "pow2"}


@dataclass
class OutputGrid:
    """How a node's output integers relate to reals: ``real = int * scale`` with one ``scale`` per
    tensor; ``lo``/``hi`` clamp (range and fused activation) and ``post_shift`` place elements
    with a coarser grid (fixed point, per-element precision) onto the common one."""

    scale: float
    bits: np.ndarray
    signed: bool
    lo: np.ndarray
    hi: np.ndarray
    elem_scale: np.ndarray  # the quantizer's own scale per element (broadcastable)
    post_shift: np.ndarray | None = None


@dataclass
class IntNode:
    name: str
    op: str
    inputs: list[str]
    attrs: dict
    out_shape: tuple[int, ...]
    grid: OutputGrid | None = None  # for requantizing ops
    params: dict = field(default_factory=dict)  # weight, bias, requant, ...


@dataclass
class IntGraph:
    nodes: list[IntNode]
    output: str
    numerics: str
    output_scale: float

    def __getitem__(self, name: str) -> IntNode:
        return next(n for n in self.nodes if n.name == name)

    def map_arrays(self, fn) -> "IntGraph":
        """A copy with every parameter array passed through ``fn`` (e.g. to torch tensors)."""
        def conv(v):
            if isinstance(v, np.ndarray):
                return fn(v)
            if isinstance(v, Requant):
                return Requant(v.kind, fn(np.asarray(v.multiplier)), fn(np.asarray(v.shift)))
            return v
        nodes = []
        for n in self.nodes:
            grid = None
            if n.grid is not None:
                g = n.grid
                grid = OutputGrid(g.scale, g.bits, g.signed, fn(g.lo), fn(g.hi), g.elem_scale,
                                  None if g.post_shift is None else fn(g.post_shift))
            nodes.append(IntNode(n.name, n.op, n.inputs, n.attrs, n.out_shape, grid,
                                 {k: conv(v) for k, v in n.params.items()}))
        return IntGraph(nodes, self.output, self.numerics, self.output_scale)


def _channel_shape(out_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (out_shape[0],) + (1,) * (len(out_shape) - 1)


def _round_bound(value: float, scale: np.ndarray, default: np.ndarray) -> np.ndarray:
    if not np.isfinite(value):
        return default
    return np.round(np.float64(value) / scale).astype(np.int64)


def output_grid(qp, out_shape: tuple[int, ...], act_min: float, act_max: float) -> OutputGrid:
    """Freeze an activation quantizer's grid, intersected with the fused activation's bounds."""
    elem_scale = expand(qp.scale.detach().double(), out_shape).cpu().numpy()
    bits = expand(qp.bits.detach().round(), out_shape).to(torch.int64).cpu().numpy()
    common = float(elem_scale.min())
    lo, hi = qrange(bits, qp.signed)
    lo, hi = np.broadcast_to(lo, out_shape), np.broadcast_to(hi, out_shape)
    lo = np.maximum(lo, _round_bound(act_min, elem_scale, lo))
    hi = np.minimum(hi, _round_bound(act_max, elem_scale, hi))
    lo, hi = _compact(lo), _compact(hi)
    post = np.round(np.log2(elem_scale / common)).astype(np.int64)
    if np.any(post != np.log2(elem_scale / common)):
        raise ValueError("per-element activation scales must be powers of two apart (fixed-point numerics)")
    return OutputGrid(common, _compact(bits), qp.signed, lo, hi, _compact(elem_scale),
                      _compact(post) if np.any(post) else None)


def _compact(a: np.ndarray) -> np.ndarray:
    """Collapse dims along which an array is constant (keeps broadcasting, saves memory)."""
    a = np.asarray(a)
    for d in range(a.ndim):
        first = np.take(a, [0], axis=d)
        if a.shape[d] > 1 and np.all(a == first):
            a = first
    return np.ascontiguousarray(a)


def integer_weights(w: torch.Tensor, wqp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dequantized, integer, channel scale)``: the weights on their quantizer's grid (float64),
    and as the deployed int64 codes on each output channel's finest grid, with that grid's scale."""
    shape = tuple(w.shape)
    full = wqp.full(shape)
    w_scale = full.scale.detach().double()
    lo, hi = qrange(full.bits.detach().round(), True, wqp.narrow)
    k = torch.clamp(torch.round(w.detach().double() / w_scale), lo, hi)
    channel_scale = reduce_to(w_scale, _channel_shape(shape), "amin")  # the channel's finest grid
    w_int = torch.round(k * w_scale / channel_scale).to(torch.int64)  # exact: powers of two apart
    return k * w_scale, w_int, channel_scale


def lower_weighted(node, w: torch.Tensor, b: torch.Tensor, wqp, s_in: float, grid: OutputGrid, kind: str) -> dict:
    """Integer weight, int32 bias and per-channel requantization of a conv/linear node."""
    _, w_int, channel_scale = integer_weights(w, wqp)
    acc_scale = (s_in * channel_scale.reshape(-1)).cpu().numpy()
    b_int = np.clip(np.round(b.detach().double().cpu().numpy() / acc_scale), INT32_MIN, INT32_MAX).astype(np.int64)
    acc_scale_b = acc_scale.reshape(_channel_shape(node.out_shape))
    requant = make_requant(acc_scale_b / grid.elem_scale, kind)
    return {"weight": w_int.cpu().numpy(), "bias": b_int.reshape(_channel_shape(node.out_shape)),
            "requant": requant, "acc_scale": acc_scale}


def lower_add(s_a: float, s_b: float, grid: OutputGrid, kind: str, max_in_bits: int) -> dict:
    if kind == "tflm":
        left = add_left_shift(max_in_bits)
        twice_max = 2.0 * max(s_a, s_b)
        return {"left_shift": left,
                "requant_a": make_requant(np.array(s_a / twice_max), kind),
                "requant_b": make_requant(np.array(s_b / twice_max), kind),
                "requant": make_requant(twice_max / (2.0**left * grid.elem_scale), kind)}
    s_acc = min(s_a, s_b)
    return {"align_a": int(round(np.log2(s_a / s_acc))), "align_b": int(round(np.log2(s_b / s_acc))),
            "requant": make_requant(s_acc / grid.elem_scale, kind)}


def pool_divisor(attrs: dict, in_shape: tuple[int, ...]) -> np.ndarray:
    """What an average pooling divides each window's integer sum by: the kernel size, or (padding
    not counted) the number of the window's elements inside the input, per output position."""
    n = int(np.prod(attrs["kernel_size"]))
    if attrs.get("count_include_pad", True) or not any(attrs["padding"]):
        return np.array(n, dtype=np.int64)
    count = np.ones((), dtype=np.int64)
    for size, k, s, p in zip(in_shape[1:], attrs["kernel_size"], attrs["stride"], attrs["padding"]):
        first = np.arange((size + 2 * p - k) // s + 1) * s - p  # each window's first index along this dim
        inside = np.minimum(first + k, size) - np.maximum(first, 0)  # a window never lies wholly in padding
        count = np.multiply.outer(count, inside)
    return count[None]


def channel_slice(a, start: int, stop: int) -> np.ndarray:
    """Channels ``start:stop`` (dim 0) of an array that broadcasts against a tensor (a constant
    dim 0 broadcasts to every slice)."""
    a = np.asarray(a)
    return a if a.ndim == 0 or a.shape[0] == 1 else a[start:stop]


def lower_onto_channels(s_in: float, grid: OutputGrid, start: int, stop: int, kind: str) -> dict:
    """The rescale of integers of scale ``s_in`` onto channels ``start:stop`` of the output grid
    (``requant``) and those channels' clamp (``lo``, ``hi``) and storage shift (``post_shift``)."""
    params = {"requant": make_requant(s_in / channel_slice(grid.elem_scale, start, stop), kind),
              "lo": channel_slice(grid.lo, start, stop), "hi": channel_slice(grid.hi, start, stop)}
    if grid.post_shift is not None:
        params["post_shift"] = channel_slice(grid.post_shift, start, stop)
    return params


def lower_concat(in_scales: list[float], in_channels: list[int], grid: OutputGrid, kind: str) -> dict:
    """Per input ``i``: ``lower_onto_channels`` for its channels of the output grid, the keys suffixed
    ``_i`` (``requant_i``, ``lo_i``, ``hi_i``, ``post_shift_i``)."""
    params, start = {}, 0
    for i, (s_in, c) in enumerate(zip(in_scales, in_channels)):
        params.update({f"{k}_{i}": v for k, v in lower_onto_channels(s_in, grid, start, start + c, kind).items()})
        start += c
    return params


#: Entries of one lookup table: every code of an input of at most 8 bits
TABLE_ENTRIES = 256
TABLE_MAX_BITS = 8


def lower_table(node, src: OutputGrid, grid: OutputGrid) -> dict:
    """The lookup tables of a ``table`` node: for each group of elements that share their input and
    output grids (the fewest equal row-major blocks: one per tensor, slice, channel or element),
    ``f(k * s_in)`` rounded onto the output grid and clamped, for every input code ``k``
    from ``base`` (-128 or 0) on. ``offset`` (per element) points at its group's table (``offset //
    256`` is the group, as ``-base`` < 256); ``in_shift``
    and the output's post-shift move between codes and the tensors' common grids."""
    shape = tuple(node.out_shape)
    for g, side in ((src, "input"), (grid, "output")):
        if int(np.max(g.bits)) > TABLE_MAX_BITS:
            raise ValueError(f"layer {node.name!r} ({node.attrs['function']}): a lookup table reads and writes codes "
                             f"of at most {TABLE_MAX_BITS} bits ({TABLE_ENTRIES} entries, as TFLite-Micro's int8 "
                             f"kernels); its {side} has {int(np.max(g.bits))} bits: give activations {TABLE_MAX_BITS} "
                             f"bits or fewer (--act-bits)")
    full = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), shape).reshape(-1) for k, v in
            (("s_in", src.elem_scale), ("s_out", grid.elem_scale), ("lo", grid.lo), ("hi", grid.hi))}
    key = np.stack(list(full.values()), axis=1)
    groups = _distinct_prefix(key)
    per = key.shape[0] // groups
    first = key[::per]
    base = -(TABLE_ENTRIES // 2) if src.signed else 0
    codes = torch.arange(base, base + TABLE_ENTRIES, dtype=torch.float64)
    f = table_function(node.attrs)
    tables = [np.clip(np.round(f(codes * s_in).numpy() / s_out), lo, hi) for s_in, s_out, lo, hi in first]
    offset = (np.arange(groups, dtype=np.int64) * TABLE_ENTRIES).repeat(per).reshape(shape) - base
    in_shift = None if src.post_shift is None else np.broadcast_to(src.post_shift, shape)
    return {"table": np.concatenate(tables).astype(np.int64), "offset": _compact(offset), "base": base,
            **({} if in_shift is None else {"in_shift": _compact(in_shift)})}


def grid_seen_by(graph: Graph, name: str, grid: OutputGrid) -> OutputGrid:
    """``grid`` (the grid of tensor ``name``'s source) over ``name``'s own shape: the same grid where
    ``name`` is its source; through flatten element by element; through a view of channels, those
    channels; through pooling a per-channel grid,
    each channel's entry over its elements (per-element entries cannot follow a pool: ValueError)."""
    node, source = graph[name], graph[graph.grid_source(name)]
    if source.name == name:
        return grid
    if node.op == "narrow":  # its channels of what its input sees
        seen = grid_seen_by(graph, node.inputs[0], grid)
        start, stop = node.attrs["start"], node.attrs["stop"]

        def cut(a):
            return a if a is None or np.asarray(a).size == 1 else np.asarray(a)[start:stop]
        return OutputGrid(seen.scale, cut(seen.bits), seen.signed, cut(seen.lo), cut(seen.hi), cut(seen.elem_scale),
                          cut(seen.post_shift))
    src_shape, shape = tuple(source.out_shape), tuple(node.out_shape)
    flattened = graph.buffer_source(name) == source.name  # views only: the elements keep their order

    def onto(a):
        if a is None or np.asarray(a).size == 1:
            return a if a is None else np.asarray(a).reshape((1,) * len(shape))
        a = np.asarray(a)
        if flattened:
            return np.broadcast_to(a, src_shape).reshape(shape)
        if a.shape[0] != src_shape[0] or any(d != 1 for d in a.shape[1:]):
            raise ValueError(f"tensor {name!r} ({node.op} of {source.name!r}): its elements' grids vary within a "
                             f"channel, which pooling or flattening does not carry; a lookup table needs a "
                             f"per-tensor or per-channel grid here")
        per = int(np.prod(shape)) // src_shape[0]
        return a.reshape(-1).repeat(per).reshape(shape) if len(shape) != len(src_shape) else a
    return OutputGrid(grid.scale, onto(grid.bits), grid.signed, onto(grid.lo), onto(grid.hi), onto(grid.elem_scale),
                      onto(grid.post_shift))


def _distinct_prefix(key: np.ndarray) -> int:
    """The fewest row-major groups of ``key``'s rows (a divisor of their count) within which all rows
    are equal."""
    n = key.shape[0]
    for groups in sorted(d for d in range(1, n + 1) if n % d == 0):
        per = n // groups
        if np.array_equal(np.repeat(key[::per], per, axis=0), key):
            return groups
    return n


def lower(graph: Graph, weights: dict, weight_qparams: dict, act_qparams: dict, numerics: str) -> IntGraph:
    """Lower a quantized graph given its float weights/biases and frozen quantizer grids.

    ``weights``: name -> (weight, bias) float tensors; ``weight_qparams`` / ``act_qparams``:
    name -> :class:`~mixprec.quantizers.QParams`.
    """
    kind = REQUANT_KIND[numerics]
    grids: dict[str, OutputGrid] = {}
    nodes: list[IntNode] = []
    for node in graph:
        src_grid = [grids[graph.grid_source(i)] for i in node.inputs]
        grid = None
        params: dict = {}
        if node.name in act_qparams:
            grid = output_grid(act_qparams[node.name], node.out_shape,
                               node.attrs.get("act_min", float("-inf")), node.attrs.get("act_max", float("inf")))
            grids[node.name] = grid
        if node.op in ("conv", "linear"):
            w, b = weights[node.name]
            params = lower_weighted(node, w, b, weight_qparams[node.name], src_grid[0].scale, grid, kind)
        elif node.op == "add":
            max_bits = int(max(np.max(g.bits) for g in src_grid))
            params = lower_add(src_grid[0].scale, src_grid[1].scale, grid, kind, max_bits)
        elif node.op == "concat":
            params = lower_concat([g.scale for g in src_grid], [s[0] for s in node.in_shapes], grid, kind)
        elif node.op == "avgpool":
            params = {"divisor": pool_divisor(node.attrs, graph[node.inputs[0]].out_shape)}
        elif node.op == "mul":  # the product of two codes is on the grid s_a * s_b
            params = {"requant": make_requant(src_grid[0].scale * src_grid[1].scale / grid.elem_scale, kind)}
        elif node.op == "table":
            params = lower_table(node, grid_seen_by(graph, node.inputs[0], src_grid[0]), grid)
        elif node.op in ("act", "slice"):
            params = {"requant": make_requant(src_grid[0].scale / grid.elem_scale, kind)}
        elif node.op == "pad":  # the input's channels onto theirs of the output grid, as one input of a concat
            params = lower_onto_channels(src_grid[0].scale, grid, node.attrs["before"],
                                         node.out_shape[0] - node.attrs["after"], kind)
        nodes.append(IntNode(node.name, node.op, list(node.inputs), dict(node.attrs), node.out_shape, grid, params))
    out_scale = grids[graph.grid_source(graph.output)].scale
    return IntGraph(nodes, graph.output, numerics, out_scale)


def save_integer_model(qm: QuantModel, path: str | Path) -> Path:
    """Write the lowered integer program (weights, biases, requantization, grids) as ``.npz``
    plus a JSON description: what the reference interpreter and every exporter consume."""
    ig = qm.lower()
    arrays, meta = {}, {"numerics": ig.numerics, "output": ig.output, "output_scale": ig.output_scale, "nodes": []}
    for n in ig.nodes:
        entry = {"name": n.name, "op": n.op, "inputs": n.inputs, "out_shape": list(n.out_shape),
                 "attrs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in n.attrs.items()}}
        if n.grid is not None:
            entry["scale"] = n.grid.scale
            entry["signed"] = n.grid.signed
            arrays[f"{n.name}.bits"] = n.grid.bits
            arrays[f"{n.name}.lo"], arrays[f"{n.name}.hi"] = np.asarray(n.grid.lo), np.asarray(n.grid.hi)
        for k, v in n.params.items():
            if hasattr(v, "kind"):
                arrays[f"{n.name}.{k}.multiplier"], arrays[f"{n.name}.{k}.shift"] = v.multiplier, v.shift
                entry.setdefault("requant", {})[k] = v.kind
            elif isinstance(v, np.ndarray):
                arrays[f"{n.name}.{k}"] = v
            else:
                entry.setdefault("values", {})[k] = v
        meta["nodes"].append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=float))
    return path
