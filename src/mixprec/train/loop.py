"""Training loop: tensors in memory, batches by index (no per-sample Python work), Adam with a
cosine schedule, validation every epoch, the best epoch's weights kept."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode (for a quantized model: the integer-exact path)."""
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def fit(model: nn.Module, x_train, y_train, x_val, y_val, cfg: TrainConfig,
        on_epoch: Callable[[int, dict], None] | None = None,
        progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Train ``model`` and leave it holding the weights of its best validation epoch.

    ``on_epoch(epoch, stats)`` runs after each epoch (checkpointing, logging); ``progress(done,
    total)`` after each step (progress bars live in the CLI). Returns per-epoch stats.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs * steps_per_epoch, 1))
    history, best_acc, best_state = [], -1.0, None
    for epoch in range(cfg.epochs):
        model.train()
        start, total_loss = time.perf_counter(), torch.zeros(())
        for step, (xb, yb) in enumerate(batches(x_train, y_train, cfg.batch_size, True, generator)):
            loss = F.cross_entropy(model(xb), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.detach()
            if progress:
                progress(epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch)
        val_acc = evaluate_accuracy(model, x_val, y_val)
        stats = {"epoch": epoch, "loss": float(total_loss) / steps_per_epoch, "val_accuracy": val_acc,
                 "seconds": time.perf_counter() - start}
        history.append(stats)
        log.info("epoch %d loss %.4f val %.4f (%.1fs)", epoch, stats["loss"], val_acc, stats["seconds"])
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        if on_epoch:
            on_epoch(epoch, stats)
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
