"""The selection problem of the budget step: per weight group / activation quantizer the candidate
widths and the cost of each (FLASH, BOPs, EBOPs, cycles, activation buffer bytes: the public
``cost.tables``), with the squared quantization errors the sensitivities share, built by
``_build``; applying a choice to the model; and the internal limits a budget sets and their
tightening."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ...cost import Budget, CostReport, Target
from ...cost import compute, memory
from ...cost.bits import BitAssignment
from ...cost.tables import CostTables, build_tables, cap
from ...lower import integer_weights
from .bits import _EPS, _apply, _apply_all, _padded, _set_bits


# ----------------------------------------------------------------------------- tables

#: Costs that are a maximum over buffer sets, each set a linear row in the activation widths:
#: peak RAM (aligned buffers live at one step) and the in+out figure (a layer's input + output)
SET_COSTS = ("ram", "in_out")


@dataclass
class _Act:
    name: str
    shape: tuple  # the quantizer's own bits shape
    bits: torch.Tensor  # snapped bits, padded to the tensor's rank
    widths: np.ndarray  # (A,) candidate widths, ascending
    cur: int  # index of the unchanged width
    sens: np.ndarray  # (A,)
    buffers: dict  # buffer -> (A,) aligned bytes (the live sets of peak RAM)
    sizes: dict  # buffer -> (A,) unaligned bytes (the in+out figure)


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
    bops: np.ndarray  # (G, K, A)
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
    in_out: list[list[str]]  # per layer: its output and input buffers (the MCU paper's in+out figure)

    def n_vars(self) -> int:
        return (sum(layer.allowed.size for layer in self.layers) + sum(len(a.widths) for a in self.acts.values())
                + 2 * len(self.layers))

    def start(self) -> tuple[dict, dict]:
        return {layer.name: layer.cur.copy() for layer in self.layers}, {q: a.cur for q, a in self.acts.items()}

    def totals(self, kw: dict, ka: dict) -> dict:
        """Internal totals of a choice: weight bytes, BOPs, EBOPs, MAC cycles, live-set RAM bound,
        largest in+out bytes."""
        out = {"flash": 0.0, "bops": 0.0, "ebops": 0.0, "cycles": 0.0}
        for layer in self.layers:
            g, k, a = np.arange(layer.groups), kw[layer.name], ka[layer.in_q]
            out["flash"] += float(layer.flash[g, k].sum())
            for key in ("bops", "ebops", "cycles"):
                out[key] += float(getattr(layer, key)[g, k, a].sum())
        for key in SET_COSTS:
            out[key] = max(self.set_bytes(key, ka), default=0.0)
        return out

    def buffer_sets(self, key: str) -> list[list[str]]:
        """The buffer sets a set cost (``SET_COSTS``) bounds: live sets (ram) or layers (in_out)."""
        return self.live_sets if key == "ram" else self.in_out

    def buffer_table(self, key: str, buffer: str) -> np.ndarray:
        """(A,) bytes of ``buffer`` at its quantizer's widths: aligned (ram) or as stored (in_out)."""
        act = self.acts[self.buffer_q[buffer]]
        return (act.buffers if key == "ram" else act.sizes)[buffer]

    def set_bytes(self, key: str, ka: dict) -> list[float]:
        """Bytes of each set of ``buffer_sets(key)`` under the activation choice ``ka``."""
        return [float(sum(self.buffer_table(key, b)[ka[self.buffer_q[b]]] for b in s)) for s in self.buffer_sets(key)]

    def live_bytes(self, ka: dict) -> list[float]:
        return self.set_bytes("ram", ka)

    def ram(self, ka: dict) -> float:
        return max(self.live_bytes(ka), default=0.0)

    def excess(self, key: str, ka: dict, limit: float) -> float:
        """Bytes over ``limit`` summed over the sets of ``key`` (0 iff every set meets it); unlike
        the maximum, every set over the limit counts, so ties do not stall the greedy."""
        return float(sum(max(0.0, s - limit) for s in self.set_bytes(key, ka)))

    def ram_excess(self, ka: dict, limit: float) -> float:
        return self.excess("ram", ka, limit)

    def sens(self, kw: dict, ka: dict) -> float:
        s = sum(float(layer.sens[np.arange(layer.groups), kw[layer.name]].sum()) for layer in self.layers)
        return s + sum(float(a.sens[ka[q]]) for q, a in self.acts.items())


def _with_in_shapes(graph, node):
    return node if node.in_shapes else replace(node, in_shapes=[graph[i].out_shape for i in node.inputs])


def _calibrated(qm) -> bool:
    try:
        qm.lower()
        return True
    except RuntimeError:
        return False


def _act_widths(t: Target, upward: bool):
    """Candidate widths of an activation quantizer: those at most its widest entry (and wider ones
    when a wider width may be faster)."""
    def widths(name: str, top: float) -> list[float]:
        return [w for w in t.act_bits if w <= top + _EPS] + ([w for w in t.act_bits if w > top + _EPS] if upward else [])
    return widths


def _acts(tables: CostTables) -> dict[str, _Act]:
    acts = {}
    for q, a in tables.acts.items():
        top = float(a.base.max())
        acts[q] = _Act(q, a.shape, a.base, a.widths, int(np.argmin(np.abs(a.widths - top))), np.zeros(len(a.widths)),
                       a.aligned, a.buffers)
    return acts


def _weight_candidates(t: Target, top: np.ndarray, prunable: bool, upward: bool):
    # 1-bit weights hold only 0: a group there is pruned in effect, and may stay pruned (0 bits)
    # where pruning is allowed or take the narrowest width that holds values
    support = sorted({0, *t.value_weight_bits} & set(t.weight_bits))
    low = (top > _EPS) & (top < t.min_weight_bits - _EPS)
    top = np.where(low, float(t.min_weight_bits), top)
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


def _prunable(t: Target, qm, name: str, last: bool) -> bool:
    return t.allows_pruning and not last and _padded(qm.layers[name].quantizer.bits(), 1).shape[0] > 1


def _effective_bits(qm):
    """Per-element weight bits for EBOPs at candidate bits: the integer weights' effective bits."""
    def bits(name: str, candidate: torch.Tensor) -> torch.Tensor:
        quant, w = qm.layers[name].quantizer, qm.layers[name].weight.detach().cpu()
        saved = quant.bits().detach().clone()
        try:
            quant.set_bits(candidate)
            return compute.effective_bits(integer_weights(w, quant.qparams(w))[1])
        finally:
            quant.set_bits(saved)
    return bits


def _layer(qm, tables: CostTables, t: Target, name: str, prunable: bool, upward: bool) -> _Layer:
    """A layer of the selection: the public table's costs plus the squared weight quantization
    error of each group at each width (the sensitivity shares) and the widths it may take."""
    table = tables.layers[name]
    quant = qm.layers[name].quantizer
    g0 = table.groups
    top = table.base.reshape(g0, -1).amax(1).numpy()
    _, allowed = _weight_candidates(t, top, prunable, upward)
    err = np.zeros((g0, len(table.widths)))
    w = qm.layers[name].weight.detach().cpu()
    try:
        for k, width in enumerate(table.widths):
            quant.set_bits(cap(table.base, torch.full((g0,), float(width))).reshape(table.shape))
            deq, _, _ = integer_weights(w, quant.qparams(w))
            err[:, k] = ((deq - w.double()) ** 2).reshape(g0, -1).sum(1).numpy()
    finally:
        quant.set_bits(table.base.reshape(table.shape))
    cur = np.array([int(np.argmin(np.abs(table.widths - m))) for m in top])
    prune_k = int(np.flatnonzero(table.widths == 0)[0]) if prunable and (table.widths == 0).any() else None
    return _Layer(name, table.in_act, table.shape, table.base, table.widths, allowed, cur, table.flash, table.ebops,
                  table.bops, table.cycles, err, np.zeros((g0, len(table.widths))), prune_k)


def _build(qm, t: Target, upward: bool) -> _Problem:
    graph = qm.graph
    calibrated = _calibrated(qm)
    base = BitAssignment(qm.weight_bits(), qm.act_bits(), qm.act_shifts() if calibrated else {}).detach()
    base = BitAssignment({k: v.cpu() for k, v in base.weight.items()}, {k: v.cpu() for k, v in base.act.items()},
                         {k: v.cpu() for k, v in base.act_shift.items()})
    weighted = [n.name for n in graph.weighted()]
    prunable = {name: _prunable(t, qm, name, name == weighted[-1]) for name in weighted}

    def weight_widths(name: str, top: np.ndarray) -> np.ndarray:
        return _weight_candidates(t, top, prunable[name], upward)[0]

    tables = build_tables(graph, t, base, weight_widths=weight_widths, act_widths=_act_widths(t, upward),
                          effective=_effective_bits(qm) if calibrated else None)
    layers = [_layer(qm, tables, t, name, prunable[name], upward) for name in weighted]
    return _Problem(layers, _acts(tables), tables.param_bytes, tables.elem_cycles, tables.live_sets, tables.buffer_act,
                    list(memory.in_out_buffers(graph).values()))


def _apply_choice(qm, p: _Problem, kw: dict, ka: dict) -> None:
    for layer in p.layers:
        bits = _apply(layer.bits, torch.as_tensor(layer.widths[kw[layer.name]], dtype=torch.float32))
        _set_bits(qm.layers[layer.name].quantizer, bits, layer.shape)
    for q, a in p.acts.items():
        _set_bits(qm.act_quantizers[q], _apply_all(a.bits, a.widths[ka[q]]), a.shape)
    qm.invalidate()


# ----------------------------------------------------------------------------- limits

#: Internal limits that are a budget as it is: internal name -> budget key
_AS_BUDGETED = {"ram": "ram_bytes", "in_out": "ram_mcu_in_out", "bops": "bops", "ebops": "ebops"}


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
    for name, key in _AS_BUDGETED.items():
        if getattr(budget, key) is not None:
            lim[name] = float(getattr(budget, key))
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
    for name, key in {"flash": "flash_bytes", **_AS_BUDGETED}.items():
        limit = getattr(budget, key)
        if limit is not None and totals[key] > limit:
            excess[name] = totals[key] - limit
    cyc = []
    if budget.latency_cycles is not None and totals["latency_cycles"] > budget.latency_cycles:
        cyc.append(totals["latency_cycles"] - budget.latency_cycles)
    if budget.energy_uj is not None and totals["energy_uj"] > budget.energy_uj:
        cyc.append((totals["energy_uj"] - budget.energy_uj) * _cycles_per_uj(t))
    if cyc:
        excess["cycles"] = max(cyc)
    for k, e in excess.items():
        step = max(e, 1.0 if k in ("flash", *SET_COSTS) else abs(lim[k]) * 1e-6)
        if k == "ram":
            step = max(step, t.alignment)
        lim[k] = min(lim[k], est[k]) - step
