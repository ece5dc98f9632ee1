"""A candidate evaluator: score many bit assignments of one model quickly, for searches that try
hundreds of them (RL, sweeps).

Built once from a run configuration and a starting checkpoint, it traces and quantizes the model
once, keeps the starting weights, and builds the cost tables (``cost.tables``) around the target's
widest widths. Each ``evaluate(candidate)``:

1. restores the starting weights and optimiser-free state (no re-tracing, no re-lowering);
2. sets every group's width (a candidate names widths in bits: ``{"weights": {layer: w or [w per
   group]}, "acts": {quantizer: w}}``; what it does not name stays at the start's widths);
3. fine-tunes ``steps`` steps on a fixed, seeded training subset (the same batches for every
   candidate, activation ranges frozen at the start's calibration, except that an activation the
   candidate narrows to ``ACT_FIT_MAX_BITS`` or fewer takes its least-squares range afresh);
4. returns the validation accuracy of the fake-quantization path on a fixed validation subset and
   the exact costs of the choice from the tables.

Integer-exact evaluation stays for final results (``run_search``). The evaluator never joins a
torch.distributed process group, also inside one: it trains with plain optimiser steps. It pickles
as its specification (``EvaluatorSpec``), so a process pool or a Ray actor rebuilds it where it runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cost import Target
from ..cost.bits import BitAssignment
from ..cost.tables import CostTables, build_tables, cap_all
from ..quantizers.fixed import freeze_observers, refit_narrow_acts
from .config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluatorSpec:
    """What an evaluator is built from: plain values only, so it pickles.

    ``start``: a float checkpoint (a run's ``checkpoints/float.pt``, or a run directory) quantized at
    ``start_bits`` and calibrated, or a quantized run's ``checkpoints/quantized.pt``.
    """

    config: RunConfig
    start: str
    steps: int = 200
    train_samples: int = 12_800  # the fixed fine-tuning subset (0: the whole training split)
    val_samples: int = 2_000
    start_bits: int = 8
    lr: float | None = None  # None: the configuration's qat_lr
    threads: int | None = None  # intra-op threads of the hosting process (None: leave as is)
    device: str = "cpu"  # where it trains and scores ("cuda" on a GPU worker)


@dataclass
class CandidateResult:
    accuracy: float  # validation accuracy of the fake-quantization path
    costs: dict  # exact totals of the choice (cost.tables)
    weight_bits: dict  # layer -> widths per group, as applied
    act_bits: dict  # quantizer -> width
    seconds: float
    losses: list = field(default_factory=list)  # fine-tuning loss every 10 steps


class CandidateEvaluator:
    def __init__(self, spec: EvaluatorSpec):
        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.qm, self.data = _start_model(spec)
        self.target = _target(spec.config)
        self.initial_bits = (self.qm.weight_bits(), self.qm.act_bits())
        self.tables: CostTables = widest_tables(self.qm, self.target)
        self.device = torch.device(spec.device)
        self.qm.to(self.device)
        self.initial = {k: v.detach().clone() for k, v in self.qm.state_dict().items()}
        rng = np.random.default_rng(spec.config.seed)
        n_train = len(self.data.y_train) if not spec.train_samples else min(spec.train_samples, len(self.data.y_train))
        pick = np.sort(rng.permutation(len(self.data.y_train))[:n_train])
        self.x_train, self.y_train = self.data.x_train[pick].to(self.device), self.data.y_train[pick].to(self.device)
        n_val = min(spec.val_samples, len(self.data.y_val))
        self.x_val, self.y_val = self.data.x_val[:n_val].to(self.device), self.data.y_val[:n_val].to(self.device)

    def __reduce__(self):  # a process pool or a Ray actor rebuilds it from its specification
        return (CandidateEvaluator, (self.spec,))

    # -- one candidate --------------------------------------------------------------------------------
    def evaluate(self, candidate: dict) -> CandidateResult:
        start = time.perf_counter()
        self._restore()
        kw, ka = self.choice(candidate)
        self._apply(kw, ka)
        losses = self._fine_tune()
        accuracy = self._validate()
        wbits = {n: self.tables.layers[n].widths[k].tolist() for n, k in kw.items()}
        abits = {q: float(self.tables.acts[q].widths[i]) for q, i in ka.items()}
        return CandidateResult(accuracy, self.tables.totals(kw, ka), wbits, abits, time.perf_counter() - start, losses)

    def choice(self, candidate: dict) -> tuple[dict, dict]:
        """Table indices of a candidate given in bits (per layer: one width or one per group)."""
        kw, ka = self.start_choice()
        for name, widths in (candidate.get("weights") or {}).items():
            if name not in self.tables.layers:
                raise KeyError(f"candidate names layer {name!r}; the model's layers: {', '.join(self.tables.layers)}")
            layer = self.tables.layers[name]
            w = np.asarray(widths, dtype=float).reshape(-1)
            if w.size not in (1, layer.groups):
                raise ValueError(f"{name}: {w.size} widths for {layer.groups} groups; give one width or one per group")
            w = np.broadcast_to(w, (layer.groups,))
            kw[name] = np.array([_index(layer.widths, v, name) for v in w])
        for q, width in (candidate.get("acts") or {}).items():
            if q not in self.tables.acts:
                raise KeyError(f"candidate names activation {q!r}; the model's: {', '.join(self.tables.acts)}")
            ka[q] = _index(self.tables.acts[q].widths, float(width), q)
        return kw, ka

    def start_choice(self) -> tuple[dict, dict]:
        """The indices of the starting model's widths."""
        return choice_of(self.tables, *self.initial_bits)

    # -- steps ----------------------------------------------------------------------------------------
    def _restore(self) -> None:
        self.qm.load_state_dict(self.initial)  # weights, biases, ranges, and the start's bits (buffers)

    def _apply(self, kw: dict, ka: dict) -> None:
        apply_choice(self.qm, self.tables, kw, ka)
        refit_narrow_acts(self.qm, torch.split(self.x_train[:1024], 256))

    def _fine_tune(self) -> list[float]:
        cfg = self.spec.config
        qm = self.qm
        qm.train()
        freeze_observers(qm)
        params = [p for g in qm.weight_parameters() for p in g["params"]]
        opt = torch.optim.Adam(params, lr=self.spec.lr or cfg.qat_lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        n, bs = len(self.y_train), cfg.batch_size
        order, losses, at = torch.randperm(n, generator=gen), [], 0
        for step in range(self.spec.steps):
            if at + bs > n:
                order, at = torch.randperm(n, generator=gen), 0
            idx = order[at:at + bs]
            at += bs
            loss = F.cross_entropy(qm(self.x_train[idx]), self.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0:
                losses.append(loss.detach())
        return [float(v) for v in losses]

    @torch.no_grad()
    def _validate(self, batch_size: int = 500) -> float:
        qm = self.qm
        qm.train()  # the fake-quantization path; ranges stay frozen
        correct = 0
        for i in range(0, len(self.y_val), batch_size):
            correct += int((qm(self.x_val[i:i + batch_size]).argmax(1) == self.y_val[i:i + batch_size]).sum())
        return correct / max(len(self.y_val), 1)


def widest_tables(qm, target: Target) -> CostTables:
    """The cost tables of ``qm`` around the target's widest widths: group ``g`` at width ``w`` is
    plain "``g`` takes ``w``" (``cost.tables``)."""
    widest = BitAssignment({n: torch.full_like(b, float(max(target.weight_bits))) for n, b in qm.weight_bits().items()},
                           {n: torch.full_like(b, float(max(target.act_bits))) for n, b in qm.act_bits().items()},
                           qm.act_shifts())
    return build_tables(qm.graph, target, widest)


def choice_of(tables: CostTables, weight_bits: dict, act_bits: dict) -> tuple[dict, dict]:
    """A model's widths (``QuantModel.weight_bits()``, ``act_bits()``) as table indices: each
    group's widest entry, each activation's."""
    kw = {}
    for name, layer in tables.layers.items():
        bits = weight_bits[name].reshape(layer.groups, -1).amax(1)
        kw[name] = np.array([_index(layer.widths, float(b), name) for b in bits])
    ka = {q: _index(a.widths, float(act_bits[q].max()), q) for q, a in tables.acts.items()}
    return kw, ka


def apply_choice(qm, tables: CostTables, kw: dict, ka: dict) -> None:
    """Set ``qm``'s widths to a choice of table indices (``CostTables.totals``' arguments)."""
    for name, layer in tables.layers.items():
        qm.layers[name].quantizer.set_bits(layer.bits(kw[name]))
    for q, act in tables.acts.items():
        qm.act_quantizers[q].set_bits(cap_all(act.base, act.widths[ka[q]]).reshape(act.shape))
    qm.invalidate()


def _index(widths: np.ndarray, value: float, name: str) -> int:
    hit = np.flatnonzero(np.isclose(widths, value))
    if not len(hit):
        raise ValueError(f"{name}: width {value:g} is not one the target runs ({', '.join(f'{w:g}' for w in widths)})")
    return int(hit[0])


def _target(cfg: RunConfig) -> Target:
    from ..cost import load_target

    return load_target(cfg.target)


def _start_model(spec: EvaluatorSpec):
    """The starting quantized model (calibrated, ranges frozen) and the run's data."""
    from ..convert import quantize
    from ..cost.targets import weight_granularity_for
    from ..data import load_dataset
    from ..models import get_model, get_spec
    from ..train import load_checkpoint
    from . import preflight
    from .saved import FLOAT_CHECKPOINT, QUANTIZED_CHECKPOINT, float_from_state, rebuild_quantized

    cfg = spec.config
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    data = preflight.prepare(data, model, get_spec(cfg.model).input_shape, cfg.data, cfg.model)
    path = Path(spec.start)
    if path.is_dir():
        path = path / (QUANTIZED_CHECKPOINT if (path / QUANTIZED_CHECKPOINT).exists() else FLOAT_CHECKPOINT)
    target = _target(cfg)
    gran = weight_granularity_for(target, cfg.weight_granularity)
    state = load_checkpoint(path)
    if "state_dict" in state:  # a quantized run's model
        qm = rebuild_quantized(model, target, data.input_shape, state, path, gran)
    else:
        float_from_state(model, state, path, cfg.model)
        qm = quantize(model, target, data.input_shape, bits=spec.start_bits, weight_granularity=gran)
        qm.calibrate(torch.split(data.x_train[:2048], 256))
    freeze_observers(qm)
    return qm, data


def evaluator_for_run(run_dir: str | Path, **options) -> CandidateEvaluator:
    """An evaluator of a finished run's model, starting from its quantized checkpoint."""
    cfg = RunConfig.load(Path(run_dir) / "config.yaml")
    return CandidateEvaluator(EvaluatorSpec(replace(cfg), str(run_dir), **options))
