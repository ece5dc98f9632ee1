"""What a search method receives: the trained float model, data, target, budget and callbacks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..cost import Budget, Target
from ..data import Splits
from .config import RunConfig


@dataclass
class FrontMember:
    """One (validation accuracy, cost) Pareto point a method kept: its index entry (epoch,
    val_accuracy, cost, costs) and how to build its frozen quantized model."""

    entry: dict
    build: Callable[[], object]


@dataclass
class SearchContext:
    config: RunConfig
    float_model: nn.Module
    data: Splits
    target: Target
    budget: Budget
    weight_bits: int
    act_bits: int
    progress: Callable[[str, int, int], None] | None = None
    epoch_hook: Callable[[str, int, dict], None] | None = None
    history: dict = field(default_factory=dict)  # phase -> per-epoch stats (the method fills it)
    checkpoint_dir: Path | None = None  # per-epoch checkpoints of each phase go here
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fine_tune_after: bool = False  # a method sets it when its result needs a fine-tune with bits frozen
    front: list[FrontMember] = field(default_factory=list)  # a method asked for a front: each becomes a run

    def checkpoint(self, phase: str) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{phase}_last.pt"

    def calibrate(self, qm, batch_size: int = 256, max_samples: int = 10_000) -> None:
        """Observe activation ranges on (at most ``max_samples`` of) the training set."""
        x = self.data.x_train[:max_samples]
        total = math.ceil(len(x) / batch_size)
        report = self.progress_for("calibrate")

        def feed():
            for i in range(total):
                yield x[i * batch_size:(i + 1) * batch_size]
                if report:
                    report(i + 1, total)
        qm.calibrate(feed())

    def fit_options(self, phase: str) -> dict:
        """What every method passes to ``fit`` for one training phase."""
        return dict(on_epoch=self.on_epoch(phase), progress=self.progress_for(phase),
                    checkpoint=self.checkpoint(phase), augment=self.data.augment, device=self.device)

    def progress_for(self, phase: str):
        return None if self.progress is None else (lambda done, total: self.progress(phase, done, total))

    def on_epoch(self, phase: str):
        def hook(epoch: int, stats: dict) -> None:
            if self.epoch_hook:
                self.epoch_hook(phase, epoch, stats)
        return hook
