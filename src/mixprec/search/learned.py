"""What the gradient-based methods (HGQ, DQ) share.

- Options: each method reads its own dataclass from ``RunConfig.options`` (CLI ``--option k=v``).
- Cost in the loss: the cost model's differentiable totals (``evaluate_torch``), computed every
  ``penalty_every`` steps and weighted by it, so the average gradient is the per-step one while
  the graph walk costs a fraction of a step.
- Every epoch the exact deployed cost is measured, the epoch is marked feasible or not, and
  the checkpoints on the (validation accuracy, cost) Pareto front are kept in ``RUN/pareto/``.
- The result is frozen into fixed-bit quantizers (what the budget step, fine-tuning and export
  take).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..bracketed import typed
from ..convert import activation_clip, convert_with
from ..cost import Budget, Target, assignment, evaluate_torch
from ..cost.deployed import cost_report
from ..cost.keys import COSTS as KEY_TABLE, cost_key as to_key
from ..cost.targets import weight_granularity_for
from ..nn.model import QuantLayer, QuantModel
from ..quantizers.fixed import freeze_observers
from ..train import Callback, save_checkpoint
from ..train.distributed import world

log = logging.getLogger(__name__)

#: Cost names users write (``--option cost=flash``) and the report totals they mean: every cost a
#: method can steer by (``cost.keys``; MACs do not depend on the widths).
COSTS = {c.name: c.key for c in KEY_TABLE if c.key != "macs"}


def parse_options(cls, options: dict, method: str):
    """``cls(**options)`` with values given as text (from the command line) converted to the field
    types; unknown keys name the known ones."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for --method {method}; known: {', '.join(sorted(known))}")
    return cls(**{k: _convert(method, k, v, cls.__dataclass_fields__[k].default) for k, v in options.items()})


def _convert(method: str, key: str, value, default):
    if not isinstance(value, str) or default is None:
        return value
    try:
        return typed(value, default)
    except ValueError as err:
        raise ValueError(f"{method} option {key}={value!r} {err}") from None


def cost_key(name: str) -> str:
    """A report total from a user's cost name (``flash``) or the total itself (``flash_bytes``)."""
    if name == "macs" or name not in COSTS and name not in COSTS.values():
        raise ValueError(f"unknown cost {name!r}; choose one of {', '.join(COSTS)}")
    return to_key(name)


def default_cost(budget: Budget) -> str:
    """The cost a method steers by: the first budget limit given, else EBOPs."""
    limits = budget.limits()
    return next(iter(limits)) if limits else "ebops"


def differentiable_costs(qm: QuantModel, target: Target) -> dict[str, torch.Tensor]:
    return evaluate_torch(qm.graph, assignment(qm), target)


def relaxed(target: Target) -> Target:
    """``target`` with a storage container for every width up to its widest: the cost a method
    steers by then falls with every bit it saves, not only where a bit crosses a container
    boundary (which would stall a controller on a flat cost and then overshoot). Feasibility is
    always judged on the real containers."""
    return replace(target, weight_containers=tuple(range(1, max(target.weight_containers) + 1)),
                   act_containers=tuple(range(1, max(target.act_containers) + 1)))


def measured_costs(qm: QuantModel, target: Target) -> dict[str, float]:
    """Exact costs of the model as it would deploy now (integer weights, containers, arena)."""
    totals = cost_report(qm, target).totals
    return {k: float(totals[k]) for k in COSTS.values()}


def meets(costs: dict[str, float], budget: Budget) -> bool:
    return all(costs[k] <= limit for k, limit in budget.limits().items())


class ParetoFront:
    """Checkpoints that no other epoch beats on both validation accuracy and cost, in ``folder``
    with an index ``pareto.json``; dominated ones are deleted as better ones arrive."""

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key
        self.entries: list[dict] = []

    def offer(self, epoch: int, accuracy: float, costs: dict, state: dict) -> bool:
        cost = costs[self.key]
        if any(e["val_accuracy"] >= accuracy and e["cost"] <= cost for e in self.entries):
            return False
        keep = [e for e in self.entries if not (accuracy >= e["val_accuracy"] and cost <= e["cost"])]
        entry = {"epoch": epoch, "val_accuracy": accuracy, "cost": cost, "costs": dict(costs)}
        if self.folder is not None and world().is_main:
            entry["checkpoint"] = f"epoch{epoch:03d}.pt"
            save_checkpoint(self.folder / entry["checkpoint"], {"model": state, "entry": entry})
            for gone in self.entries:
                if gone not in keep:
                    (self.folder / gone["checkpoint"]).unlink(missing_ok=True)
        self.entries = sorted(keep + [entry], key=lambda e: e["cost"])
        self._write_index()
        return True

    def _write_index(self) -> None:
        if self.folder is not None and world().is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "pareto.json").write_text(json.dumps({"cost": self.key, "front": self.entries}, indent=1))


class EpochCosts(Callback):
    """Measures each epoch's exact costs into ``stats["cost"]`` and ``stats["feasible"]``, and
    offers the epoch to the Pareto front."""

    def __init__(self, target: Target, budget: Budget, front: ParetoFront):
        self.target, self.budget, self.front = target, budget, front
        self.model: QuantModel | None = None

    def bind(self, model: QuantModel) -> "EpochCosts":
        self.model = model
        return self

    def after_epoch(self, epoch: int, stats: dict) -> None:
        costs = measured_costs(self.model, self.target)
        stats["cost"] = costs
        stats["feasible"] = meets(costs, self.budget)
        if self.front.offer(epoch, stats["val_accuracy"], costs, self.model.state_dict()):
            log.info("epoch %d joins the Pareto front (%s %.6g, val %.4f)", epoch, self.front.key,
                     costs[self.front.key], stats["val_accuracy"])

    def state_dict(self) -> dict:
        return {"front": self.front.entries}

    def load_state_dict(self, state: dict) -> None:
        self.front.entries = list(state.get("front", []))


def model_quantizers(qm: QuantModel, with_input: bool = True) -> list:
    """Every weight quantizer, then every activation quantizer (the input's unless excluded)."""
    acts = [q for name, q in qm.act_quantizers.items() if with_input or name != "input"]
    return [layer.quantizer for layer in qm.layers.values()] + acts


def pareto_folder(checkpoint_dir: Path | None) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir).parent / "pareto"


def is_feasible(stats: dict) -> bool:
    return bool(stats.get("feasible", True))


#: A budget is landed when the cost it steers is at least this share of it (and within it)
LANDING_SHARE = 0.9


def landing(limits: dict[str, float]):
    """``fit``'s ``best_if`` for a run steered onto budget ``limits`` (cost key -> limit): epochs
    within the budget with a steered cost at least ``LANDING_SHARE`` of its limit (tier 2: with
    FLASH and RAM limits, the one that binds) beat those further under every limit (tier 1). On a
    small validation split one or two samples decide "most accurate"; an early epoch on the way to
    the budget won so, and a 2e5-EBOPs run that held 97-99% of its budget from epoch 2 on returned
    its epoch 1, at 88%."""
    def tier(stats: dict) -> int:
        if not is_feasible(stats):
            return 0
        cost = stats.get("cost") or {}
        near = any(cost.get(key) is not None and cost[key] >= LANDING_SHARE * limit for key, limit in limits.items())
        return 2 if near else 1
    return tier


def every_k(step: int, k: int) -> bool:
    return k <= 1 or step % k == 0


def log_ramp(start: float, end: float, t: float) -> float:
    return math.exp(math.log(start) + (math.log(end) - math.log(start)) * min(max(t, 0.0), 1.0))


# ----------------------------------------------------------------------------- freezing


@torch.no_grad()
def learned_model(ctx, act_granularity: str, weight_quantizer, act_quantizer,
                  input_granularity: str = "per-tensor") -> QuantModel:
    """The run's float model with a method's quantizers: ``weight_quantizer(node, weight,
    granularity)`` at the run's weight granularity and ``act_quantizer(node, granularity)`` at
    ``act_granularity``, the input's at ``input_granularity`` (default per tensor: data comes at one
    width)."""
    t = ctx.target
    weights = weight_granularity_for(t, ctx.config.weight_granularity)
    check_act_granularity(t, act_granularity)
    check_act_granularity(t, input_granularity)
    return convert_with(ctx.float_model, ctx.data.input_shape, t.numerics,
                        lambda node, w: weight_quantizer(node, w, weights),
                        lambda node: act_quantizer(node, input_granularity if node.op == "input" else act_granularity),
                        t)


def check_act_granularity(t: Target, granularity: str) -> None:
    """Learned activation bits finer than per tensor need the target to allow them and fixed-point
    numerics (one real scale per activation tensor is what the integer kernels take otherwise)."""
    if granularity not in t.act_granularities:
        raise ValueError(f"{t.name} supports activation granularity {', '.join(t.act_granularities)}; "
                         f"got act_granularity={granularity}")
    if granularity != "per-tensor" and t.numerics != "fixed":
        raise ValueError(f"act_granularity={granularity} needs a fixed-point target ({t.name} is {t.numerics})")


def check_learned(cfg, target: Target, opts) -> None:
    """``Method.check`` of the methods with learned activation bits (hgq, dq)."""
    check_act_granularity(target, opts.act_granularity)


def freeze(qm: QuantModel) -> QuantModel:
    """The same model with fixed-bit quantizers holding the learned bits and grids: each quantizer's
    own :meth:`~mixprec.quantizers.Quantizer.freeze` (a weight quantizer also says which float
    weight to keep), in the model's numerics; activation ranges stay as learned during fine-tuning."""
    layers = {}
    for name, layer in qm.layers.items():
        fixed, weight = layer.quantizer.freeze(layer.weight, numerics=qm.numerics)
        layers[name] = QuantLayer(weight.cpu(), layer.bias.detach().cpu(), fixed, layer.fold_ratio)
    acts = {name: _frozen_act(qm, name, q) for name, q in qm.act_quantizers.items()}
    out = QuantModel(qm.graph, layers, acts, qm.numerics, qm.target_name)
    out.pruning = qm.pruning  # the same graph: channels removed before stay removed
    freeze_observers(out)
    return out


def _frozen_act(qm: QuantModel, name: str, q):
    """``q.freeze`` with the node's fused-activation bounds; an error names the activation."""
    try:
        return q.freeze(numerics=qm.numerics, clip=activation_clip(qm.graph[name])).quantizer
    except ValueError as e:
        raise ValueError(f"activation {name!r} ({qm.target_name}): {e}") from None
