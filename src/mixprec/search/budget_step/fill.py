"""The fill of the budget step: where a method leaves part of a budget unused, raise the widths
whose measured loss decrease per unit of cost is largest until the budget is used.

A gradient method steers its cost towards a target with a penalty that always pushes widths down
(DNAS on ResNet-8 under 32 KiB ended at 28.5 KB, 87% of it), and a user who asks for a budget
expects a model near it. The fill is the reduction's mirror image: the same groups, costs, limits
and integer program, with only the current width or a wider one allowed per group (the pruned
stay pruned: their channels may be gone) and, as sensitivity, the measured change of the task
loss when a layer's groups are raised to a width (every group below it, shared among them by the
decrease of their squared weight quantization error) or an activation quantizer is. Only a
decrease counts. After QAT the latent weights of a narrow layer need not be better at a wider
grid, which is why the gain is measured, not assumed; where a fine-tune follows (the weights then
adapt to the wider grids), the room the measured gains leave goes where the quantization noise
falls most, else a raise the loss does not reward costs a negligible amount per bit, so nothing
moves for nothing. Narrower activation widths are offered at a price above every gain, so the
solver never trades one down to pay for a raise. Without a fine-tune after it, a fill whose raises
together do not lower the measured loss falls back to raises verified one at a time.
"""
from __future__ import annotations

import logging

import numpy as np

from ...cost import Budget, Target, feasible
from ...cost.deployed import cost_report
from .bits import _EPS, _apply, _bits_snapshot, _changes, _restore
from .problem import _apply_choice, _build, _limits, _Problem
from .sensitivity import _TIE, _UP, _LossProbe, act_loss_changes
from .solve import _over, _until_feasible

log = logging.getLogger(__name__)


def _raise_weights(p: _Problem, qm, probe: _LossProbe, base_loss: float, trained_after: bool, moves: list) -> None:
    """Per layer: allow only raises, and price each by its measured loss change (negative: a gain),
    then (``trained_after``) by the quantization noise it removes, else a negligible cost per bit.
    Each measured raise that lowered the loss goes into ``moves`` as (change, layer, width index)."""
    for layer in p.layers:
        quant = qm.layers[layer.name].quantizer
        top = layer.bits.reshape(layer.groups, -1).amax(1).numpy()
        up = layer.allowed & (layer.widths[None, :] > top[:, None] + _EPS)
        layer.allowed = up | (np.arange(len(layer.widths))[None, :] == layer.cur[:, None])
        less_error = np.maximum(layer.err[np.arange(layer.groups), layer.cur][:, None] - layer.err, 0.0)
        sens = np.zeros_like(layer.err)
        try:
            for k, w in enumerate(layer.widths):
                raised = up[:, k]
                if not raised.any():
                    continue
                quant.set_bits(_apply(layer.bits, np.where(raised, w, top)).reshape(layer.shape))
                change = min(probe() - base_loss, 0.0)
                if change < 0:
                    moves.append((change, layer.name, k))
                share = np.where(raised, less_error[:, k], 0.0)
                sens[:, k] = change * share / max(float(share.sum()), 1e-300)
        finally:
            quant.set_bits(layer.bits.reshape(layer.shape))
        if trained_after:  # once the weights adapt, a wider grid does at least as well as a narrower one
            sens = np.minimum.accumulate(np.where(up | ~layer.allowed, sens, 0.0), axis=1)
            power = float((qm.layers[layer.name].weight.detach().double() ** 2).sum()) or 1.0
            layer.sens = np.where(up, sens, 0.0) - _TIE * np.where(up, less_error, 0.0) / power
        else:
            layer.sens = sens + _UP * np.where(up, layer.widths[None, :] - top[:, None], 0.0)


def _raise_acts(p: _Problem, qm, probe: _LossProbe, base_loss: float, trained_after: bool, moves: list) -> None:
    for a in p.acts.values():
        top = float(a.bits.max())
        up = a.widths > top + _EPS
        changes = np.minimum(act_loss_changes(qm, a, probe, base_loss, lambda w: w > top + _EPS), 0.0)
        moves += [(float(changes[i]), a.name, i) for i in np.flatnonzero(changes < 0)]
        less_noise = 4.0 ** -top - 4.0 ** -a.widths  # uniform noise of step range / 2^bits, as the proxy
        sens = changes + np.where(up, -_TIE * less_noise if trained_after else _UP * (a.widths - top), 0.0)
        if trained_after:
            sens[a.cur:] = np.minimum.accumulate(sens[a.cur:])
        a.sens = sens


def _scale_and_lock(p: _Problem) -> float:
    """Gains scaled to at most 1; a narrower activation width priced above all gains together.
    Returns the total gain on offer."""
    gains = [layer.sens[layer.allowed] for layer in p.layers] + [a.sens for a in p.acts.values()]
    scale = max([float(np.abs(g).max()) for g in gains if g.size] + [0.0])
    if scale <= 0:
        return 0.0
    total = 0.0
    for layer in p.layers:
        layer.sens = layer.sens / scale
        total += float(-np.minimum(layer.sens, 0.0).min(1, initial=0.0).sum())
    for a in p.acts.values():
        a.sens = a.sens / scale
        total += float(-min(a.sens.min(), 0.0))
    for a in p.acts.values():
        a.sens[: a.cur] = 1.0 + 2.0 * total
    return total


def fill_budget(qm, t: Target, budget: Budget, probe: _LossProbe, solver: str, max_iterations: int,
                time_limit: float, trained_after: bool = False) -> tuple[str, int]:
    """Raise widths into the room ``budget`` leaves ``qm`` (which meets it), where the measured loss
    falls, and (``trained_after``: a fine-tune follows) then where the quantization noise falls.
    Returns (solver used or ``"none"``, selections measured); ``qm`` keeps meeting the budget."""
    if not budget.limits():
        return "none", 0
    before = _bits_snapshot(qm)
    p = _build(qm, t, upward=True)
    base_loss, moves = probe(), []
    _raise_weights(p, qm, probe, base_loss, trained_after, moves)
    _raise_acts(p, qm, probe, base_loss, trained_after, moves)
    if _scale_and_lock(p) <= 0:
        log.info("budget fill: no wider width lowers the loss")
        return "none", 0
    report, used, it = _until_feasible(qm, p, t, budget, _limits(p, budget, t), solver, max_iterations, time_limit,
                                       "budget fill")
    if report is None or not _changes(before, qm):
        _restore(qm, before)  # the model as it was met the budget
        return "none", it
    if not trained_after and probe() >= base_loss:
        # gains measured a layer at a time, shared among its groups by the error each removes, need
        # not add up (HGQ on the MNIST MLP under 4.7k EBOPs: two output channels raised from 2 to 6
        # bits, their layer's share of a gain, raised the loss 6%)
        log.info("budget fill: the raises together do not lower the loss; raising whole tensors, "
                 "each kept only where the loss falls")
        _restore(qm, before)
        return _verified_raises(qm, p, t, budget, probe, base_loss, moves, before), it
    return used, it


def _verified_raises(qm, p: _Problem, t: Target, budget: Budget, probe: _LossProbe, base_loss: float, moves: list,
                     before: dict) -> str:
    """The measured raises themselves (a layer's every group below a width raised to it, an activation
    raised), largest gain per unit of cost first, each kept only where it fits and the loss, measured
    again with those kept before it, falls. ``"verified"``, or ``"none"`` with ``qm`` as it was."""
    lim = _limits(p, budget, t)
    kw, ka = p.start()
    layers = {layer.name: layer for layer in p.layers}

    def applied(name: str, k: int):
        if name in layers:
            layer = layers[name]
            raise_ = layer.allowed[:, k] & (layer.widths[k] > layer.widths[kw[name]])
            return {**kw, name: np.where(raise_, k, kw[name])}, ka
        return kw, {**ka, name: max(k, ka[name])}

    def load(choice) -> float:
        tot = p.totals(*choice)
        return sum((tot[key] - start[key]) / max(abs(v), 1e-12) for key, v in lim.items())
    start = p.totals(kw, ka)
    order = sorted(moves, key=lambda m: m[0] / max(load(applied(m[1], m[2])), 1e-12))
    loss, kept = base_loss, 0
    for _, name, k in order:
        choice = applied(name, k)
        if _over(p.totals(*choice), lim):
            continue
        _apply_choice(qm, p, *choice)
        new = probe()
        if new < loss:
            (kw, ka), loss, kept = choice, new, kept + 1
        else:
            _apply_choice(qm, p, kw, ka)
    if kept and feasible(cost_report(qm, t), budget):
        return "verified"
    _restore(qm, before)
    return "none"
