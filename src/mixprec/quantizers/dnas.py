"""Channel-wise DNAS (Risso et al., IGSC 2022): a weight quantizer that is a mixture over candidate
widths, one distribution per group (output channel, or the whole layer).

Training forward: ``W_hat[g] = sum_p softmax(alpha[g] / T)_p * Q_p(W[g])``, ``Q_p`` the fixed-bit
quantizer at ``p`` bits (straight-through rounding, its grid from the float weight by its range
rule) and ``Q_0 = 0``: a channel at 0 bits is pruned, and ``output_gate`` scales its bias by
``1 - P(0 bits)`` so it goes whole. With ``gumbel`` each training forward draws a hard one-hot
sample (Gumbel-softmax, straight-through to the logits) instead. ``set_forward`` makes training
forwards the argmax model's instead: without a gradient to the logits (to train the weights), or
straight-through (the logits learn from the argmax model).

Everything else is the argmax model: ``bits()`` the argmax width per group, ``qparams``/``freeze``
the fixed quantizer at those bits (the grid its candidate used in training, so ``eval()`` of a
supernet scores its argmax model exactly), ``output_gate(hard=True)`` 0 where pruned. The argmax
never prunes every group of a layer (see :meth:`DNASWeightQuantizer.choice`).

Activations (:class:`DNASActQuantizer`) are a mixture of PACT quantizers, one per candidate width,
each with its own learned clip: ``y = sum_p softmax(beta / T)_p * Q_p(x; clip_p)``; the argmax
width with its clip is the activation grid of the argmax model.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..granularity import shape_for
from ..numerics import qrange
from .base import Frozen, LearnedQuantizer, QParams, ceil_ste, fake_quant, needs_weight
from .fixed import RANGE_RULES, FixedWeightQuantizer, freeze_learned_act, settled_step

GRANULARITIES = ("per-channel", "per-tensor")
FORWARD_MODES = ("mixture", "argmax", "straight-through")


class _Choice(LearnedQuantizer):
    """Logits ``alpha`` of shape (G, P): one distribution per group over the ascending ``widths``."""

    def _setup_choice(self, groups: int, widths: Sequence[int], temperature: float, gumbel: bool) -> None:
        self.widths = tuple(sorted(int(w) for w in widths))
        if len(set(self.widths)) != len(self.widths) or not any(w > 0 for w in self.widths):
            raise ValueError(f"candidate widths {self.widths}: distinct, at least one above 0")
        self.gumbel = bool(gumbel)
        self.forward_mode = "mixture"  # what training forwards weigh the candidates by (set_forward)
        self.alpha = nn.Parameter(torch.zeros(groups, len(self.widths)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def set_temperature(self, t: float) -> None:
        self.temperature.fill_(float(t))

    def set_forward(self, mode: str) -> None:
        """What training forwards weigh the candidates by: ``mixture`` (the softmax, or a Gumbel
        draw), ``argmax`` (one-hot, no gradient to the logits: to train the weights of the model the
        search would return now) or ``straight-through`` (the argmax one-hot forward, the softmax's
        gradient to the logits: each logit learns what its candidate would change in the argmax
        model, not in a mixture no width choice gives)."""
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward mode {mode!r}: choose one of {', '.join(FORWARD_MODES)}")
        self.forward_mode = mode

    def probabilities(self) -> torch.Tensor:
        """(G, P) softmax of ``alpha / T``: what the expected cost weighs."""
        return torch.softmax(self.alpha / self.temperature, dim=1)

    def mixture(self) -> torch.Tensor:
        """The weights of one training forward (``set_forward``): the probabilities or a hard
        Gumbel-softmax draw, or the argmax one-hot (with the probabilities' gradient when
        straight-through)."""
        if self.forward_mode != "mixture":
            one_hot = F.one_hot(self.choice(), len(self.widths)).to(self.alpha.dtype)
            if self.forward_mode == "argmax":
                return one_hot
            p = self.probabilities()
            return one_hot + (p - p.detach())
        if self.gumbel:
            return F.gumbel_softmax(self.alpha, tau=float(self.temperature), hard=True, dim=1)
        return self.probabilities()

    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        """(G,) the argmax candidate index per group, ties to the wider width."""
        return (len(self.widths) - 1) - torch.argmax(self.alpha.flip(1), dim=1)

    def _bits_of(self, choice: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        widths = torch.tensor(self.widths, dtype=torch.float32, device=self.alpha.device)
        return widths[choice].reshape(shape)


class DNASWeightQuantizer(_Choice):
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
        self._setup_choice(self.param_shape[0], widths, temperature, gumbel)
        if 0 in self.widths and self.param_shape[0] != self.weight_shape[0]:
            raise ValueError("0 bits (pruning) is a candidate only per output channel")
        self.numerics, self._range_rule = numerics, range_rule
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

    # -- the distribution ----------------------------------------------------------------------------
    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        """(G,) the argmax candidate index per group, ties to the wider width. Where every group
        would be pruned, the group with the strongest non-zero logit keeps its best width: a layer
        of zeros cuts the network."""
        idx = super().choice()
        if self.prunes and bool((idx == 0).all()):
            best, width = self.alpha[:, 1:].max(1)
            g = int(torch.argmax(best))
            idx[g] = int(width[g]) + 1
        return idx

    def bits(self) -> torch.Tensor:
        return self._bits_of(self.choice(), self.param_shape)

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


class DNASActQuantizer(_Choice):
    """An activation of (per-sample) ``shape`` at one width per tensor drawn from ``widths``: a
    mixture of PACT quantizers, candidate ``p`` clipping to ``[0, clip_p]`` (``[-clip_p, clip_p]``
    for a signed tensor) on ``2^p`` codes, its clip a trained parameter (straight-through, with the
    rounding term LSQ adds). The first training forward (``calibrate``) sets the signedness and
    each candidate's clip to the one of least squared error on that batch."""

    def __init__(self, shape: tuple[int, ...], widths: Sequence[int], numerics: str = "scaled",
                 clip: tuple[float, float] = (float("-inf"), float("inf")), temperature: float = 1.0,
                 gumbel: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        self._setup_choice(1, widths, temperature, gumbel)
        if 0 in self.widths:
            raise ValueError("an activation keeps at least 1 bit: 0 is not an activation width")
        self.numerics = numerics
        self.clip = (float(clip[0]), float(clip[1]))
        self.clip_value = nn.Parameter(torch.ones(len(self.widths)))
        self.register_buffer("signed_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag)

    def _top_codes(self) -> torch.Tensor:
        widths = torch.tensor(self.widths, dtype=torch.float64, device=self.clip_value.device)
        return qrange(widths, self.signed)[1].to(torch.float32)

    def scales(self) -> torch.Tensor:
        """(P,) each candidate's step: its clip over its largest code (a power of two, rounded up,
        under fixed-point numerics)."""
        scale = self.clip_value.abs().clamp_min(1e-8) / self._top_codes()
        return torch.exp2(ceil_ste(torch.log2(scale))) if self.numerics == "fixed" else scale

    def _candidate(self, k: int, scale: torch.Tensor) -> QParams:
        ones = (1,) * len(self.shape)
        return QParams(scale[k].reshape(ones), torch.full(ones, float(self.widths[k]), device=scale.device),
                       self.signed)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Signedness from the observed minimum, each clip of least squared error on a grid of
        fractions of the largest observed magnitude (values clamped to the fused activation's)."""
        v = torch.cat([xb.detach().float().reshape(-1) for xb in batches]).clamp(*self.clip)
        v = v[::max(1, v.numel() // 2 ** 18)]  # a strided, deterministic subsample
        self.signed_flag.fill_(bool(v.min() < 0))
        top = float(v.abs().max().clamp_min(1e-8))
        codes = self._top_codes()
        for k in range(len(self.widths)):
            best = min((float(torch.mean((fake_quant(v, self._grid(top * f / float(codes[k]), k)) - v) ** 2)), f)
                       for f in torch.linspace(0.05, 1.0, 40).tolist())[1]
            self.clip_value[k] = top * best
        self.initialized.fill_(True)

    def _grid(self, scale: float, k: int) -> QParams:
        return QParams(torch.tensor(scale), torch.tensor(float(self.widths[k])), self.signed)

    def _check(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError("DNAS activation quantizer is not initialised: call calibrate(batches) or run a "
                               "training-mode forward pass first")

    def bits(self) -> torch.Tensor:
        return self._bits_of(self.choice(), (1,) * len(self.shape))

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        """The argmax candidate's grid (what the argmax model lowers to), its step as the frozen
        quantizer will hold it (:func:`~mixprec.quantizers.fixed.settled_step`)."""
        self._check()
        qp = self._candidate(int(self.choice()[0]), self.scales())
        if self.numerics == "fixed":  # a power of two round-trips as it is
            return qp
        return QParams(settled_step(qp.scale, qp.bits, qp.signed), qp.bits, qp.signed)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed activation quantizer at the argmax width and its candidate's learned grid."""
        return freeze_learned_act(self, weight, numerics, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.calibrate([x])
        self._check()
        if not self.training:
            return fake_quant(x, self.qparams())
        pi, scale = self.mixture()[0], self.scales()
        out = pi[0] * fake_quant(x, self._candidate(0, scale))
        for k in range(1, len(self.widths)):
            out = out + pi[k] * fake_quant(x, self._candidate(k, scale))
        return out
