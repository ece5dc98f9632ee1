"""Cost tables: every cost of a traced graph on a target, per group and candidate width, computed
once, so that a search scores a discrete assignment (``CostTables.totals``) or a distribution over
widths (``CostTables.expected``) without walking the graph again.

**Groups.** A weighted layer's bits tensor is split along its first dimension: one group per entry
of a per-tensor / per-slice / per-channel tensor (per-element bits: one group per output channel).
An activation quantizer (a node that sets a grid, the input included) is one group. Group ``g``
at width ``w`` means every element of ``g`` at ``min(b_e, w)`` of the base bits ``b`` the tables
were built from (``w`` at or above the group's widest base entry: the group as it is; a width above
it raises every non-zero entry to ``w``): with base bits at the target's widest width this is plain
"the group takes ``w``".

**Tables.** Per weight group and width: the packed bytes of its channels (containers, each channel
from a byte boundary), and for every width of the layer's input quantizer the EBOPs, BOPs and MAC
cycles (the throughput table at the channel's widest weight and the input's widest activation).
Per activation quantizer and width: the bytes of every buffer whose grid it sets (unaligned and
aligned) and their layout-table bytes. Constant terms: biases and requantization entries, the
elementwise cycles, the MACs, the buffers live at each execution step.

- ``totals(weights, acts)``: the exact cost of one choice, every total of ``cost.report`` (FLASH
  with the layout tables, peak RAM from the arena planner, the live-set bound, the MCU paper's
  largest in+out figure, EBOPs, BOPs, latency, energy). FLASH equals ``mixprec.cost_report`` where
  the widths decide every table (scaled numerics, per-tensor activations); ``cost_report`` also
  measures what only the lowered values decide (clamp tables of per-channel grids, alignments of
  per-element fixed-point grids).
- ``expected(p_weights, p_acts)``: the expectation of every additive cost when each group draws its
  width independently, ``p_weights[layer]`` of shape (G, K) and ``p_acts[quantizer]`` of shape
  (A,): exact and differentiable in the probabilities (no cost of the mean width): EBOPs and cycles
  sum ``p_w[g, k] p_a[a] C[g, k, a]`` over both widths, so MPIC latency is the sum over (activation,
  weight) pairs of probability x MACs / throughput(a, w). A layer's width table (one byte per
  output channel, present unless all its groups take one width) is expected as
  ``C_out (1 - sum_k prod_g p[g, k])``, exact when each group's base bits are one width. Peak RAM is
  a maximum, which has no closed-form expectation: ``ram_bytes`` is the largest expected sum of
  the buffers live at one step (a lower bound of the expected peak).

**Pruning.** A width that leaves an output channel without weights (0 bits) prunes it: ``totals``
and ``expected`` then cost the model with the channel removed, with what it frees through the
graph (its bias and requantization entries, its channel of every buffer, the weight columns that
read it, their MACs; ``graph.channels`` for residual ties and grouped convolutions). The per-channel
tables this takes are made on first use (``cost.pruning``, which says what ``expected`` assumes).
``totals`` of a choice without a 0-width group, and ``expected`` where no layer has a 0 width, come
from the tables above as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..granularity import expand
from ..graph.ir import ALIAS_OPS, Graph
from . import compute, memory, pruning
from .bits import BitAssignment, act_bits as resolve_act_bits, act_storage_bits
from .targets import Target

_EPS = 1e-6

#: ``effective(name, bits) -> per-element weight bits for EBOPs`` of layer ``name`` at candidate
#: ``bits`` (the integer weights' effective bits once a model is calibrated); None: nominal bits
EffectiveBits = Callable[[str, torch.Tensor], torch.Tensor]


def padded(bits: torch.Tensor, rank: int) -> torch.Tensor:
    """``bits`` as a float CPU tensor of ``rank`` dims (leading 1s), detached."""
    return bits.detach().cpu().reshape((1,) * (rank - bits.dim()) + tuple(bits.shape)).float()


def cap(bits: torch.Tensor, widths) -> torch.Tensor:
    """``bits`` with group ``g`` (index along dim 0) at width ``widths[g]``: capped at it when it is
    at most the group's widest entry, else every non-zero entry raised to it."""
    g0 = bits.shape[0]
    flat = bits.reshape(g0, -1)
    top = flat.amax(1, keepdim=True)
    w = torch.as_tensor(widths, dtype=flat.dtype).reshape(-1, 1).expand(g0, 1)
    out = torch.where(w <= top + _EPS, torch.minimum(flat, w), torch.where(flat > 0, w, flat))
    return out.reshape(bits.shape)


def cap_all(bits: torch.Tensor, width: float) -> torch.Tensor:
    """``cap`` with the whole tensor as one group (an activation quantizer)."""
    return cap(bits.reshape(1, -1), torch.tensor([float(width)])).reshape(bits.shape)


@dataclass
class ActTable:
    """One activation quantizer: its candidate widths and the buffers whose grid it sets."""

    name: str
    shape: tuple  # the quantizer's own bits shape
    base: torch.Tensor  # base bits, padded to the tensor's rank
    widths: np.ndarray  # (A,) ascending
    buffers: dict  # buffer -> (A,) bytes, unaligned
    aligned: dict  # buffer -> (A,) bytes, aligned to the target
    table_bytes: np.ndarray  # (A,) layout-table bytes of those buffers

    def bits(self, i: int) -> torch.Tensor:
        """The quantizer's bits (its own shape) at ``widths[i]``."""
        return cap_all(self.base, float(self.widths[i])).reshape(self.shape)


@dataclass
class WeightTable:
    """One weighted layer: its groups' candidate widths and their costs."""

    name: str
    in_act: str  # the activation quantizer that sets its input's grid
    shape: tuple  # the quantizer's bits shape
    base: torch.Tensor  # base bits, padded to the weight's rank
    widths: np.ndarray  # (K,) ascending
    flash: np.ndarray  # (G, K) packed weight bytes
    ebops: np.ndarray  # (G, K, A) over the input quantizer's widths (effective bits where given)
    bops: np.ndarray  # (G, K, A) nominal bits x input bits x output positions
    cycles: np.ndarray  # (G, K, A) MAC cycles
    channels: int  # output channels (the width table's bytes when widths differ)
    # per output channel and weight column (dim 1), for what pruning frees (``cost.pruning``)
    col_eff: np.ndarray  # (C_out, K, columns) EBOPs weight bits summed over the kernel
    col_nom: np.ndarray  # (C_out, K, columns) nominal bits summed over the kernel
    col_in_bits: np.ndarray  # (A, C_out, columns) the input bits each column multiplies

    @property
    def groups(self) -> int:
        return self.flash.shape[0]

    def bits(self, choice) -> torch.Tensor:
        """The layer's bits (its quantizer's shape) when group ``g`` takes ``widths[choice[g]]``."""
        return cap(self.base, torch.as_tensor(self.widths[np.asarray(choice)], dtype=torch.float32)).reshape(self.shape)


@dataclass
class CostTables:
    target: Target
    graph: Graph
    layers: dict[str, WeightTable]
    acts: dict[str, ActTable]
    base: BitAssignment  # the assignment the tables were built from (post-shifts included)
    param_bytes: float  # biases and requantization entries (independent of the widths)
    elem_cycles: float
    macs: float
    live_sets: list[list[str]]  # buffers live together at some step (dominated sets dropped)
    buffer_act: dict[str, str]  # buffer -> the activation quantizer that sets its size
    _torch: dict = field(default_factory=dict, repr=False)
    _pruning: dict = field(default_factory=dict, repr=False)  # per-channel tables, made on first use

    # -- one choice ----------------------------------------------------------------------------------
    def totals(self, weights: dict, acts: dict) -> dict[str, float]:
        """Every cost of one choice: ``weights[layer]`` the width index of each group (G,),
        ``acts[quantizer]`` the width index of each activation quantizer. A row left without
        weights is pruned: the cost is the model's with it removed (``cost.pruning``)."""
        pruned = pruning.totals(self, weights, acts)
        if pruned is not None:
            return pruned
        t = self.target
        out = {"weight_bytes": 0.0, "ebops": 0.0, "bops": 0.0, "cycles": 0.0, "table_bytes": 0.0}
        for name, layer in self.layers.items():
            g, k, a = np.arange(layer.groups), np.asarray(weights[name]), acts[layer.in_act]
            out["weight_bytes"] += float(layer.flash[g, k].sum())
            out["ebops"] += float(layer.ebops[g, k, a].sum())
            out["bops"] += float(layer.bops[g, k, a].sum())
            out["cycles"] += float(layer.cycles[g, k, a].sum())
            out["table_bytes"] += memory.weight_table_bytes(self.graph[name], layer.bits(k), t)
        out["table_bytes"] += float(sum(a.table_bytes[acts[q]] for q, a in self.acts.items()))
        sizes = self.buffer_sizes(acts)
        plan = memory.plan_arena({b: int(s) for b, s in sizes.items()}, memory.lifetimes(self.graph), t.alignment)
        in_out = memory.in_out_bytes(self.graph, {b: torch.tensor(float(s)) for b, s in sizes.items()})
        latency = out.pop("cycles") + self.elem_cycles
        return {"flash_bytes": out["weight_bytes"] + self.param_bytes + out["table_bytes"], **out,
                "param_bytes": self.param_bytes, "ram_bytes": float(plan.arena),
                "ram_lower_bound": max(self.live_bytes(acts), default=0.0),
                "ram_mcu_in_out": float(max(in_out.values())) if in_out else 0.0, "macs": self.macs,
                "latency_cycles": latency, "energy_uj": compute.energy_uj(latency, t)}

    def buffer_sizes(self, acts: dict) -> dict[str, float]:
        return {b: self.acts[q].buffers[b][acts[q]] for b, q in self.buffer_act.items()}

    def live_bytes(self, acts: dict) -> list[float]:
        """Aligned bytes live at each step (the sets of ``live_sets``)."""
        size = {b: self.acts[q].aligned[b][acts[q]] for b, q in self.buffer_act.items()}
        return [float(sum(size[b] for b in live)) for live in self.live_sets]

    def start(self) -> tuple[dict, dict]:
        """The choice that leaves the base bits as they are (each group at its widest base entry,
        or the narrowest candidate above it)."""
        w = {n: np.array([int(np.searchsorted(layer.widths, float(m) - _EPS)) for m in
                          layer.base.reshape(layer.groups, -1).amax(1).tolist()]).clip(0, len(layer.widths) - 1)
             for n, layer in self.layers.items()}
        a = {q: int(np.searchsorted(act.widths, float(act.base.max()) - _EPS)) for q, act in self.acts.items()}
        return w, {q: min(i, len(self.acts[q].widths) - 1) for q, i in a.items()}

    # -- a distribution over choices -----------------------------------------------------------------
    def expected(self, p_weights: dict, p_acts: dict) -> dict[str, torch.Tensor]:
        """The expectation of every additive cost under independent per-group probabilities:
        ``p_weights[layer]`` (G, K) and ``p_acts[quantizer]`` (A,), rows summing to 1. Where a
        width prunes rows, what they free is expected too (``cost.pruning``)."""
        if pruning.can_prune(self):
            return pruning.expected(self, p_weights, p_acts)
        zero = torch.zeros((), dtype=torch.float64)
        out = {k: zero for k in ("weight_bytes", "table_bytes", "ebops", "bops", "cycles")}
        for name, layer in self.layers.items():
            pw = p_weights[name].double()
            pa = p_acts[layer.in_act].double()
            tab = self._tensors("w", name)
            out["weight_bytes"] = out["weight_bytes"] + (pw * tab["flash"]).sum()
            for key in ("ebops", "bops", "cycles"):
                out[key] = out[key] + torch.einsum("gk,a,gka->", pw, pa, tab[key])
            if layer.groups > 1:
                same = torch.prod(pw, dim=0).sum()  # every group at one width
                out["table_bytes"] = out["table_bytes"] + layer.channels * (1.0 - same)
        for q, act in self.acts.items():
            pa = p_acts[q].double()
            out["table_bytes"] = out["table_bytes"] + (pa * self._tensors("a", q)["tables"]).sum()
        size = {b: (p_acts[q].double() * self._tensors("a", q)["aligned"][b]).sum() for b, q in self.buffer_act.items()}
        live = [torch.stack([size[b] for b in s]).sum() for s in self.live_sets if s]
        latency = out.pop("cycles") + self.elem_cycles
        return {"flash_bytes": out["weight_bytes"] + self.param_bytes + out["table_bytes"], **out,
                "param_bytes": zero + self.param_bytes, "ram_bytes": torch.stack(live).max() if live else zero,
                "macs": zero + self.macs, "latency_cycles": latency,
                "energy_uj": compute.energy_uj(latency, self.target)}

    def _tensors(self, kind: str, name: str) -> dict:
        """The tables of a layer (``kind`` "w") or an activation quantizer ("a", which may share the
        layer's name) as float64 tensors, made once."""
        key = (kind, name)
        if key not in self._torch:
            if kind == "w":
                layer = self.layers[name]
                self._torch[key] = {k: torch.from_numpy(np.asarray(getattr(layer, k), dtype=np.float64))
                                    for k in ("flash", "ebops", "bops", "cycles")}
            else:
                act = self.acts[name]
                self._torch[key] = {"tables": torch.from_numpy(act.table_bytes.astype(np.float64)),
                                    "aligned": {b: torch.from_numpy(v.astype(np.float64))
                                                for b, v in act.aligned.items()}}
        return self._torch[key]


# ----------------------------------------------------------------------------- building


def build_tables(graph: Graph, target: Target, base: BitAssignment, *, weight_widths: Callable | None = None,
                 act_widths: Callable | None = None, effective: EffectiveBits | None = None) -> CostTables:
    """The cost tables of ``graph`` on ``target`` around the ``base`` assignment.

    ``weight_widths(name, top)`` gives a layer's candidate widths from its groups' widest base bits
    ``top`` (G,) (default: the target's weight widths, 0 only where the target prunes);
    ``act_widths(name, top)`` an activation quantizer's (default: the target's activation widths).
    ``effective``: per-element weight bits for EBOPs (see ``EffectiveBits``).
    """
    base = base.detach()
    buffer_act = {n.name: graph.grid_source(n.name) for n in graph if n.op not in ALIAS_OPS}
    acts = {q: _act_table(graph, target, base, q, buffer_act, act_widths) for q in base.act}
    layers = {n.name: _weight_table(graph, target, base, n.name, acts, weight_widths, effective)
              for n in graph.weighted()}
    params = float(sum(memory.param_flash_bytes(graph, base, n.name, target) for n in graph))
    elem = float(sum(compute.elementwise_cycles(n, target) for n in graph))
    spans = memory.lifetimes(graph)
    steps = max(last for _, last in spans.values()) + 1
    live = {tuple(sorted(b for b, (s, e) in spans.items() if s <= step <= e)) for step in range(steps)}
    live = [list(s) for s in live if not any(set(s) < set(o) for o in live)]  # drop dominated sets
    return CostTables(target, graph, layers, acts, base, params, elem, float(sum(n.macs for n in graph)),
                      sorted(live), buffer_act)


def _act_table(graph: Graph, t: Target, base: BitAssignment, q: str, buffer_act: dict, act_widths) -> ActTable:
    shape = tuple(base.act[q].shape)
    bits = padded(base.act[q], len(graph[q].out_shape))
    top = float(bits.max())
    widths = np.array(sorted(act_widths(q, top) if act_widths else t.act_bits), dtype=float)
    mine = [b for b, src in buffer_act.items() if src == q]
    sizes = {b: np.zeros(len(widths)) for b in mine}
    aligned = {b: np.zeros(len(widths)) for b in mine}
    tables = np.zeros(len(widths))
    for i, w in enumerate(widths):
        a = BitAssignment(base.weight, {**base.act, q: cap_all(bits, w).reshape(shape)}, base.act_shift)
        for b in mine:
            nbytes = round(float(memory.act_bytes(graph[b].out_shape, act_storage_bits(a, graph, b), t)))
            sizes[b][i] = nbytes
            aligned[b][i] = math.ceil(nbytes / t.alignment) * t.alignment
            tables[i] += memory.act_table_bytes(graph, a, b, t)
    return ActTable(q, shape, bits, widths, sizes, aligned, tables)


def _weight_table(graph: Graph, t: Target, base: BitAssignment, name: str, acts: dict, weight_widths,
                  effective: EffectiveBits | None) -> WeightTable:
    node = graph[name]
    if not node.in_shapes:
        from dataclasses import replace

        node = replace(node, in_shapes=[graph[i].out_shape for i in node.inputs])
    ws = tuple(node.weight_shape)
    shape = tuple(base.weight[name].shape)
    bits = padded(base.weight[name], len(ws))
    g0, cout = bits.shape[0], ws[0]
    top = bits.reshape(g0, -1).amax(1).numpy()
    if weight_widths is not None:
        widths = np.array(sorted(weight_widths(name, top)), dtype=float)
    else:
        widths = np.array(sorted(w for w in t.weight_bits if w > 0 or t.allows_pruning), dtype=float)
    in_act = graph.grid_source(node.inputs[0])
    act = acts[in_act]
    in_bits, a_max = [], []
    for w in act.widths:
        a = BitAssignment(base.weight, {**base.act, in_act: cap_all(act.base, w).reshape(act.shape)})
        b = resolve_act_bits(a, graph, node.inputs[0])
        in_bits.append(compute.weight_input_bits(node, b).double())
        a_max.append(compute.input_channel_bits(node, b).amax())
    K, A = len(widths), len(act.widths)
    flash = np.zeros((g0, K))
    ebops, bops, cycles = np.zeros((g0, K, A)), np.zeros((g0, K, A)), np.zeros((g0, K, A))
    col_eff, col_nom = np.zeros((cout, K, ws[1])), np.zeros((cout, K, ws[1]))
    col_in = np.stack([expand(b, ws).reshape(cout, ws[1], -1)[..., 0].numpy() for b in in_bits])
    for k, width in enumerate(widths):
        bk = cap(bits, torch.full((g0,), float(width)))
        flash[:, k] = memory.channel_weight_bytes(node, bk, t).reshape(g0, -1).sum(1).numpy()
        full = expand(bk, ws).double()
        eff = effective(name, bk.reshape(shape)).double() if effective is not None else full
        col_eff[:, k] = expand(eff, ws).reshape(cout, ws[1], -1).sum(-1).numpy()
        col_nom[:, k] = full.reshape(cout, ws[1], -1).sum(-1).numpy()
        w_c = full.reshape(cout, -1).amax(1)
        for i in range(A):
            ebops[:, k, i] = (eff * in_bits[i]).reshape(g0, -1).sum(1).numpy()
            bops[:, k, i] = (full * in_bits[i]).reshape(g0, -1).sum(1).numpy() * compute.positions(node)
            cyc = (node.macs / cout) * compute.cycles_per_mac(t, a_max[i], w_c.float()).double()
            cycles[:, k, i] = cyc.reshape(g0, -1).sum(1).numpy()
    return WeightTable(name, in_act, shape, bits, widths, flash, ebops, bops, cycles, cout, col_eff, col_nom, col_in)
