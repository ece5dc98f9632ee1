"""The budget step: after any search method, make a quantized model meet every hard budget
(FLASH, peak RAM, EBOPs, energy, latency) while losing as little accuracy as it can.

Gradient methods only penalise their costs, so their result may miss a budget; a method may also
leave widths the target's kernels do not run. This step fixes both, and is what ``api.finalize``
and the search run (after the method, before evaluation) call.

**Groups and candidates.** A weighted layer's bits tensor is split along its first dimension: one
group per entry of a per-tensor / per-slice / per-channel bits tensor; per-element bits are
aggregated into one group per output channel (so the solve stays small; each element keeps its own
width below the group's choice). Each activation quantizer is one group. A group's choice is a
width ``w`` from the target's supported set (``weight_bits`` / ``act_bits``: 2/4/8 on the MCU
targets, 0..16 on fpga-hls4ml); it is applied as a cap, ``min(b_e, w)`` on every entry ``e`` of the
group, so ``w`` equal to the group's widest entry means "unchanged". Width 0 (pruning a weight
group) is a candidate only where the target allows pruning, never for the last weighted layer nor
for a per-tensor group, and a constraint keeps at least one group of every layer. Every bit is
first snapped onto the supported set, upwards (``ceil``; above the widest supported: the widest);
that start may be infeasible, and the step then only reduces widths, except when a latency or energy
budget is set: a throughput table can make narrower widths slower (the Cortex-M estimates do), so
then wider widths are candidates too (with a negligible penalty, so nothing moves for nothing).

**Sensitivity** ``s[g, w]``: the estimated increase of the task loss when group ``g`` takes width
``w``. With held-out data it is measured, per layer: ``dL_l(w)`` = loss (fake-quantized forward,
range observers frozen, a few validation batches) with every group of layer ``l`` capped at ``w``,
minus the loss of the snapped model. It is shared among the layer's groups in proportion to each
group's increase of the squared weight quantization error, ``d_g(w) = sum_{e in g} (q_w(W_e) -
W_e)^2 - (q(W_e) - W_e)^2``. Why: to second order the loss increase of weight noise ``delta`` is
``1/2 sum_e H_ee delta_e^2``; with a diagonal Hessian constant within a layer (the usual
HAWQ-style assumption, per layer not per element) the layer's increase is ``1/2 h_l sum_e
delta_e^2`` and group ``g`` contributes exactly its share of the squared error. The measurement
calibrates ``h_l`` at every width (so it also captures what second order misses) and costs one
forward pass per layer and width, not one per group. Activation groups are measured directly.
Layers are assumed additive (as HAWQ / HAQ do). Without data a data-free proxy stands in: the
noise-to-signal ratio each choice adds, ``sum_{e in g} delta_e^2 / sum_layer W^2`` for weights and
``mean_e (4^-min(b_e, w) - 4^-b_e)`` for activations (uniform noise of step ``range / 2^b`` against
a signal spread over the range), which ranks every tensor by its relative quantization noise.
Sensitivities are made non-increasing in the width; a negligible multiple of the proxy breaks ties.

**Costs** per group and width come from the cost model's own functions (``memory``,
``compute``), computed once per layer and width: FLASH bytes of the group's channels (parameter
bytes do not depend on the widths), EBOPs (HGQ's effective bits of the integer weights as lowering
computes them once the model is calibrated, nominal bits before) and cycles (the throughput table
at the channel's widest weight and the input's widest activation) for every width of the layer's
input activation quantizer, and, per activation quantizer and width, the aligned size of every
activation buffer whose grid it defines. FLASH is additive over groups; EBOPs and cycles are
bilinear (weight width times input width), and latency and energy are both the total cycles.

**Selection** is an integer program (``scipy.optimize.milp``, HiGHS, relative gap ``MIP_GAP``): a
binary ``x[g, w]`` per weight group and width, ``y[q, a]`` per activation quantizer and width, one
per group (``sum_w x[g, w] = 1``), minimising ``sum s x + sum s y`` subject to

- FLASH: ``sum_{g,w} F[g, w] x[g, w] <= flash - param bytes``;
- EBOPs and cycles, exactly despite the products ``x[g, w] y[q_l, a]`` of a layer's weight width
  and its input width: continuous ``z[g, w, a] >= 0`` with ``sum_a z[g, w, a] = x[g, w]`` and
  ``sum_w z[g, w, a] = y[q_l, a]`` (``z = x y`` at integer points, and each group's LP relaxation
  is the convex hull of its choices, which keeps branch and bound short), then
  ``sum C[g, w, a] z[g, w, a] <= limit``. Above ``HULL_MAX_VARS`` product variables, one continuous
  ``t_l`` per layer with big-M rows ``t_l >= sum_{g,w} C[g, w, a] x[g, w] - M_a (1 - y[q_l, a])``
  stands in. Latency and energy limits become one cycles limit, less the elementwise cycles;
- peak RAM: for every step of the execution order, the aligned sizes of the buffers live at that
  step sum to at most the limit (the planner's arena is at least this bound);
- pruning: ``sum_{g in l} x[g, 0] <= G_l - 1``.

Its answer is polished (undo any reduction the limits no longer need) and compared with the greedy
one, which wins only where the solver stopped at its time limit. The greedy selection is also the
fallback (``milp`` unavailable or failing, more than ``MILP_MAX_VARS`` variables): it repeatedly
takes the change with the least sensitivity per unit of normalised violated cost (RAM as the bytes
over the limit summed over the live sets, so ties between sets do not stall it), then polishes.
After setting the bits the cost is re-measured with ``cost_report`` (never assumed): every table
entry is the cost model's own figure, but the arena planner can need more than the live-set bound
(and fixed-point activation grids can move), so while a measured cost still exceeds its limit that
constraint is tightened by the excess and the selection repeated (``max_iterations``; the
narrowest assignment is the last resort). If no assignment meets the budget, ``BudgetError``
names the smallest achievable cost (``check_achievable`` for the target, then the minimum at this
model's granularity), and the model is left as it was.

**Fine-tune**: an optional callable (the search run passes ``fit`` with the run's data for
``budget_epochs`` epochs, weights and biases only, so the bits stay frozen), after which the cost is
measured again; if training moved a measured cost over its limit (EBOPs count effective bits of the
trained weights), the selection runs once more, without another fine-tune. ``feasible`` is computed
from the final measured cost.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..api import as_target, cost_report
from ..cost import Budget, BudgetError, CostReport, Target, check_achievable, feasible, violations
from ..cost import compute, memory
from ..cost.bits import BitAssignment, act_bits as resolve_act_bits, act_storage_bits
from ..cost.budget import _LABELS, _fmt
from ..granularity import expand, reduce_to
from ..graph.ir import ALIAS_OPS
from ..numerics import qrange

log = logging.getLogger(__name__)

COST_KEYS = ("flash_bytes", "ram_bytes", "ebops", "latency_cycles", "energy_uj")
MILP_MAX_VARS = 60_000  # above this many binary variables the greedy selection is used
HULL_MAX_VARS = 150_000  # above this many product variables the big-M rows are used instead
_TIE = 1e-6  # weight of the data-free proxy that breaks ties between measured sensitivities
_UP = 1e-9  # penalty per bit of a width raised (latency / energy budgets only)
_EPS = 1e-6
MIP_GAP = 1e-2  # relative optimality gap of the integer program (the sensitivities are estimates)


# ----------------------------------------------------------------------------- result


@dataclass
class BudgetStepResult:
    """What the budget step did. ``before``: measured costs of the model as given; ``after``: final."""

    report: CostReport
    feasible: bool
    solver: str  # "none" (nothing to reduce), "milp", "greedy", "milp+min" / "greedy+min" (fallback)
    sensitivity: str  # "measured", "proxy" or "none"
    iterations: int  # selections measured (tighten loop, over both passes)
    before: dict
    after: dict
    changes: list[dict] = field(default_factory=list)
    fine_tune: list | None = None
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "report"}
        d["changed"] = self.changed
        return d


def _costs(report: CostReport) -> dict:
    return {k: report.totals[k] for k in COST_KEYS}


# ----------------------------------------------------------------------------- bits helpers


def _padded(bits: torch.Tensor, rank: int) -> torch.Tensor:
    return bits.detach().cpu().reshape((1,) * (rank - bits.dim()) + tuple(bits.shape)).float()


def _apply(bits: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``bits`` with group ``g`` (index along dim 0) at width ``widths[g]``: capped at it when it is
    at most the group's widest entry, else every non-zero entry raised to it."""
    g0 = bits.shape[0]
    flat = bits.reshape(g0, -1)
    top = flat.amax(1, keepdim=True)
    w = torch.as_tensor(widths, dtype=flat.dtype).reshape(-1, 1).expand(g0, 1)
    out = torch.where(w <= top + _EPS, torch.minimum(flat, w), torch.where(flat > 0, w, flat))
    return out.reshape(bits.shape)


def _apply_all(bits: torch.Tensor, width: float) -> torch.Tensor:
    """``_apply`` with the whole tensor as one group (an activation quantizer)."""
    return _apply(bits.reshape(1, -1), torch.tensor([float(width)])).reshape(bits.shape)


def _snap(bits: torch.Tensor, allowed) -> torch.Tensor:
    """Every entry onto the smallest allowed width at or above it (the widest allowed above that)."""
    s = torch.tensor(sorted(allowed), dtype=torch.float32)
    idx = torch.bucketize(bits.detach().float() - _EPS, s).clamp_max(len(s) - 1)
    return s[idx].reshape(bits.shape)


def _set_bits(quantizer, bits: torch.Tensor, shape) -> None:
    if not hasattr(quantizer, "set_bits"):
        raise TypeError(f"{type(quantizer).__name__} has no set_bits(); freeze the method's result into fixed "
                        "quantizers (mixprec.quantizers.fixed) before the budget step")
    quantizer.set_bits(bits.reshape(shape))


# ----------------------------------------------------------------------------- tables


@dataclass
class _Act:
    name: str
    shape: tuple  # the quantizer's own bits shape
    bits: torch.Tensor  # snapped bits, padded to the tensor's rank
    widths: np.ndarray  # (A,) candidate widths, ascending
    cur: int  # index of the unchanged width
    sens: np.ndarray  # (A,)
    buffers: dict  # buffer -> (A,) aligned bytes


@dataclass
class _Layer:
    name: str
    in_q: str
    shape: tuple
    bits: torch.Tensor  # snapped bits, padded to the weight's rank
    widths: np.ndarray  # (K,)
    allowed: np.ndarray  # (G, K) bool
    cur: np.ndarray  # (G,) index of each group's unchanged width
    flash: np.ndarray  # (G, K)
    ebops: np.ndarray  # (G, K, A)
    cycles: np.ndarray  # (G, K, A)
    err: np.ndarray  # (G, K) squared weight quantization error
    sens: np.ndarray  # (G, K)
    prune_k: int | None  # index of width 0 when some group may be pruned

    @property
    def groups(self) -> int:
        return self.allowed.shape[0]


@dataclass
class _Problem:
    layers: list[_Layer]
    acts: dict[str, _Act]
    param_bytes: float
    elem_cycles: float
    live_sets: list[list[str]]  # buffers live together at some step (deduplicated)
    buffer_q: dict[str, str]  # buffer -> the activation quantizer that sets its size

    def n_vars(self) -> int:
        return (sum(layer.allowed.size for layer in self.layers) + sum(len(a.widths) for a in self.acts.values())
                + 2 * len(self.layers))

    def start(self) -> tuple[dict, dict]:
        return {layer.name: layer.cur.copy() for layer in self.layers}, {q: a.cur for q, a in self.acts.items()}

    def totals(self, kw: dict, ka: dict) -> dict:
        """Internal totals of a choice: weight bytes, EBOPs, MAC cycles, live-set RAM bound."""
        out = {"flash": 0.0, "ebops": 0.0, "cycles": 0.0}
        for layer in self.layers:
            g, k, a = np.arange(layer.groups), kw[layer.name], ka[layer.in_q]
            out["flash"] += float(layer.flash[g, k].sum())
            out["ebops"] += float(layer.ebops[g, k, a].sum())
            out["cycles"] += float(layer.cycles[g, k, a].sum())
        out["ram"] = self.ram(ka)
        return out

    def live_bytes(self, ka: dict) -> list[float]:
        size = {b: self.acts[q].buffers[b][ka[q]] for b, q in self.buffer_q.items()}
        return [sum(size[b] for b in live) for live in self.live_sets]

    def ram(self, ka: dict) -> float:
        return max(self.live_bytes(ka), default=0.0)

    def ram_excess(self, ka: dict, limit: float) -> float:
        """Bytes over ``limit`` summed over the live sets (0 iff the live-set bound meets it); unlike
        the peak, every buffer of every set over the limit counts, so ties do not stall the greedy."""
        return float(sum(max(0.0, s - limit) for s in self.live_bytes(ka)))

    def sens(self, kw: dict, ka: dict) -> float:
        s = sum(float(layer.sens[np.arange(layer.groups), kw[layer.name]].sum()) for layer in self.layers)
        return s + sum(float(a.sens[ka[q]]) for q, a in self.acts.items())


class _LossProbe:
    """Mean task loss on a few held-out batches: fake-quantized forward, observers frozen."""

    def __init__(self, qm, x, y, max_samples: int = 512, batch_size: int = 256):
        self.qm, self.batch_size = qm, batch_size
        self.x, self.y = x[:max_samples].cpu(), y[:max_samples].cpu()

    @torch.no_grad()
    def __call__(self) -> float:
        frozen = [(m, m.momentum) for m in self.qm.modules() if hasattr(m, "momentum") and hasattr(m, "observe")]
        was_training = self.qm.training
        try:
            for m, _ in frozen:
                m.momentum = 0.0
            self.qm.train(True)
            total = 0.0
            for i in range(0, len(self.x), self.batch_size):
                out = self.qm(self.x[i:i + self.batch_size])
                yb = self.y[i:i + self.batch_size]
                if yb.is_floating_point():
                    total += float(F.mse_loss(out, yb.reshape(out.shape), reduction="sum")) / max(out[0].numel(), 1)
                else:
                    total += float(F.cross_entropy(out, yb, reduction="sum"))
            return total / max(len(self.x), 1)
        finally:
            for m, momentum in frozen:
                m.momentum = momentum
            self.qm.train(was_training)


def _with_in_shapes(graph, node):
    return node if node.in_shapes else replace(node, in_shapes=[graph[i].out_shape for i in node.inputs])


def _calibrated(qm) -> bool:
    try:
        qm.lower()
        return True
    except RuntimeError:
        return False


def _act_tables(qm, t: Target, base: BitAssignment, upward: bool) -> tuple[dict, dict]:
    graph = qm.graph
    buffer_q = {n.name: graph.grid_source(n.name) for n in graph if n.op not in ALIAS_OPS}
    acts = {}
    for q, quant in qm.act_quantizers.items():
        shape = tuple(quant.bits().shape)
        bits = _padded(quant.bits(), len(graph[q].out_shape))
        top = float(bits.max())
        widths = [w for w in t.act_bits if w <= top + _EPS] + ([w for w in t.act_bits if w > top + _EPS] if upward else [])
        widths = np.array(sorted(widths), dtype=float)
        mine = [b for b, src in buffer_q.items() if src == q]
        sizes = {b: np.zeros(len(widths)) for b in mine}
        for i, w in enumerate(widths):
            a = BitAssignment(base.weight, {**base.act, q: _apply_all(bits, w).reshape(shape)}, base.act_shift)
            for b in mine:
                nbytes = float(memory.act_bytes(graph[b].out_shape, act_storage_bits(a, graph, b), t))
                sizes[b][i] = math.ceil(round(nbytes) / t.alignment) * t.alignment
        acts[q] = _Act(q, shape, bits, widths, int(np.argmin(np.abs(widths - top))), np.zeros(len(widths)), sizes)
    return acts, buffer_q


def _weight_candidates(t: Target, top: np.ndarray, prunable: bool, upward: bool):
    support = sorted(t.weight_bits)
    widths = sorted({w for w in support if w <= top.max() + _EPS and (w > 0 or prunable or (top <= _EPS).any())}
                    | ({w for w in support if w > 0 and w > top.min() + _EPS} if upward else set()))
    widths = np.array(widths, dtype=float)
    allowed = np.zeros((len(top), len(widths)), dtype=bool)
    for g, m in enumerate(top):
        if m <= _EPS:  # already pruned: stays
            allowed[g] = widths == 0
            continue
        down = (widths <= m + _EPS) & ((widths > 0) | prunable)
        up = (widths > m + _EPS) if upward else np.zeros_like(down)
        allowed[g] = down | up
    return widths, allowed


def _int_weights(w: torch.Tensor, qp) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized weights and the integer weights exactly as ``lower.lower_weighted`` makes them."""
    shape = tuple(w.shape)
    full = qp.full(shape)
    scale = full.scale.detach().double()
    lo, hi = qrange(full.bits.detach().round(), True, qp.narrow)
    k = torch.clamp(torch.round(w.detach().double() / scale), lo, hi)
    channel = reduce_to(scale, (shape[0],) + (1,) * (len(shape) - 1), "amin")
    return k * scale, torch.round(k * scale / channel)


def _layer_table(qm, t: Target, name: str, acts: dict, base: BitAssignment, calibrated: bool, upward: bool,
                 last: bool) -> _Layer:
    graph = qm.graph
    node = _with_in_shapes(graph, graph[name])
    layer = qm.layers[name]
    quant = layer.quantizer
    ws = tuple(node.weight_shape)
    shape = tuple(quant.bits().shape)
    bits = _padded(quant.bits(), len(ws))
    g0, cout = bits.shape[0], ws[0]
    top = bits.reshape(g0, -1).amax(1).numpy()
    prunable = t.allows_pruning and not last and g0 > 1
    widths, allowed = _weight_candidates(t, top, prunable, upward)
    in_q = graph.grid_source(node.inputs[0])
    act = acts[in_q]
    # input activation bits per candidate width of the input quantizer
    in_bits, a_max = [], []
    for w in act.widths:
        a = BitAssignment(base.weight, {**base.act, in_q: _apply_all(act.bits, w).reshape(act.shape)})
        b = resolve_act_bits(a, graph, node.inputs[0])
        in_bits.append(compute.weight_input_bits(node, b).double())
        a_max.append(compute.input_channel_bits(node, b).amax())
    K, A = len(widths), len(act.widths)
    flash, err = np.zeros((g0, K)), np.zeros((g0, K))
    ebops, cycles = np.zeros((g0, K, A)), np.zeros((g0, K, A))
    w = layer.weight.detach().cpu()
    try:
        for k, width in enumerate(widths):
            bk = _apply(bits, torch.full((g0,), float(width)))
            quant.set_bits(bk.reshape(shape))
            deq, w_int = _int_weights(w, quant.qparams(w))
            err[:, k] = ((deq - w.double()) ** 2).reshape(g0, -1).sum(1).numpy()
            flash[:, k] = memory.channel_weight_bytes(node, bk, t).reshape(g0, -1).sum(1).numpy()
            full = expand(bk, ws).double()
            eff = compute.effective_bits(w_int).double() if calibrated else full
            w_c = full.reshape(cout, -1).amax(1)
            for i in range(A):
                ebops[:, k, i] = (eff * in_bits[i]).reshape(g0, -1).sum(1).numpy()
                cyc = (node.macs / cout) * compute.cycles_per_mac(t, a_max[i], w_c.float()).double()
                cycles[:, k, i] = cyc.reshape(g0, -1).sum(1).numpy()
    finally:
        quant.set_bits(bits.reshape(shape))
    cur = np.array([int(np.argmin(np.abs(widths - m))) for m in top])
    prune_k = int(np.flatnonzero(widths == 0)[0]) if prunable and (widths == 0).any() else None
    return _Layer(name, in_q, shape, bits, widths, allowed, cur, flash, ebops, cycles, err, np.zeros((g0, K)), prune_k)


def _build(qm, t: Target, upward: bool) -> _Problem:
    graph = qm.graph
    calibrated = _calibrated(qm)
    base = BitAssignment(qm.weight_bits(), qm.act_bits(), qm.act_shifts() if calibrated else {}).detach()
    base = BitAssignment({k: v.cpu() for k, v in base.weight.items()}, {k: v.cpu() for k, v in base.act.items()},
                         {k: v.cpu() for k, v in base.act_shift.items()})
    acts, buffer_q = _act_tables(qm, t, base, upward)
    weighted = [n.name for n in graph.weighted()]
    layers = [_layer_table(qm, t, name, acts, base, calibrated, upward, name == weighted[-1]) for name in weighted]
    params = float(sum(memory.param_flash_bytes(graph, base, n.name, t) for n in graph))
    elem = float(sum(compute.elementwise_cycles(n, t) for n in graph))
    spans = memory.lifetimes(graph)
    steps = max(last for _, last in spans.values()) + 1
    live = {tuple(sorted(b for b, (s, e) in spans.items() if s <= step <= e)) for step in range(steps)}
    live = [list(s) for s in live if not any(set(s) < set(o) for o in live)]  # drop dominated sets
    return _Problem(layers, acts, params, elem, sorted(live), buffer_q)


# ----------------------------------------------------------------------------- sensitivity


def _proxy(p: _Problem, qm) -> None:
    """Data-free sensitivities: the noise-to-signal ratio each choice adds (see the module docstring)."""
    for layer in p.layers:
        power = float((qm.layers[layer.name].weight.detach().double() ** 2).sum()) or 1.0
        base = layer.err[np.arange(layer.groups), layer.cur][:, None]
        layer.sens = np.maximum(layer.err - base, 0.0) / power
    for a in p.acts.values():
        flat = a.bits.flatten().double()
        a.sens = np.array([float((4.0 ** -torch.minimum(flat, torch.tensor(w, dtype=flat.dtype)) - 4.0 ** -flat).mean())
                           for w in a.widths])
        a.sens = np.maximum(a.sens, 0.0)


def _measure(p: _Problem, qm, probe: _LossProbe) -> None:
    """Measured sensitivities: per-layer loss increase, shared by the squared-error increase."""
    _proxy(p, qm)  # tie-breaker and the sharing weights
    base_loss = probe()
    for layer in p.layers:
        quant = qm.layers[layer.name].quantizer
        proxy = layer.sens.copy()
        share = proxy / np.maximum(proxy.sum(0, keepdims=True), 1e-300)
        measured = np.zeros_like(proxy)
        top = layer.bits.reshape(layer.groups, -1).amax(1).numpy()
        try:
            for k, w in enumerate(layer.widths):
                if not (layer.allowed[:, k] & (w < top - _EPS)).any():
                    continue
                widths = torch.as_tensor(np.minimum(top, w), dtype=torch.float32)  # groups narrower than w: unchanged
                quant.set_bits(_apply(layer.bits, widths).reshape(layer.shape))
                measured[:, k] = max(probe() - base_loss, 0.0) * share[:, k]
        finally:
            quant.set_bits(layer.bits.reshape(layer.shape))
        layer.sens = measured + _TIE * proxy
    for a in p.acts.values():
        quant = qm.act_quantizers[a.name]
        top = float(a.bits.max())
        measured = np.zeros(len(a.widths))
        try:
            for i, w in enumerate(a.widths):
                if w < top - _EPS:
                    quant.set_bits(_apply_all(a.bits, w).reshape(a.shape))
                    measured[i] = max(probe() - base_loss, 0.0)
        finally:
            quant.set_bits(a.bits.reshape(a.shape))
        a.sens = measured + _TIE * a.sens


def _finish_sensitivity(p: _Problem) -> None:
    """Non-increasing in the width below the start, a tiny penalty for raised widths, scaled to max 1."""
    for layer in p.layers:
        s = layer.sens
        for g in range(layer.groups):
            c = layer.cur[g]
            for k in range(c - 1, -1, -1):
                s[g, k] = max(s[g, k], s[g, k + 1])
            s[g, c] = 0.0
            top = layer.widths[c]
            up = layer.widths > top
            s[g, up] = _UP * (layer.widths[up] - top)
    for a in p.acts.values():
        for i in range(a.cur - 1, -1, -1):
            a.sens[i] = max(a.sens[i], a.sens[i + 1])
        a.sens[a.cur] = 0.0
        up = a.widths > a.widths[a.cur]
        a.sens[up] = _UP * (a.widths[up] - a.widths[a.cur])
    scale = max([float(layer.sens.max()) for layer in p.layers] + [float(a.sens.max()) for a in p.acts.values()] + [0.0])
    if scale > 0:
        for layer in p.layers:
            layer.sens = layer.sens / scale
        for a in p.acts.values():
            a.sens = a.sens / scale


# ----------------------------------------------------------------------------- limits


def _cycles_per_uj(t: Target) -> float:
    return t.clock_hz / (t.power_mw * 1e3)


def _wider_can_be_faster(t: Target) -> bool:
    """Whether some wider (activation, weight) pair runs more MACs per cycle than a narrower one."""
    pairs = [(a, w) for a in t.act_bits for w in t.weight_bits if w > 0]
    return any(t.throughput(a2, w2) > t.throughput(a1, w1) + 1e-12
               for a1, w1 in pairs for a2, w2 in pairs if a2 >= a1 and w2 >= w1 and (a2, w2) != (a1, w1))


def _limits(p: _Problem, budget: Budget, t: Target) -> dict:
    lim = {}
    if budget.flash_bytes is not None:
        lim["flash"] = budget.flash_bytes - p.param_bytes
    if budget.ram_bytes is not None:
        lim["ram"] = float(budget.ram_bytes)
    if budget.ebops is not None:
        lim["ebops"] = float(budget.ebops)
    cyc = []
    if budget.latency_cycles is not None:
        cyc.append(budget.latency_cycles - p.elem_cycles)
    if budget.energy_uj is not None:
        cyc.append(budget.energy_uj * _cycles_per_uj(t) - p.elem_cycles)
    if cyc:
        lim["cycles"] = min(cyc)
    return lim


def _tighten(lim: dict, report: CostReport, budget: Budget, t: Target, p: _Problem, est: dict) -> None:
    """Lower each internal limit whose measured cost exceeds its budget by the excess."""
    totals = report.totals
    excess = {}
    if budget.flash_bytes is not None and totals["flash_bytes"] > budget.flash_bytes:
        excess["flash"] = totals["flash_bytes"] - budget.flash_bytes
    if budget.ram_bytes is not None and totals["ram_bytes"] > budget.ram_bytes:
        excess["ram"] = totals["ram_bytes"] - budget.ram_bytes
    if budget.ebops is not None and totals["ebops"] > budget.ebops:
        excess["ebops"] = totals["ebops"] - budget.ebops
    cyc = []
    if budget.latency_cycles is not None and totals["latency_cycles"] > budget.latency_cycles:
        cyc.append(totals["latency_cycles"] - budget.latency_cycles)
    if budget.energy_uj is not None and totals["energy_uj"] > budget.energy_uj:
        cyc.append((totals["energy_uj"] - budget.energy_uj) * _cycles_per_uj(t))
    if cyc:
        excess["cycles"] = max(cyc)
    for k, e in excess.items():
        step = max(e, 1.0 if k in ("flash", "ram") else abs(lim[k]) * 1e-6)
        if k == "ram":
            step = max(step, t.alignment)
        lim[k] = min(lim[k], est[k]) - step


# ----------------------------------------------------------------------------- solvers


def _solve_milp(p: _Problem, lim: dict, time_limit: float):
    """Optimal choice under the internal limits (``mip_rel_gap`` MIP_GAP), or None when none exists.

    The bilinear costs (EBOPs, cycles) use the tight product formulation where it stays small:
    ``z[g, w, a] >= 0`` with ``sum_a z = x[g, w]`` and ``sum_w z = y[q, a]`` (so ``z = x y`` at
    integer points, and the LP relaxation is the convex hull of each group's choices); above
    ``HULL_MAX_VARS`` product variables, the big-M rows of the module docstring.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    bilinear = [k for k in ("ebops", "cycles") if k in lim]
    n = 0
    x_off = {}
    for layer in p.layers:
        x_off[layer.name] = n
        n += layer.allowed.size
    y_off = {}
    for q, a in p.acts.items():
        y_off[q] = n
        n += len(a.widths)
    coupled = [layer for layer in p.layers if len(p.acts[layer.in_q].widths) > 1] if bilinear else []
    hull = sum(int(layer.allowed.sum()) * len(p.acts[layer.in_q].widths) for layer in coupled) <= HULL_MAX_VARS
    z_off, t_off = {}, {}
    for layer in coupled:
        if hull:
            z_off[layer.name] = n
            n += layer.allowed.size * len(p.acts[layer.in_q].widths)
        else:
            for key in bilinear:
                t_off[key, layer.name] = n
                n += 1
    c, lower, upper, integrality = np.zeros(n), np.zeros(n), np.ones(n), np.zeros(n)
    for layer in p.layers:
        o, size = x_off[layer.name], layer.allowed.size
        c[o:o + size], upper[o:o + size], integrality[o:o + size] = layer.sens.ravel(), layer.allowed.ravel(), 1
    for q, a in p.acts.items():
        c[y_off[q]:y_off[q] + len(a.widths)], integrality[y_off[q]:y_off[q] + len(a.widths)] = a.sens, 1
    for layer in coupled:
        if hull:
            o, size = z_off[layer.name], layer.allowed.size * len(p.acts[layer.in_q].widths)
            upper[o:o + size] = np.repeat(layer.allowed.ravel(), len(p.acts[layer.in_q].widths))
    for i in t_off.values():
        upper[i] = np.inf
    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(idx, coef, low, high):
        rows.append(np.full(len(idx), len(lo)))
        cols.append(np.asarray(idx, dtype=np.int64))
        vals.append(np.asarray(coef, dtype=float))
        lo.append(low)
        hi.append(high)

    def x_index(layer):  # (G, K) variable indices
        return x_off[layer.name] + np.arange(layer.allowed.size).reshape(layer.allowed.shape)

    for layer in p.layers:
        xs = x_index(layer)
        for g in range(layer.groups):
            row(xs[g], np.ones(xs.shape[1]), 1.0, 1.0)
        if layer.prune_k is not None:
            row(xs[:, layer.prune_k], np.ones(layer.groups), -np.inf, layer.groups - 1.0)
    for q, a in p.acts.items():
        row(y_off[q] + np.arange(len(a.widths)), np.ones(len(a.widths)), 1.0, 1.0)
    if "flash" in lim:
        scale = max(abs(lim["flash"]), 1.0)
        row(np.concatenate([x_index(layer).ravel() for layer in p.layers]),
            np.concatenate([layer.flash.ravel() for layer in p.layers]) / scale, -np.inf, lim["flash"] / scale)
    if hull:
        for layer in coupled:
            A = len(p.acts[layer.in_q].widths)
            xs, ys = x_index(layer), y_off[layer.in_q] + np.arange(A)
            zs = z_off[layer.name] + np.arange(layer.allowed.size * A).reshape(layer.groups, -1, A)
            for g in range(layer.groups):
                for k in np.flatnonzero(layer.allowed[g]):
                    row(np.append(zs[g, k], xs[g, k]), np.append(np.ones(A), -1.0), 0.0, 0.0)
                ks = np.flatnonzero(layer.allowed[g])
                for i in range(A):
                    row(np.append(zs[g, ks, i], ys[i]), np.append(np.ones(len(ks)), -1.0), 0.0, 0.0)
    for key in bilinear:
        scale = max(abs(lim[key]), 1.0)
        idx, coef = [], []
        for layer in p.layers:
            cost = np.where(layer.allowed[:, :, None], getattr(layer, key), 0.0)  # (G, K, A)
            if layer not in coupled:
                idx.append(x_index(layer).ravel())
                coef.append(cost[:, :, 0].ravel())
            elif hull:
                idx.append(z_off[layer.name] + np.arange(cost.size))
                coef.append(cost.ravel())
            else:
                idx.append([t_off[key, layer.name]])
                coef.append([1.0])
                _big_m_rows(row, layer, cost, x_index(layer).ravel(), t_off[key, layer.name],
                            y_off[layer.in_q] + np.arange(cost.shape[2]))
        row(np.concatenate(idx), np.concatenate(coef) / scale, -np.inf, lim[key] / scale)
    if "ram" in lim:
        scale = max(abs(lim["ram"]), 1.0)
        for live in p.live_sets:
            coef: dict[int, float] = {}
            for b in live:
                q = p.buffer_q[b]
                for i, size in enumerate(p.acts[q].buffers[b]):
                    coef[y_off[q] + i] = coef.get(y_off[q] + i, 0.0) + size / scale
            row(list(coef), list(coef.values()), -np.inf, lim["ram"] / scale)
    A = coo_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), n)).tocsr()
    res = milp(c, integrality=integrality, bounds=Bounds(lower, upper),
               constraints=LinearConstraint(A, np.array(lo), np.array(hi)),
               options={"time_limit": time_limit, "mip_rel_gap": MIP_GAP, "disp": False})
    if res.x is None:
        if res.status == 2:  # infeasible
            return None
        raise RuntimeError(f"milp: {res.message}")
    if res.status != 0:
        log.info("milp stopped before proving optimality (%s); keeping its best answer", res.message)
    x = res.x
    kw = {layer.name: x[x_off[layer.name]:x_off[layer.name] + layer.allowed.size].reshape(layer.groups, -1).argmax(1)
          for layer in p.layers}
    ka = {q: int(x[y_off[q]:y_off[q] + len(a.widths)].argmax()) for q, a in p.acts.items()}
    return kw, ka


def _big_m_rows(row, layer, cost, xs, ti, ys) -> None:
    """``t_l >= sum_{g,w} C[g, w, a] x[g, w] - M_a (1 - y_a)`` for every input width ``a``, and
    ``t_l >= sum min_a C x`` (valid whatever the width); ``M_a`` as small as keeps a row slack
    when ``y_a = 0``."""
    low = cost.min(axis=2)
    big = max(float(cost.max(axis=(1, 2)).sum()), 1.0)  # row scale
    row(np.append(xs, ti), np.append(low.ravel() / big, -1.0 / big), -np.inf, 0.0)
    for i in range(cost.shape[2]):
        m = float((cost[:, :, i] - low).max(axis=1).sum())
        if m > 0:
            row(np.append(xs, [ti, ys[i]]), np.concatenate([cost[:, :, i].ravel() / big, [-1.0 / big, m / big]]),
                -np.inf, m / big)


def _over(tot: dict, lim: dict) -> dict:
    return {k: tot[k] - v for k, v in lim.items() if tot[k] > v + 1e-9 * max(abs(v), 1.0)}


def _greedy_totals(p: _Problem, kw: dict, ka: dict, lim: dict) -> dict:
    tot = p.totals(kw, ka)
    if "ram" in lim:
        tot["ram"] = p.ram_excess(ka, lim["ram"])
    return tot


def _moves(p: _Problem, kw: dict, ka: dict, lim: dict):
    """Every single change: (kind, name, group, new index, delta costs dict, delta sensitivity)."""
    for layer in p.layers:
        g = np.arange(layer.groups)
        k, a = kw[layer.name], ka[layer.in_q]
        d = {"flash": layer.flash - layer.flash[g, k][:, None],
             "ebops": layer.ebops[:, :, a] - layer.ebops[g, k, a][:, None],
             "cycles": layer.cycles[:, :, a] - layer.cycles[g, k, a][:, None]}
        ds = layer.sens - layer.sens[g, k][:, None]
        ok = layer.allowed.copy()
        ok[g, k] = False
        if layer.prune_k is not None:
            pruned = int((k == layer.prune_k).sum())
            if pruned >= layer.groups - 1:
                ok[:, layer.prune_k] &= False
        yield "w", layer, ok, d, ds
    ram_lim = lim.get("ram", math.inf)
    ram0 = p.ram_excess(ka, ram_lim)
    for q, act in p.acts.items():
        d = {"flash": np.zeros(len(act.widths)), "ebops": np.zeros(len(act.widths)), "cycles": np.zeros(len(act.widths)),
             "ram": np.zeros(len(act.widths))}
        for layer in p.layers:
            if layer.in_q == q:
                g, k = np.arange(layer.groups), kw[layer.name]
                d["ebops"] += layer.ebops[g, k, :].sum(0) - layer.ebops[g, k, ka[q]].sum()
                d["cycles"] += layer.cycles[g, k, :].sum(0) - layer.cycles[g, k, ka[q]].sum()
        for i in range(len(act.widths)):
            if i != ka[q]:
                d["ram"][i] = p.ram_excess({**ka, q: i}, ram_lim) - ram0
        ok = np.ones(len(act.widths), dtype=bool)
        ok[ka[q]] = False
        yield "a", act, ok, d, act.sens - act.sens[ka[q]]


def _solve_greedy(p: _Problem, lim: dict, start=None, max_steps: int = 100_000):
    """Cheapest sensitivity per unit of normalised violated cost first, then undo what is not needed."""
    kw, ka = start if start is not None else p.start()
    kw = {k: v.copy() for k, v in kw.items()}
    ka = dict(ka)
    keys = list(lim)
    glim = {**lim, "ram": 0.0} if "ram" in lim else dict(lim)  # RAM as the excess over the live sets
    for _ in range(max_steps):
        tot = _greedy_totals(p, kw, ka, lim)
        over = _over(tot, glim)
        if not over:
            break
        best = None
        for kind, obj, ok, d, ds in _moves(p, kw, ka, lim):
            gain = np.zeros(ds.shape)
            valid = ok.copy()
            for key in keys:
                dk = d.get(key, np.zeros(ds.shape))
                if key in over:
                    gain += np.minimum(-dk, over[key]) / over[key]
                else:
                    valid &= tot[key] + dk <= glim[key] + 1e-9 * max(abs(glim[key]), 1.0)
            valid &= gain > 1e-12
            if not valid.any():
                continue
            score = np.where(valid, np.maximum(ds, 0.0) / np.where(valid, gain, 1.0), np.inf)
            i = np.unravel_index(int(np.argmin(score)), score.shape)
            if best is None or score[i] < best[0]:
                best = (score[i], kind, obj, i)
        if best is None:
            return None
        _, kind, obj, i = best
        if kind == "w":
            kw[obj.name][i[0]] = i[1]
        else:
            ka[obj.name] = int(i[0])
    else:
        return None
    return _polish(p, lim, kw, ka, max_steps)


def _polish(p: _Problem, lim: dict, kw: dict, ka: dict, max_steps: int = 100_000):
    """Undo what is not needed: the largest sensitivity reduction that keeps every limit, while
    there is one (also run on the integer program's answer, which is optimal only to MIP_GAP)."""
    kw = {k: v.copy() for k, v in kw.items()}
    ka = dict(ka)
    keys = list(lim)
    glim = {**lim, "ram": 0.0} if "ram" in lim else dict(lim)
    for _ in range(max_steps):
        tot = _greedy_totals(p, kw, ka, lim)
        best = None
        for kind, obj, ok, d, ds in _moves(p, kw, ka, lim):
            valid = ok & (ds < -1e-15)
            for key in keys:
                dk = d.get(key, np.zeros(ds.shape))
                valid &= tot[key] + dk <= glim[key] + 1e-9 * max(abs(glim[key]), 1.0)
            if not valid.any():
                continue
            score = np.where(valid, ds, np.inf)
            i = np.unravel_index(int(np.argmin(score)), score.shape)
            if best is None or score[i] < best[0]:
                best = (score[i], kind, obj, i)
        if best is None:
            break
        _, kind, obj, i = best
        if kind == "w":
            kw[obj.name][i[0]] = i[1]
        else:
            ka[obj.name] = int(i[0])
    return kw, ka


def _solve(p: _Problem, lim: dict, solver: str, time_limit: float):
    """(choice or None, solver used)."""
    if solver == "auto":
        solver = "milp" if p.n_vars() <= MILP_MAX_VARS else "greedy"
    if solver == "milp":
        try:
            choice = _solve_milp(p, lim, time_limit)
            if choice is None:
                return None, "milp"
            choice = _polish(p, lim, *choice)
            greedy = _solve_greedy(p, lim)  # cheap; wins only where the solver stopped early
            if greedy is not None and p.sens(*greedy) < p.sens(*choice) - 1e-12:
                return greedy, "greedy"
            return choice, "milp"
        except (ImportError, RuntimeError, ValueError) as exc:
            log.warning("milp selection failed (%s); using the greedy selection", exc)
    elif solver != "greedy":
        raise ValueError(f"unknown solver {solver!r}; use auto, milp or greedy")
    return _solve_greedy(p, lim), "greedy"


def _min_choice(p: _Problem):
    """Every group at its narrowest non-zero allowed width (the smallest memory and EBOPs)."""
    kw = {}
    for layer in p.layers:
        ok = layer.allowed & (layer.widths > 0)[None, :]
        kw[layer.name] = np.where(ok.any(1), np.argmax(ok, axis=1), layer.cur)
    return kw, {q: 0 for q in p.acts}


def _apply_choice(qm, p: _Problem, kw: dict, ka: dict) -> None:
    for layer in p.layers:
        bits = _apply(layer.bits, torch.as_tensor(layer.widths[kw[layer.name]], dtype=torch.float32))
        _set_bits(qm.layers[layer.name].quantizer, bits, layer.shape)
    for q, a in p.acts.items():
        _set_bits(qm.act_quantizers[q], _apply_all(a.bits, a.widths[ka[q]]), a.shape)
    qm.invalidate()


# ----------------------------------------------------------------------------- messages


def _smallest_here(qm, p: _Problem, t: Target) -> dict:
    """Smallest measured costs at this model's granularities: every group at its narrowest width."""
    saved = _bits_snapshot(qm)
    try:
        _apply_choice(qm, p, *_min_choice(p))
        totals = dict(cost_report(qm, t).totals)
    finally:
        _restore(qm, saved)
    # latency / energy need not fall with the widths: a lower bound per layer instead
    cycles = p.elem_cycles + sum(float(min((layer.cycles[:, :, i] + np.where(layer.allowed, 0, np.inf)).min(1).sum()
                                           for i in range(layer.cycles.shape[2]))) for layer in p.layers)
    totals["latency_cycles"] = min(totals["latency_cycles"], cycles)
    totals["energy_uj"] = min(totals["energy_uj"], cycles / _cycles_per_uj(t))
    return totals


def _infeasible_message(qm, p: _Problem, budget: Budget, t: Target) -> str:
    mins = _smallest_here(qm, p, t)
    parts = []
    for key, limit in budget.limits().items():
        parts.append(f"{_LABELS[key]} budget {_fmt(key, limit)} (smallest achievable {_fmt(key, mins[key])} "
                     f"with every group at its narrowest width on {t.name})")
    return ("no assignment of supported widths at this model's granularities meets the budget together: "
            + "; ".join(parts) + "; a coarser granularity (fewer stored scales) or a larger budget may")


# ----------------------------------------------------------------------------- the step


def _bits_snapshot(qm) -> dict:
    return {("w", n): l.quantizer.bits().detach().clone() for n, l in qm.layers.items()} | \
           {("a", n): q.bits().detach().clone() for n, q in qm.act_quantizers.items()}


def _restore(qm, saved: dict) -> None:
    for (kind, name), bits in saved.items():
        q = qm.layers[name].quantizer if kind == "w" else qm.act_quantizers[name]
        _set_bits(q, bits, tuple(bits.shape))
    qm.invalidate()


def _snap_model(qm, t: Target) -> bool:
    changed = False
    for name, layer in qm.layers.items():
        bits = layer.quantizer.bits().detach().cpu()
        snapped = _snap(bits, t.weight_bits)
        if not torch.equal(snapped, bits.float()):
            _set_bits(layer.quantizer, snapped, tuple(bits.shape))
            changed = True
    for name, q in qm.act_quantizers.items():
        bits = q.bits().detach().cpu()
        snapped = _snap(bits, t.act_bits)
        if not torch.equal(snapped, bits.float()):
            _set_bits(q, snapped, tuple(bits.shape))
            changed = True
    if changed:
        qm.invalidate()
    return changed


def needs_step(qm, target: str | Target, budget: Budget) -> bool:
    """Whether the budget step would change ``qm``: a limit is exceeded or a width is not supported."""
    t = as_target(target)
    return not feasible(cost_report(qm, t), budget) or not _supported(qm, t)


def _supported(qm, t: Target) -> bool:
    w = all(set(map(float, l.quantizer.bits().detach().flatten().tolist())) <= set(map(float, t.weight_bits))
            for l in qm.layers.values())
    a = all(set(map(float, q.bits().detach().flatten().tolist())) <= set(map(float, t.act_bits))
            for q in qm.act_quantizers.values())
    return w and a


def _changes(before: dict, qm) -> list[dict]:
    out = []
    for (kind, name), old in before.items():
        q = qm.layers[name].quantizer if kind == "w" else qm.act_quantizers[name]
        new = q.bits().detach().cpu()
        if old.shape == new.shape and torch.equal(old.cpu().float(), new.float()):
            continue
        values, counts = torch.unique(new.flatten(), return_counts=True)
        same_shape = tuple(old.shape) == tuple(new.shape)
        out.append({"name": name, "kind": "weight" if kind == "w" else "activation",
                    "entries": int(new.numel()),
                    "changed_entries": int((old.cpu().float() != new.float()).sum()) if same_shape else int(new.numel()),
                    "bits_mean_before": float(old.float().mean()), "bits_mean_after": float(new.float().mean()),
                    "widths_after": {str(int(v)): int(c) for v, c in zip(values.tolist(), counts.tolist())}})
    return out


def _broadcast_bits(qm) -> None:
    """Under torchrun every process selects; make sure all hold rank 0's choice."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    for module in list(qm.layers.values()) + list(qm.act_quantizers.values()):
        q = getattr(module, "quantizer", module)
        bits = q.bits().detach().clone()
        bits = bits.cuda() if nccl else bits
        torch.distributed.broadcast(bits, 0)
        _set_bits(q, bits.cpu(), tuple(bits.shape))
    qm.invalidate()


def _select(qm, t: Target, budget: Budget, probe, solver: str, max_iterations: int, time_limit: float):
    """One selection pass from the model's current bits: (report, solver used, iterations, sensitivity)."""
    upward = (budget.latency_cycles is not None or budget.energy_uj is not None) and _wider_can_be_faster(t)
    p = _build(qm, t, upward)
    if probe is not None:
        _measure(p, qm, probe)
        kind = "measured"
    else:
        _proxy(p, qm)
        kind = "proxy"
    _finish_sensitivity(p)
    lim = _limits(p, budget, t)
    used = solver
    for it in range(1, max_iterations + 1):
        choice, used = _solve(p, lim, solver, time_limit)
        if choice is None:
            break
        _apply_choice(qm, p, *choice)
        report = cost_report(qm, t)
        if feasible(report, budget):
            return report, used, it, kind
        est = p.totals(*choice)
        log.info("budget step: measured %s after selection %d; tightening", violations(report, budget), it)
        _tighten(lim, report, budget, t, p, est)
    else:
        it = max_iterations
    # the narrowest assignment is the last resort (the planner's arena is not monotone in the sizes)
    _apply_choice(qm, p, *_min_choice(p))
    report = cost_report(qm, t)
    if feasible(report, budget):
        log.warning("budget step: only the narrowest assignment meets the budget")
        return report, used + "+min", it, kind
    for layer in p.layers:
        _set_bits(qm.layers[layer.name].quantizer, layer.bits, layer.shape)
    for q, a in p.acts.items():
        _set_bits(qm.act_quantizers[q], a.bits, a.shape)
    qm.invalidate()
    raise BudgetError(_infeasible_message(qm, p, budget, t))


def budget_step(qm, target: str | Target, budget: Budget, *, x_val=None, y_val=None,
                fine_tune: Callable | None = None, solver: str = "auto", max_samples: int = 512,
                batch_size: int = 256, max_iterations: int = 8, time_limit: float = 20.0) -> BudgetStepResult:
    """Make ``qm`` (quantizers with ``set_bits``; the step works on the CPU and moves the model back
    to its device) meet every limit of ``budget`` on ``target``.

    ``x_val, y_val``: held-out data for measured sensitivities (at most ``max_samples``); without
    them the data-free proxy is used. ``fine_tune(qm)``: called after the selection with the bits
    frozen (it may return a history, kept in the result). ``solver``: ``auto`` (``milp`` up to
    ``MILP_MAX_VARS`` variables), ``milp`` or ``greedy``. A model that already fits with supported
    widths is returned unchanged; raises ``BudgetError`` naming the smallest achievable cost when
    nothing fits. See the module docstring for the method.
    """
    param = next(qm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    qm.cpu()
    try:
        return _budget_step(qm, as_target(target), budget, x_val, y_val, fine_tune, solver, max_samples, batch_size,
                            max_iterations, time_limit)
    finally:
        qm.to(device)
        qm.invalidate()


def _budget_step(qm, t: Target, budget: Budget, x_val, y_val, fine_tune, solver, max_samples, batch_size,
                 max_iterations, time_limit) -> BudgetStepResult:
    start = time.perf_counter()
    before_report = cost_report(qm, t)
    before = _bits_snapshot(qm)
    if feasible(before_report, budget) and _supported(qm, t):
        return BudgetStepResult(before_report, True, "none", "none", 0, _costs(before_report), _costs(before_report),
                                seconds=time.perf_counter() - start)
    _snap_model(qm, t)
    report = cost_report(qm, t)
    solver_used, iterations, kind, history = "none", 0, "none", None
    if not feasible(report, budget):
        try:
            check_achievable(qm.graph, t, budget)
        except BudgetError:
            _restore(qm, before)
            raise
        probe = _LossProbe(qm, x_val, y_val, max_samples, batch_size) if x_val is not None else None
        try:
            report, solver_used, iterations, kind = _select(qm, t, budget, probe, solver, max_iterations, time_limit)
        except BudgetError:
            _restore(qm, before)
            raise
        _broadcast_bits(qm)
    if fine_tune is not None and (solver_used != "none" or _changes(before, qm)):
        history = fine_tune(qm)
        qm.cpu()
        qm.invalidate()
        report = cost_report(qm, t)
        if not feasible(report, budget):
            log.info("budget step: %s after fine-tuning; selecting again", violations(report, budget))
            probe = _LossProbe(qm, x_val, y_val, max_samples, batch_size) if x_val is not None else None
            report, again, more, kind = _select(qm, t, budget, probe, solver, max_iterations, time_limit)
            _broadcast_bits(qm)
            solver_used, iterations = f"{solver_used},{again}", iterations + more
    report = cost_report(qm, t)
    ok = feasible(report, budget)
    result = BudgetStepResult(report, ok, solver_used, kind, iterations, _costs(before_report), _costs(report),
                              _changes(before, qm), history if isinstance(history, list) else None,
                              time.perf_counter() - start)
    log.info("budget step (%s, %s sensitivity): %s -> %s in %.1f s", solver_used, kind,
             {k: before_report.totals[k] for k in budget.limits()}, {k: report.totals[k] for k in budget.limits()},
             result.seconds)
    return result
