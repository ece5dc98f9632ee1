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
from ..api import (as_target, cost_report, largest_uniform_bits, quantize, save_integer_model,
                   verify_against_reference, activation_width_for)
from ..cost import Budget, BudgetError, check, evaluate, format_size, violations
from ..cost.bits import BitAssignment
from ..data import load_dataset
from ..models import get_model
from ..train import TrainConfig, evaluate_accuracy, fit, load_checkpoint, save_checkpoint
from .config import RunConfig
from .context import SearchContext

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_bits(cfg: RunConfig, model, target, input_shape, budget: Budget) -> tuple[int, int]:
    """Weight and activation widths for the uniform start; refuses impossible budgets up front."""
    if cfg.bits is None:
        wb = largest_uniform_bits(model, target, input_shape, budget, cfg.act_bits, cfg.weight_granularity)
        return wb, cfg.act_bits or activation_width_for(wb, target)
    ab = cfg.act_bits or activation_width_for(cfg.bits, target)
    qm = quantize(model, target, input_shape, bits=cfg.bits, act_bits=ab, weight_granularity=cfg.weight_granularity)
    report = evaluate(qm.graph, BitAssignment(qm.weight_bits(), qm.act_bits()), target)
    detail = violations(report, budget)
    if detail:
        try:
            hint = f" The widest uniform width that fits is {largest_uniform_bits(model, target, input_shape, budget, cfg.act_bits, cfg.weight_granularity)} bits."
        except BudgetError as exc:
            hint = f" {exc}."
        raise BudgetError(f"uniform {cfg.bits}-bit weights / {ab}-bit activations do not meet the budget: {detail}.{hint}")
    return cfg.bits, ab


def _float_warmup(cfg: RunConfig, model, data, ckpt: Path, progress, epoch_hook) -> list[dict]:
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        log.info("resumed float model from %s", ckpt)
        return state.get("history", [])
    hook = (lambda e, s: epoch_hook("float", e, s)) if epoch_hook else None
    prog = (lambda d, t: progress("float", d, t)) if progress else None
    history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val,
                  TrainConfig(cfg.float_epochs, cfg.lr, 0.0, cfg.batch_size, cfg.seed), hook, prog)
    save_checkpoint(ckpt, {"model": model.state_dict(), "history": history})
    return history


def run_search(cfg: RunConfig, out_dir: str | Path, progress=None, epoch_hook=None) -> dict:
    """Run ``cfg`` into ``out_dir`` and return the result (also written to ``result.json``)."""
    from . import SEARCH_METHODS

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(cfg, out)
    cfg.save(out / "config.yaml")
    seed_everything(cfg.seed)

    target = as_target(cfg.target)
    budget = Budget.from_strings(**cfg.budget)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    model = get_model(cfg.model)
    weight_bits, act_bits = choose_bits(cfg, model, target, data.input_shape, budget)
    log.info("target %s, budget %s, uniform start %d/%d bits", target.name, budget.limits(), weight_bits, act_bits)

    float_history = _float_warmup(cfg, model, data, out / "checkpoints" / "float.pt", progress, epoch_hook)
    float_acc = evaluate_accuracy(model, data.x_test, data.y_test)

    ctx = SearchContext(cfg, model, data, target, budget, weight_bits, act_bits, progress, epoch_hook)
    qm, _ = SEARCH_METHODS[cfg.method](ctx)
    save_checkpoint(out / "checkpoints" / "quantized.pt", quantized_state(qm))

    quant_acc = evaluate_accuracy(qm, data.x_test, data.y_test)
    report = cost_report(qm, target)
    checks = check(report, budget)
    mismatches = verify_against_reference(qm, data.x_test[:512])
    save_integer_model(qm, out / "integer_model.npz")
    result = {
        "mixprec_version": __version__, "model": cfg.model, "data": cfg.data, "target": target.name,
        "method": cfg.method, "seed": cfg.seed, "input_shape": list(data.input_shape),
        "accuracy": {"float": float_acc, "quantized": quant_acc},
        "cost": {k: report.totals[k] for k in ("flash_bytes", "ram_bytes", "macs", "bops", "ebops",
                                                "latency_cycles", "energy_uj")},
        "cost_detail": dict(report.totals),
        "budget": budget.limits(),
        "budget_checks": {k: {"value": v, "limit": lim, "ok": ok} for k, (v, lim, ok) in checks.items()},
        "feasible": all(ok for _, _, ok in checks.values()) and _fits_device(report, target),
        "reference_mismatches": mismatches,
        "layers": layer_bits(qm, report),
        "history": {"float": float_history, **ctx.history},
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(summary_markdown(result))
    return result


def _fits_device(report, target) -> bool:
    ok = True
    if target.flash_bytes is not None:
        ok &= report.totals["flash_bytes"] <= target.flash_bytes
    if target.ram_bytes is not None:
        ok &= report.totals["ram_bytes"] <= target.ram_bytes
    return bool(ok)


def _check_resumable(cfg: RunConfig, out: Path) -> None:
    existing = out / "config.yaml"
    if existing.exists() and RunConfig.load(existing) != cfg:
        raise ValueError(f"{out} holds a run with a different configuration ({existing}); "
                         f"choose another --out or delete it")


def quantized_state(qm) -> dict:
    """Everything needed to rebuild a quantized model: tensors only (loads with weights_only)."""
    return {"state_dict": qm.state_dict(), "weight_bits": qm.weight_bits(), "act_bits": qm.act_bits()}


def layer_bits(qm, report) -> list[dict]:
    rows = []
    for row in report.layers:
        if row.op == "input" or row.weight_bits is not None or row.op in ("add", "act"):
            entry = {"name": row.name, "op": row.op, "act_bits": row.act_bits,
                     "weight_bytes": row.weight_bytes, "param_bytes": row.param_bytes, "macs": row.macs}
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
    state = load_checkpoint(run_dir / "checkpoints" / "quantized.pt")
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    model = get_model(cfg.model)
    input_shape = tuple(result.get("input_shape") or load_dataset(cfg.data, cfg.data_dir, cfg.seed).input_shape)
    qm = quantize(model, cfg.target, input_shape, bits=state["weight_bits"], act_bits=state["act_bits"])
    qm.load_state_dict(state["state_dict"])
    qm.eval()
    return cfg, qm, result


def summary_markdown(result: dict) -> str:
    acc, cost = result["accuracy"], result["cost"]
    lines = [f"# {result['method']} on {result['model']} / {result['data']} for {result['target']}", "",
             f"- test accuracy: float {acc['float']:.2%}, quantized (integer-exact) {acc['quantized']:.2%}",
             f"- FLASH {format_size(cost['flash_bytes'])}, peak RAM {format_size(cost['ram_bytes'])}, "
             f"MACs {cost['macs']:,}, EBOPs {cost['ebops']:,.0f}, latency {cost['latency_cycles']:,.0f} cycles, "
             f"energy {cost['energy_uj']:.3g} uJ",
             f"- budget: {result['budget'] or 'none'}; feasible: {result['feasible']}",
             f"- reference mismatches: {result['reference_mismatches']}", "",
             "| layer | op | weight bits | act bits | weight bytes | param bytes | MACs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        wb = r.get("weight_bits_mean")
        lines.append(f"| {r['name']} | {r['op']} | {'' if wb is None else f'{wb:.2f}'} | {r['act_bits']:.0f} | "
                     f"{r['weight_bytes']} | {r['param_bytes']} | {r['macs']:,} |")
    return "\n".join(lines) + "\n"
