"""``--method hgq``: High Granularity Quantization (Sun et al., arXiv 2405.00645).

Every weight group (element, channel, slice or tensor: the target decides what is allowed) and
every activation tensor learns its fractional bits ``f`` by the surrogate gradient of
:mod:`mixprec.quantizers.hgq`, against a cost penalty ``beta * cost / reference``. The cost is any
total of the cost model (EBOPs, BOPs, FLASH, peak RAM, in+out RAM, energy, latency), or several,
each with its own penalty (:class:`CostPenalties`). ``beta``
follows a schedule (constant, linear or log ramp) or a controller that tracks a target cost (by
default the band of 97-100% of the budget on that cost, raising bits when the cost falls under it).
Every epoch is measured exactly; epochs on the (validation
accuracy, cost) Pareto front are kept in ``RUN/pareto/``; the result is the most accurate epoch
that meets the budget (with the controller: among those at 90-100% of it first; the last epoch when
none meets it), recalibrated and frozen into fixed bits for the budget step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..cost.deployed import effective_ebops
from ..granularity import reduce_to
from ..nn.model import QuantModel
from ..quantizers.hgq import HGQActQuantizer, HGQWeightQuantizer
from ..train import Callback, fit
from ..train.checkpoint import load_checkpoint
from .context import FrontMember, SearchContext
from .methods import Method
from .learned import (EpochCosts, ParetoFront, check_act_granularity, check_learned, cost_key, default_cost,
                      differentiable_costs, every_k, freeze, is_feasible, landing, learned_model, log_ramp, model_quantizers,
                      pareto_folder, parse_options, relaxed)

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "linear", "log", "controller", "front")


#: ``anneal=auto``: a target this many times below the starting cost is approached over AUTO_ANNEAL of
#: the phase (an MNIST MLP steered from 2.9M to 2.1k EBOPs at once collapsed to chance; annealed
#: over half the phase it kept 89%)
ANNEAL_RATIO = 1000.0
AUTO_ANNEAL = 0.5


def _fraction(text) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"anneal is a fraction of the phase, 0..1, or auto (got {text!r})") from None


@dataclass
class HGQOptions:
    cost: str = ""  # the costs to steer by, comma-separated (flash, ram, ram_in_out, bops, ebops, energy, latency), each with its own controller; "" = the first budget limit, else ebops
    schedule: str = ""  # constant | linear | log | controller | front; "" = controller when the cost has a budget, else log; front = the log ramp, and every (val accuracy, cost) Pareto epoch becomes its own run in RUN/front/
    beta: float = 1e-2  # penalty weight of cost / reference (the budget, else the starting cost)
    beta_end: float = 1.0  # end of the linear / log ramp
    target_ratio: float = 1.0  # controller: aim at this fraction of the budget (the cost it reads is the real containers'; with the band it settles in [(1 - band) x, 1 x] this)
    gain: float = 0.05  # controller: change of ln(beta) per penalty step per unit of relative error
    min_reach: float = 16.0  # controller: at least this change of ln(beta) over the phase at full error (a short phase raises its gain)
    max_error: float = 1.0  # controller: the relative error is clipped to +-this (bounds each step)
    band: float = 0.03  # controller: below (1 - band) x its target the penalty turns into a pull that raises bits, so a budget is landed near, not undershot (0 = never)
    anneal: str = "auto"  # controller: its target falls from the starting cost to the final one over this fraction of the phase (geometrically); 0 = the final target from the first step; auto = 0.5 where the target is more than ANNEAL_RATIO x below the starting cost (a penalty that many times the loss at once collapses the model), else 0
    init_bits: float = 8.0  # starting weight storage bits (sign included)
    act_init_bits: float = 8.0  # starting activation bits
    act_granularity: str = "per-tensor"  # of the activations' bits (per-channel/per-element on fixed-point targets)
    bits_lr: float = 3e-2  # learning rate of f (its own parameter group, no weight decay)
    bits_reach: float = 8.0  # f can move at least this many bits over the phase (a short phase raises bits_lr)
    gamma: float = 0.0  # + gamma * sum(f): HGQ's small pull towards fewer bits
    penalty_every: int = 8  # compute the cost term every k steps, weighted by k
    learn_input: str = "auto"  # learn the input's bits too: true | false | auto (= on fixed-point targets, the FPGA, where every input feature costs its own bits; elsewhere data comes at one width and the gradient would cost a share of a small model's step)
    input_granularity: str = ""  # of the learned input bits; "" = per-element where the target allows it (HGQ2's per-feature inputs: constant or useless features go to 0 bits), else per-tensor

    def __post_init__(self):
        if self.schedule and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in self.cost_names():
            cost_key(name)
        if self.penalty_every < 1:
            raise ValueError("penalty_every must be at least 1")
        if not 0.0 <= self.band < 1.0:
            raise ValueError(f"band is a fraction of the controller's target, 0 <= band < 1 (got {self.band})")
        if self.anneal != "auto" and not 0.0 <= _fraction(self.anneal) <= 1.0:
            raise ValueError(f"anneal is a fraction of the phase, 0..1, or auto (got {self.anneal})")
        if self.learn_input not in ("auto", "true", "false"):
            raise ValueError(f"learn_input is true, false or auto (got {self.learn_input!r})")

    def cost_names(self) -> list[str]:
        return [c.strip() for c in self.cost.split(",") if c.strip()]

    def input_setup(self, target) -> tuple[bool, str]:
        """Whether the input's bits are learned on ``target``, and at which granularity."""
        learn = self.learn_input == "true" or (self.learn_input == "auto" and target.numerics == "fixed")
        if not learn:
            return False, "per-tensor"
        finest = "per-element" if "per-element" in target.act_granularities and target.numerics == "fixed" else "per-tensor"
        return True, self.input_granularity or finest


class BetaPenalty(Callback):
    """``beta * cost / reference`` (+ ``gamma * sum f``) every ``every`` steps, times ``every``;
    ``beta`` follows the schedule, or the controller's multiplicative update towards ``target``
    (annealed from the first measured cost when ``opts.anneal``: compressing a deep network to the
    budget in the first epoch costs accuracy that a short phase does not win back). The gradient
    comes from the relaxed cost (every bit counts); the controller compares the cost with the real
    storage containers, what the budget is judged on."""

    def __init__(self, opts: HGQOptions, key: str, schedule: str, reference: float, target: float | None,
                 total_steps: int, target_model, measure_model=None):
        self.opts, self.key, self.schedule = opts, key, schedule
        self.reference, self.target, self.total_steps = reference, target, max(total_steps, 1)
        self.cost_model = target_model  # the gradient's cost model (relaxed containers)
        self.act_quantizers: list = []  # kept at 1 to max_act_bits bits (see keep_activations_alive)
        self.input_quantizers: list = []  # a learned input: 0 bits prune a feature, so only the top is kept
        self.weight_quantizers: list = []  # each keeps one group alive (see keep_layers_alive)
        self.measure_model = measure_model or target_model  # the controller's: the real containers
        self.max_act_bits = max(self.measure_model.act_containers)
        self.beta, self.calls, self.last_cost = opts.beta, 0, float("nan")  # last_cost: what the controller saw
        self.pull = 0.0  # the controller's upward pull (see control_beta)
        self.pace = phase_pace(opts, self.total_steps)
        self.start_cost: float | None = None  # the first measured cost: where an annealed target starts

    def current_beta(self) -> float:
        t = self.calls / self.total_steps
        o = self.opts
        if self.schedule == "linear":
            return o.beta + (o.beta_end - o.beta) * min(t, 1.0)
        if self.schedule in ("log", "front"):
            return log_ramp(o.beta, o.beta_end, t)
        return -self.pull if self.pull else self.beta

    def anneal(self) -> float:
        """The fraction of the phase over which the target falls (``HGQOptions.anneal``)."""
        if self.opts.anneal != "auto":
            return _fraction(self.opts.anneal)
        far = self.start_cost is not None and self.start_cost > ANNEAL_RATIO * self.target
        return AUTO_ANNEAL if far else 0.0

    def current_target(self) -> float:
        anneal = self.anneal()
        if not anneal or self.start_cost is None:
            return self.target
        t = self.calls / (anneal * self.total_steps)
        return log_ramp(max(self.start_cost, self.target), self.target, t)

    def extra_loss(self, model) -> torch.Tensor | None:
        step, self.calls = self.calls, self.calls + 1
        if not every_k(step, self.pace.every):
            return None
        cost = self.cost(model)
        if self.schedule == "controller":
            self.last_cost = self.measured(model, cost)
            if self.start_cost is None:
                self.start_cost = self.last_cost
            self.beta, self.pull = control_beta(self.beta, self.pull, self.last_cost, self.current_target(), self.opts,
                                                self.pace.gain)
        term = self.current_beta() * cost / self.reference
        if self.opts.gamma:
            term = term + self.opts.gamma * sum(q.f.sum() for q in model_quantizers(model))
        return self.pace.every * term

    def cost(self, model) -> torch.Tensor:
        """The differentiable cost the term weighs (a method with its own cost model overrides it)."""
        return differentiable_costs(model, self.cost_model)[self.key]

    def measured(self, model, cost: torch.Tensor) -> float:
        """The cost as the budget judges it: real containers, and EBOPs from the integer weights
        (nominal bits count trailing zeros and the sign bit, so they would overstate it)."""
        if self.key == "ebops":
            return effective_ebops(model)
        if self.measure_model is self.cost_model:
            return float(cost.detach())
        with torch.no_grad():
            return float(differentiable_costs(model, self.measure_model)[self.key])

    def after_step(self, step: int) -> None:
        if every_k(step, self.pace.every):
            keep_activations_alive(self.act_quantizers, self.max_act_bits)
            keep_activations_alive(self.input_quantizers, self.max_act_bits, min_bits=None)
            keep_layers_alive(self.weight_quantizers)

    def after_epoch(self, epoch: int, stats: dict) -> None:
        stats["beta"] = self.current_beta()
        if self.target is not None and self.opts.anneal:
            stats["target_cost"] = self.current_target()

    def state_dict(self) -> dict:
        return {"beta": self.beta, "pull": self.pull, "calls": self.calls, "start_cost": self.start_cost}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.calls = state["beta"], state["calls"]
        self.pull = state.get("pull", 0.0)
        self.start_cost = state.get("start_cost")


class CostPenalties(Callback):
    """Several cost penalties as one callback (a FLASH and a RAM limit each with its controller):
    their terms summed; the stats keep the first cost's ``beta`` and, with more than one, every
    cost's under ``beta_by_cost``."""

    def __init__(self, penalties: list[BetaPenalty]):
        self.penalties = penalties

    def extra_loss(self, model) -> torch.Tensor | None:
        terms = [t for t in (p.extra_loss(model) for p in self.penalties) if t is not None]
        return sum(terms) if terms else None

    def after_step(self, step: int) -> None:
        for p in self.penalties:
            p.after_step(step)

    def after_epoch(self, epoch: int, stats: dict) -> None:
        for p in reversed(self.penalties):  # the first cost's figures are written last: they stand
            p.after_epoch(epoch, stats)
        if len(self.penalties) > 1:
            stats["beta_by_cost"] = {p.key: p.current_beta() for p in self.penalties}

    def state_dict(self) -> dict:
        return {"penalties": [p.state_dict() for p in self.penalties]}

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self.penalties, state.get("penalties", [state])):  # [state]: one penalty's, as saved before
            p.load_state_dict(s)


#: The controller's upward pull starts at this fraction of the options' starting beta
PULL_START = 1e-2


def control_beta(beta: float, pull: float, cost: float, target: float, opts: HGQOptions,
                 gain: float) -> tuple[float, float]:
    """One controller update from the measured ``cost``: ``(beta, pull)``; the penalty weighs the
    cost by ``beta`` while ``pull`` is 0, else by ``-pull`` (the bits climb). Multiplicative, the
    relative error clipped to ``opts.max_error`` (a start far over budget, 13x on an FPGA run,
    otherwise let beta leap ~e^0.6 per step and prune whole layers before the cost could answer).

    Over the target beta grows and any pull stops. Under the target beta shrinks; with
    ``opts.band``, under ``(1 - band) x target`` the pull starts small and grows while the cost
    stays there, and in the band both hold. A positive beta, however small, still pushes every bit
    the loss does not defend downwards (Adam's steps follow the gradient's sign): a run that overshot
    stayed at 65% of a 26k-EBOPs budget to its end. Beta keeps what it had learnt under the pull, so
    the cost, once back over the target, meets the push it needs (restarting it small let the cost
    settle 15% over the budget), and at least the pull's strength when a climb overshoots (a climb
    from 1e5 to a 2e5 budget otherwise stayed over it, its feasible epochs the early ones at 88%)."""
    error = min(max(cost / target - 1.0, -opts.max_error), opts.max_error)
    low = (1.0 - opts.band) * target
    if opts.band and low <= cost <= target:
        return beta, pull
    if cost > target:  # a climb that overshot is met by a push as strong as the pull that made it
        beta = max(beta, pull)
    beta = min(max(beta * math.exp(gain * error), 1e-8), 1e4)
    if cost > target or not opts.band:
        return beta, 0.0
    return beta, min(max(pull, PULL_START * opts.beta) * math.exp(gain * min(1.0 - cost / low, opts.max_error)), 1e4)


@dataclass(frozen=True)
class Pace:
    """How often the cost term is computed, the controller's gain and f's learning rate for a phase."""

    every: int
    gain: float
    bits_lr: float


#: A phase of at least this many steps keeps the options' pace (every benchmark row's does)
FULL_PACE_STEPS = 2560


def phase_pace(opts: HGQOptions, total_steps: int) -> Pace:
    """The options' pace, scaled to a short phase's length in steps (not epochs): the cost term
    comes every step rather than every ``penalty_every`` (Adam damps a gradient that comes one step
    in eight, so f moved ~1.6 bits in 126 steps while beta sat at its cap), the controller's updates
    can move ln(beta) by ``min_reach`` at full error, and Adam's f steps (about ``bits_lr`` each) can
    move ``bits_reach`` bits. 23 steps an epoch for 10 epochs at the options' pace: 29 controller
    updates, beta 0.012 -> 0.043 while FLASH stayed at twice its budget. Phases of
    ``FULL_PACE_STEPS`` or more keep the options as given."""
    every = opts.penalty_every if total_steps >= FULL_PACE_STEPS else 1
    updates = max(1, math.ceil(total_steps / every))
    gain = opts.gain * every / opts.penalty_every  # the options' change of ln(beta) per step, at least
    return Pace(every, max(gain, opts.min_reach / updates), max(opts.bits_lr, opts.bits_reach / max(total_steps, 1)))


@torch.no_grad()
def keep_activations_alive(quantizers, max_bits: int = 16, min_bits: int | None = 1) -> None:
    """Keep every activation group between 1 and ``max_bits`` bits: a 0-bit activation passes no
    gradient, so a beta overshoot (cost far above its target at the start) could prune the network
    dead for good (weights may still prune), and a group whose range is tiny must not get a grid so
    fine that ``x / step`` overflows. A group that has only seen zeros (a dead channel) has no range:
    its ``f`` is capped as if its integer bits were 0, so a first small value cannot overflow either.
    ``min_bits=None``: no floor (the network input, whose features may be pruned)."""
    for q in quantizers:
        i, seen = q.range_int_bits()
        floor = -math.inf if min_bits is None else float(min_bits)
        lo = torch.where(seen, floor - i, torch.full_like(i, -math.inf))
        hi = torch.where(seen, max_bits - i, torch.full_like(i, float(max_bits)))
        q.f.copy_(torch.minimum(torch.maximum(q.f, lo), hi))


@torch.no_grad()
def keep_layers_alive(quantizers) -> None:
    """Where every group of a layer's weights is pruned, give the group with the largest weight one
    magnitude bit again: a layer of zeros cuts the network, as the budget step never allows either."""
    for q in quantizers:
        w = q.last_weight()
        if w is None or bool((q.magnitude_bits(w) > 0).any()):
            continue
        peak = reduce_to(w.abs().float(), q.param_shape)
        g = int(torch.argmax(peak))
        # f = -floor(log2 m): m * 2^f lies in [1, 2), so the group's largest weight keeps code 1 or 2
        f = -torch.floor(torch.log2(peak.view(-1)[g].clamp_min(2.0 ** -126)))
        q.f.view(-1)[g] = torch.maximum(q.f.view(-1)[g], f)


def hgq_model(ctx: SearchContext, opts: HGQOptions):
    """The float model with HGQ quantizers at the run's weight granularity and the options' activation
    granularity."""
    return learned_model(
        ctx, opts.act_granularity,
        lambda node, w, gran: HGQWeightQuantizer(node.weight_shape, gran, init_bits=opts.init_bits - 1, weight=w),
        lambda node, gran: HGQActQuantizer(node.out_shape, gran, init_bits=opts.act_init_bits),
        input_granularity=opts.input_setup(ctx.target)[1])


def _calibrate_acts(ctx: SearchContext, qm, act_bits: float | None = None) -> None:
    """Observe activation ranges afresh (extremes over the calibration set), optionally set each
    activation's ``f`` so it starts at ``act_bits``, and stop observing (the ranges stay)."""
    for q in qm.act_quantizers.values():
        q.set_observing(True)
        q.reset_range()
    ctx.calibrate(qm)
    for q in qm.act_quantizers.values():
        if act_bits is not None:  # I of the range itself; 0 for a group that saw only zeros
            i, seen = q.range_int_bits()
            q.set_f(act_bits - torch.where(seen, i, torch.zeros_like(i)))
        q.set_observing(False)


def steered_costs(opts: HGQOptions, budget) -> list[str]:
    """The costs the penalty steers by: the options' (``-o cost=flash,ram``: a controller on each),
    else the first budget limit, else EBOPs."""
    names = opts.cost_names()
    return [cost_key(n) for n in names] if names else [default_cost(budget)]


def cost_penalties(ctx: SearchContext, opts: HGQOptions, qm, steer, total_steps: int) -> CostPenalties:
    """One penalty per steered cost: the controller towards ``target_ratio`` of its limit, or the
    options' schedule (a cost without a limit: relative to its starting value)."""
    limits, penalties = ctx.budget.limits(), []
    start = {k: float(v.detach()) for k, v in differentiable_costs(qm, steer).items()}
    for key in steered_costs(opts, ctx.budget):
        limit = limits.get(key)
        schedule = opts.schedule or ("controller" if limit is not None else "log")
        if schedule == "controller" and limit is None:
            raise ValueError(f"the beta controller tracks a budget on {key}; give one (e.g. --flash) or choose "
                             f"--option schedule=constant|linear|log|front")
        reference = limit if limit is not None else max(start[key], 1.0)
        penalties.append(BetaPenalty(opts, key, schedule, reference,
                                     None if limit is None else opts.target_ratio * limit, total_steps, steer,
                                     ctx.target))
        log.info("HGQ cost %s: %s (start %.6g, reference %.6g)", key, schedule, start[key], reference)
    return CostPenalties(penalties)


def search_hgq(ctx: SearchContext):
    cfg, data, t = ctx.config, ctx.data, ctx.target
    opts = parse_options(HGQOptions, cfg.options, "hgq")
    qm = hgq_model(ctx, opts)
    _calibrate_acts(ctx, qm, opts.act_init_bits)
    for q in qm.act_quantizers.values():
        q.set_observing(True)  # ranges keep growing with what training sees (HGQ)
    steer = relaxed(t)
    train_cfg = cfg.train_config("qat")
    total = train_cfg.epochs * math.ceil(len(data.x_train) / train_cfg.batch_size)
    penalties = cost_penalties(ctx, opts, qm, steer, total)
    first = penalties.penalties[0]  # keeps the quantizers alive, once per step
    learn_input, input_granularity = opts.input_setup(t)
    inp = qm.act_quantizers["input"]
    inp.f.requires_grad_(learn_input)
    if learn_input:
        log.info("HGQ learns the input's bits %s (constant or useless features may go to 0 bits)", input_granularity)
        first.input_quantizers = [inp]
    first.act_quantizers = [q for q in qm.act_quantizers.values() if q.f.requires_grad and q is not inp]
    first.weight_quantizers = [layer.quantizer for layer in qm.layers.values()]
    measure = EpochCosts(t, ctx.budget, ParetoFront(pareto_folder(ctx.checkpoint_dir), first.key)).bind(qm)
    f_params = [q.f for q in model_quantizers(qm) if q.f.requires_grad]
    weights = qm.weight_parameters()
    pace = first.pace
    groups = weights + [{"params": f_params, "lr": pace.bits_lr, "weight_decay": 0.0}]
    log.info("HGQ on %s: beta from %g, %d epochs", t.name, opts.beta, train_cfg.epochs)
    if pace != Pace(opts.penalty_every, opts.gain, opts.bits_lr):
        log.info("a short phase (%d steps): cost term every %d steps, controller gain %.3g, bits_lr %.3g (options: "
                 "%d, %g, %g), so that the bits can reach the budget", total, pace.every, pace.gain, pace.bits_lr,
                 opts.penalty_every, opts.gain, opts.bits_lr)
    limits = ctx.budget.limits()
    steered = {p.key: limits[p.key] for p in penalties.penalties if p.schedule == "controller"}
    history = fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, train_cfg, params=groups,
                  callbacks=[penalties, measure], best_if=landing(steered) if steered else is_feasible,
                  **ctx.fit_options("hgq"))
    ctx.history["hgq"] = history
    if first.schedule == "front":  # every Pareto epoch becomes a run of its own (search.front)
        folder = pareto_folder(ctx.checkpoint_dir)
        ctx.front = [FrontMember(entry, partial(_pareto_member, ctx, opts, folder / entry["checkpoint"]))
                     for entry in measure.front.entries if folder is not None and "checkpoint" in entry]
    qm.cpu()
    _calibrate_acts(ctx, qm)  # integer bits from the calibration set before export (HGQ)
    ctx.fine_tune_after = True  # freezing re-derives the grids from the weights: let the weights adapt
    return freeze(qm), history


def _pareto_member(ctx: SearchContext, opts: HGQOptions, checkpoint: Path) -> QuantModel:
    """The frozen model of one Pareto checkpoint, prepared as the search's own result is: integer
    bits recalibrated, then frozen."""
    qm = hgq_model(ctx, opts)
    qm.load_state_dict(load_checkpoint(checkpoint)["model"])
    qm.cpu()
    _calibrate_acts(ctx, qm)
    return freeze(qm)


def check_hgq(cfg, target, opts: HGQOptions) -> None:
    """``Method.check``: the activation and input granularities the target allows."""
    check_learned(cfg, target, opts)
    check_act_granularity(target, opts.input_setup(target)[1])


METHOD = Method("hgq", search_hgq, HGQOptions,
                "per-weight/channel bit-widths learned by gradient (HGQ: surrogate gradient, cost penalty with a controller)",
                check=check_hgq, fills_budget=True)
