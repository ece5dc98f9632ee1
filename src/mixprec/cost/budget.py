"""Budgets: limits on the costs of a ``CostReport``, checked after search and before it starts.

Units: bytes for FLASH and RAM (``ram_bytes`` is the planned arena, ``ram_mcu_in_out`` the largest
input + output buffers of one layer), plain counts for BOPs, EBOPs and cycles, microjoules for energy.

>>> b = Budget.from_strings(flash="32KiB", ram="8KiB", ebops="1e4")
>>> b.flash_bytes, b.ram_bytes, b.ebops
(32768, 8192, 10000.0)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..graph.ir import Graph
from .bits import min_assignment
from .keys import BUDGET_KEYS, BUDGET_NAMES, BY_KEY, BY_NAME
from .report import CostReport, evaluate
from .targets import Target
from .units import format_size, parse_number, parse_size, size_unit


class BudgetError(ValueError):
    """A budget no bit assignment can meet, or one that the device cannot hold."""


@dataclass(frozen=True)
class Budget:
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    ebops: float | None = None
    energy_uj: float | None = None
    latency_cycles: float | None = None
    bops: float | None = None
    ram_mcu_in_out: int | None = None

    @classmethod
    def from_strings(cls, **limits) -> "Budget":
        """From user text keyed by cost name (``cost.keys``: flash, ram, ram_in_out, bops, ebops,
        energy, latency): sizes as ``"32KiB"`` (``units.parse_size``), the rest as numbers
        (``"1e6"``); energy in uJ, latency in cycles. ``None`` leaves a cost unconstrained."""
        unknown = sorted(set(limits) - set(BUDGET_NAMES))
        if unknown:
            raise ValueError(f"unknown budget {unknown}; budgets: {', '.join(BUDGET_NAMES)}")
        values = {}
        for name, text in limits.items():
            cost = BY_NAME[name]
            if text is not None:
                values[cost.key] = parse_size(text) if cost.unit == "B" else parse_number(text)
        return cls(**values)

    def limits(self) -> dict[str, float]:
        """The set limits, keyed by the report total they constrain."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def check(report: CostReport, budget: Budget) -> dict[str, tuple[float, float, bool]]:
    """``{total: (value, limit, value <= limit)}`` for every limit the budget sets."""
    return {k: (report.totals[k], limit, report.totals[k] <= limit) for k, limit in budget.limits().items()}


def feasible(report: CostReport, budget: Budget) -> bool:
    return all(ok for _, _, ok in check(report, budget).values())


def violations(report: CostReport, budget: Budget) -> str:
    """The limits ``report`` exceeds, as ``"flash_bytes 8232 > 4096; ..."`` (empty when it fits)."""
    return "; ".join(f"{k} {v:.6g} > {lim:.6g}" for k, (v, lim, ok) in check(report, budget).items() if not ok)


# ----------------------------------------------------------------------------- before search

_LABELS = {k: BY_KEY[k].label for k in BUDGET_KEYS}


def smallest_costs(graph: Graph, target: Target, weight_granularity: str | None = None,
                   allow_pruning: bool = False, removes_channels: bool = False) -> dict[str, float]:
    """Lower bounds of every budgeted cost on ``target`` (``how_reached`` says how).

    Memory, BOPs and EBOPs grow with the bits, so their minimum is every weight at the smallest width
    that holds values and every activation at the smallest width, at ``weight_granularity`` (a
    run's; default the target's coarsest: fewest scales) and, with ``allow_pruning``, every layer but
    the last pruned to one group (``min_assignment``: 0-bit groups, their biases kept). A method
    that ``removes_channels`` (DNAS) goes further: every layer that may lose channels keeps one, and
    a removed channel frees its bias, its buffer and its consumers' columns (``_one_channel_each``).
    Latency need not: a lower bound puts every weighted layer at the fastest (activation, non-zero
    weight) pair of the table, independently.
    """
    if removes_channels:
        totals, elementwise = _one_channel_each(graph, target, weight_granularity)
    else:
        r = evaluate(graph, min_assignment(graph, target, allow_pruning, weight_granularity), target)
        totals, elementwise = r.totals, r.totals["latency_cycles"] - sum(row.cycles for row in r.layers if row.macs)
    cycles = elementwise + totals["macs"] / _fastest_throughput(target)
    mins = {k: totals[k] for k in ("flash_bytes", "ram_bytes", "ram_mcu_in_out", "bops")}
    # EBOPs count each weight's set bits: any weight may round to 0 at any width, so the floor is one
    # 1-bit weight per layer (a layer of zeros is no model) on inputs at the smallest width
    mins["ebops"] = float(len(graph.weighted()) * target.min_act_bits)
    mins.update(latency_cycles=cycles, energy_uj=cycles / target.clock_hz * target.power_mw * 1e3)
    return mins


def _one_channel_each(graph: Graph, target: Target, weight_granularity: str | None) -> tuple[dict, float]:
    """The cost tables' exact totals when every layer that may lose channels (more than one weight
    group, not grouped, not the output layer) keeps one channel, everything at the smallest widths;
    and the elementwise cycles."""
    import numpy as np

    from .tables import build_tables

    base = min_assignment(graph, target, False, weight_granularity)
    last = graph.weighted()[-1].name if graph.weighted() else None

    def may_lose(name: str) -> bool:
        return name != last and graph[name].attrs.get("groups", 1) == 1 and base.weight[name].shape[0] > 1
    smallest = float(target.min_weight_bits)
    tables = build_tables(graph, target, base, act_widths=lambda q, top: [float(target.min_act_bits)],
                          weight_widths=lambda name, top: [0.0, smallest] if may_lose(name) else [smallest])
    keep_one = {n: (np.arange(layer.groups) == 0).astype(int) if may_lose(n) else np.zeros(layer.groups, int)
                for n, layer in tables.layers.items()}
    return tables.totals(keep_one, {q: 0 for q in tables.acts}), tables.elem_cycles


def how_reached(key: str, target: Target, weight_granularity: str | None = None, allow_pruning: bool = False,
                removes_channels: bool = False) -> str:
    """How ``smallest_costs`` reaches its figure for ``key``, for messages."""
    gran = weight_granularity or min(target.weight_granularities, key=_GRANULARITY_ORDER.index)
    weights = f"weights at {target.min_weight_bits} bits {gran}"
    if removes_channels and gran != "per-tensor":  # one width per layer removes no channel
        weights += ", every hidden layer down to one channel"
    elif allow_pruning and target.allows_pruning and gran == "per-element":
        weights += ", all but one weight of every layer pruned"
    elif allow_pruning and target.allows_pruning:
        weights += ", all but one group of every hidden layer pruned"
    acts = f"activations at {target.min_act_bits} bits"
    both = f"all {weights}; {acts}"
    ebops = (f"one non-zero weight of one bit per layer (a weight that rounds to 0 costs no EBOPs), inputs at "
             f"{target.min_act_bits} bits")
    return {"flash_bytes": f"all {weights}", "ram_bytes": f"all {acts}", "ram_mcu_in_out": f"all {acts}",
            "bops": both, "ebops": ebops}.get(key, "every layer at its fastest supported widths")


_GRANULARITY_ORDER = ("per-tensor", "per-slice", "per-channel", "per-element")


def _fastest_throughput(target: Target) -> float:
    return max(target.throughput(a, w) for a in target.act_bits for w in target.weight_bits if w > 0)


def _fmt(key: str, value: float, unit: str | None = None) -> str:
    if BY_KEY[key].unit == "B":
        return format_size(value, unit)
    return f"{value:.4g} uJ" if key == "energy_uj" else f"{value:.4g}"


def _violation(key: str, limit: float, smallest: float, target: Target, how: str) -> str:
    unit = size_unit(max(limit, smallest))
    return (f"{_LABELS[key]} budget {_fmt(key, limit, unit)} is below the smallest achievable "
            f"{_fmt(key, smallest, unit)} ({how}) for this model on {target.name}")


def _capacity_errors(budget: Budget, mins: dict[str, float], target: Target, how) -> list[str]:
    errors = []
    # the in+out figure is part of the peak RAM: a device holds no more of it than its RAM
    for key, capacity in (("flash_bytes", target.flash_bytes), ("ram_bytes", target.ram_bytes),
                          ("ram_mcu_in_out", target.ram_bytes)):
        limit = getattr(budget, key)
        if capacity is not None and limit is not None and limit > capacity:
            errors.append(f"{_LABELS[key]} budget {_fmt(key, limit)} exceeds the {_fmt(key, capacity)} "
                          f"of {target.name}")
        if capacity is not None and mins[key] > capacity:
            errors.append(f"the smallest achievable {_LABELS[key]} {_fmt(key, mins[key])} "
                          f"({how(key)}) does not fit the {_fmt(key, capacity)} of {target.name}")
    return errors


def check_achievable(graph: Graph, target: Target, budget: Budget, weight_granularity: str | None = None,
                     allow_pruning: bool = False, removes_channels: bool = False) -> dict[str, float]:
    """Raise ``BudgetError`` if no assignment on ``target`` at ``weight_granularity`` (pruned where
    ``allow_pruning`` and the target allow it, channels removed where the method ``removes_channels``)
    can meet ``budget``; return the minima.

    Also raises when a memory budget exceeds the device's capacity (a budget above the memory the
    device has is a mistake) or when even the smallest model does not fit the device.
    """
    mins = smallest_costs(graph, target, weight_granularity, allow_pruning, removes_channels)

    def how(key: str) -> str:
        return how_reached(key, target, weight_granularity, allow_pruning, removes_channels)
    errors = [_violation(k, limit, mins[k], target, how(k)) for k, limit in budget.limits().items() if mins[k] > limit]
    errors += _capacity_errors(budget, mins, target, how)
    if errors:
        raise BudgetError("; ".join(errors))
    return mins
