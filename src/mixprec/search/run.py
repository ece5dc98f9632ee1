"""One search run, end to end, into a run directory:

``config.yaml`` -> budget checked against the smallest achievable cost (before any training) ->
float warm-up (checkpointed; a rerun resumes from it) -> the method -> integer-exact test
accuracy, deployed cost, budget checks, reference check -> ``result.json``, ``report.md``,
``checkpoints/``, ``integer_model.npz``.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..convert import quantize
from ..cost import (Budget, BudgetError, as_target, assignment, check, check_achievable, evaluate, format_size,
                    violations)
from ..cost.deployed import cost_report
from ..cost.targets import activation_width_for, weight_granularity_for
from ..data import load_dataset
from ..data.base import preprocessing_record
from ..execute import verify_against_reference
from ..lower import save_integer_model
from ..models import get_model, get_spec
from ..nn.model import LayerNamesError
from ..train.loop import chance_accuracy
from . import preflight
from ..train import CheckpointError, evaluate_accuracy, fit, load_checkpoint, resolve_device, save_checkpoint, world
from ..train.distributed import barrier, init_distributed
from .config import RunConfig
from .context import SearchContext
from .methods import get_method
from .uniform import largest_uniform_bits

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Budget keys by the widths they depend on: FLASH only on the weights, peak RAM only on the
#: activations, compute and energy on both
WEIGHT_COSTS = ("flash_bytes", "ebops", "bops", "energy_uj", "latency_cycles")
ACT_COSTS = ("ram_bytes", "ebops", "bops", "energy_uj", "latency_cycles")
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
                             allow_pruning=True)
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


def _float_warmup(cfg: RunConfig, model, data, ckpt_dir: Path, device, progress, epoch_hook) -> list[dict]:
    done = _float_source(cfg) or ckpt_dir / "float.pt"
    if done.exists():
        state = load_checkpoint(done)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"{done} does not hold a float {cfg.model} model: {exc}") from exc
        log.info("float model from %s", done)
        return state.get("history", [])
    hook = (lambda e, s: epoch_hook("float", e, s)) if epoch_hook else None
    prog = (lambda d, t: progress("float", d, t)) if progress else None
    history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("float"), hook, prog,
                  checkpoint=ckpt_dir / "float_last.pt", augment=data.augment, device=device)
    model.cpu()
    if world().is_main:
        save_checkpoint(done, {"model": model.state_dict(), "history": history})
    return history


def check_options(cfg: RunConfig, target) -> None:
    """Refuse unknown or malformed method options, and options the target cannot take, before any
    training."""
    from .learned import check_act_granularity, parse_options

    method = get_method(cfg.method)
    if method.options is not None:
        opts = parse_options(method.options, cfg.options, cfg.method)
        if hasattr(opts, "act_granularity"):
            check_act_granularity(target, opts.act_granularity)
    elif cfg.options:
        raise ValueError(f"--method {cfg.method} takes no options (got {sorted(cfg.options)})")


def _float_source(cfg: RunConfig) -> Path | None:
    """The float checkpoint ``float_from`` names (a run directory or a ``float.pt``), checked to exist."""
    if not cfg.float_from:
        return None
    path = Path(cfg.float_from)
    if path.is_dir():
        path = path / "checkpoints" / "float.pt"
    if not path.exists():
        raise FileNotFoundError(f"--float-from {cfg.float_from}: no float model at {path} (a run directory that "
                                f"finished its float phase, or its checkpoints/float.pt)")
    return path


def run_search(cfg: RunConfig, out_dir: str | Path, progress=None, epoch_hook=None, *,
               resume: bool = False, device: str = "auto") -> dict | None:
    """Run ``cfg`` into ``out_dir`` and return the result (also written to ``result.json``).

    ``resume`` continues a run that was stopped (killed, even mid-epoch) from its last per-epoch
    checkpoint and ends with the result an uninterrupted run would have given. Under ``torchrun``
    every process trains and the first one writes; the others return None.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    dev = resolve_device(device)
    w = init_distributed(dev)
    _check_resumable(cfg, out, resume)
    seed_everything(cfg.seed)

    # Bad input (options, model, target, budget, then data) fails here, before the run directory
    # claims a run, so the corrected command can be rerun into the same --out. What needs no data
    # is checked before the data is loaded.
    target = as_target(cfg.target)
    budget = Budget.from_strings(**cfg.budget)
    spec = get_spec(cfg.model)
    check_options(cfg, target)
    _float_source(cfg)
    model = get_model(cfg.model)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    data = preflight.prepare(data, model, spec.input_shape, cfg.data, cfg.model)
    weight_bits, act_bits = choose_bits(cfg, model, target, data.input_shape, budget)
    barrier()  # every process has looked before the first one writes
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    log.info("target %s, budget %s, uniform start %d/%d bits, device %s%s", target.name, budget.limits(),
             weight_bits, act_bits, dev, f", {w.size} processes" if w.distributed else "")

    ckpt_dir = out / "checkpoints"
    seed_everything(cfg.seed)  # every phase starts from the same RNG state, resumed or not
    float_history = _float_warmup(cfg, model, data, ckpt_dir, dev, progress, epoch_hook)
    seed_everything(cfg.seed + 1)
    ctx = SearchContext(cfg, model, data, target, budget, weight_bits, act_bits, progress, epoch_hook,
                        checkpoint_dir=ckpt_dir, device=dev)
    qm, _ = get_method(cfg.method).run(ctx)
    qm.cpu()
    step = run_budget_step(ctx, qm)  # every process: its fine-tune is data-parallel too
    if not w.is_main:
        return None
    save_checkpoint(ckpt_dir / "quantized.pt", quantized_state(qm))

    float_acc = evaluate_accuracy(model, data.x_test, data.y_test, progress=_phase(progress, "test float"))
    quant_acc = evaluate_accuracy(qm, data.x_test, data.y_test, progress=_phase(progress, "test integer"))
    report = cost_report(qm, target)
    checks = check(report, budget)
    mismatches = verify_against_reference(qm, data.x_test[:512])
    save_integer_model(qm, out / "integer_model.npz")
    chance = chance_accuracy(data.y_test)
    degenerate = degenerate_reason(float_acc, quant_acc, chance)
    if degenerate:
        log.error("%s", degenerate)
    gap = search_gap(step, budget)
    result = {
        "mixprec_version": __version__, "model": cfg.model, "data": cfg.data, "target": target.name,
        "method": cfg.method, "seed": cfg.seed, "input_shape": list(data.input_shape),
        "accuracy": {"float": float_acc, "quantized": quant_acc, "chance": chance},
        "degenerate": bool(degenerate), "degenerate_reason": degenerate,
        "search_gap": gap,
        "cost": {k: report.totals[k] for k in ("flash_bytes", "ram_bytes", "macs", "bops", "ebops",
                                                "latency_cycles", "energy_uj")},
        "cost_detail": dict(report.totals),
        "budget": budget.limits(),
        "budget_checks": {k: {"value": v, "limit": lim, "ok": ok} for k, (v, lim, ok) in checks.items()},
        "feasible": all(ok for _, _, ok in checks.values()) and _fits_device(report, target),
        "budget_step": step,
        "reference_mismatches": mismatches,
        "weight_range": weight_range_rule(qm),
        "layers": layer_bits(qm, report),
        "preprocessing": preprocessing_entry(data, qm),
        "history": {"float": float_history, **ctx.history},
        "device": str(dev), "processes": w.size,
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(summary_markdown(result))
    return result


#: A result is degenerate when it keeps at most this share of the margin between chance and a
#: perfect score (10 classes: 19%)...
NEAR_CHANCE = 0.1
#: ...or loses more than this share of the float model's margin over chance
FAR_BELOW_FLOAT = 0.5


def degenerate_reason(float_acc: float, quant_acc: float, chance: float) -> str | None:
    """Why a run's result must not be shipped (None: it may): integer-exact test accuracy at or near
    chance (the majority class's share of the test labels), or far below the float model's."""
    near = chance + NEAR_CHANCE * (1.0 - chance)
    if float_acc <= near:
        return (f"the float model itself scores {float_acc:.2%} on the test set (chance {chance:.2%}): it did not "
                f"learn; check the labels and the data's scale, or train longer (--float-epochs) at another --lr")
    if quant_acc <= near:
        return (f"the quantized model scores {quant_acc:.2%}, at chance ({chance:.2%}; float {float_acc:.2%}): "
                f"it collapsed. See the run's history for the phase that lost it; a lower --qat-lr, more bits or "
                f"a larger budget keep it")
    if float_acc - quant_acc > FAR_BELOW_FLOAT * (float_acc - chance):
        return (f"the quantized model scores {quant_acc:.2%}, far below the float model's {float_acc:.2%} "
                f"(chance {chance:.2%}): it lost more than half the float model's margin over chance; more bits, "
                f"a larger budget or more QAT epochs keep it")
    return None


#: A method ending its search more than this share over a budget limit is reported (the budget step
#: then did the cutting the method should have done)
SEARCH_GAP = 0.1


def search_gap(step: dict, budget: Budget) -> dict:
    """The limits the method's own result missed by more than ``SEARCH_GAP`` (before the budget
    step): ``{key: {"searched": value, "limit": limit}}``, logged as a warning."""
    before = step.get("before") or {}
    gap = {k: {"searched": before[k], "limit": lim} for k, lim in budget.limits().items()
           if k in before and before[k] > (1.0 + SEARCH_GAP) * lim}
    for k, g in gap.items():
        log.warning("the method ended its search at %s %.6g, %.0f%% over the budget's %.6g; the budget step cut the "
                    "rest, which costs accuracy: a longer search (--qat-epochs) or the method's options (-o) let "
                    "the method get there itself", k, g["searched"], 100 * (g["searched"] / g["limit"] - 1), g["limit"])
    return gap


def weight_range_rule(qm) -> str:
    """How the weight grids took their range: ``mse``, ``max`` (a learned grid frozen into the
    weights, or a run from before the least-squares rule), ``learned`` (unfrozen learned quantizers),
    or ``mixed``."""
    rules = {layer.quantizer.range_rule for layer in qm.layers.values()}
    return rules.pop() if len(rules) == 1 else "mixed"


def run_budget_step(ctx: SearchContext, qm) -> dict:
    """The budget step after the method, when its result misses the budget or holds widths the
    target does not run: selection with sensitivities measured on the validation split, then
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

    if not needs_step(qm, ctx.target, ctx.budget):
        if ctx.fine_tune_after and fine_tune(qm) is not None:
            qm.cpu()
            return {"applied": False, "fine_tune_epochs": cfg.budget_epochs}
        return {"applied": False}
    result = budget_step(qm, ctx.target, ctx.budget, x_val=data.x_val, y_val=data.y_val, fine_tune=fine_tune)
    qm.cpu()
    out = result.to_dict()
    out.pop("fine_tune", None)  # in history.budget
    return {"applied": True, **out}


def _phase(progress, name: str):
    return None if progress is None else (lambda done, total: progress(name, done, total))


def _fits_device(report, target) -> bool:
    ok = True
    if target.flash_bytes is not None:
        ok &= report.totals["flash_bytes"] <= target.flash_bytes
    if target.ram_bytes is not None:
        ok &= report.totals["ram_bytes"] <= target.ram_bytes
    return bool(ok)


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


def quantized_state(qm) -> dict:
    """Everything needed to rebuild a quantized model: tensors only (loads with weights_only)."""
    return {"state_dict": qm.state_dict(), "weight_bits": qm.weight_bits(), "act_bits": qm.act_bits()}


def preprocessing_entry(data, qm) -> dict:
    """What turns raw values into the model's input integers on a device: the data loader's
    normalisation and the quantized model's input scale, zero point and range (``result.json``'s
    ``preprocessing``; the C export's input helpers are made from it)."""
    return preprocessing_record(data.preprocessing, qm.lower())


def layer_bits(qm, report) -> list[dict]:
    rows = []
    for row in report.layers:
        if row.op == "input" or row.weight_bits is not None or row.op in ("add", "act"):
            entry = {"name": row.name, "op": row.op, "act_bits": row.act_bits,
                     "weight_bytes": row.weight_bytes, "param_bytes": row.param_bytes,
                     "table_bytes": row.table_bytes, "macs": row.macs}
            if row.name in qm.layers:
                bits = qm.layers[row.name].quantizer.bits().detach()
                entry["weight_bits"] = bits.flatten().tolist() if bits.numel() > 1 else float(bits)
                entry["weight_bits_mean"] = row.weight_bits
                entry["params"] = row.params
            rows.append(entry)
    return rows


def load_run(run_dir: str | Path):
    """Rebuild ``(config, quantized model, result)`` from a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = RunConfig.load(run_dir / "config.yaml")
    path = run_dir / "checkpoints" / "quantized.pt"
    state = load_checkpoint(path)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    model = get_model(cfg.model)
    input_shape = tuple(result.get("input_shape") or load_dataset(cfg.data, cfg.data_dir, cfg.seed).input_shape)
    qm = quantize(model, cfg.target, input_shape, bits=state["weight_bits"], act_bits=state["act_bits"])
    try:
        qm.load_state_dict(state["state_dict"])
    except LayerNamesError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    qm.eval()
    return cfg, qm, result


def _budget_step_lines(step: dict) -> list[str]:
    if not step.get("applied"):
        return []
    moved = ", ".join(f"{k} {step['before'][k]:.6g} -> {step['after'][k]:.6g}" for k in step["before"]
                      if step["before"][k] != step["after"][k])
    return [f"- budget step ({step['solver']}, {step['sensitivity']} sensitivity): {len(step['changes'])} "
            f"bit tensors changed; {moved or 'costs unchanged'}"]


def summary_markdown(result: dict) -> str:
    acc, cost = result["accuracy"], result["cost"]
    lines = [f"# {result['method']} on {result['model']} / {result['data']} for {result['target']}", "",
             f"- test accuracy: float {acc['float']:.2%}, quantized (integer-exact) {acc['quantized']:.2%}",
             f"- FLASH {format_size(cost['flash_bytes'])}, peak RAM {format_size(cost['ram_bytes'])}, "
             f"MACs {cost['macs']:,}, EBOPs {cost['ebops']:,.0f}, latency {cost['latency_cycles']:,.0f} cycles, "
             f"energy {cost['energy_uj']:.3g} uJ",
             f"- budget: {result['budget'] or 'none'}; feasible: {result['feasible']}",
             *([f"- **degenerate**: {result['degenerate_reason']}"] if result.get("degenerate") else []),
             *_budget_step_lines(result.get("budget_step") or {}),
             f"- reference mismatches: {result['reference_mismatches']}", "",
             "| layer | op | weight bits | act bits | weight bytes | param bytes | MACs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        wb = r.get("weight_bits_mean")
        lines.append(f"| {r['name']} | {r['op']} | {'' if wb is None else f'{wb:.2f}'} | {r['act_bits']:.0f} | "
                     f"{r['weight_bytes']} | {r['param_bytes']} | {r['macs']:,} |")
    return "\n".join(lines) + "\n"
