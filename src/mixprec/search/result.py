"""What a finished run reports: whether its result may be shipped (``degenerate_reason``), how far
the method's own search ended from the budget (``search_gap``), the per-layer widths, and the
``report.md`` summary of ``result.json``."""
from __future__ import annotations

import logging

from ..cost import Budget, format_size
from ..data.base import preprocessing_record

log = logging.getLogger(__name__)


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


def fits_device(report, target) -> bool:
    ok = True
    if target.flash_bytes is not None:
        ok &= report.totals["flash_bytes"] <= target.flash_bytes
    if target.ram_bytes is not None:
        ok &= report.totals["ram_bytes"] <= target.ram_bytes
    return bool(ok)


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


def _budget_step_lines(step: dict) -> list[str]:
    if not step.get("applied"):
        return []
    moved = ", ".join(f"{k} {step['before'][k]:.6g} -> {step['after'][k]:.6g}" for k in step["before"]
                      if step["before"][k] != step["after"][k])
    filled = step.get("fill", "none") != "none"
    return [f"- budget step ({step['solver']}, {step['sensitivity']} sensitivity"
            f"{', then widths raised into the unused budget' if filled else ''}): {len(step['changes'])} "
            f"bit tensors changed; {moved or 'costs unchanged'}"]


def in_out_ram(cost: dict) -> str:
    """The MCU paper's RAM figure beside the planned arena (runs before it was measured: nothing)."""
    return f" (largest in+out of one layer {format_size(cost['ram_mcu_in_out'])})" if "ram_mcu_in_out" in cost else ""


def summary_markdown(result: dict) -> str:
    acc, cost = result["accuracy"], result["cost"]
    lines = [f"# {result['method']} on {result['model']} / {result['data']} for {result['target']}", "",
             f"- test accuracy: float {acc['float']:.2%}, quantized (integer-exact) {acc['quantized']:.2%}",
             f"- FLASH {format_size(cost['flash_bytes'])}, peak RAM {format_size(cost['ram_bytes'])}{in_out_ram(cost)}, "
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
