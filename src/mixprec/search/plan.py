"""Planning sweeps of trials: the widest model of a family that a budget admits, float stages
shared between trials, trials in the order that trains each float model once, and the command line
that reproduces a trial.

A family is a model registered with a width multiplier (``lenet5[width=0.5]``,
``resnet8[width=11]``). ``widest`` judges from shapes alone, before any training, with the cost
model a run itself uses: the widest width whose uniform ``bits``-bit model meets a share of the
budget. Trials whose float stages agree (``trial.float_id``) share one: the first trains it, the
others start from it (``float_from``), so methods are compared from the very same float weights.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..convert import quantize
from ..cost import Budget, CostReport, as_target, evaluate, feasible
from ..cost.bits import uniform
from ..cost.keys import BY_NAME
from ..models import get_model
from .config import RunConfig
from .trial import Trial, float_run_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Models of one architecture at several widths: ``widths`` widest first, ``widths[0]`` the
    registered model itself."""

    name: str
    widths: tuple
    input_shape: tuple

    def model(self, width) -> str:
        """The registry name of the model at ``width``."""
        return self.name if width == self.widths[0] else f"{self.name}[width={width}]"


@functools.lru_cache(maxsize=None)
def uniform_cost(family: str, width, target: str, input_shape: tuple, bits: int, act_bits: int,
                 granularity: str = "per-channel") -> CostReport:
    """The cost of the uniform model of ``family`` at ``width`` (a planner asks for each width many
    times, so reports are kept)."""
    t = as_target(target)
    graph = quantize(get_model(f"{family}[width={width}]"), t, input_shape, bits=bits, act_bits=act_bits,
                     weight_granularity=granularity).graph
    return evaluate(graph, uniform(graph, bits, act_bits, granularity), t)


def widest(family: Family, target: str, bits: int, budget: Budget, *, share: float = 1.0, act_bits: int = 8,
           granularity: str = "per-channel"):
    """The widest width of ``family`` whose uniform ``bits``-bit model (``act_bits`` activations)
    meets ``share`` of every limit of ``budget``; None when none does."""
    scaled = Budget(**{k: v * share for k, v in budget.limits().items()})
    for width in family.widths:
        report = uniform_cost(family.name, width, target, tuple(family.input_shape), bits, act_bits, granularity)
        if feasible(report, scaled):
            return width
    return None


def trained_floats(trials) -> dict[str, Path]:
    """The float models the trials' folders already hold, trained by the trial itself: float id ->
    run directory."""
    found: dict[str, Path] = {}
    for trial in trials:
        stored = trial.out / "config.yaml"
        if trial.has_float() and stored.is_file() and not RunConfig.load(stored).float_from:
            found.setdefault(Trial(RunConfig.load(stored), trial.out).float_id, trial.out)
    return found


def share_floats(trials, trained: dict[str, Path] | None = None) -> list[Trial]:
    """The trials with one float stage per float id: a trial whose float model another one trains
    (earlier in the list, or ``trained``: float id -> run directory, say from ``trained_floats``)
    starts from that one's (``float_from``); trials with a ``float_from`` of their own keep it."""
    owners = dict(trained or {})
    shared = []
    for trial in trials:
        if not trial.trains_float():
            shared.append(trial)
            continue
        owner = owners.setdefault(trial.float_id, trial.out)
        same = Path(owner).resolve() == trial.out.resolve()
        shared.append(trial if same else Trial(replace(trial.config, float_from=str(owner)), trial.out))
    return shared


def in_float_order(trials) -> list[Trial]:
    """The trials with every float model's trainer before the trials that start from it (stable
    otherwise), so one pass trains each float model once."""
    trains = {t.out.resolve() for t in trials if t.trains_float()}

    def waits(trial: Trial) -> bool:
        source = trial.config.float_from
        return bool(source) and float_run_dir(Path(source)).resolve() in trains
    return [t for t in trials if not waits(t)] + [t for t in trials if waits(t)]


#: The RunConfig fields a command line always states (the rest: when set)
_STATED = ("float_epochs", "qat_epochs", "budget_epochs", "batch_size", "lr", "qat_lr", "weight_decay", "optimizer")


def command_line(cfg: RunConfig, out, root: Path | None = None) -> str:
    """The ``mixprec search`` command that runs ``cfg`` into ``out`` (paths relative to ``root``
    when under it), for tables that state how each row was made."""
    data = f"'{cfg.data}'" if "[" in cfg.data else cfg.data  # loader options: quoted for the shell
    parts = [f"mixprec search --model '{cfg.model}' --data {data} --target {cfg.target} --method {cfg.method}"]
    if cfg.bits:
        parts.append(f"--bits {cfg.bits}")
    if cfg.act_bits is not None:  # unset: the CLI's own default (activations at least as wide as weights)
        parts.append(f"--act-bits {cfg.act_bits}")
    if cfg.weight_granularity:
        parts.append(f"--granularity {cfg.weight_granularity}")
    parts += [f"{BY_NAME[k].cli_flag} {v}" for k, v in cfg.budget.items()]
    parts += [f"--{key.replace('_', '-')} {getattr(cfg, key)}" for key in _STATED]
    if cfg.budget_fill is not None:
        parts.append("--fill" if cfg.budget_fill else "--no-fill")
    if cfg.seed:
        parts.append(f"--seed {cfg.seed}")
    parts += [f"-o {k}={v}" for k, v in cfg.options.items()]
    if cfg.float_from:
        parts.append(f"--float-from {_relative(Path(cfg.float_from), root)}")
    parts.append(f"--out {out}")
    return " ".join(parts)


def _relative(path: Path, root: Path | None) -> Path:
    if root is None:
        return path
    full = path.resolve()
    return full.relative_to(root) if full.is_relative_to(root) else path
