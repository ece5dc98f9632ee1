"""The cost of a quantized model as deployed: :func:`cost_report` measures it (FLASH on the C
library's sections laid out from the lowered model, EBOPs on the effective bits of its integer
weights), :func:`cost_term` is a differentiable cost to train with.

The rest of :mod:`mixprec.cost` prices a graph and its bit assignment; this module prices a
:class:`~mixprec.nn.model.QuantModel`, and is what the search methods, the budget step and the
public API (``mixprec.cost_report``) measure with.

>>> import torch, mixprec
>>> qm = mixprec.quantize(torch.nn.Sequential(torch.nn.Linear(4, 2)), "cortex-m4", (4,), bits=4)
>>> qm.calibrate([torch.randn(8, 4)])
>>> int(cost_report(qm, "cortex-m4").totals["flash_bytes"])   # 2 rows x 2 B + bias/mult/shift
28
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..lower import integer_weights
from .bits import BitAssignment, act_bits as resolve_act_bits, assignment
from .compute import ebops as node_ebops, effective_bits
from .report import CostReport, evaluate, evaluate_torch
from .targets import Target, as_target

if TYPE_CHECKING:
    from ..nn.model import QuantModel

log = logging.getLogger(__name__)


def cost_term(qm: QuantModel, target: str | Target, key: str = "flash_bytes") -> torch.Tensor:
    """A differentiable cost (any report total) to add to the loss."""
    return evaluate_torch(qm.graph, assignment(qm), as_target(target))[key]


def cost_report(qm: QuantModel, target: str | Target) -> CostReport:
    """Exact cost of the model as deployed. Once the model has been calibrated, FLASH is the bytes
    of the C library's constant sections laid out from the lowered model (weights, parameters and
    every layout or clamp table), and EBOPs count each weight's effective bits (see
    :func:`mixprec.cost.compute.effective_bits`: a weight that rounds to zero costs nothing)."""
    t = as_target(target)
    a = assignment(qm)
    report = evaluate(qm.graph, a, t)
    try:
        ig = qm.lower()
    except RuntimeError:  # not calibrated yet: the EBOPs of the weights on their grids, FLASH from the cost model
        return weight_ebops(report, qm)
    _set_ebops(report, _effective_ebops(qm, {n: torch.as_tensor(ig[n].params["weight"]) for n in qm.layers}))
    _measure_flash_sections(report, ig, qm.graph, a, t)
    return report


@torch.no_grad()
def weight_ebops(report: CostReport, qm: QuantModel) -> CostReport:
    """``report`` (of ``qm``'s widths) with ``ebops`` counted on ``qm``'s integer weights, straight from
    the quantizers' grids (no calibration needed: weight grids come from the weights)."""
    _set_ebops(report, _effective_ebops(qm, _grid_weights(qm)))
    return report


def _set_ebops(report: CostReport, rows: dict) -> None:
    for row in report.layers:
        if row.name in rows:
            row.ebops = float(rows[row.name])
    report.totals["ebops"] = float(sum(rows.values()))


def _grid_weights(qm: QuantModel) -> dict:
    ints = {}
    for name, layer in qm.layers.items():
        w = layer.weight.detach()
        ints[name] = integer_weights(w, layer.quantizer.qparams(w))[1]
    return ints


def _measure_flash_sections(report: CostReport, ig, graph, a: BitAssignment, t: Target) -> None:
    """Replace the cost model's FLASH figure with the library's sections where they differ: tables
    the lowered values need (alignments of per-element fixed-point grids, clamp tables, shifts a
    target stores in 0 bytes) are known only once the model is lowered."""
    # The C generator lays the sections out (it builds on this package's memory model): imported
    # here, where it is used, so the cost package does not load the exporters (see
    # tests/test_architecture.py).
    from ..export.base import ExportError
    from ..export.c.generate import flash_sections

    try:
        sections = flash_sections(ig, graph, a, t, report)
    except ExportError as exc:  # no C library for this model: export says why; the cost model stands
        log.debug("FLASH from the cost model only: %s", exc)
        return
    measured = sum(sections.values())
    tables = measured - report.totals["weight_bytes"] - report.totals["param_bytes"]
    if measured != report.totals["flash_bytes"]:
        log.debug("FLASH sections %s differ from the cost model's %d B", sections, report.totals["flash_bytes"])
        report.totals["flash_bytes"], report.totals["table_bytes"] = measured, tables


@torch.no_grad()
def effective_ebops(qm: QuantModel) -> float:
    """``cost_report(qm, t).totals["ebops"]`` of a calibrated model without lowering it (the integer
    weights straight from the quantizers' grids): cheap enough to steer training by."""
    return float(sum(_effective_ebops(qm, _grid_weights(qm)).values()))


def _effective_ebops(qm: QuantModel, w_int: dict) -> dict:
    in_bits = assignment(qm).detach()
    return {name: node_ebops(qm.graph[name], effective_bits(k).float(),
                             resolve_act_bits(in_bits, qm.graph, qm.graph[name].inputs[0]))
            for name, k in w_int.items()}
