"""``--method rl``: reinforcement-learning search of every weight's and activation's width under hard
limits (Rusci et al. 2020, after HAQ), for a board with a fixed FLASH and RAM.

1. The float model is trained at 8 bits for ``start_epochs`` (quantization-aware): the shared
   starting point every candidate is fine-tuned from (``checkpoints/rl-start.pt``).
2. ``episodes`` episodes of a DDPG agent (``ddpg``): each sets the width of every weight tensor and
   every activation tensor (``env``), the first ``warmup`` ones at random; the policy is then
   lowered until it meets every budget limit (``env.fit_to_budget``, on the exact cost tables), so
   every policy evaluated already fits. A policy is scored once by the candidate evaluator (a short
   fine-tune from the start, ``steps`` steps on a fixed training subset, then validation accuracy);
   the reward is 0.1 x (that accuracy less the float model's, in percentage points), as HAQ's.
3. Candidates are evaluated where ``executor`` says (``executors``: this process, worker processes,
   or Ray actors), ``batch`` episodes at a time, and fed back in episode order, so the course of a
   search depends on its seed alone; the agent, its replay buffer and the episode log are saved
   after every episode (``checkpoints/rl.pt``): a killed search resumes where it stopped.
4. The most accurate policy is applied to the start and fine-tuned for ``qat_epochs`` epochs on the
   whole training split; it already meets the budget, which the budget step then checks.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...convert import quantize
from ...quantizers.fixed import freeze_observers, refit_narrow_acts
from ...cost.targets import weight_granularity_for
from ...train import fit, load_checkpoint, save_checkpoint
from ...train.loop import evaluate_accuracy
from ..context import SearchContext
from ..evaluator import EvaluatorSpec, apply_choice, choice_of, widest_tables
from ..learned import measured_costs, meets, parse_options
from ..methods import Method
from ..saved import quantized_state, rebuild_quantized
from .env import build_episode, fit_to_budget
from .executors import EXECUTORS, import_ray, make_executor
from .search import RLSearch, Schedule

log = logging.getLogger(__name__)

START_CHECKPOINT = "rl-start.pt"
SEARCH_CHECKPOINT = "rl.pt"


@dataclass
class RLOptions:
    episodes: int = 100  # policies tried (the paper runs hundreds); the warm-up ones included
    warmup: int = 20  # episodes of random actions before the agent acts and learns
    batch: int = 4  # episodes proposed together, evaluated in parallel, fed back in order
    steps: int = 100  # fine-tuning steps of each candidate (batches of --batch-size)
    train_samples: int = 12_800  # the candidates' fixed fine-tuning subset of the training split
    val_samples: int = 2_000  # the candidates' fixed validation subset
    start_epochs: int = 1  # quantization-aware epochs at 8 bits of the shared starting point
    ends_bits: int = 8  # the first and the last layer's weights at this width; 0: searched
    sigma: float = 0.5  # exploration: truncated normal of sigma * sigma_decay ** (episode - warmup)
    sigma_decay: float = 0.99
    executor: str = "local"  # local | process | ray
    workers: int = 1  # evaluators working at once (process, ray)
    threads: int = 0  # intra-op threads of each evaluator (0: the machine's cores / workers)
    ray_address: str = ""  # an existing Ray cluster ("" starts one on this machine)
    gpus: float = 0.0  # GPUs each Ray worker asks for (its evaluator then trains on one)

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"-o executor={self.executor}: choose one of {', '.join(EXECUTORS)}")
        for name in ("episodes", "batch", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"-o {name}={getattr(self, name)}: give at least 1")
        if self.steps < 0 or self.warmup < 0 or self.start_epochs < 0:
            raise ValueError("-o steps, warmup and start_epochs take 0 or more")

    def evaluator_threads(self) -> int:
        return self.threads or max((os.cpu_count() or 1) // self.workers, 1)


def check(cfg, target, opts: RLOptions) -> None:
    """``Method.check``: what the RL search cannot take, before the run claims its folder."""
    if opts.ends_bits and opts.ends_bits not in target.weight_bits:
        raise ValueError(f"-o ends_bits={opts.ends_bits}: {target.name} runs {', '.join(map(str, target.weight_bits))}"
                         f"-bit weights; give one of those, or 0 to search the first and last layers too")
    if opts.executor == "ray":
        import_ray()


def check_model(cfg, target, opts: RLOptions, model, input_shape, budget) -> None:
    """``Method.check_model``: the budget can be met with the held layers at ``ends_bits`` and
    every searched tensor at its narrowest width (raises ``BudgetError`` naming what to change)."""
    qm = quantize(model, target, input_shape, bits=max(target.weight_bits), act_bits=max(target.act_bits),
                  weight_granularity=weight_granularity_for(target, cfg.weight_granularity))
    tables, episode = episode_of(qm, target, opts)
    fit_to_budget(episode, tables, [0] * len(episode.steps), budget.limits())


def episode_of(qm, target, opts: RLOptions):
    """The cost tables of ``qm`` (at the target's widest widths) and the episode over its tensors."""
    tables = widest_tables(qm, target)
    return tables, build_episode(qm.graph, tables, choice_of(tables, qm.weight_bits(), qm.act_bits()), opts.ends_bits)


def search_rl(ctx: SearchContext):
    opts = parse_options(RLOptions, ctx.config.options, "rl")
    folder = ctx.checkpoint_dir or Path(tempfile.mkdtemp(prefix="mixprec-rl-"))
    qm = starting_point(ctx, opts, folder / START_CHECKPOINT)
    tables, episode = episode_of(qm, ctx.target, opts)
    n_val = min(opts.val_samples, len(ctx.data.y_val))
    float_accuracy = evaluate_accuracy(ctx.float_model, ctx.data.x_val[:n_val], ctx.data.y_val[:n_val])
    schedule = Schedule(opts.episodes, opts.warmup, opts.batch, opts.sigma, opts.sigma_decay, ctx.config.seed)
    search = RLSearch(episode, tables, ctx.budget.limits(), schedule, float_accuracy, folder / SEARCH_CHECKPOINT)
    log.info("RL on %s: %d episodes (%d random) over %d tensors, candidates on %s x%d; float accuracy %.2f%%",
             ctx.target.name, opts.episodes, opts.warmup, len(episode.steps), opts.executor, opts.workers,
             100 * float_accuracy)
    threads = torch.get_num_threads()
    executor = make_executor(opts.executor, evaluator_spec(ctx, opts, folder / START_CHECKPOINT), opts.workers,
                             opts.ray_address, opts.gpus)
    report = ctx.progress_for("rl")
    try:
        best = search.run(executor.evaluate, on_episode=lambda e: report(e["episode"] + 1, opts.episodes)
                          if report else None)
    finally:
        executor.close()
        torch.set_num_threads(threads)
    log.info("RL best policy: episode %d, %.2f%% validation (candidate fine-tune)", best["episode"],
             100 * best["accuracy"])
    apply_choice(qm, tables, *episode.choice(best["positions"]))
    refit_narrow_acts(qm, torch.split(ctx.data.x_train[:1024], 256))  # as the candidates were scored
    freeze_observers(qm, frozen=False)  # the ranges then follow the weights as they train
    history = fit(qm, ctx.data.x_train, ctx.data.y_train, ctx.data.x_val, ctx.data.y_val,
                  ctx.config.train_config("qat"), params=qm.weight_parameters(), **ctx.fit_options("rl-final"))
    ctx.history["rl"] = search.state.log
    ctx.history["qat"] = history
    measured = measured_costs(qm, ctx.target)
    if not meets(measured, ctx.budget):  # the tables and the deployed layout disagree: say so, the budget step fixes it
        log.warning("RL: the best policy measures %s on the deployed model, over the budget %s that the cost tables "
                    "said it met", {k: measured[k] for k in ctx.budget.limits()}, ctx.budget.limits())
    return qm, search.state.log


def starting_point(ctx: SearchContext, opts: RLOptions, path: Path):
    """The model at the target's widest widths, trained ``start_epochs`` epochs quantization-aware
    (saved at ``path``; a resumed run takes it from there)."""
    cfg, data, t = ctx.config, ctx.data, ctx.target
    gran = weight_granularity_for(t, cfg.weight_granularity)
    if path.exists():
        log.info("RL starting point from %s", path)
        return rebuild_quantized(ctx.float_model, t, data.input_shape, load_checkpoint(path), path, gran)
    qm = quantize(ctx.float_model, t, data.input_shape, bits=max(t.weight_bits), act_bits=max(t.act_bits),
                  weight_granularity=gran)
    ctx.calibrate(qm)
    train = replace(cfg.train_config("qat"), epochs=opts.start_epochs)
    if opts.start_epochs:
        log.info("RL starting point: %d quantization-aware epoch(s) at %d bits", opts.start_epochs, max(t.weight_bits))
        fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, train, params=qm.weight_parameters(),
            **ctx.fit_options("rl-start"))
    qm.cpu()
    save_checkpoint(path, quantized_state(qm))
    return qm


def evaluator_spec(ctx: SearchContext, opts: RLOptions, start: Path) -> EvaluatorSpec:
    data_dir = ctx.config.data_dir or os.environ.get("MIXPREC_DATA")  # workers elsewhere read the same data
    return EvaluatorSpec(replace(ctx.config, data_dir=data_dir), str(start), steps=opts.steps,
                         train_samples=opts.train_samples, val_samples=opts.val_samples,
                         start_bits=max(ctx.target.weight_bits), threads=opts.evaluator_threads(),
                         device="cuda" if opts.gpus > 0 else "cpu")


METHOD = Method("rl", search_rl, RLOptions,
                "reinforcement-learning search (DDPG, HAQ-style) of each weight and activation tensor's width "
                "under hard FLASH/RAM limits; candidates in parallel (local, process, ray)", check=check,
                check_model=check_model, fills_budget=True)
