"""The interface every quantizer implements, and the one fake-quantization function they share.

A quantizer maps a real tensor onto a grid ``scale * k`` with integer ``k`` in the range of its
bit-width. ``scale`` and ``bits`` are tensors whose shapes are the granularity (see
:mod:`mixprec.granularity`); search methods differ only in how they produce them (given, learned
step and range, learned fractional bits, a mixture of choices).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..granularity import expand
from ..numerics import qrange

NUMERICS = ("scaled", "fixed")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


@dataclass
class QParams:
    """A quantizer's grid at one moment: ``scale`` and ``bits`` tile the value tensor."""

    scale: torch.Tensor
    bits: torch.Tensor
    signed: bool
    narrow: bool = False

    def full(self, shape: tuple[int, ...]) -> "QParams":
        return QParams(expand(self.scale, shape), expand(self.bits, shape), self.signed, self.narrow)

    def int_range(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = qrange(expand(self.bits.detach().round(), shape), self.signed, self.narrow)
        return lo, hi

    def numpy(self) -> dict:
        return {
            "scale": self.scale.detach().double().cpu().numpy(),
            "bits": self.bits.detach().round().to(torch.int64).cpu().numpy(),
            "signed": self.signed,
            "narrow": self.narrow,
        }


def fake_quant(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``scale * clip(round(x / scale), qmin(bits), qmax(bits))`` with straight-through rounding.

    Gradients reach ``x`` inside the range (zero outside, where clipping is active) and reach
    ``scale`` when it requires grad (LSQ-style). ``bits`` enters only through the clip range.
    """
    # A weight has no batch dimension; an activation has one in front of its quantizer's shape.
    value_shape = tuple(x.shape) if qp.scale.dim() == x.dim() else tuple(x.shape[1:])
    if qp.bits.numel() == 1:  # one range: plain numbers, no range tensors to broadcast
        lo, hi = qrange(int(qp.bits.detach().round()), qp.signed, qp.narrow)
    else:
        lo, hi = (r.to(x.dtype) for r in qrange(expand(qp.bits.detach().round(), value_shape), qp.signed,
                                                 qp.narrow))
    scale = qp.scale if qp.scale.numel() == 1 else expand(qp.scale, value_shape)
    return _FakeQuant.apply(x, scale.to(x.dtype), lo, hi)


def inside_mask(value: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """1.0 where clipping left ``value`` as it was, else 0.0, in float arithmetic: on a CPU the
    compare-and-select form (bool tensors, ``torch.where``) takes 5 to 40 times as long as a float
    pass, and the quantizers' backward passes run one per quantized tensor."""
    return (value - clipped).abs_().sign_().neg_().add_(1.0)


def _pass_x(k: torch.Tensor, lo, hi) -> torch.Tensor:
    """x's straight-through gradient for the rounded codes ``k`` (``k`` is overwritten): 1 inside the
    range, 0 outside, a half on its edges, where clipping ties (as the min/max form always did: the
    largest weight of a channel sits exactly on the edge). As integers, ``r + 1/2 - |k - m|``
    clipped to [0, 1] with the range's middle ``m`` and half-width ``r``: four in-place passes where
    the compare-and-select form took seven with their temporaries."""
    middle, half_width = (lo + hi) / 2, (hi - lo) / 2
    return k.sub_(middle).abs_().neg_().add_(half_width + 0.5).clamp_(0.0, 1.0)


class _FakeQuant(torch.autograd.Function):
    """One fused pass forward and one backward (the composed STE form took about ten kernels
    per quantizer each way, which dominated a small model's training step on a CPU)."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi):
        t = x / scale
        k = torch.round(t)
        kc = torch.clamp(k, lo, hi)
        if ctx.needs_input_grad[1]:  # d(k * s)/ds: k - x/s inside the range, k where clipped
            per_scale = torch.addcmul(kc, t, inside_mask(k, kc), value=-1)  # before _pass_x reuses k
            ctx.save_for_backward(_pass_x(k, lo, hi), per_scale)
        else:
            ctx.save_for_backward(_pass_x(k, lo, hi))
        ctx.scale_shape = scale.shape
        return kc.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        gx = grad * ctx.saved_tensors[0] if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = sum_to_shape(grad * ctx.saved_tensors[1], ctx.scale_shape)
        return gx, gs, None, None


def sum_to_shape(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dims that were broadcast to reach ``g``'s shape."""
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and g.shape[d] != 1)
    return (g.sum(dim=dims, keepdim=True) if dims else g).reshape(shape)


def reduce_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum_to_shape(a * b, shape)``; one dot product when ``shape`` is a single number."""
    if math.prod(shape) == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return sum_to_shape(a * b, shape)


def clamp_bounds(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    """Clamp bounds: plain numbers for one range on a CPU (the tensor form broadcasts a bound per
    element), else tensors in ``dtype``."""
    if lo.numel() == 1 and hi.numel() == 1 and lo.device.type == "cpu":
        return float(lo), float(hi)
    return lo.to(dtype), hi.to(dtype)


def broadcastable(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``param`` shaped to broadcast against ``shape`` (its gradient then sums where it broadcast);
    slices of more than one element along a dim need the full expansion."""
    if all(n in (1, full) for n, full in zip(param.shape[::-1], shape[::-1])):
        return param.reshape((1,) * (len(shape) - param.dim()) + tuple(param.shape))
    return expand(param, shape)


def range_scale(max_abs: torch.Tensor, bits: torch.Tensor, signed: bool, numerics: str,
                narrow: bool = False) -> torch.Tensor:
    """Scale that maps ``max_abs`` onto the largest code of ``bits``; a power of two (rounded up,
    so nothing clips) under fixed-point numerics."""
    _, hi = qrange(bits.detach().round(), signed, narrow)
    scale = max_abs.detach().clamp_min(1e-8) / hi.to(max_abs.dtype).clamp_min(1.0)
    if numerics == "fixed":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale.to(torch.float32)


class Frozen(NamedTuple):
    """What :meth:`Quantizer.freeze` returns: the fixed-bit quantizer, and the float weight a layer
    keeps with it (``None`` for an activation quantizer)."""

    quantizer: Quantizer
    weight: torch.Tensor | None


class Quantizer(nn.Module, metaclass=abc.ABCMeta):
    """The quantizer protocol: every kind implements each capability below, so code elsewhere calls
    them without probing (``hasattr``) for what a kind can do.

    ``forward(x)`` fake-quantizes with straight-through gradients. Weight quantizers derive their
    grid from the weights, so ``qparams``/``freeze`` take them; activation quantizers ignore ``x``.

    =============  ===================  =====================  =======================  =========================
    capability     fixed weights        fixed activations      HGQ, DQ weights          HGQ, DQ activations
    =============  ===================  =====================  =======================  =========================
    bits()         the given bits       the given bits         learned, differentiable  learned, differentiable
    qparams(x)     from x's range       from observed range    the learned grid         the learned grid
    set_bits(b)    sets them            sets them              TypeError: freeze first  TypeError: freeze first
    freeze(...)    a copy               a copy, not observing  FixedWeightQuantizer     ActQuantizer, not observing
    range_rule     "max" or "mse"       "observed"             "learned"                "learned"
    observing      False (no observer)  the running range      False (no observer)      HGQ the running range, DQ False
    output_gate()  None                 None                   None                     None
    =============  ===================  =====================  =======================  =========================

    DNAS weights (:mod:`mixprec.quantizers.dnas`, a mixture over candidate widths) are learned too:
    ``bits()`` the argmax width per group (not differentiable), ``qparams``/``freeze`` the fixed
    quantizer of the argmax (its grid from the weights: ``range_rule`` ``mse`` or ``max``),
    ``set_bits`` a ``TypeError``, no observer, and ``output_gate`` the share of each channel kept.
    DNAS activations (a mixture of PACT quantizers, one learned clip per candidate width) are
    learned like DQ's: ``bits()`` the argmax width, ``qparams``/``freeze`` its candidate's grid.

    ``bits_shape()`` gives the shape of ``bits()`` (the granularity) before any data: HGQ and DQ
    activations' bits need what they observe, their shape does not.

    ``range_rule`` values: ``max`` (each group's largest value onto the largest code), ``mse`` (the
    least-squares scale at 3 bits or fewer, max above), ``observed`` (a running min/max of the data),
    ``learned`` (the grid is a trained parameter: HGQ's fractional bits, DQ's step and range).
    """

    numerics: str = "scaled"

    @abc.abstractmethod
    def bits(self) -> torch.Tensor:
        """The bit-width tensor (its shape is the granularity; differentiable where it is learned)."""

    def bits_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`bits` (the granularity), known before the quantizer has seen data."""
        return tuple(self.bits().shape)

    @abc.abstractmethod
    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        """The grid (``scale``, ``bits``, ``signed``) that integer lowering freezes; weight quantizers
        take the weights ``x``."""

    @abc.abstractmethod
    def set_bits(self, bits) -> None:
        """Set the bits (a tensor tiling :meth:`bits`' shape). Fixed-bit quantizers only: a learned
        quantizer raises ``TypeError`` and must be frozen first (:meth:`freeze`)."""

    @abc.abstractmethod
    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed-bit quantizer (with ``set_bits``) holding this one's current bits and grid, on
        the CPU and not observing, and for a weight quantizer the float weight to keep with it.

        ``weight``: a weight quantizer's weights (an activation quantizer takes none). ``numerics``:
        the model's (default: the quantizer's own). ``clip``: an activation's fused-activation
        bounds, for the fixed observer should it be restarted (default: the quantizer's own)."""

    @property
    @abc.abstractmethod
    def range_rule(self) -> str:
        """How the grid takes its range: ``max``, ``mse``, ``observed`` or ``learned``."""

    @property
    def observing(self) -> bool:
        """Whether training-mode forwards update a running range. False for a quantizer without an
        observer (weights; DQ activations, whose range is a parameter)."""
        return False

    def set_observing(self, on: bool) -> None:
        """Start or stop range tracking; a quantizer without an observer ignores it."""

    def output_gate(self, hard: bool = False) -> torch.Tensor | None:
        """How much of each output channel a weight quantizer keeps, (C_out,): the layer scales its
        bias by it, so a pruned channel goes whole (DNAS: ``1 - P(0 bits)`` in training, 0/1 of the
        argmax when ``hard``). None (every other kind): nothing is gated."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.qparams(x))


class LearnedQuantizer(Quantizer):
    """A quantizer whose bits follow trained parameters (HGQ, DQ): it has no ``set_bits``, its grid
    is ``learned``, and :meth:`freeze` turns it into a fixed-bit one."""

    @property
    def range_rule(self) -> str:
        return "learned"

    def set_bits(self, bits) -> None:
        raise TypeError(f"{type(self).__name__} learns its bits and has no set_bits(): freeze it into a "
                        "fixed-bit quantizer first (quantizer.freeze, or mixprec.search.learned.freeze for a "
                        "model), as the budget step and fine-tuning need")


def no_weight(kind: str, weight) -> None:
    """Refuse a weight given to an activation quantizer's ``freeze`` (``freeze(False)`` once meant
    ``set_observing(True)``)."""
    if weight is not None:
        raise TypeError(f"{kind} freezes without a weight; to start or stop range tracking call set_observing()")


def needs_weight(kind: str, weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{kind}.freeze needs the layer's weight tensor, got {type(weight).__name__}")
    return weight


def as_bits_tensor(bits, shape: tuple[int, ...]) -> torch.Tensor:
    """Accept an int, a list/array or a tensor of bits; check it tiles ``shape``."""
    t = torch.as_tensor(np.asarray(bits), dtype=torch.float32)
    if t.dim() == 0:
        t = t.reshape((1,) * len(shape))
    expand(t, shape)  # raises when it does not tile
    return t
