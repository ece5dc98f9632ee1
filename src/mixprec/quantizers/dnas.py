"""Channel-wise DNAS (Risso et al., IGSC 2022): a weight quantizer that is a mixture over candidate
widths, one distribution per group (output channel, or the whole layer).

Training forward: ``W_hat[g] = sum_p softmax(alpha[g] / T)_p * Q_p(W[g])``, ``Q_p`` the fixed-bit
quantizer at ``p`` bits (straight-through rounding, its grid from the float weight by its range
rule) and ``Q_0 = 0``: a channel at 0 bits is pruned, and ``output_gate`` scales its bias by
``1 - P(0 bits)`` so it goes whole. With ``gumbel`` each training forward draws a hard one-hot
sample (Gumbel-softmax, straight-through to the logits) instead.

Everything else is the argmax model: ``bits()`` the argmax width per group, ``qparams``/``freeze``
the fixed quantizer at those bits (the grid its candidate used in training, so ``eval()`` of a
supernet scores its argmax model exactly), ``output_gate(hard=True)`` 0 where pruned. The argmax
never prunes every group of a layer (see :meth:`DNASWeightQuantizer.choice`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..granularity import shape_for
from .base import Frozen, LearnedQuantizer, QParams, needs_weight
from .fixed import RANGE_RULES, FixedWeightQuantizer

GRANULARITIES = ("per-channel", "per-tensor")


class DNASWeightQuantizer(LearnedQuantizer):
    """Logits ``alpha`` of shape (G, P) over the ascending candidate ``widths`` (0 = pruned, only
    where each group is one output channel) for a weight of ``weight_shape``."""

    def __init__(self, weight_shape: tuple[int, ...], widths: Sequence[int], granularity: str = "per-channel",
                 numerics: str = "scaled", range_rule: str = "mse", temperature: float = 1.0, gumbel: bool = False):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"DNAS weights are {' or '.join(GRANULARITIES)}, not {granularity!r}")
        if range_rule not in RANGE_RULES:
            raise ValueError(f"range_rule {range_rule!r}: choose one of {', '.join(RANGE_RULES)}")
        self.weight_shape = tuple(weight_shape)
        self.param_shape = shape_for(granularity, self.weight_shape)
        self.widths = tuple(sorted(int(w) for w in widths))
        if len(set(self.widths)) != len(self.widths) or not any(w > 0 for w in self.widths):
            raise ValueError(f"candidate widths {self.widths}: distinct, at least one above 0")
        if 0 in self.widths and self.param_shape[0] != self.weight_shape[0]:
            raise ValueError("0 bits (pruning) is a candidate only per output channel")
        self.numerics, self.gumbel, self._range_rule = numerics, bool(gumbel), range_rule
        self.alpha = nn.Parameter(torch.zeros(self.param_shape[0], len(self.widths)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.candidates = nn.ModuleList(self._fixed(torch.full(self.param_shape, float(w)))
                                        for w in self.widths if w > 0)
        self._draw: torch.Tensor | None = None  # the last training forward's mixture, until its gate takes it

    def _fixed(self, bits: torch.Tensor) -> FixedWeightQuantizer:
        return FixedWeightQuantizer(self.weight_shape, bits.detach().cpu(), self.numerics, self._range_rule)

    @property
    def range_rule(self) -> str:
        return self._range_rule  # the grid comes from the weights, as the fixed quantizer's does

    @property
    def prunes(self) -> bool:
        return self.widths[0] == 0

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(float(t))

    # -- the distribution ----------------------------------------------------------------------------
    def probabilities(self) -> torch.Tensor:
        """(G, P) softmax of ``alpha / T``: what the expected cost weighs."""
        return torch.softmax(self.alpha / self.temperature, dim=1)

    def mixture(self) -> torch.Tensor:
        """The weights of one training forward: the probabilities, or a hard Gumbel-softmax draw."""
        if self.gumbel:
            return F.gumbel_softmax(self.alpha, tau=float(self.temperature), hard=True, dim=1)
        return self.probabilities()

    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        """(G,) the argmax candidate index per group, ties to the wider width. Where every group
        would be pruned, the group with the strongest non-zero logit keeps its best width: a layer
        of zeros cuts the network."""
        p = len(self.widths)
        idx = (p - 1) - torch.argmax(self.alpha.flip(1), dim=1)
        if self.prunes and bool((idx == 0).all()):
            best, width = self.alpha[:, 1:].max(1)
            g = int(torch.argmax(best))
            idx[g] = int(width[g]) + 1
        return idx

    def bits(self) -> torch.Tensor:
        widths = torch.tensor(self.widths, dtype=torch.float32, device=self.alpha.device)
        return widths[self.choice()].reshape(self.param_shape)

    def pruned(self) -> torch.Tensor:
        """(G,) bool: the groups the argmax prunes."""
        return self.bits().reshape(-1) == 0

    # -- the quantizer -------------------------------------------------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        pi = self.mixture()
        self._draw = pi
        out = torch.zeros_like(w)
        nonzero = [k for k, width in enumerate(self.widths) if width > 0]
        for k, q in zip(nonzero, self.candidates):
            out = out + pi[:, k].reshape(self.param_shape) * q(w)
        return out

    def output_gate(self, hard: bool = False) -> torch.Tensor | None:
        if not self.prunes:
            return None
        if hard:
            return (~self.pruned()).float()
        # the draw of the forward just before (a Gumbel sample must gate its own bias), taken once
        pi, self._draw = self._draw, None
        if pi is None or not self.training:
            pi = self.probabilities()
        return 1.0 - pi[:, 0]

    def argmax_quantizer(self) -> FixedWeightQuantizer:
        """The fixed quantizer of the argmax model (0 bits where pruned), on the logits' device."""
        return self._fixed(self.bits()).to(self.alpha.device)

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        return self.argmax_quantizer().qparams(x)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """The argmax model's fixed quantizer and the weight as it is (the grid came from it). The
        layer's bias is the caller's: it takes ``output_gate(hard=True)``."""
        weight = needs_weight(type(self).__name__, weight)
        fixed = FixedWeightQuantizer(self.weight_shape, self.bits().detach().cpu(), numerics or self.numerics,
                                     self._range_rule)
        return Frozen(fixed, weight.detach())
