"""One search run, end to end, into a run directory, as stages over a ``Trial``:

``prepare`` (options, model, target, budget against the smallest achievable cost, then the data:
all before the directory is claimed; ``config.yaml``) -> ``float`` (the float model, trained with
per-epoch checkpoints or shared from another run) -> ``method`` -> ``budget`` (the budget step) ->
``front`` (only when the method kept a front: each point a run in ``front/``) -> ``final``
(integer-exact test accuracy, deployed cost, budget checks, reference check -> ``result.json``,
``report.md``, ``checkpoints/quantized.pt``, ``integer_model.npz``).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..convert import quantize
from ..cost import (Budget, BudgetError, Target, as_target, assignment, check, check_achievable, evaluate,
                    violations)
from ..cost.deployed import cost_report
from ..cost.keys import ACT_COSTS, COSTS, WEIGHT_COSTS
from ..cost.targets import activation_width_for, weight_granularity_for
from ..data import Splits, load_dataset
from ..execute import verify_against_reference
from ..graph.convert import trace
from ..lower import TABLE_MAX_BITS, save_integer_model
from ..models import get_model, get_spec
from ..nn.model import QuantModel
from ..train import evaluate_accuracy, fit, resolve_device, save_checkpoint
from ..train.distributed import World, barrier, init_distributed
from ..train.loop import chance_accuracy
from ..user_code import as_user_error, model_files
from . import preflight
from .config import RunConfig
from .context import SearchContext
from .methods import get_method
from .result import (degenerate_reason, fits_device, layer_bits, preprocessing_entry, search_gap, summary_markdown,
                     weight_range_rule)
from .saved import FLOAT_CHECKPOINT, float_source, load_float, quantized_state
from .trial import Trial
from .uniform import largest_uniform_bits

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: What a width the budget does not constrain stays at
UNCONSTRAINED_BITS = 8


def constrained(budget: Budget) -> tuple[bool, bool]:
    """Whether the budget constrains the weights' widths, and the activations'."""
    limits = budget.limits()
    return any(k in WEIGHT_COSTS for k in limits), any(k in ACT_COSTS for k in limits)


def choose_bits(cfg: RunConfig, model, target, input_shape, budget: Budget) -> tuple[int, int]:
    """Weight and activation widths for the uniform start; refuses impossible budgets up front.

    A width the budget does not constrain is not lowered with the other: under a FLASH-only
    budget activations keep at least 8 bits (they cost no FLASH; a keyword-spotting model at 2-bit
    weights and 2-bit activations scored 9.5%), under a RAM-only budget the weights do."""
    weights_matter, acts_matter = constrained(budget)
    if cfg.bits is None and cfg.act_bits is None and acts_matter and not weights_matter:
        wb = _widest_at_most(UNCONSTRAINED_BITS, target.value_weight_bits)
        return wb, largest_uniform_act_bits(model, target, input_shape, budget, wb, cfg.weight_granularity)
    act_bits = cfg.act_bits
    if act_bits is None and weights_matter and not acts_matter:
        act_bits = activation_width_for(max(UNCONSTRAINED_BITS, cfg.bits or 0), target)
    if cfg.bits is None:
        try:
            wb = largest_uniform_bits(model, target, input_shape, budget, act_bits, cfg.weight_granularity)
        except BudgetError:
            if cfg.method == "uniform":
                raise
            # a mixed-precision method needs no uniform model that fits, only a reachable budget
            graph = quantize(model, target, input_shape, bits=target.min_weight_bits,
                             act_bits=act_bits or target.min_act_bits, weight_granularity=cfg.weight_granularity).graph
            check_achievable(graph, target, budget, weight_granularity_for(target, cfg.weight_granularity),
                             allow_pruning=True, removes_channels=get_method(cfg.method).removes_channels)
            wb = target.min_weight_bits
        return wb, act_bits or activation_width_for(wb, target)
    ab = act_bits or activation_width_for(cfg.bits, target)
    qm = quantize(model, target, input_shape, bits=cfg.bits, act_bits=ab, weight_granularity=cfg.weight_granularity)
    report = evaluate(qm.graph, assignment(qm), target)
    detail = violations(report, budget)
    if detail:
        try:
            hint = f" The widest uniform width that fits is {largest_uniform_bits(model, target, input_shape, budget, cfg.act_bits, cfg.weight_granularity)} bits."
        except BudgetError as exc:
            hint = f" {exc}."
        raise BudgetError(f"uniform {cfg.bits}-bit weights / {ab}-bit activations do not meet the budget: {detail}.{hint}")
    return cfg.bits, ab


def _widest_at_most(bits: int, widths) -> int:
    return max((b for b in widths if b <= bits), default=min(widths))


def largest_uniform_act_bits(model, target, input_shape, budget: Budget, weight_bits: int,
                             weight_granularity: str | None) -> int:
    """The widest uniform activation width that meets ``budget`` with ``weight_bits`` weights."""
    tried = []
    for ab in sorted(target.act_bits, reverse=True):
        qm = quantize(model, target, input_shape, bits=weight_bits, act_bits=ab, weight_granularity=weight_granularity)
        detail = violations(evaluate(qm.graph, assignment(qm), target), budget)
        if not detail:
            return ab
        tried.append(f"{ab}-bit: {detail}")
    raise BudgetError(f"no uniform activation width meets the budget with {weight_bits}-bit weights ("
                      + "; ".join(tried) + "); a smaller model or a larger budget does")


def check_options(cfg: RunConfig, target) -> None:
    """Refuse unknown or malformed method options, and options the target cannot take, before any
    training."""
    method = get_method(cfg.method)
    if method.options is None and cfg.options:
        raise ValueError(f"--method {cfg.method} takes no options (got {sorted(cfg.options)})")
    opts = method_options(cfg)
    if method.check is not None:
        method.check(cfg, target, opts)


def method_options(cfg: RunConfig):
    """The method's options dataclass from ``cfg.options`` (None: it takes none)."""
    from .learned import parse_options

    method = get_method(cfg.method)
    return None if method.options is None else parse_options(method.options, cfg.options, cfg.method)


@dataclass
class RunState:
    """What the stages of one run hand on to each other."""

    trial: Trial
    device: torch.device
    world: World
    target: Target
    budget: Budget
    model: nn.Module  # the float model: trained (or loaded) by the float stage
    data: Splits
    weight_bits: int  # the uniform start
    act_bits: int
    progress: Callable | None = None
    epoch_hook: Callable | None = None
    started: float = field(default_factory=time.perf_counter)
    float_history: list = field(default_factory=list)
    context: SearchContext | None = None
    quantized: QuantModel | None = None
    budget_step: dict | None = None
    result: dict | None = None
    front: list | None = None  # the front's runs, when the method kept one (``build_front``)

    @property
    def config(self) -> RunConfig:
        return self.trial.config

    @property
    def out(self) -> Path:
        return self.trial.out

    @property
    def checkpoints(self) -> Path:
        return self.trial.out / "checkpoints"


def check_lookup_tables(cfg: RunConfig, target, graph, act_bits: int) -> None:
    """Activations deployed as lookup tables (sigmoid, tanh, hardswish, ...) take and give codes of at
    most 8 bits; refuse a run that may choose wider ones before it trains."""
    tables = [n for n in graph if n.op == "table"]
    widest = act_bits if cfg.method == "uniform" else max(target.act_bits)
    if tables and widest > TABLE_MAX_BITS:
        n = tables[0]
        how = (f"--act-bits {TABLE_MAX_BITS}" if cfg.method == "uniform" else
               f"a target whose activations are at most {TABLE_MAX_BITS} bits (cortex-m4, cortex-m7, mpic), or "
               f"--method uniform with --act-bits {TABLE_MAX_BITS} or fewer")
        raise ValueError(f"layer {n.name!r} ({n.attrs['function']}) is deployed as a lookup table of "
                         f"{TABLE_MAX_BITS}-bit codes, but the {cfg.method} method on target {target.name} may give "
                         f"activations {widest} bits; use {how}")


def prepare(trial: Trial, progress=None, epoch_hook=None, *, resume: bool = False, device: str = "auto") -> RunState:
    """Check what a user can get wrong, then claim the run directory.

    Bad input (options, model, target, budget, then data) fails here, before the directory claims
    a run, so the corrected command can be rerun into the same ``--out``. What needs no data is
    checked before the data is loaded."""
    cfg, out = trial.config, trial.out
    dev = resolve_device(device)
    w = init_distributed(dev)
    _check_resumable(cfg, out, resume)
    seed_everything(cfg.seed)
    target = as_target(cfg.target)
    budget = Budget.from_strings(**cfg.budget)
    spec = get_spec(cfg.model)
    check_options(cfg, target)
    float_source(cfg)
    model = get_model(cfg.model)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    data = preflight.prepare(data, model, spec.input_shape, cfg.data, cfg.model)
    weight_bits, act_bits = choose_bits(cfg, model, target, data.input_shape, budget)
    check_lookup_tables(cfg, target, trace(model, data.input_shape)[0], act_bits)
    method = get_method(cfg.method)
    if method.check_model is not None:
        method.check_model(cfg, target, method_options(cfg), model, data.input_shape, budget)
    barrier()  # every process has looked before the first one writes
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    log.info("target %s, budget %s, uniform start %d/%d bits, device %s%s", target.name, budget.limits(),
             weight_bits, act_bits, dev, f", {w.size} processes" if w.distributed else "")
    return RunState(trial, dev, w, target, budget, model, data, weight_bits, act_bits, progress, epoch_hook)


def train_float(run: RunState) -> None:
    """The float stage: trained into ``checkpoints/float.pt`` (per-epoch checkpoints: a killed run
    resumes mid-way), or loaded from there or from the run ``float_from`` names."""
    cfg, data = run.config, run.data
    seed_everything(cfg.seed)  # every stage starts from the same RNG state, resumed or not
    done = float_source(cfg) or run.out / FLOAT_CHECKPOINT
    if done.exists():
        run.float_history = load_float(run.model, done, cfg.model)
        log.info("float model from %s", done)
        return
    hook = (lambda e, s: run.epoch_hook("float", e, s)) if run.epoch_hook else None
    net = run.model
    if trace(run.model, data.input_shape)[0].output_transform == "softmax":
        net = LogOf(run.model)  # the loss takes log-probabilities; a model ending in log_softmax gives them
    history = fit(net, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("float"), hook,
                  _phase(run.progress, "float"), checkpoint=run.checkpoints / "float_last.pt", augment=data.augment,
                  device=run.device)
    run.model.cpu()
    if run.world.is_main:
        save_checkpoint(done, {"model": run.model.state_dict(), "history": history})
    run.float_history = history


class LogOf(nn.Module):
    """``log(model(x))``: trains a model that returns probabilities (a softmax at its output) with the
    cross-entropy of its log-probabilities, the loss it was written for."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.model(x).clamp_min(torch.finfo(torch.float32).tiny))


def run_method(run: RunState) -> None:
    """The method stage: the registered method turns the float model into a quantized one."""
    seed_everything(run.config.seed + 1)
    run.context = SearchContext(run.config, run.model, run.data, run.target, run.budget, run.weight_bits,
                                run.act_bits, run.progress, run.epoch_hook, checkpoint_dir=run.checkpoints,
                                device=run.device)
    run.quantized, _ = get_method(run.config.method).run(run.context)
    run.quantized.cpu()


def meet_budget(run: RunState) -> None:
    """The budget stage (every process: its fine-tune is data-parallel too)."""
    run.budget_step = run_budget_step(run.context, run.quantized)


def finish(run: RunState) -> None:
    """The final stage: integer-exact test accuracy, the deployed cost against the budget, the
    reference check, ``integer_model.npz``, ``result.json`` and ``report.md`` (first process only)."""
    if not run.world.is_main:
        return
    cfg, data, qm, target, budget = run.config, run.data, run.quantized, run.target, run.budget
    save_checkpoint(run.checkpoints / "quantized.pt", quantized_state(qm))
    float_acc = evaluate_accuracy(run.model, data.x_test, data.y_test, progress=_phase(run.progress, "test float"))
    quant_acc = evaluate_accuracy(qm, data.x_test, data.y_test, progress=_phase(run.progress, "test integer"))
    report = cost_report(qm, target)
    checks = check(report, budget)
    mismatches = verify_against_reference(qm, data.x_test[:512])
    save_integer_model(qm, run.out / "integer_model.npz")
    chance = chance_accuracy(data.y_test)
    degenerate = degenerate_reason(float_acc, quant_acc, chance)
    if degenerate:
        log.error("%s", degenerate)
    result = {
        "mixprec_version": __version__, "trial": run.trial.id, "model": cfg.model, "data": cfg.data,
        "target": target.name, "method": cfg.method, "seed": cfg.seed, "input_shape": list(data.input_shape),
        "accuracy": {"float": float_acc, "quantized": quant_acc, "chance": chance},
        "degenerate": bool(degenerate), "degenerate_reason": degenerate,
        "search_gap": search_gap(run.budget_step, budget),
        "cost": {c.key: report.totals[c.key] for c in COSTS},
        "cost_detail": dict(report.totals),
        "budget": budget.limits(),
        "budget_checks": {k: {"value": v, "limit": lim, "ok": ok} for k, (v, lim, ok) in checks.items()},
        "feasible": all(ok for _, _, ok in checks.values()) and fits_device(report, target),
        "budget_step": run.budget_step,
        "reference_mismatches": mismatches,
        "weight_range": weight_range_rule(qm),
        "layers": layer_bits(qm, report),
        "preprocessing": preprocessing_entry(data, qm),
        **({"deployed_output": f"integer logits: the model's {qm.graph.output_transform} at the output is left out "
                               f"(monotone, the argmax is unchanged)"} if qm.graph.output_transform else {}),
        "history": {"float": run.float_history, **run.context.history},
        **({"front": run.front} if run.front else {}),
        "device": str(run.device), "processes": run.world.size,
        "wall_seconds": time.perf_counter() - run.started,
    }
    (run.out / "result.json").write_text(json.dumps(result, indent=2))
    (run.out / "report.md").write_text(summary_markdown(result))
    run.result = result


def build_front(run: RunState) -> None:
    """The front stage (``-o schedule=front``): every Pareto point the method kept becomes a run of
    its own in ``RUN/front/NN-epochEEE/``, as the run's own result is made (the budget step and its
    fine-tune, integer-exact test accuracy, the deployed cost, the reference check): each one can
    be reported, exported and verified. ``RUN/front/front.json`` indexes them, and ``mixprec report
    RUN/front`` plots them. A member that finished is read back (a killed run resumes)."""
    members = run.context.front if run.context is not None else []
    if not members:
        return
    folder = run.out / "front"
    rows = []
    for i, member in enumerate(members):
        out = folder / f"{i:02d}-epoch{member.entry['epoch']:03d}"
        done = out / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            ctx = replace(run.context, history={}, front=[], checkpoint_dir=out / "checkpoints")
            qm = member.build()
            step = run_budget_step(ctx, qm)
            if run.world.is_main:
                out.mkdir(parents=True, exist_ok=True)
                run.config.save(out / "config.yaml")
            one = replace(run, trial=Trial(run.config, out), context=ctx, quantized=qm, budget_step=step, result=None,
                          front=None)
            finish(one)
            result = one.result
        if result is not None:
            rows.append({"run": str(out.relative_to(run.out)), "epoch": member.entry["epoch"],
                         "val_accuracy": member.entry["val_accuracy"], "test_accuracy": result["accuracy"]["quantized"],
                         "cost": result["cost"], "feasible": result["feasible"], "degenerate": result["degenerate"]})
    if run.world.is_main:
        (folder / "front.json").write_text(json.dumps({"front": rows}, indent=1))
    run.front = rows
    log.info("front: %d runs in %s", len(rows), folder)


#: A run's stages in order; ``run_search(..., until=NAME)`` stops after one (``float``: a float
#: model other trials can share). The front comes before the final stage, whose ``result.json``
#: marks the run done.
STAGES: dict[str, Callable[[RunState], None]] = {
    "float": train_float, "method": run_method, "budget": meet_budget, "front": build_front, "final": finish}


def run_search(cfg: RunConfig, out_dir: str | Path, progress=None, epoch_hook=None, *,
               resume: bool = False, device: str = "auto", until: str = "final") -> dict | None:
    """Run ``cfg`` into ``out_dir`` and return the result (also written to ``result.json``).

    ``resume`` continues a run that was stopped (killed, even mid-epoch) from its last per-epoch
    checkpoint and ends with the result an uninterrupted run would have given; a run that already
    finished with this configuration returns its stored result at once. ``until`` stops after that
    stage (see ``STAGES``) and returns None. Under ``torchrun`` every process trains and the first
    one writes; the others return None.
    """
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    trial = Trial(cfg, Path(out_dir))
    if resume:
        stored = trial.stored_result()
        if stored is not None:
            log.info("%s already holds this run's result (trial %s)", trial.out, trial.id)
            return stored
    run = None
    try:
        run = prepare(trial, progress, epoch_hook, resume=resume, device=device)
        for name, stage in STAGES.items():
            stage(run)
            if name == until:
                break
    except Exception as exc:  # noqa: BLE001  (re-raised; as the user's own where their model raised it)
        mine = as_user_error(exc, model_files(cfg.model, run.model if run is not None else None))
        if mine is exc:
            raise
        raise mine from exc
    return run.result


def _phase(progress, name: str):
    return None if progress is None else (lambda done, total: progress(name, done, total))


def run_budget_step(ctx: SearchContext, qm) -> dict:
    """The budget step after the method, when its result misses the budget or holds widths the
    target does not run, or when the run fills unused budget (``--fill``, by default where the
    method says so): selection with sensitivities measured on the validation split, then
    ``budget_epochs`` of fine-tuning with the bits frozen (also without a step when the method
    asks for it, ``ctx.fine_tune_after``). Returns what goes into ``result.json``."""
    from .budget_step import budget_step, needs_step

    cfg, data = ctx.config, ctx.data

    def fine_tune(model):
        if cfg.budget_epochs <= 0:
            return None
        params = model.weight_parameters()
        history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("budget"),
                      params=params, **ctx.fit_options("budget"))
        ctx.history["budget"] = history
        return history

    fill = cfg.budget_fill if cfg.budget_fill is not None else get_method(cfg.method).fills_budget
    if not needs_step(qm, ctx.target, ctx.budget) and not (fill and ctx.budget.limits()):
        if ctx.fine_tune_after and fine_tune(qm) is not None:
            qm.cpu()
            return {"applied": False, "fine_tune_epochs": cfg.budget_epochs}
        return {"applied": False}
    # no fine-tune at all without epochs: a fill then raises only what measurably lowers the loss
    result = budget_step(qm, ctx.target, ctx.budget, x_val=data.x_val, y_val=data.y_val,
                         fine_tune=fine_tune if cfg.budget_epochs > 0 else None, fill=fill,
                         fine_tune_always=ctx.fine_tune_after)
    qm.cpu()
    out = result.to_dict()
    out.pop("fine_tune", None)  # in history.budget
    return {"applied": True, **out}


def _check_resumable(cfg: RunConfig, out: Path, resume: bool) -> None:
    existing = out / "config.yaml"
    if not existing.exists():
        if resume and out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--resume: {out} holds no run (no config.yaml) but is not empty; check --out, or "
                             f"drop --resume to start a new run in an empty folder")
        if resume:
            log.info("nothing to resume in %s: starting a new run", out)
        return
    if not resume:
        raise ValueError(f"{out} already holds a run ({existing}); pass --resume to continue it, "
                         f"or choose another --out")
    saved = RunConfig.load(existing)
    if saved != cfg:
        diff = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
                         for k in vars(cfg) if getattr(saved, k) != getattr(cfg, k))
        raise ValueError(f"{out} holds a run with a different configuration ({diff}); "
                         f"resume it with the same options, or choose another --out")
