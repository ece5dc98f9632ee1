"""The one training loop every method uses.

Tensors stay in memory and batches are taken by index (no per-sample Python work). Each epoch ends
with validation, best-epoch keeping and an atomic checkpoint of everything needed to continue
exactly: weights, optimiser, schedule position, RNG streams, method (callback) state. A non-finite
loss rolls the epoch back to the last good state with a lower learning rate. Under ``torchrun`` each
global batch is sharded over the processes and gradients are averaged by DistributedDataParallel.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..execute import eval_batch_size
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import World, all_reduce_sum, barrier, init_distributed
from .state import capture_rng, restore_rng

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mixprec-train/1"

SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "linear": lambda t: 1.0 - t,
    "constant": lambda t: 1.0,
}


def _adam(params, cfg):
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


OPTIMIZERS = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "cosine"
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    # An epoch whose validation accuracy lost more than this share of the phase's best margin over
    # chance (its start included) is undone like a non-finite one; 0 turns the check off
    collapse_drop: float = 0.5

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}")
        if not 0.0 <= self.collapse_drop <= 1.0:
            raise ValueError(f"collapse_drop is a share of the accuracy margin, 0..1 (got {self.collapse_drop})")


class Callback:
    """Method-specific steps of training; every hook is optional."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (a cost penalty, say)."""
        return None

    def after_step(self, step: int) -> None:
        """After each optimiser step (quantizer updates on their own schedule, say)."""

    def after_epoch(self, epoch: int, stats: dict) -> None:
        """May add numbers to ``stats`` (a ``cost`` dict, say); they land in the history."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainingDiverged(FloatingPointError):
    """The loss stayed non-finite after every allowed rollback; no model was written from it."""


class _NonFinite(Exception):
    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield row_major(x[idx]), y[idx]


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a freshly made tensor (no copy when it is contiguous already).

    A user's module must get what it would get from its own DataLoader: with one channel, a
    contiguous (N, 1, H, W) tensor may carry the size-1 dim's stride of a channels-last one
    ((64, 1, 8, 1) from a permuted or sliced array); convolutions then answer in channels-last
    memory and the user's ``x.view(x.size(0), -1)`` fails."""
    if not x.is_contiguous():
        return x.contiguous()
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    strides = tuple(reversed(strides))
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
                      progress: Callable[[int, int], None] | None = None, world: World | None = None) -> float:
    """Top-1 accuracy in eval mode (for a quantized model: the integer-exact path), in batches of
    ``batch_size`` (default: :func:`eval_batch_size`).

    With a distributed ``world`` each process scores its share and the counts are summed.
    """
    was_training = model.training
    model.eval()
    if world is not None and world.distributed:
        x, y = x[world.rank::world.size], y[world.rank::world.size]
    device = _model_device(model)
    batch_size = batch_size or eval_batch_size(device, x)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.tensor(len(y), dtype=torch.int64, device=device)
    n_batches = math.ceil(len(y) / batch_size)
    for i, (xb, yb) in enumerate(batches(x, y, batch_size)):
        correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum()
        if progress:
            progress(i + 1, n_batches)
    model.train(was_training)
    if world is not None and world.distributed:
        all_reduce_sum(correct), all_reduce_sum(total)
    return int(correct) / max(int(total), 1)


def chance_accuracy(y: torch.Tensor) -> float:
    """What always answering the most frequent class scores on labels ``y``."""
    return float(torch.bincount(y.reshape(-1).long()).max()) / len(y) if len(y) else 0.0


def params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


class Trainer:
    """One training run of ``model``; see :func:`fit`."""

    def __init__(self, model: nn.Module, x_train, y_train, x_val, y_val, cfg: TrainConfig, *,
                 checkpoint: str | Path | None = None, callbacks: Sequence[Callback] = (),
                 augment: Callable | None = None, device: torch.device | str = "cpu",
                 on_epoch: Callable[[int, dict], None] | None = None,
                 progress: Callable[[int, int], None] | None = None, params=None,
                 best_if: Callable[[dict], bool | int] | None = None):
        self.cfg = cfg
        self.best_if = best_if
        self.device = torch.device(device)
        self.world = init_distributed(self.device)
        self.model = model.to(self.device)
        self.net = self._wrap(model)
        self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
        self.x_val, self.y_val = x_val, y_val
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.callbacks = list(callbacks)
        self.augment, self.on_epoch, self.progress = augment, on_epoch, progress
        # copies: the optimiser writes its settings into a group's dict, which a caller may reuse
        params = [dict(p) if isinstance(p, dict) else p for p in (params if params is not None else model.parameters())]
        self.optimizer = OPTIMIZERS[cfg.optimizer](params, cfg)
        # a group's "lr_scale" multiplies its learning rate (QuantModel.weight_parameters)
        self.base_lrs = [g["lr"] * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
        self.total_steps = max(cfg.epochs * self.steps_per_epoch, 1)
        self.epoch, self.step, self.lr_scale = 0, 0, 1.0
        self.history: list[dict] = []
        self.best_acc, self.best_state, self.best_tier = -1.0, None, 0
        self.start_acc: float | None = None  # the model's validation accuracy before the first step
        self.peak_acc = -1.0  # the best validation accuracy of any epoch (the collapse reference)
        self.chance = chance_accuracy(y_val)
        self.pending_rollbacks: list[dict] = []

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.world.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "config": asdict(self.cfg),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step": self.step, "lr_scale": self.lr_scale,
            "history": self.history, "best_acc": self.best_acc, "best_state": self.best_state, "best_tier": self.best_tier,
            "start_acc": self.start_acc, "peak_acc": self.peak_acc,
            "rng": capture_rng(self.generator),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def load_state(self, state: dict, source: str = "checkpoint") -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{source} is not a mixprec training checkpoint (format {state.get('format')!r})")
        mine = asdict(self.cfg)
        changed = {k: (v, mine.get(k)) for k, v in state["config"].items()
                   if k not in ("max_rollbacks", "rollback_lr_factor", "collapse_drop") and mine.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise CheckpointError(f"{source} was written with other training settings ({detail}); "
                                  f"resume with the same settings or start a new run")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # another model's state (or layer names of an older mixprec)
            raise CheckpointError(f"{source} does not hold this model's state: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.lr_scale = state["epoch"], state["step"], state["lr_scale"]
        self.history, self.best_acc, self.best_state = list(state["history"]), state["best_acc"], state["best_state"]
        self.best_tier = state.get("best_tier", 0 if self.best_state is None else 1)
        self.start_acc, self.peak_acc = state.get("start_acc"), state.get("peak_acc", self.best_acc)
        restore_rng(state["rng"], self.generator)
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)

    def _save(self) -> None:
        if self.checkpoint is not None and self.world.is_main:
            save_checkpoint(self.checkpoint, self.state())
        barrier()

    # -- loop ----------------------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = self.lr_scale * SCHEDULES[self.cfg.schedule](min(self.step / self.total_steps, 1.0))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.cfg.lr * factor

    def _augment_generator(self) -> torch.Generator:
        # Seeded per step and rank, so augmentation needs no saved state and ranks draw independently.
        return torch.Generator().manual_seed((self.cfg.seed << 40) + (self.step << 8) + self.world.rank)

    def _run_epoch(self) -> dict:
        self.net.train()
        start, loss_sum = time.perf_counter(), torch.zeros((), device=self.device)
        order = torch.randperm(len(self.x_train), generator=self.generator).to(self.device)
        bs, w = self.cfg.batch_size, self.world
        for i in range(self.steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            global_count = len(idx)
            if w.distributed:
                idx = idx[w.rank::w.size]
            xb, yb = self.x_train[idx], self.y_train[idx]
            if self.augment is not None:
                xb = self.augment(xb, self._augment_generator())
            xb = row_major(xb)
            lr = self._set_lr()
            # Summed over this shard and divided by the global count: DDP's gradient average then
            # equals the single-process gradient of the global batch.
            loss = F.cross_entropy(self.net(xb), yb, reduction="sum") * (w.size / global_count)
            for cb in self.callbacks:
                extra = cb.extra_loss(self.model)
                if extra is not None:
                    loss = loss + extra
            bad = (~torch.isfinite(loss.detach())).float()
            if w.distributed:
                all_reduce_sum(bad)
            if bad.item():
                raise _NonFinite(f"epoch {self.epoch} step {i}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            for cb in self.callbacks:
                cb.after_step(self.step)
            loss_sum += loss.detach()
            if self.progress and w.is_main:
                self.progress(self.epoch * self.steps_per_epoch + i + 1, self.cfg.epochs * self.steps_per_epoch)
        if w.distributed:
            all_reduce_sum(loss_sum)
            loss_sum /= w.size
        seconds = time.perf_counter() - start
        return {"epoch": self.epoch, "loss": float(loss_sum) / self.steps_per_epoch, "lr": lr,
                "seconds": seconds, "samples_per_second": len(self.x_train) / max(seconds, 1e-9)}

    def _rollbacks_left(self) -> int:
        done = sum(len(h.get("rollbacks", [])) for h in self.history) + len(self.pending_rollbacks)
        return self.cfg.max_rollbacks - done

    def _rollback(self, good: dict, where: str, why: str = "non-finite loss") -> None:
        """Restore ``good`` (the state before the failed epoch) with a lower learning rate."""
        lowered = self.lr_scale * self.cfg.rollback_lr_factor
        pending = self.pending_rollbacks
        self.load_state(good, "the last good state")
        self.pending_rollbacks = pending
        self.lr_scale = lowered
        self.pending_rollbacks.append({"where": where, "why": why, "lr_scale": self.lr_scale})
        log.warning("%s at %s: rolled back to the start of epoch %d, learning rate x%g", why, where, self.epoch,
                    self.lr_scale)

    def _diverged(self, good: dict, where: str) -> None:
        if self._rollbacks_left() <= 0:
            raise TrainingDiverged(
                f"non-finite loss at {where} after {self.cfg.max_rollbacks} rollbacks (learning rate scaled to "
                f"{self.lr_scale:g}); the last good state is epoch {good['epoch']}"
                + (f" in {self.checkpoint}" if self.checkpoint and good["epoch"] > 0 else " (the phase's start)")
                + "; no model was written from the diverged state. Lower the learning rate (--lr / --qat-lr) "
                "or check the data for extreme values")
        self._rollback(good, where)

    def collapse(self, accuracy: float) -> str | None:
        """Why an epoch's validation ``accuracy`` counts as a collapse (None: it does not): it lost more
        than ``collapse_drop`` of the best margin over chance seen in this phase."""
        reference = max(self.peak_acc, self.start_acc if self.start_acc is not None else -1.0)
        margin = reference - self.chance
        if not self.cfg.collapse_drop or margin < 0.05 or accuracy >= reference - self.cfg.collapse_drop * margin:
            return None
        return (f"validation accuracy fell to {accuracy:.4f} from {reference:.4f} "
                f"(chance {self.chance:.4f})")

    def fit(self) -> list[dict]:
        if self.checkpoint is not None and self.checkpoint.exists():
            self.load_state(load_checkpoint(self.checkpoint, map_location=self.device), str(self.checkpoint))
            log.info("resumed %s at epoch %d of %d", self.checkpoint, self.epoch, self.cfg.epochs)
        if self.epoch == 0 and self.start_acc is None and self.cfg.epochs > 0:
            self.start_acc = evaluate_accuracy(self.model, self.x_val, self.y_val, world=self.world)
            log.info("validation accuracy before training: %.4f (chance %.4f)", self.start_acc, self.chance)
        while self.epoch < self.cfg.epochs:
            good = copy.deepcopy(self.state())
            try:
                stats = self._run_epoch()
                if not params_finite(self.model):
                    raise _NonFinite(f"epoch {self.epoch} (non-finite weights after the epoch)")
            except _NonFinite as exc:
                self._diverged(good, exc.where)
                continue
            stats["val_accuracy"] = evaluate_accuracy(self.model, self.x_val, self.y_val, world=self.world)
            collapse = self.collapse(stats["val_accuracy"])
            if collapse and self._rollbacks_left() > 0:
                self._rollback(good, f"epoch {self.epoch}", collapse)
                continue
            if collapse:
                log.warning("%s at epoch %d, with no rollback left: the phase keeps its best epoch", collapse,
                            self.epoch)
            if self.epoch == 0:
                stats["start_val_accuracy"] = self.start_acc
            self.peak_acc = max(self.peak_acc, stats["val_accuracy"])
            if self.pending_rollbacks:
                stats["rollbacks"], self.pending_rollbacks = self.pending_rollbacks, []
            for cb in self.callbacks:
                cb.after_epoch(self.epoch, stats)
            self.history.append(stats)
            if self.world.is_main:
                log.info("epoch %d loss %.4f val %.4f lr %.3g (%.1f s, %.0f samples/s)", self.epoch, stats["loss"],
                         stats["val_accuracy"], stats["lr"], stats["seconds"], stats["samples_per_second"])
            tier = 1 if self.best_if is None else int(self.best_if(stats))
            if tier and (tier, stats["val_accuracy"]) > (self.best_tier, self.best_acc):
                self.best_tier, self.best_acc = tier, stats["val_accuracy"]
                self.best_state = copy.deepcopy(self.model.state_dict())
            self.epoch += 1
            self._save()
            if self.on_epoch:
                self.on_epoch(stats["epoch"], stats)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.history


def fit(model: nn.Module, x_train, y_train, x_val, y_val, cfg: TrainConfig,
        on_epoch: Callable[[int, dict], None] | None = None,
        progress: Callable[[int, int], None] | None = None, **options) -> list[dict]:
    """Train ``model`` and leave it holding the weights of its best validation epoch.

    ``on_epoch(epoch, stats)`` runs after each epoch; ``progress(done, total)`` after each step
    (progress bars live in the CLI). ``options``: ``checkpoint`` (a path: written every epoch and
    resumed from when it exists), ``callbacks``, ``augment``, ``device``, ``params`` (tensors or
    optimiser parameter groups), ``best_if`` (``stats -> bool``: only epochs it accepts compete for
    "best", e.g. those that meet a budget; when none does, the last epoch's weights stay; or ``stats
    -> int``, a tier: 0 excluded, and an epoch of a higher tier beats any of a lower one). Returns
    the per-epoch stats.
    """
    return Trainer(model, x_train, y_train, x_val, y_val, cfg, on_epoch=on_epoch, progress=progress, **options).fit()
