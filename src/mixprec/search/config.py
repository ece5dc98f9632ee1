"""A run's configuration: one dataclass, round-tripped through ``config.yaml``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

@dataclass
class RunConfig:
    model: str = "digits-cnn"
    data: str = "digits"
    target: str = "cortex-m4"
    method: str = "uniform"
    bits: int | None = None  # weights; None: the widest the budget allows
    act_bits: int | None = None  # None: the smallest supported width >= the weight width
    weight_granularity: str | None = None  # None: per channel where the target allows it
    budget: dict = field(default_factory=dict)  # flash, ram, ram_in_out, bops, ebops, energy, latency as user text
    float_epochs: int = 15
    qat_epochs: int = 10
    budget_epochs: int = 1  # fine-tune after the budget step (only when it had to change the bits)
    budget_fill: bool | None = None  # raise widths into unused budget where the loss falls; None: the method's default
    lr: float = 3e-3
    qat_lr: float = 5e-4
    batch_size: int = 32
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    options: dict = field(default_factory=dict)  # the method's own options (see its ...Options dataclass)
    float_from: str | None = None  # start from this run's float model (RUN_DIR or a float.pt) instead of training one

    def __post_init__(self):
        from .methods import get_method

        get_method(self.method)  # an unknown name lists the registered ones
        from ..train.loop import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
        from ..cost.keys import BUDGET_NAMES

        unknown = set(self.budget) - set(BUDGET_NAMES)
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)}; use {', '.join(BUDGET_NAMES)}")

    def train_config(self, phase: str):
        """Training settings of one phase: ``float`` warm-up, ``budget`` (the fine-tune after the budget
        step), or a method's ``qat``-style fine-tune."""
        from ..train import TrainConfig

        if phase == "float":
            return TrainConfig(self.float_epochs, self.lr, self.weight_decay, self.batch_size, self.seed, self.optimizer)
        if phase == "budget":
            return TrainConfig(self.budget_epochs, self.qat_lr, self.weight_decay, self.batch_size, self.seed + 2,
                               self.optimizer)
        return TrainConfig(self.qat_epochs, self.qat_lr, self.weight_decay, self.batch_size, self.seed + 1, self.optimizer)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
