"""``--method dq``: fully differentiable mixed precision (Schaefer et al., arXiv 2206.07741).

Each weight slice (per output channel by default) and each activation tensor learns a step size
and a range (:mod:`mixprec.quantizers.dq`); the bits are implied and differentiable. The
multi-phase schedule, within the run's QAT epochs:

a. ``weight_epochs`` of weights only, precision frozen;
b. the rest: weights every step, quantizer parameters every ``k`` steps on their own optimiser,
   against the ramped squared hinge ``s(t) * sum_c weight_c * relu(cost_c / target_c - 1)^2`` over
   every budget limit (FLASH and RAM are the paper's weight and activation memories; in+out RAM,
   BOPs, EBOPs, energy and latency work the same way), ``s`` rising from 0.01 to 1 over the first
   half;
c. the most accurate epoch whose measured cost meets the budget is kept (the last when none does);
d. the precision is frozen into fixed bits; the run's final stage (budget step when needed, then
   ``budget_epochs`` of fine-tuning with the bits frozen) finishes it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..convert import activation_clip
from ..quantizers.dq import GRAD_MODS, DQActQuantizer, DQWeightQuantizer
from ..train import Callback, fit
from .context import SearchContext
from .methods import Method
from .learned import (EpochCosts, ParetoFront, check_learned, default_cost, differentiable_costs, every_k, freeze, is_feasible,
                      learned_model, log_ramp, model_quantizers, pareto_folder, parse_options, relaxed)

log = logging.getLogger(__name__)

HINGE_COSTS = ("relaxed", "deployed")


@dataclass
class DQOptions:
    init_bits: int = 8  # starting bits of weights and activations
    weight_epochs: int = 1  # phase a: weights only, precision frozen
    k: int = 5  # phase b: quantizer update every k steps
    quant_lr: float = 0.05  # Adam learning rate of log2(step) and log2(range)
    min_reach: float = 8.0  # at least this many bits of log2(step) movement over phase b (a short phase raises quant_lr)
    weight_grad: str = "ewgs"  # ewgs | atanh | ste: the weights' gradient modification
    act_grad: str = "atanh"  # ewgs | atanh | ste: the activations'
    delta: float = 5e-3  # strength of the gradient modification
    penalty: float = 20.0  # weight of each constraint's squared hinge (it vanishes near the limit: make it steep)
    target_ratio: float = 0.95  # aim at this fraction of each budget limit
    ramp_start: float = 0.01  # s(t) rises from this to 1 over the first half of phase b
    act_granularity: str = "per-tensor"  # of the activations' step and range (finer on fixed-point targets)
    learn_input: bool = False  # learn the input's precision too (its gradient needs the first layer's input gradient, a large share of a small model's step; data usually comes at a fixed width)
    hinge_cost: str = "relaxed"  # relaxed | deployed: the hinge's value from the relaxed cost, or from the target's real containers (gradient from the relaxed cost either way)

    def __post_init__(self):
        if self.hinge_cost not in HINGE_COSTS:
            raise ValueError(f"unknown hinge_cost {self.hinge_cost!r}; choose one of {', '.join(HINGE_COSTS)}")
        for name in ("weight_grad", "act_grad"):
            if getattr(self, name) not in GRAD_MODS:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(GRAD_MODS)}")
        if self.k < 1 or self.weight_epochs < 0:
            raise ValueError("k must be at least 1 and weight_epochs at least 0")


def quantizer_lr(opts: DQOptions, total_steps: int) -> float:
    """The quantizer optimiser's learning rate for a phase b of ``total_steps``: ``opts.quant_lr``,
    raised so that its updates (one per ``k`` steps, each moving log2(step) by about the learning
    rate) can move a step size by ``min_reach`` bits. It scales with the run's length in steps:
    23 steps an epoch for 9 epochs are 41 updates, 2 bits at 0.05, short of an 8-bit start's way to
    a budget. Phases of 160 updates or more (every benchmark row) keep ``opts.quant_lr``."""
    updates = max(1, total_steps // opts.k)
    return max(opts.quant_lr, opts.min_reach / updates)


class HingePenalty(Callback):
    """The ramped squared-hinge memory (and other budget) penalty, and the quantizer optimiser
    that steps every ``k`` training steps on the gradients accumulated since its last step.

    ``cost_target`` gives the cost's gradient (relaxed containers: every bit counts). With
    ``hinge_cost="deployed"`` the hinge's value is the cost in ``deployed_target``'s real containers
    (2/4/8 on an MCU): a relaxed 2.1-bit channel is stored in 4 bits, so the relaxed cost can sit at
    the target while the deployed one is far above it and the hinge has gone quiet."""

    def __init__(self, opts: DQOptions, quantizers: list, targets: dict[str, float], total_steps: int, cost_target,
                 deployed_target=None):
        self.opts, self.quantizers, self.targets = opts, quantizers, targets
        self.total_steps, self.cost_target = max(total_steps, 1), cost_target
        self.deployed_target = deployed_target or cost_target
        params = [p for q in quantizers for p in (q.log2_d, q.log2_xmax)]
        self.lr = quantizer_lr(opts, self.total_steps)
        self.optimizer = torch.optim.Adam(params, lr=self.lr)
        self.calls = 0

    def ramp(self) -> float:
        return log_ramp(self.opts.ramp_start, 1.0, 2.0 * self.calls / self.total_steps)

    def extra_loss(self, model) -> torch.Tensor | None:
        if not self.targets or not every_k(self.calls + 1, self.opts.k):
            return None
        costs = self.costs(model)
        hinge = sum(torch.relu(costs[key] / target - 1.0) ** 2 for key, target in self.targets.items())
        return self.opts.k * self.ramp() * self.opts.penalty * hinge

    def costs(self, model) -> dict[str, torch.Tensor]:
        costs = differentiable_costs(model, self.cost_target)
        if self.opts.hinge_cost == "relaxed" or self.deployed_target is self.cost_target:
            return costs
        with torch.no_grad():
            deployed = differentiable_costs(model, self.deployed_target)
        # the deployed value, the relaxed gradient
        return {k: costs[k] + (deployed[k] - costs[k]).detach() for k in self.targets}

    def after_step(self, step: int) -> None:
        self.calls += 1
        if every_k(self.calls, self.opts.k):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for q in self.quantizers:
                q.project()

    def after_epoch(self, epoch: int, stats: dict) -> None:
        stats["penalty_scale"] = self.ramp()

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        # gradients accumulated since the last quantizer step belong to the state: an epoch need not
        # end on a multiple of k
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
        return {"calls": self.calls, "optimizer": self.optimizer.state_dict(), "grads": grads}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        self.optimizer.load_state_dict(state["optimizer"])
        for p, g in zip(self._params(), state.get("grads", [])):
            p.grad = None if g is None else g.to(p.device).clone()


def dq_model(ctx: SearchContext, opts: DQOptions):
    """The float model with DQ quantizers: weights at the run's granularity (per channel by
    default), activations at the options' (per tensor by default)."""
    t = ctx.target
    return learned_model(
        ctx, opts.act_granularity,
        lambda node, w, gran: DQWeightQuantizer(node.weight_shape, gran, init_bits=opts.init_bits, weight=w,
                                                numerics=t.numerics, grad_mod=opts.weight_grad, delta=opts.delta),
        lambda node, gran: DQActQuantizer(node.out_shape, gran, init_bits=opts.init_bits, numerics=t.numerics,
                                          grad_mod=opts.act_grad, delta=opts.delta, clip=activation_clip(node)))


def _precision_trainable(qm, on: bool, learn_input: bool) -> None:
    for q in model_quantizers(qm):
        on_here = on and (learn_input or q is not qm.act_quantizers["input"])
        q.log2_d.requires_grad_(on_here)
        q.log2_xmax.requires_grad_(on_here)


def search_dq(ctx: SearchContext):
    cfg, data, t = ctx.config, ctx.data, ctx.target
    opts = parse_options(DQOptions, cfg.options, "dq")
    qm = dq_model(ctx, opts)
    ctx.calibrate(qm)  # activation step and range from the first batch's 99.9th percentile
    weights = qm.weight_parameters()
    base = cfg.train_config("qat")
    phase_a = min(opts.weight_epochs, base.epochs)
    key = default_cost(ctx.budget)
    history = []
    if phase_a:
        _precision_trainable(qm, False, opts.learn_input)
        ctx.history["dq-weights"] = fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, _epochs(base, phase_a),
                                        params=weights, **ctx.fit_options("dq-weights"))
    phase_b = base.epochs - phase_a
    if phase_b:
        _precision_trainable(qm, True, opts.learn_input)
        steer = relaxed(t)
        targets = {k: opts.target_ratio * v for k, v in ctx.budget.limits().items()}
        steps = phase_b * math.ceil(len(data.x_train) / base.batch_size)
        penalty = HingePenalty(opts, model_quantizers(qm, opts.learn_input), targets, steps, steer, t)
        measure = EpochCosts(t, ctx.budget, ParetoFront(pareto_folder(ctx.checkpoint_dir), key)).bind(qm)
        log.info("DQ phase b on %s: %d epochs, quantizers every %d steps at lr %.3g, targets %s", t.name, phase_b,
                 opts.k, penalty.lr, targets)
        history = fit(qm, data.x_train, data.y_train, data.x_val, data.y_val,
                      _epochs(base, phase_b, seed_offset=1), params=weights, callbacks=[penalty, measure],
                      best_if=is_feasible, **ctx.fit_options("dq"))
        ctx.history["dq"] = history
    ctx.fine_tune_after = True  # phase d: the run fine-tunes with the precision frozen
    qm.cpu()
    return freeze(qm), history


def _epochs(cfg, epochs: int, seed_offset: int = 0):
    from dataclasses import replace

    return replace(cfg, epochs=epochs, seed=cfg.seed + seed_offset)


METHOD = Method("dq", search_dq, DQOptions,
                "learned step size and range per tensor slice (DQ: implied bits, squared-hinge budget penalty)",
                check=check_learned, fills_budget=True)
