"""One call for every cost of a graph under a bit assignment on a target.

``evaluate`` gives a ``CostReport`` of plain numbers (per-layer rows, totals, the arena plan);
``evaluate_torch`` gives the same totals as differentiable torch scalars for a loss.

>>> from mixprec.graph.ir import Graph, Node
>>> from mixprec.cost.bits import uniform
>>> from mixprec.cost.targets import load_target
>>> g = Graph([Node("input", "input", [], (16,)),
...            Node("fc", "linear", ["input"], (4,), [(16,)], (4, 16))], output="fc")
>>> r = evaluate(g, uniform(g, 4, 8), load_target("cortex-m4"))
>>> r.totals["weight_bytes"], r.totals["param_bytes"], r.totals["ram_bytes"]  # 4*8 B; 4*4 bias + 8
(32, 24, 20)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..graph.ir import Graph, Node
from . import compute, memory
from .bits import BitAssignment, act_bits, weight_bits
from .rounding import align_up_ste
from .targets import Target

TOTALS = ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes", "ram_lower_bound", "ram_mcu_in_out",
          "macs", "bops", "ebops", "ebops_nominal", "latency_cycles", "energy_uj")
_INT_TOTALS = ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes", "ram_lower_bound", "ram_mcu_in_out", "macs")


@dataclass
class LayerCost:
    name: str
    op: str
    params: int  # weight elements
    weight_bits: float | None  # mean over elements (None: no weights)
    act_bits: float  # mean over the output tensor
    weight_bytes: int
    param_bytes: int
    macs: int
    bops: float
    ebops: float
    cycles: float
    energy_uj: float
    in_out_bytes: int  # input buffers + output buffer (MCU-paper RAM figure); 0 for input and views
    table_bytes: int = 0  # layout tables of its weights and output buffer (non-uniform containers)


@dataclass
class CostReport:
    target: str
    layers: list[LayerCost]
    totals: dict[str, float | int]
    plan: memory.MemoryPlan

    def to_dict(self) -> dict:
        return {"target": self.target, "totals": dict(self.totals),
                "layers": [asdict(row) for row in self.layers], "memory_plan": self.plan.to_dict()}


# ----------------------------------------------------------------------------- terms


def _device(a: BitAssignment) -> torch.device:
    return next(iter(a.act.values())).device if a.act else torch.device("cpu")


def _with_in_shapes(graph: Graph, node: Node) -> Node:
    """``node`` with ``in_shapes`` filled from its producers when the converter left them empty."""
    return node if node.in_shapes else replace(node, in_shapes=[graph[i].out_shape for i in node.inputs])


def _layer_terms(graph: Graph, a: BitAssignment, node: Node, target: Target) -> dict[str, torch.Tensor]:
    zero = torch.zeros((), device=_device(a))
    terms = {"weight_bytes": zero, "bops": zero, "ebops": zero,
             "cycles": zero + compute.elementwise_cycles(node, target)}
    node = _with_in_shapes(graph, node)
    if node.has_weights:
        wb, ib = weight_bits(a, graph, node.name), act_bits(a, graph, node.inputs[0])
        terms.update(weight_bytes=memory.weight_flash_bytes(node, wb, target),
                     bops=compute.bops(node, wb, ib), ebops=compute.ebops(node, wb, ib),
                     cycles=terms["cycles"] + compute.mac_cycles(node, wb, ib, target))
    return terms


def _memory_terms(graph: Graph, a: BitAssignment, target: Target):
    sizes = memory.buffer_bytes(graph, a, target)
    plan = memory.plan_buffers(graph, sizes, target)
    spans = plan.lifetimes  # the plan's own: the graph walked once
    aligned = {b: align_up_ste(s, target.alignment) for b, s in sizes.items()}
    lower = memory.live_bytes_peak(aligned, spans)
    return plan, memory.arena_torch(plan, sizes), lower, memory.in_out_bytes(graph, sizes)


def _totals(graph, a, target, terms, params, tables, arena, lower, in_out) -> dict[str, torch.Tensor]:
    t = {k: torch.stack([row[k] for row in terms.values()]).sum() for k in ("weight_bytes", "bops", "ebops", "cycles")}
    zero = torch.zeros((), device=_device(a))
    param_bytes = zero + float(sum(params.values()))
    table_bytes = zero + float(sum(tables.values()))
    return {"flash_bytes": t["weight_bytes"] + param_bytes + table_bytes, "weight_bytes": t["weight_bytes"],
            "param_bytes": param_bytes, "table_bytes": table_bytes, "ram_bytes": arena, "ram_lower_bound": lower,
            "ram_mcu_in_out": torch.stack(list(in_out.values())).max() if in_out else zero,
            "macs": zero + float(sum(n.macs for n in graph)), "bops": t["bops"], "ebops": t["ebops"],
            "ebops_nominal": t["ebops"], "latency_cycles": t["cycles"], "energy_uj": compute.energy_uj(t["cycles"], target)}


def _evaluate(graph: Graph, a: BitAssignment, target: Target):
    terms = {n.name: _layer_terms(graph, a, n, target) for n in graph}
    params = {n.name: memory.param_flash_bytes(graph, a, n.name, target) for n in graph}
    tables = {n.name: memory.table_flash_bytes(graph, a, n.name, target) for n in graph}
    plan, arena, lower, in_out = _memory_terms(graph, a, target)
    return terms, params, tables, plan, in_out, _totals(graph, a, target, terms, params, tables, arena, lower, in_out)


def evaluate_torch(graph: Graph, assignment: BitAssignment, target: Target) -> dict[str, torch.Tensor]:
    """Every total of ``evaluate`` as a torch scalar, differentiable in the assignment's bits."""
    return _evaluate(graph, assignment, target)[-1]


def evaluate(graph: Graph, assignment: BitAssignment, target: Target) -> CostReport:
    """Per-layer costs, totals (plain ints / floats) and the arena plan.

    From widths alone, EBOPs count every weight at its nominal width (``ebops_nominal``, an upper
    bound); ``ebops`` holds the same until the weights are known:
    :func:`mixprec.cost.deployed.cost_report` and ``weight_ebops`` replace it with the EBOPs of the
    integer weights (a weight's set bits; one that rounds to 0 costs nothing), the one figure
    results, budgets and ``mixprec cost`` report as ``ebops``."""
    with torch.no_grad():
        terms, params, tables, plan, in_out, totals = _evaluate(graph, assignment.detach(), target)
        rows = [_row(graph, assignment, n, terms[n.name], params[n.name], tables[n.name], in_out.get(n.name), target)
                for n in graph]
    return CostReport(target.name, rows, {k: _plain(k, v) for k, v in totals.items()}, plan)


def _plain(key: str, value: torch.Tensor) -> float | int:
    v = float(value)
    return int(round(v)) if key in _INT_TOTALS else v


def _row(graph, a, node, terms, params, tables, in_out, target) -> LayerCost:
    wb = float(weight_bits(a, graph, node.name).mean()) if node.has_weights else None
    cycles = float(terms["cycles"])
    return LayerCost(node.name, node.op, _numel(node.weight_shape), wb, float(act_bits(a, graph, node.name).mean()),
                     int(round(float(terms["weight_bytes"]))), params, node.macs, float(terms["bops"]),
                     float(terms["ebops"]), cycles, compute.energy_uj(cycles, target),
                     int(round(float(in_out))) if in_out is not None else 0, tables)


def _numel(shape) -> int:
    n = 1
    for s in shape or (0,):
        n *= s
    return n


# ----------------------------------------------------------------------------- text


_COLUMNS = (("name", "{}"), ("op", "{}"), ("params", "{}"), ("weight_bits", "{:.2f}"), ("act_bits", "{:.2f}"),
            ("weight_bytes", "{}"), ("param_bytes", "{}"), ("table_bytes", "{}"), ("macs", "{}"), ("bops", "{:.4g}"), ("ebops", "{:.4g}"),
            ("cycles", "{:.4g}"), ("energy_uj", "{:.4g}"), ("in_out_bytes", "{}"))


def format_table(report: CostReport) -> str:
    """A plain-text table: one line per layer, then the totals."""
    cells = [[c for c, _ in _COLUMNS]]
    for row in report.layers:
        values = asdict(row)
        cells.append(["-" if values[c] is None else fmt.format(values[c]) for c, fmt in _COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", f"totals on {report.target}:"]
    lines += [f"  {k:<16} {v:.6g}" if isinstance(v, float) else f"  {k:<16} {v}" for k, v in report.totals.items()]
    return "\n".join(lines)
