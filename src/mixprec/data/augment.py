"""Batched training augmentations: whole-batch tensor ops, no per-sample Python loop.

An augmentation is ``fn(x, generator) -> x`` (see :attr:`Splits.augment`). Random numbers come
from the CPU ``generator`` and are then moved to ``x.device``, so a run is reproducible
whatever device it trains on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``x`` (N, C, H, W) by ``padding``, crop each sample back to H x W at its
    ``offsets[n] = (dy, dx)`` (0..2*padding) and mirror it left-right where ``flips[n]``."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (N, H) source rows in padded
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], w - 1 - cols, cols)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices split by the channel slice put their dims first: (N, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class RandomCropFlip:
    """The standard CIFAR augmentation: a random shift of up to ``padding`` pixels (zero fill,
    which after normalisation is the dataset mean) and a random horizontal flip, per sample.
    A dataclass rather than a closure so that it pickles and prints."""

    padding: int = 4

    def __post_init__(self):
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"random_crop_flip expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        n = x.shape[0]
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n,), generator=generator).bool()
        return crop_flip(x, offsets.to(x.device), flips.to(x.device), self.padding)


def random_crop_flip(padding: int = 4) -> Augment:
    """See :class:`RandomCropFlip`."""
    return RandomCropFlip(padding)
