"""The budget step: after any search method, make a quantized model meet every hard budget
(FLASH, peak RAM, the MCU paper's in+out RAM, BOPs, EBOPs, energy, latency) while losing as little
accuracy as it can.

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
bytes do not depend on the widths), BOPs (nominal bits), EBOPs (effective bits, highest to lowest
set bit, of the integer weights as lowering computes them once the model is calibrated, nominal
bits before) and cycles (the throughput table at the channel's widest weight and the input's
widest activation) for every width of the layer's input activation quantizer, and, per activation
quantizer and width, the size (unaligned and aligned) of every activation buffer whose grid it
defines. FLASH is additive over groups; BOPs, EBOPs and cycles are bilinear (weight width times
input width), and latency and energy are both the total cycles.

**Selection** is an integer program (``scipy.optimize.milp``, HiGHS, relative gap ``MIP_GAP``): a
binary ``x[g, w]`` per weight group and width, ``y[q, a]`` per activation quantizer and width, one
per group (``sum_w x[g, w] = 1``), minimising ``sum s x + sum s y`` subject to

- FLASH: ``sum_{g,w} F[g, w] x[g, w] <= flash - param bytes``;
- BOPs, EBOPs and cycles, exactly despite the products ``x[g, w] y[q_l, a]`` of a layer's weight
  width and its input width: continuous ``z[g, w, a] >= 0`` with ``sum_a z[g, w, a] = x[g, w]`` and
  ``sum_w z[g, w, a] = y[q_l, a]`` (``z = x y`` at integer points, and each group's LP relaxation
  is the convex hull of its choices, which keeps branch and bound short), then
  ``sum C[g, w, a] z[g, w, a] <= limit``. Above ``HULL_MAX_VARS`` product variables, one continuous
  ``t_l`` per layer with big-M rows ``t_l >= sum_{g,w} C[g, w, a] x[g, w] - M_a (1 - y[q_l, a])``
  stands in. Latency and energy limits become one cycles limit, less the elementwise cycles;
- peak RAM: for every step of the execution order, the aligned sizes of the buffers live at that
  step sum to at most the limit (the planner's arena is at least this bound);
- in+out RAM (the MCU paper's figure, a maximum over layers): for every layer, the sizes of its
  input buffers and its output buffer sum to at most the limit;
- pruning: ``sum_{g in l} x[g, 0] <= G_l - 1``.

Its answer is polished (undo any reduction the limits no longer need) and compared with the greedy
one, which wins only where the solver stopped at its time limit. The greedy selection is also the
fallback (``milp`` unavailable or failing, more than ``MILP_MAX_VARS`` variables): it repeatedly
takes the change with the least sensitivity per unit of normalised violated cost (RAM as the bytes
over the limit summed over the live sets, in+out RAM likewise over the layers, so ties between
sets do not stall it), then polishes.
After setting the bits the cost is re-measured with ``cost_report`` (never assumed): every table
entry is the cost model's own figure, but the arena planner can need more than the live-set bound
(and fixed-point activation grids can move), so while a measured cost still exceeds its limit that
constraint is tightened by the excess and the selection repeated (``max_iterations``; the
narrowest assignment is the last resort). If no assignment meets the budget, ``BudgetError``
names the smallest achievable cost (``check_achievable`` for the target, then the minimum at this
model's granularity), and the model is left as it was.

**Fill** (``fill=True``, with data; ``budget_step.fill``): a method may also leave budget unused.
Then, once the model meets the budget, the same program is solved with only raises allowed, each
priced by the measured loss change of raising it (only a decrease counts), so the room left goes
where the loss falls most per unit of cost; the measured cost is checked as above, and a fill that
cannot be made to fit is undone. It comes before the fine-tune, so raised widths are trained,
and then the room the measured gains leave goes where the quantization noise falls most (the
proxy's ranking): after QAT at a narrow width, a wider grid rarely lowers the loss before the
weights adapt to it (DNAS on ResNet-8 under 32 KiB: measured gains alone filled 292 of the 4,266
bytes left). Under an EBOPs budget the fill comes after the fine-tune instead, on measured gains
only and on the weights the model ships with: the fine-tune moves effective EBOPs (HGQ on the MNIST
MLP: +3% at 530k, +9.5% at 2.1k after a fill to the budget), and cutting that again without a
fine-tune cost up to 0.7 points.

**Ranges**: before the fine-tune, an activation the step changed to 4 bits or fewer observes its range again on
validation batches (``refit_narrow_acts``: the least-squares clip at its width); the range it had
at 8 bits spans the max, which at 2 bits rounds most values to 0 (HGQ on ResNet-8 under a RAM limit
collapsed to chance that way).

**Fine-tune**: an optional callable (the search run passes ``fit`` with the run's data for
``budget_epochs`` epochs, weights and biases only, so the bits stay frozen), after which the cost is
measured again; if training moved a measured cost over its limit (EBOPs count effective bits of the
trained weights), the selection runs once more, without another fine-tune. ``feasible`` is computed
from the final measured cost.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch

from ...cost import Budget, BudgetError, CostReport, Target, check_achievable, feasible, violations
from ...cost.budget import _LABELS, _fmt
from ...cost.keys import BUDGET_KEYS
from ...cost.deployed import cost_report
from ...cost.targets import as_target
from ...quantizers.fixed import refit_narrow_acts
from .bits import (_EPS, _apply, _apply_all, _bits_snapshot, _broadcast_bits, _changes, _padded, _restore, _set_bits,
                   _snap, _snap_model, _supported)
from .fill import fill_budget
from .problem import (_Act, _Layer, _Problem, _apply_choice, _build, _calibrated, _cycles_per_uj, _limits,
                      _tighten, _weight_candidates, _wider_can_be_faster, _with_in_shapes)
from .sensitivity import _TIE, _UP, _LossProbe, _finish_sensitivity, _measure, _proxy
from .solve import (HULL_MAX_VARS, MILP_MAX_VARS, MIP_GAP, _big_m_rows, _greedy_totals, _min_choice, _moves, _over,
                    _polish, _solve, _solve_greedy, _solve_milp, _until_feasible)

# the public names, then the helpers of the former single module, re-exported for the tests and for
# code written against it (a constant is read where it is defined: patch e.g. ``budget_step.solve``)
__all__ = [
    "BudgetStepResult", "budget_step", "needs_step", "COST_KEYS", "MILP_MAX_VARS", "HULL_MAX_VARS", "MIP_GAP",
    "_EPS", "_apply", "_apply_all", "_bits_snapshot", "_broadcast_bits", "_changes", "_padded", "_restore",
    "_set_bits", "_snap", "_snap_model", "_supported", "_Act", "_Layer", "_Problem", "_apply_choice",
    "_build", "_calibrated", "_cycles_per_uj", "_limits", "_tighten",
    "_weight_candidates", "_wider_can_be_faster", "_with_in_shapes", "_TIE", "_UP", "_LossProbe",
    "_finish_sensitivity", "_measure", "_proxy", "_big_m_rows", "_greedy_totals", "_min_choice", "_moves", "_over",
    "_polish", "_solve", "_solve_greedy", "_solve_milp",
]

log = logging.getLogger(__name__)

COST_KEYS = BUDGET_KEYS


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
    fill: str = "none"  # what raised widths into unused budget: milp, greedy, verified (one by one), none

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "report"}
        d["changed"] = self.changed
        return d


def _costs(report: CostReport) -> dict:
    return {k: report.totals[k] for k in COST_KEYS}


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


def needs_step(qm, target: str | Target, budget: Budget) -> bool:
    """Whether the budget step would change ``qm``: a limit is exceeded or a width is not supported."""
    t = as_target(target)
    return not feasible(cost_report(qm, t), budget) or not _supported(qm, t)


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
    report, used, it = _until_feasible(qm, p, t, budget, _limits(p, budget, t), solver, max_iterations, time_limit,
                                       "budget step")
    if report is not None:
        return report, used, it, kind
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
                batch_size: int = 256, max_iterations: int = 8, time_limit: float = 20.0,
                fill: bool = False, fill_samples: int = 2048, fine_tune_always: bool = False) -> BudgetStepResult:
    """Make ``qm`` (quantizers with ``set_bits``; the step works on the CPU and moves the model back
    to its device) meet every limit of ``budget`` on ``target``.

    ``x_val, y_val``: held-out data for measured sensitivities (at most ``max_samples``); without
    them the data-free proxy is used. ``fine_tune(qm)``: called after the selection with the bits
    frozen (it may return a history, kept in the result). ``solver``: ``auto`` (``milp`` up to
    ``MILP_MAX_VARS`` variables), ``milp`` or ``greedy``. A model that already fits with supported
    widths is returned unchanged; raises ``BudgetError`` naming the smallest achievable cost when
    nothing fits. ``fill``: also raise widths into what the budget leaves unused where the loss
    measured on ``x_val, y_val`` (at most ``fill_samples``: a raise gains little, so it is measured
    on more data than a cut) falls (``budget_step.fill``; without data nothing is raised).
    ``fine_tune_always``: fine-tune even when nothing changed (a method whose result needs it).
    See the module docstring for the method.
    """
    param = next(qm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    qm.cpu()
    try:
        return _budget_step(qm, as_target(target), budget, x_val, y_val, fine_tune, solver, max_samples, batch_size,
                            max_iterations, time_limit, fill and x_val is not None, fill_samples, fine_tune_always)
    finally:
        qm.to(device)
        qm.invalidate()


def _fill(qm, t: Target, budget: Budget, x_val, y_val, samples, batch_size, solver, max_iterations, time_limit,
          trained_after: bool):
    probe = _LossProbe(qm, x_val, y_val, samples, batch_size)
    filled, iterations = fill_budget(qm, t, budget, probe, solver, max_iterations, time_limit, trained_after)
    _broadcast_bits(qm)
    return filled, iterations


def _budget_step(qm, t: Target, budget: Budget, x_val, y_val, fine_tune, solver, max_samples, batch_size,
                 max_iterations, time_limit, fills: bool, fill_samples: int, fine_tune_always: bool) -> BudgetStepResult:
    start = time.perf_counter()
    before_report = cost_report(qm, t)
    before = _bits_snapshot(qm)
    if feasible(before_report, budget) and _supported(qm, t) and not fills and not fine_tune_always:
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
    filled = "none"
    # a cost the fine-tune moves (EBOPs count the trained weights' set bits) is filled after it, on
    # the weights the model ships with; one that only the widths set, before it, so raised widths train
    fill_first = fills and budget.ebops is None
    if fill_first:
        filled, more = _fill(qm, t, budget, x_val, y_val, fill_samples, batch_size, solver, max_iterations, time_limit,
                             trained_after=fine_tune is not None)
        iterations, kind = iterations + more, "measured"
    if x_val is not None:  # an activation cut to a few bits takes the range that suits them
        narrowed = {c["name"] for c in _changes(before, qm) if c["kind"] == "activation"}
        refit_narrow_acts(qm, torch.split(x_val[:1024].cpu(), batch_size), narrowed)
    if fine_tune is not None and (fine_tune_always or solver_used != "none" or _changes(before, qm)):
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
    if fills and not fill_first:
        filled, more = _fill(qm, t, budget, x_val, y_val, fill_samples, batch_size, solver, max_iterations, time_limit,
                             trained_after=False)
        iterations, kind = iterations + more, "measured"
    report = cost_report(qm, t)
    ok = feasible(report, budget)
    result = BudgetStepResult(report, ok, solver_used, kind, iterations, _costs(before_report), _costs(report),
                              _changes(before, qm), history if isinstance(history, list) else None,
                              time.perf_counter() - start, fill=filled)
    log.info("budget step (%s, %s sensitivity, fill %s): %s -> %s in %.1f s", solver_used, kind, filled,
             {k: before_report.totals[k] for k in budget.limits()}, {k: report.totals[k] for k in budget.limits()},
             result.seconds)
    return result
