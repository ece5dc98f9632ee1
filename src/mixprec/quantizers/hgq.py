"""HGQ: fixed-point quantizers with trainable fractional bits (Sun et al., arXiv 2405.00645).

``q(x) = round(x * 2^f) / 2^f``, saturated to the integer bits. ``f`` is a real trainable tensor
whose shape is the granularity (per element, per channel, per tensor, ...); the forward pass uses
``round(f)`` (straight-through). Gradients:

* wrt ``x``: straight-through inside the representable range, zero where saturation is active;
* wrt ``f``: the surrogate ``dq/df = -ln(2) * (q(x) - x)`` (the error halves with each extra
  fractional bit), implemented by :class:`HGQRound`; the gradient reaching a group's ``f`` is
  scaled by ``1 / sqrt(group size)``.

Integer bits (no gradient): weights take ``I = floor(log2 max|q(w)|) + 1`` per group from their
own quantized values, so they never saturate; activations take them from a running min/max per
group (``calibrate``/``set_observing`` control the observer). ``f`` may go negative: values smaller
than half a step round to zero, and a group whose ``I + f <= 0`` is pruned.

Bits reported by ``bits()`` are storage bits, what the cost model counts (differentiable in
``f``): weights ``relu(I + f)`` magnitude bits plus a sign bit unless pruned (HGQ's own figure, the
magnitude bits, is :meth:`HGQWeightQuantizer.magnitude_bits`); activations ``relu(I + f)`` where
``I`` includes a sign bit unless the observed range is non-negative.

``qparams()`` expresses the grid as power-of-two scales ``2^-round(f)`` (one per group) and storage
bits (sign included), which is what :mod:`mixprec.lower` consumes for ``fixed`` numerics, so the
fake-quantized values equal ``fake_quant(x, qparams())`` and lowering stays exact. The returned
scale carries gradient to ``f``: ``fake_quant``'s LSQ-style scale gradient times
``d(2^-f)/df = -ln2 * 2^-f`` is exactly the HGQ surrogate inside the range, so a
:class:`~mixprec.nn.model.QuantModel` (which applies ``fake_quant(weight, qparams)``) trains ``f``
the same way as :meth:`HGQWeightQuantizer.forward`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..granularity import check_compatible, expand, reduce_to, shape_for
from ..numerics import qrange
from .base import (Frozen, LearnedQuantizer, QParams, broadcastable, clamp_bounds, needs_weight, no_weight,
                   reduce_product)
from .fixed import frozen_act_quantizer, frozen_weight_quantizer

LN2 = math.log(2.0)
_TINY = 2.0 ** -126


class HGQRound(torch.autograd.Function):
    """``clip(round(x * 2^f), lo, hi) / 2^f`` with STE for ``x`` (inside the range) and the HGQ
    surrogate ``dq/df = -ln(2) * (q - x)`` for ``f``. ``f`` must hold integers (already rounded)
    and broadcast onto ``x``; ``lo``/``hi`` are integer code bounds broadcasting onto ``x``.

    Each pass over ``x`` is memory-bound on a CPU, so the forward allocates two tensors (the
    codes, reused for the mask, and ``q``) and saves the mask and the error ``q - x``; the
    backward is one product for ``x`` and one reduction for ``f`` (a dot product when ``f`` is one
    number), with ``-ln 2`` applied to the reduced gradient."""

    @staticmethod
    def forward(ctx, x, f, lo, hi):
        step = torch.exp2(-f.to(x.dtype))
        k = torch.div(x, step).round_()
        q = torch.clamp(k, *clamp_bounds(lo, hi, x.dtype))
        inside = k.sub_(q).abs_().sign_().neg_().add_(1.0)  # inside_mask(k, q), in k's storage
        q.mul_(step)
        ctx.save_for_backward(inside, q - x if ctx.needs_input_grad[1] else None)
        ctx.f_shape = f.shape
        return q

    @staticmethod
    def backward(ctx, grad):
        inside, error = ctx.saved_tensors
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gf = None
        if ctx.needs_input_grad[1]:
            gf = reduce_product(grad, error, ctx.f_shape).mul_(-LN2)
        return gx, gf, None, None


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``factor``."""
    return t.detach() + (t - t.detach()) * factor


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


def _param_shape(granularity, value_shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(granularity, str):
        return shape_for(granularity, value_shape)
    shape = tuple(int(n) for n in granularity)
    shape = (1,) * (len(value_shape) - len(shape)) + shape
    check_compatible(shape, value_shape)
    return shape


def _int_bits(max_abs: torch.Tensor) -> torch.Tensor:
    """``floor(log2 m) + 1`` (bits left of the binary point that cover ``m``); very negative where
    ``m == 0`` so the group counts as pruned."""
    return torch.floor(torch.log2(max_abs.clamp_min(_TINY))) + 1


class _HGQBase(LearnedQuantizer):
    numerics = "fixed"

    def _init_f(self, param_shape, init_f) -> None:
        self.param_shape = tuple(param_shape)
        f0 = torch.as_tensor(init_f, dtype=torch.float32)
        self.f = nn.Parameter(torch.broadcast_to(f0, self.param_shape).clone())

    @property
    def group_size(self) -> int:
        return math.prod(self.value_shape) // math.prod(self.param_shape)

    def bits_shape(self) -> tuple[int, ...]:
        return self.param_shape  # an activation's integer bits wait for its observed range

    def f_int(self) -> torch.Tensor:
        """``round(f)`` with straight-through gradient scaled by ``1/sqrt(group size)``."""
        return _round_ste(scale_grad(self.f, 1.0 / math.sqrt(self.group_size)))

    def set_f(self, f) -> None:
        with torch.no_grad():
            self.f.copy_(torch.broadcast_to(torch.as_tensor(f, dtype=self.f.dtype), self.param_shape))


class HGQWeightQuantizer(_HGQBase):
    """Signed fixed-point weights with trainable fractional bits ``f`` (shape = granularity).

    ``granularity``: a name (``per-element``, ``per-channel``, ``per-slice``, ``per-tensor``) or a
    parameter shape tiling ``weight_shape``. ``init_bits``: the initial fractional bits ``f``
    unless ``weight`` is given, in which case ``f`` starts at ``init_bits - I(weight)`` per group
    so every group starts with about ``init_bits`` magnitude bits. ``init_f`` overrides both.
    """

    def __init__(self, weight_shape: tuple[int, ...], granularity="per-element", init_bits: float = 8,
                 weight: torch.Tensor | None = None, init_f=None):
        super().__init__()
        self.weight_shape = self.value_shape = tuple(weight_shape)
        shape = _param_shape(granularity, self.weight_shape)
        if init_f is None:
            if weight is not None:
                max_abs = reduce_to(weight.detach().abs().float(), shape)
                init_f = float(init_bits) - _int_bits(max_abs).clamp_min(-30)
            else:
                init_f = float(init_bits)
        self._init_f(shape, init_f)
        self._weight_ref: torch.Tensor | None = None  # the weights last seen (see last_weight)

    def _codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rounded ``f`` (param shape, STE) and the integer bits ``I`` per group (no gradient)."""
        f = self.f_int()
        step = expand(torch.exp2(-f.detach()), self.weight_shape)
        qmax = reduce_to((torch.round(w.detach() / step) * step).abs(), self.param_shape)
        return f, _int_bits(qmax)

    def _mag_bits(self, w: torch.Tensor) -> torch.Tensor:
        f, i = self._codes(w)
        return torch.relu(i + f)

    def magnitude_bits(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """HGQ's bits ``relu(I + f)`` per group (no sign bit; 0 = pruned); differentiable in ``f``.
        ``I`` comes from the weights: pass them, or the last weights seen by ``forward``/``qparams``."""
        w = self._seen_weight() if w is None else w
        return self._mag_bits(w)

    def bits(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Storage bits per group: magnitude bits plus the sign bit, 0 where pruned; the gradient
        is that of the magnitude bits."""
        mag = self.magnitude_bits(w)
        return mag + (mag.detach() > 0).to(mag.dtype)

    def last_weight(self) -> torch.Tensor | None:
        """The weights (detached) the last ``forward``/``qparams`` saw, which ``bits()`` without
        weights takes the integer bits from; ``None`` before any."""
        return self._weight_ref

    def _seen_weight(self) -> torch.Tensor:
        if self._weight_ref is None:
            raise RuntimeError("HGQWeightQuantizer.bits() needs the weights once: call forward/qparams "
                               "or pass them")
        return self._weight_ref

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        w = self._seen_weight() if x is None else x
        self._weight_ref = w.detach()
        f, i = self._codes(w)
        mag = torch.relu(i + f.detach())
        storage = torch.where(mag > 0, mag + 1, torch.zeros_like(mag))  # sign bit, narrow range
        return QParams(torch.exp2(-f), storage, signed=True, narrow=True)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed quantizer with the storage bits of ``weight``, and the weight as it is. The fixed
        grid takes each group's max range: under fixed numerics the learned power of two (the
        largest code covers ``max|w|``), under scaled numerics the learned step or finer."""
        weight = needs_weight(type(self).__name__, weight)
        bits = self.qparams(weight).bits
        return Frozen(frozen_weight_quantizer(bits, tuple(weight.shape), numerics or self.numerics), weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.qparams(x)
        lo, hi = qrange(expand(qp.bits, self.weight_shape), True, True)
        f_full = expand(-torch.log2(qp.scale), self.weight_shape)
        return HGQRound.apply(x, f_full, lo, hi)


class HGQActQuantizer(_HGQBase):
    """Fixed-point activations with trainable fractional bits and integer bits from a running
    min/max per group of ``f`` (over the batch and the group's elements).

    ``shape``: the per-sample activation shape. ``signed``: ``None`` follows the observed minimum
    (a non-negative tensor, e.g. after ReLU, gets no sign bit), ``True``/``False`` forces it.
    ``momentum``: ``None`` keeps the extreme values seen since the last ``reset_range()`` (HGQ),
    a float uses an exponential moving average. :meth:`set_observing` stops or restarts observing.
    """

    def __init__(self, shape: tuple[int, ...], granularity="per-tensor", init_bits: float = 6,
                 signed: bool | None = None, momentum: float | None = None, init_f=None):
        super().__init__()
        self.shape = self.value_shape = tuple(shape)
        self.force_signed = signed
        self.momentum = momentum
        self._observing = True
        self.margin_bits = 0
        p = _param_shape(granularity, self.shape)
        self._init_f(p, float(init_bits) if init_f is None else init_f)
        self.register_buffer("running_min", torch.zeros(p))
        self.register_buffer("running_max", torch.zeros(p))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    # -- range observer --------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        return self._observing

    def set_observing(self, on: bool) -> None:
        self._observing = bool(on)

    def reset_range(self) -> None:
        self.observed.fill_(False)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        v = x.detach().float()
        lo = reduce_to(v.amin(0), self.param_shape, "amin")
        hi = reduce_to(v.amax(0), self.param_shape, "amax")
        if not bool(self.observed):
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.observed.fill_(True)
        elif self.momentum is None:
            torch.minimum(self.running_min, lo, out=self.running_min)
            torch.maximum(self.running_max, hi, out=self.running_max)
        else:
            self.running_min.lerp_(lo, self.momentum)
            self.running_max.lerp_(hi, self.momentum)

    @torch.no_grad()
    def calibrate(self, batches, margin_bits: int = 0) -> None:
        """Reset the range, observe ``batches`` (tensors of activations), then stop observing.
        ``margin_bits`` extra integer bits are kept via :attr:`margin_bits`."""
        self.reset_range()
        for xb in batches:
            self.observe(xb)
        self.margin_bits = int(margin_bits)
        self.set_observing(False)

    @property
    def signed(self) -> bool:
        if self.force_signed is not None:
            return bool(self.force_signed)
        return bool((self.running_min < 0).any())

    # -- grid ------------------------------------------------------------------------------
    def _int_bits(self, f: torch.Tensor) -> torch.Tensor:
        """Integer bits per group (sign bit included when signed), from the quantized range."""
        if not bool(self.observed):
            raise RuntimeError("HGQ activation quantizer has not observed any data: run a calibration "
                               "pass or a training step first")
        step = torch.exp2(-f.detach())
        hi = torch.round(self.running_max.clamp_min(0) / step) * step
        lo = torch.round(self.running_min.clamp_max(0) / step) * step
        i = _int_bits(hi)  # codes k_hi < 2^(I + f)
        if self.signed:  # codes in [-2^(b-1), 2^(b-1) - 1]: |k_lo| <= 2^(b-1), plus the sign bit
            i_neg = torch.ceil(torch.log2((-lo).clamp_min(_TINY)))
            i = torch.maximum(i, i_neg) + 1
        return i + self.margin_bits

    def range_int_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(I, seen)`` per group: the integer bits of the observed range itself (no rounding to a
        grid), and whether the group has seen anything but zeros (where ``I`` means nothing)."""
        seen = torch.maximum(self.running_max.abs(), self.running_min.abs()) > 0
        return self._int_bits(torch.full_like(self.f, 24.0)), seen

    def bits(self) -> torch.Tensor:
        """Cost bits ``relu(I + f)`` per group (sign included when signed); differentiable in ``f``."""
        f = self.f_int()
        return torch.relu(self._int_bits(f) + f)

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        f = self.f_int()
        storage = torch.relu(self._int_bits(f) + f.detach())
        return QParams(torch.exp2(-f), storage, signed=self.signed)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed activation quantizer with the learned bits and grid (:func:`frozen_act_quantizer`)."""
        no_weight(type(self).__name__, weight)
        clip = (float("-inf"), float("inf")) if clip is None else clip
        return Frozen(frozen_act_quantizer(self.qparams(), self.shape, numerics or self.numerics, clip), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self._observing:
            self.observe(x)
        qp = self.qparams()
        lo, hi = qrange(broadcastable(qp.bits, self.shape), qp.signed)
        return HGQRound.apply(x, broadcastable(-torch.log2(qp.scale), self.shape), lo, hi)
