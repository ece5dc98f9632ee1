"""The small public API the CLI is a thin layer over.

>>> import torch, mixprec
>>> qm = mixprec.quantize(torch.nn.Sequential(torch.nn.Linear(4, 2)), "cortex-m4", (4,), bits=4)
>>> qm.calibrate([torch.randn(8, 4)])
>>> int(mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"])   # 2 rows x 2 B + bias/mult/shift
28
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .convert import convert
from .cost import (Budget, BudgetError, CostReport, Target, check_achievable, evaluate, evaluate_torch, feasible,
                   load_target, violations)
from .cost.bits import BitAssignment, act_bits as resolve_act_bits, uniform
from .cost.compute import ebops as node_ebops, effective_bits
from .execute import reference
from .lower import integer_weights
from .nn.model import QuantModel
from .train.loop import eval_batch_size

log = logging.getLogger(__name__)


def as_target(target: str | Target) -> Target:
    return target if isinstance(target, Target) else load_target(target)


def default_weight_granularity(target: Target) -> str:
    """Per channel where the target's kernels allow it (it costs a few bytes and buys accuracy)."""
    for g in ("per-channel", "per-tensor"):
        if g in target.weight_granularities:
            return g
    return target.weight_granularities[0]


def quantize(model: nn.Module, target: str | Target, input_shape: tuple[int, ...], bits=8, act_bits=None,
             weight_granularity: str | None = None) -> QuantModel:
    """Convert a float model into a quantized model for ``target`` (fixed bit-widths; a weight
    group of 3 bits or fewer takes the least-squares scale of its max-abs range and narrower
    candidates, a wider one the max-abs range)."""
    t = as_target(target)
    act_bits = bits if act_bits is None else act_bits
    gran = weight_granularity_for(t, weight_granularity)
    for b in _values(bits):
        if b not in t.weight_bits:
            raise ValueError(f"{b}-bit weights are not supported by {t.name}; supported: {', '.join(map(str, t.weight_bits))}")
    for b in _values(act_bits):
        if b not in t.act_bits:
            raise ValueError(f"{b}-bit activations are not supported by {t.name}; supported: {', '.join(map(str, t.act_bits))}")
    return convert(model, input_shape, t.numerics, bits, act_bits, gran, t.act_granularities[0], t.name)


def weight_granularity_for(t: Target, requested: str | None) -> str:
    """The requested weight granularity (the target's default when ``None``), refused with the
    supported ones when the target's kernels cannot run it."""
    gran = requested or default_weight_granularity(t)
    if gran not in t.weight_granularities:
        raise ValueError(f"target {t.name} does not support {gran} weights; it supports "
                         f"{', '.join(t.weight_granularities)}")
    return gran


def _values(bits) -> list[int]:
    if isinstance(bits, dict):
        return sorted({int(v) for b in bits.values() for v in torch.as_tensor(b).flatten().tolist()})
    return sorted({int(v) for v in torch.as_tensor(bits).flatten().tolist()})


def assignment(qm: QuantModel) -> BitAssignment:
    """The model's bits (and its activation grids' post-shifts) as the cost model takes them."""
    return BitAssignment(qm.weight_bits(), qm.act_bits(), qm.act_shifts())


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
    except RuntimeError:  # not calibrated yet: nominal bits only
        return report
    rows = _effective_ebops(qm, {n: torch.as_tensor(ig[n].params["weight"]) for n in qm.layers})
    for row in report.layers:
        if row.name in rows:
            row.ebops = float(rows[row.name])
    report.totals["ebops"] = float(sum(rows.values()))
    _measure_flash_sections(report, ig, qm.graph, a, t)
    return report


def _measure_flash_sections(report: CostReport, ig, graph, a: BitAssignment, t: Target) -> None:
    """Replace the cost model's FLASH figure with the library's sections where they differ: tables
    the lowered values need (alignments of per-element fixed-point grids, clamp tables, shifts a
    target stores in 0 bytes) are known only once the model is lowered."""
    from .export.base import ExportError
    from .export.c.generate import flash_sections

    try:
        sections = flash_sections(ig, graph, a, t)
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
    ints = {}
    for name, layer in qm.layers.items():
        w = layer.weight.detach()
        ints[name] = integer_weights(w, layer.quantizer.qparams(w))[1]
    return float(sum(_effective_ebops(qm, ints).values()))


def _effective_ebops(qm: QuantModel, w_int: dict) -> dict:
    in_bits = assignment(qm).detach()
    return {name: node_ebops(qm.graph[name], effective_bits(k).float(),
                             resolve_act_bits(in_bits, qm.graph, qm.graph[name].inputs[0]))
            for name, k in w_int.items()}


def largest_uniform_bits(model: nn.Module, target: str | Target, input_shape, budget: Budget,
                         act_bits: int | None = None, weight_granularity: str | None = None) -> int:
    """The widest uniform weight width (activations alike unless given) that meets ``budget``,
    judged from shapes alone; raises ``BudgetError`` naming the smallest achievable cost."""
    t = as_target(target)
    graph = quantize(model, t, input_shape, bits=t.min_weight_bits, act_bits=act_bits or t.min_act_bits,
                     weight_granularity=weight_granularity).graph
    gran = weight_granularity_for(t, weight_granularity)
    try:
        check_achievable(graph, t, budget, gran)
    except BudgetError as exc:
        if not t.allows_pruning:
            raise
        try:
            check_achievable(graph, t, budget, gran, allow_pruning=True)
        except BudgetError:
            raise exc from None
        raise BudgetError(f"{exc}; pruning channels, a mixed-precision method (--method hgq or dq) can reach "
                          f"it") from None
    tried = []
    for b in nonzero_widths(t):
        report = evaluate(graph, uniform(graph, b, act_bits or activation_width_for(b, t), gran,
                                         t.act_granularities[0]), t)
        if feasible(report, budget):
            return b
        tried.append(f"{b}-bit: {violations(report, budget)}")
    raise BudgetError("no uniform width meets the budget (" + "; ".join(tried) + "), though the smallest "
                      "achievable cost does: a mixed-precision method (--method hgq or dq) can reach it")


def nonzero_widths(t: Target) -> list[int]:
    """The target's weight widths that hold non-zero values, widest first: neither 0 (pruning is
    not a uniform width) nor 1 (a signed symmetric 1-bit weight is 0)."""
    return sorted(t.value_weight_bits, reverse=True)


def activation_width_for(weight_bits: int, t: Target) -> int:
    """The narrowest supported activation width at least as wide as the weights (uniform pairing)."""
    return min((a for a in t.act_bits if a >= weight_bits), default=max(t.act_bits))


def finalize(qm: QuantModel, target: str | Target, budget: Budget, data=None, *, x_val=None, y_val=None,
             fine_tune=None, epochs: int = 1, lr: float = 5e-4, solver: str = "auto") -> CostReport:
    """Make ``qm`` meet ``budget`` and return its measured cost.

    A model that already fits with widths the target supports is left alone. Otherwise the budget
    step (``mixprec.search.budget_step``) snaps the bits onto the supported widths and lowers the
    widths of the groups (weight channels / slices / tensors, activation tensors) whose loss
    increase per unit of cost is smallest, chosen by an integer program, and re-measures until
    every limit holds. Raises ``BudgetError`` naming the smallest achievable cost when nothing fits.

    Without data the selection ranks groups by their relative weight (and activation)
    quantization noise and nothing is trained. ``data`` (a dataset split object with ``x_val``,
    ``y_val`` and, for fine-tuning, ``x_train``, ``y_train``; or a pair ``(x_val, y_val)``) or
    ``x_val, y_val`` measure the sensitivities on held-out data instead. With training data the
    model is then fine-tuned for ``epochs`` epochs at ``lr`` with the bits frozen; ``fine_tune``
    (a callable taking the model) replaces that with your own training. Use
    ``budget_step.budget_step`` directly for what changed and the solver used.
    """
    from .search.budget_step import budget_step

    train = None
    if isinstance(data, (tuple, list)):
        x_val, y_val = data
    elif data is not None:
        x_val, y_val = data.x_val, data.y_val
        if getattr(data, "x_train", None) is not None:
            train = data
    if fine_tune is None and train is not None and epochs > 0:
        fine_tune = _fine_tune_with(train, epochs, lr)
    return budget_step(qm, target, budget, x_val=x_val, y_val=y_val, fine_tune=fine_tune, solver=solver).report


def _fine_tune_with(data, epochs: int, lr: float):
    """A fine-tune of weights and biases only (the bits stay as chosen) on ``data``'s splits."""
    from .train import TrainConfig, fit

    def run(qm: QuantModel):
        params = qm.weight_parameters()
        return fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, TrainConfig(epochs=epochs, lr=lr),
                   params=params, augment=getattr(data, "augment", None))
    return run


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


def verify_against_reference(qm: QuantModel, x: torch.Tensor) -> int:
    """Number of outputs where the model's evaluation differs from the NumPy reference (want 0)."""
    qm.eval()
    ig = qm.lower()
    mismatches, batch = 0, eval_batch_size("cpu", x)  # cache-sized batches
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        with torch.no_grad():
            got = qm(xb).numpy()
        want = (reference(ig, xb.numpy()) * ig.output_scale).astype(np.float32)
        mismatches += int((got != want).sum())
    return mismatches


__all__ = ["Budget", "BudgetError", "as_target", "assignment", "cost_report", "cost_term", "finalize",
           "largest_uniform_bits", "quantize", "save_integer_model", "verify_against_reference"]
