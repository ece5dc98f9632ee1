"""What a search method receives: the trained float model, data, target, budget and callbacks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..cost import Budget, Target
from ..data import Splits
from .config import RunConfig


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
    history: dict = field(default_factory=dict)

    def progress_for(self, phase: str):
        return None if self.progress is None else (lambda done, total: self.progress(phase, done, total))

    def on_epoch(self, phase: str):
        def hook(epoch: int, stats: dict) -> None:
            self.history.setdefault(phase, []).append(stats)
            if self.epoch_hook:
                self.epoch_hook(phase, epoch, stats)
        return hook
