"""``--method dnas``: channel-wise mixed-precision search with pruning (Risso et al., IGSC 2022).

Every weighted layer becomes a supernet layer (:mod:`mixprec.quantizers.dnas`): one distribution
over the target's weight widths per output channel (``--granularity per-channel``) or per layer
(``--granularity per-tensor``), plus 0 bits (the channel removed) where a layer may lose channels:
per channel only, never the network's output layer, never a grouped (depthwise) conv, whose
channels follow its input's. Activations (``-o acts``) stay at the run's width (``fixed``) or take
a width per tensor from the target's activation widths (``search``: a mixture of PACT quantizers
with learned clips, :class:`~mixprec.quantizers.dnas.DNASActQuantizer`; the input and the
network's output stay fixed); ``auto`` searches them where the budget depends on them (RAM,
BOPs, EBOPs, latency, energy) and ``--act-bits`` does not fix them.

The loss adds, per cost, ``lam * E[cost] / reference`` with the exact expectation of the cost
tables (``CostTables.expected``: what a pruned channel frees downstream included); a cost with a
budget gets HGQ's controller on ``lam`` towards ``target_ratio`` of the budget, measured on the
argmax model. Each epoch: the logits on a held-out ``search_split`` of the training split with
the weights frozen, then the weights on the rest with the logits frozen, at a temperature that
falls from ``t_start`` by ``exp(-t_decay)`` per epoch of a ``t_epochs``-epoch search (scaled to the
run's). The weights pass trains the argmax model (``weights_on=argmax``, the default: the weights
of the model the search returns are trained as that model) or the softmax mixture, as the paper
does (``weights_on=mixture``: on LeNet-5 under a 2 KiB budget the argmax model then scored 43% on
validation at the end of the search, against 95% when trained as itself). The logits pass trains
on the softmax mixture, as the paper does, or (``logits_on=argmax``) on the argmax model with the
softmax's gradient (straight-through). Then the argmax model is frozen, its pruned channels are
removed (``mixprec.prune``), and the run fine-tunes it with the bits frozen after the budget step.

With every logit equal at the start, as the paper has them, Adam's first steps move each logit by
the same amount whatever its gradient's size, so a channel whose narrowest width costs more than
the expectation (a small layer's, its bias counted) is pruned by the very first step, before the
loss can answer. ``prune_prior`` starts the 0-bit logit that far below the others: pruning then
comes only once the cost keeps pushing (ResNet-8 / CIFAR-10 under 40 KiB: 19% of the channels
pruned and 76.4% with 0, 10% and 78.9% with 2; under 24 KiB, where the budget itself forces the
cuts, no gain; docs/benchmarks.md).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from ..convert import activation_clip, convert_with
from ..cost import assignment
from ..cost.bits import BitAssignment
from ..cost.keys import ACT_COSTS
from ..cost.tables import build_tables
from ..cost.targets import activation_width_for, weight_granularity_for
from ..graph.channels import channel_map
from ..nn.model import QuantModel
from ..prune import prune_channels
from ..quantizers.dnas import GRANULARITIES, DNASActQuantizer, DNASWeightQuantizer
from ..quantizers.fixed import RANGE_RULES, ActQuantizer
from ..train import Callback, TrainConfig, fit
from ..train.loop import SCHEDULES
from .context import SearchContext
from .hgq import BetaPenalty, CostPenalties, HGQOptions
from .learned import cost_key, freeze, parse_options
from .methods import Method
from .uniform import uniform_act_bits

log = logging.getLogger(__name__)

#: The costs ``CostTables.expected`` gives (the in+out RAM figure is a max over layers: no expectation)
EXPECTED_COSTS = ("flash_bytes", "ram_bytes", "bops", "ebops", "latency_cycles", "energy_uj")
ACT_MODES = ("auto", "fixed", "search")


@dataclass
class DnasOptions:
    cost: str = ""  # costs to steer by, comma-separated (flash, ram, bops, ebops, latency, energy); "" = the budget's, else flash
    lam: str = "0.1"  # weight of each cost / reference: one for all or one per cost; a cost with a budget starts its controller here
    target_ratio: float = 0.95  # controller: aim at this fraction of each budget limit
    t_start: float = 5.0  # softmax temperature at the first epoch
    t_decay: float = 0.045  # ln of the temperature's fall per epoch of a t_epochs-epoch search
    t_epochs: int = 50  # the search length t_decay is quoted for (a shorter run decays faster); 0: per epoch as given
    gumbel: bool = False  # hard Gumbel-softmax samples in training instead of the softmax mixture
    search_split: float = 0.2  # share of the training split the logits train on (the weights take the rest)
    logits_lr: float = 0.05  # Adam learning rate of the logits
    logits_reach: float = 4.0  # the logits can move at least this much over the search (a short one raises logits_lr)
    prune: bool = True  # offer 0 bits (the channel removed) where a layer may lose channels
    prune_prior: float = 0.0  # the 0-bit logit starts this far below the others (0: all equal, as the paper)
    range_rule: str = "mse"  # each candidate's grid from the weights: mse (least squares at 3 bits or fewer) or max
    acts: str = "auto"  # activation widths: fixed (the run's), search (PACT mixture per tensor), auto (search where the budget depends on them)
    logits_on: str = "mixture"  # what the logits pass trains on: mixture (the softmax supernet, as the paper) or argmax (its one-hot forward, straight-through)
    weights_on: str = "argmax"  # what the weights pass trains: argmax (the model the search returns) or mixture (the softmax supernet, as the paper)

    def __post_init__(self):
        for name in self.cost_names():
            if cost_key(name) not in EXPECTED_COSTS:
                raise ValueError(f"dnas steers by an expected cost; {name!r} has none (choose among flash, ram, bops, "
                                 f"ebops, latency, energy)")
        if any(v <= 0 for v in self.lams()) or len(self.lams()) not in (1, max(len(self.cost_names()), 1)):
            raise ValueError(f"lam={self.lam!r}: one positive weight, or one per cost")
        if not 0.0 < self.search_split < 1.0:
            raise ValueError(f"search_split is a share of the training split, between 0 and 1 (got {self.search_split})")
        if self.prune_prior < 0:
            raise ValueError(f"prune_prior is how far the 0-bit logit starts below the others: 0 or more "
                             f"(got {self.prune_prior})")
        if self.t_start <= 0 or self.t_decay < 0 or self.t_epochs < 0:
            raise ValueError("t_start must be positive, t_decay and t_epochs at least 0")
        if self.range_rule not in RANGE_RULES:
            raise ValueError(f"range_rule {self.range_rule!r}: choose one of {', '.join(RANGE_RULES)}")
        if self.acts not in ACT_MODES:
            raise ValueError(f"acts={self.acts!r}: choose one of {', '.join(ACT_MODES)}")
        for name in ("logits_on", "weights_on"):
            if getattr(self, name) not in ("mixture", "argmax"):
                raise ValueError(f"{name}={getattr(self, name)!r}: mixture or argmax")

    def cost_names(self) -> list[str]:
        return [c.strip() for c in self.cost.split(",") if c.strip()]

    def lams(self) -> list[float]:
        return [float(v) for v in str(self.lam).split(",") if v.strip()]


def temperature(opts: DnasOptions, epoch: int, epochs: int) -> float:
    per_epoch = opts.t_decay * (opts.t_epochs / max(epochs, 1) if opts.t_epochs else 1.0)
    return opts.t_start * math.exp(-per_epoch * epoch)


# ----------------------------------------------------------------------------- the supernet


def candidate_widths(ctx: SearchContext, opts: DnasOptions, prunable: bool) -> list[int]:
    """The target's widths that hold values, plus 0 where the layer may lose channels: on every
    target, since a pruned channel is removed from the exported layer, not stored at 0 bits."""
    zero = prunable and opts.prune
    return ([0] if zero else []) + sorted(ctx.target.value_weight_bits)


def may_prune(node, granularity: str) -> bool:
    """Whether a layer may lose output channels by itself: per-channel bits, and not a grouped conv
    (its channels follow its input's). The network's output layer never does (``supernet``)."""
    return granularity == "per-channel" and node.attrs.get("groups", 1) == 1


def searches_acts(ctx: SearchContext, opts: DnasOptions) -> bool:
    """Whether the activation widths are searched (``acts``; ``auto``: where the budget depends on
    them and neither ``--act-bits`` nor a single-width target fixes them)."""
    if opts.acts != "auto":
        return opts.acts == "search"
    free = ctx.config.act_bits is None and len(ctx.target.act_bits) > 1
    return free and any(k in ACT_COSTS for k in ctx.budget.limits())


def supernet(ctx: SearchContext, opts: DnasOptions, granularity: str) -> QuantModel:
    """The float model with DNAS weight quantizers, and activations at the run's width or (``acts``)
    DNAS activation quantizers over the target's widths; the input stays at the run's width (at
    least 8 bits when searched) and the network's output at 8 bits or more, as the uniform method
    keeps it."""
    t = ctx.target
    searched = searches_acts(ctx, opts)
    input_bits = max(ctx.act_bits, activation_width_for(8, t)) if searched else ctx.act_bits

    def weights(node, w, prunable: bool = True):
        widths = candidate_widths(ctx, opts, prunable and may_prune(node, granularity))
        q = DNASWeightQuantizer(node.weight_shape, widths, granularity, t.numerics, opts.range_rule, opts.t_start,
                                opts.gumbel)
        if q.prunes:
            with torch.no_grad():
                q.alpha[:, 0] = -opts.prune_prior
        return q

    def acts(node):
        if searched and node.op != "input":
            return DNASActQuantizer(node.out_shape, t.act_bits, t.numerics, activation_clip(node), opts.t_start,
                                    opts.gumbel)
        return ActQuantizer(node.out_shape, input_bits if node.op == "input" else ctx.act_bits, t.numerics,
                            clip=activation_clip(node))

    qm = convert_with(ctx.float_model, ctx.data.input_shape, t.numerics, weights, acts, t)
    for name in channel_map(qm.graph).producers(qm.graph.output):  # the network's output keeps its channels
        if name in qm.layers:
            qm.layers[name].quantizer = weights(qm.graph[name], None, prunable=False)
    head = qm.graph.grid_source(qm.graph.output)
    head_bits = uniform_act_bits(qm.graph, ctx.act_bits, t)
    head_bits = head_bits[head] if isinstance(head_bits, dict) else head_bits
    if searched or head_bits != ctx.act_bits:
        qm.act_quantizers[head] = ActQuantizer(qm.graph[head].out_shape, head_bits, t.numerics,
                                               clip=activation_clip(qm.graph[head]))
    if searched:
        log.info("DNAS activation widths searched over %s bits (input %d, output %d bits fixed)",
                 "/".join(map(str, t.act_bits)), input_bits, head_bits)
    return qm


def supernet_quantizers(qm: QuantModel) -> dict[str, DNASWeightQuantizer]:
    return {name: layer.quantizer for name, layer in qm.layers.items()}


def act_choices(qm: QuantModel) -> dict[str, DNASActQuantizer]:
    """The activation quantizers whose width is searched."""
    return {name: q for name, q in qm.act_quantizers.items() if isinstance(q, DNASActQuantizer)}


def choices(qm: QuantModel) -> list:
    """Every distribution the search trains: the weights' and the searched activations'."""
    return [*supernet_quantizers(qm).values(), *act_choices(qm).values()]


def set_temperature(qm: QuantModel, t: float) -> None:
    for q in choices(qm):
        q.set_temperature(t)


def pruned_share(qm: QuantModel) -> float:
    """The share of all weighted layers' output channels the argmax prunes."""
    qs = supernet_quantizers(qm).values()
    return sum(int(q.pruned().sum()) for q in qs if q.prunes) / max(sum(q.weight_shape[0] for q in qs), 1)


# ----------------------------------------------------------------------------- cost


class SupernetCost:
    """The supernet's costs from the cost tables (built once, around the widest widths): expected
    under the logits' probabilities (differentiable) and exact for the argmax choice, each computed
    once between :meth:`clear` calls (several cost terms share a step's)."""

    def __init__(self, qm: QuantModel, target):
        self.qm = qm
        # the model's structure stays through the search: its choices are looked up once
        self.weights, self.acts = quantizers, choices = supernet_quantizers(qm), act_choices(qm)
        base = assignment(qm)
        widest = {n: torch.full(q.param_shape, float(max(q.widths))) for n, q in quantizers.items()}
        acts = {n: torch.full_like(b, float(max(choices[n].widths))) if n in choices else b for n, b in base.act.items()}
        base = BitAssignment(widest, acts, base.act_shift)
        self.tables = build_tables(qm.graph, target, base, weight_widths=lambda name, top: quantizers[name].widths,
                                   act_widths=lambda name, top: choices[name].widths if name in choices else [float(top)])
        self.clear()

    def clear(self) -> None:
        self._expected: dict | None = None
        self._argmax: dict | None = None

    def expected(self) -> dict[str, torch.Tensor]:
        if self._expected is None:
            p_weights = {n: q.probabilities().cpu() for n, q in self.weights.items()}
            p_acts = {a: self.acts[a].probabilities()[0].cpu() if a in self.acts else torch.ones(1, dtype=torch.float64)
                      for a in self.tables.acts}
            self._expected = self.tables.expected(p_weights, p_acts)
        return self._expected

    def argmax(self) -> dict[str, float]:
        if self._argmax is None:
            choice = {n: q.choice().cpu().numpy() for n, q in self.weights.items()}
            acts = {a: int(self.acts[a].choice()[0]) if a in self.acts else 0 for a in self.tables.acts}
            self._argmax = self.tables.totals(choice, acts)
        return self._argmax


class ExpectedCostPenalty(BetaPenalty):
    """HGQ's penalty and controller on one expected cost; the controller reads the argmax model's."""

    def __init__(self, costs: SupernetCost, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.costs = costs

    def cost(self, model) -> torch.Tensor:
        return self.costs.expected()[self.key]

    def measured(self, model, cost: torch.Tensor) -> float:
        return float(self.costs.argmax()[self.key])


class CostTerms(CostPenalties):
    """The sum of every cost's penalty, the costs computed once per step."""

    def __init__(self, costs: SupernetCost, penalties: list[ExpectedCostPenalty]):
        super().__init__(penalties)
        self.costs = costs

    def extra_loss(self, model) -> torch.Tensor | None:
        self.costs.clear()
        return super().extra_loss(model)

    def after_epoch(self, epoch: int, stats: dict) -> None:
        stats["lam"] = {p.key: p.current_beta() for p in self.penalties}


def cost_terms(ctx: SearchContext, opts: DnasOptions, costs: SupernetCost, total_steps: int) -> CostTerms:
    """One penalty per cost: a controller where the budget limits the cost, else a constant ``lam``;
    each relative to the budget, or to the widest model's cost."""
    limits = ctx.budget.limits()
    keys = [cost_key(c) for c in opts.cost_names()] or [k for k in limits if k in EXPECTED_COSTS] or ["flash_bytes"]
    lams = opts.lams() * (len(keys) if len(opts.lams()) == 1 else 1)
    start = costs.argmax()
    penalties = []
    for key, lam in zip(keys, lams):
        limit = limits.get(key)
        pace = HGQOptions(beta=lam, target_ratio=opts.target_ratio, penalty_every=1, band=0.0)
        reference = limit if limit is not None else max(float(start[key]), 1e-12)
        target = None if limit is None else opts.target_ratio * limit
        penalties.append(ExpectedCostPenalty(costs, pace, key, "constant" if limit is None else "controller",
                                             reference, target, total_steps, ctx.target))
        log.info("DNAS cost %s: %s from lam %g (reference %.6g, widest %.6g)", key,
                 "constant" if limit is None else f"controller towards {target:.6g}", lam, reference, start[key])
    return CostTerms(costs, penalties)


class SearchStats(Callback):
    """Adds the epoch's temperature, expected costs, the argmax model's (``cost``) and the share
    of channels it prunes to the stats."""

    def __init__(self, qm: QuantModel, costs: SupernetCost):
        self.qm, self.costs = qm, costs

    def after_epoch(self, epoch: int, stats: dict) -> None:
        self.costs.clear()
        with torch.no_grad():
            expected = self.costs.expected()
        argmax = self.costs.argmax()
        stats["temperature"] = float(next(iter(supernet_quantizers(self.qm).values())).temperature)
        # the tables count weights at their widths: EBOPs here are nominal (the weights' own come at the end)
        named = lambda k: "ebops_nominal" if k == "ebops" else k  # noqa: E731
        stats["expected_cost"] = {named(k): float(expected[k]) for k in EXPECTED_COSTS}
        stats["cost"] = {named(k): float(argmax[k]) for k in EXPECTED_COSTS}  # the argmax model's, exact
        stats["pruned_share"] = pruned_share(self.qm)
        stats["act_bits"] = {n: int(q.bits().reshape(-1)[0]) for n, q in act_choices(self.qm).items()}
        self.costs.clear()


# ----------------------------------------------------------------------------- the search


def split_for_search(ctx: SearchContext, share: float):
    """(x, y) of the logits' held-out share of the training split and of the weights' rest."""
    x, y = ctx.data.x_train, ctx.data.y_train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.config.seed))
    k = min(max(1, round(share * len(x))), len(x) - 1)
    return (x[order[:k]], y[order[:k]]), (x[order[k:]], y[order[k:]])


def trainable(qm: QuantModel, logits: bool, opts: DnasOptions) -> None:
    """Train the logits (weights frozen) or the weights, biases and activation clips (logits frozen),
    each on the mixture or on the argmax model (``logits_on``, ``weights_on``; the logits through
    the argmax straight-through)."""
    on = opts.logits_on if logits else opts.weights_on
    mode = "mixture" if on == "mixture" else "straight-through" if logits else "argmax"
    for q in choices(qm):
        q.set_forward(mode)
        q.alpha.requires_grad_(logits)
    for layer in qm.layers.values():
        layer.weight.requires_grad_(not logits)
        layer.bias.requires_grad_(not logits)
    for q in act_choices(qm).values():
        q.clip_value.requires_grad_(not logits)


def logits_and_weights(qm: QuantModel) -> tuple[list, list]:
    """What each pass trains: the logits of every choice; the weights and biases (as the model
    groups them) and the activation clips."""
    clips = [q.clip_value for q in act_choices(qm).values()]
    return [q.alpha for q in choices(qm)], qm.weight_parameters() + ([{"params": clips}] if clips else [])


def run_pass(ctx: SearchContext, qm: QuantModel, phase: str, epoch: int, data, cfg: TrainConfig, params,
             callbacks) -> dict:
    """One pass of one epoch with ``mixprec.train.fit`` (its own checkpoint: a finished pass replays
    from it, a killed one restarts from the pass before)."""
    hook = ctx.on_epoch(phase)
    history = fit(qm, *data, ctx.data.x_val, ctx.data.y_val, cfg, on_epoch=lambda _, stats: hook(epoch, stats),
                  progress=ctx.progress_for(phase), checkpoint=ctx.checkpoint(f"{phase}-{epoch:03d}"),
                  augment=ctx.data.augment, device=ctx.device, params=params, callbacks=callbacks)
    return history[-1]


def pass_configs(ctx: SearchContext, opts: DnasOptions, epoch: int, epochs: int, logit_steps: int):
    """The logits pass (Adam, constant rate, no collapse rollback: the weights pass answers a change
    of widths) and the weights pass (the run's QAT settings, its rate on a cosine over the search)."""
    base = ctx.config.train_config("qat")
    lr = max(opts.logits_lr, opts.logits_reach / max(logit_steps, 1))
    logits = TrainConfig(1, lr, 0.0, base.batch_size, base.seed + 2 * epoch, "adam",
                         schedule="constant", collapse_drop=0.0)
    weights = replace(base, epochs=1, lr=base.lr * SCHEDULES["cosine"](epoch / epochs), schedule="constant",
                      seed=base.seed + 2 * epoch + 1)
    return logits, weights


def freeze_argmax(qm: QuantModel) -> QuantModel:
    """The argmax model with fixed quantizers (0 bits where pruned) and each pruned channel's bias 0."""
    out = freeze(qm)
    with torch.no_grad():
        for name, layer in qm.layers.items():
            out.layers[name].bias.copy_(layer.gated_bias(hard=True).detach().cpu())
    return out


def remove_pruned(qm: QuantModel) -> QuantModel:
    """``qm`` with its 0-bit channels removed (``mixprec.prune``; the narrower model records which
    it kept), or as it is where none is pruned."""
    if not any(bool((layer.quantizer.bits() == 0).any()) for layer in qm.layers.values()):
        return qm
    return prune_channels(qm).model


def search_granularity(cfg, target) -> str:
    """The run's weight granularity (``--granularity``): per-channel, or per-tensor = per layer."""
    granularity = weight_granularity_for(target, cfg.weight_granularity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"dnas searches per-channel or per-layer (per-tensor) weights, not {granularity}: "
                         f"--granularity per-channel or per-tensor")
    return granularity


def check(cfg, target, opts: DnasOptions) -> None:
    """``Method.check``: the granularity, before any training."""
    search_granularity(cfg, target)


def search(ctx: SearchContext, qm: QuantModel, opts: DnasOptions) -> list[dict]:
    """The alternating passes, one record per epoch (the weights pass's stats, the logits pass's
    under ``logits``)."""
    cfg, costs = ctx.config, SupernetCost(qm, ctx.target)
    search_data, weight_data = split_for_search(ctx, opts.search_split)
    epochs = cfg.qat_epochs
    logit_steps = epochs * math.ceil(len(search_data[0]) / cfg.batch_size)
    terms, stats = cost_terms(ctx, opts, costs, logit_steps), SearchStats(qm, costs)
    alphas, weights = logits_and_weights(qm)
    log.info("DNAS on %s: %d epochs, logits on %d samples, weights on %d", ctx.target.name, epochs,
             len(search_data[0]), len(weight_data[0]))
    history = []
    for epoch in range(epochs):
        set_temperature(qm, temperature(opts, epoch, epochs))
        logits_cfg, weights_cfg = pass_configs(ctx, opts, epoch, epochs, logit_steps)
        trainable(qm, logits=True, opts=opts)
        searched = run_pass(ctx, qm, "dnas-logits", epoch, search_data, logits_cfg, alphas, [terms])
        trainable(qm, logits=False, opts=opts)
        trained = run_pass(ctx, qm, "dnas", epoch, weight_data, weights_cfg, weights, [stats])
        history.append({**trained, "epoch": epoch, "logits": searched})
    return history


def search_dnas(ctx: SearchContext):
    opts = parse_options(DnasOptions, ctx.config.options, "dnas")
    qm = supernet(ctx, opts, search_granularity(ctx.config, ctx.target))
    ctx.calibrate(qm)
    history = search(ctx, qm, opts)
    ctx.history["dnas"] = history
    qm.cpu()
    log.info("DNAS argmax: %.1f%% of the channels pruned", 100 * pruned_share(qm))
    ctx.fine_tune_after = True  # the argmax model's weights trained inside a mixture: let them adapt
    return remove_pruned(freeze_argmax(qm)), history


METHOD = Method("dnas", search_dnas, DnasOptions,
                "channel-wise precision and pruning by differentiable search (DNAS: softmax over {0, target widths} "
                "per channel, exact expected cost)", removes_channels=True, check=check,
                fills_budget=True)
