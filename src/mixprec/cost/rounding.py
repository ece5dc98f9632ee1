"""Straight-through rounding used by the cost models: exact in the forward pass, a smooth
surrogate gradient in the backward pass.

Every cost function rounds the way the deployed artifact does (bits up to a storage container,
bits up to whole bytes, offsets up to an alignment) and passes the gradient of the unrounded value
(identity) through the rounding, so a cost stays usable in a loss.

>>> import torch
>>> b = torch.tensor([0.0, 1.0, 3.0, 4.0, 5.5], requires_grad=True)
>>> snap_up_ste(b, (2, 4, 8)).tolist()
[0.0, 2.0, 4.0, 4.0, 8.0]
>>> snap_up(3, (2, 4, 8))
4
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-6  # bits within EPS above a supported width count as that width (float noise)


def ste(exact: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``exact`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return surrogate + (exact - surrogate).detach()


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """``ceil(x)`` forward, identity gradient (``ceil(x - EPS)`` so float noise does not add a byte)."""
    return ste(torch.ceil(x - EPS).clamp_min(0.0), x)


def align_up_ste(x: torch.Tensor, alignment: int) -> torch.Tensor:
    """``x`` rounded up to a multiple of ``alignment`` (forward), identity gradient."""
    if alignment <= 1:
        return ste_ceil(x)
    return ste(torch.ceil(x / alignment - EPS).clamp_min(0.0) * alignment, x)


def snap_up_ste(bits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """The smallest width in ``allowed`` that holds ``bits`` (0 or less -> 0), identity gradient.

    Bits above the largest allowed width are kept at ``ceil(bits)`` (no supported width holds them;
    a budget or the target check reports that, the cost model does not fail in the middle of training).
    """
    return ste(_snap_up_exact(bits.detach(), allowed), bits)


def _snap_up_exact(bits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    widths = torch.tensor(sorted(w for w in allowed if w > 0), dtype=bits.dtype, device=bits.device)
    idx = torch.bucketize(bits - EPS, widths)
    snapped = widths[idx.clamp_max(len(widths) - 1)]
    snapped = torch.where(idx >= len(widths), torch.ceil(bits - EPS), snapped)
    return torch.where(bits <= EPS, torch.zeros_like(bits), snapped)


def snap_up(bits: float, allowed: Sequence[int]) -> int:
    """Python-number version of ``snap_up_ste``: smallest allowed width >= ``bits`` (0 -> 0).

    >>> snap_up(5, (2, 4, 8)), snap_up(0, (2, 4, 8)), snap_up(12, (2, 4, 8))
    (8, 0, 12)
    """
    return int(_snap_up_exact(torch.tensor([float(bits)], dtype=torch.float64), allowed).item())
