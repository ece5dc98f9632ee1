"""Fully differentiable mixed precision (Schaefer et al., arXiv 2206.07741): quantizers that learn a
step ``d`` and a range ``xmax`` per group, with the bit-width implied by the two.

Parameters are ``log2_d`` and ``log2_xmax`` (their shape is the granularity, as HGQ's ``f``), so an
optimiser step is a relative change of ``d`` and ``xmax`` whatever their magnitude. Under ``fixed``
numerics the step is ``d = 2^round(log2_d)`` (straight-through), under ``scaled`` any real.

Implied magnitude bits ``c = ceil(log2(xmax / d + 1))`` (straight-through ceil, ``c >= 1``); the
storage/cost bits are ``b = c + 1`` when signed, ``c`` otherwise, differentiable in both parameters.

Forward: ``q = d * R(clip(x / d, lo, hi))`` with the codes ``[lo, hi]`` of the whole ``b``-bit range
(``hi = 2^c - 1``; signed weights narrow ``lo = -hi``, signed activations ``lo = -2^c``, unsigned
``lo = 0``). Our choice: ``xmax`` enters the forward only through ``c``, i.e. the range is rounded
up to what a ``b``-bit kernel stores, so the values equal ``fake_quant(x, qparams())`` bit for bit
and lowering is exact; ``xmax`` still receives gradient from clipped elements (through ``hi(c)``)
and from the bit cost, both via the straight-through ceil. ``round(clip(u)) == clip(round(u))`` for
integer bounds, so clipping first changes no value and lets the bounds carry the gradient.

``R`` is round half to even with a targeted gradient modification on ``x`` (:class:`ModRound`):
``dR = g * (1 + delta * sign(g) * m(u))``, ``r = u - round(u)``:

* ``ewgs`` (weights): ``m = r`` (element-wise gradient scaling);
* ``atanh`` (activations): ``m = 0.5 / atanh(alpha/2) * atanh(alpha * r)``, ``alpha = 1.9``
  (``m(+-0.5) = +-0.5`` like EWGS, but steeper near the rounding boundaries);
* ``ste``: ``m = 0``.

The step then gets ``dq/dd = round(u) - u * (1 + delta * sign(g) * m(u))`` inside the range (LSQ
when ``m = 0``). :meth:`project` keeps ``d`` in ``[2^-12, d_max]`` and ``d <= xmax``; a training loop
calls it after each optimiser step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..granularity import expand, reduce_to
from .base import (NUMERICS, Frozen, LearnedQuantizer, QParams, broadcastable, ceil_ste, clamp_bounds, needs_weight,
                   reduce_product, round_ste)
from .fixed import freeze_learned_act, frozen_weight_quantizer
from .hgq import _param_shape

GRAD_MODS = ("ewgs", "atanh", "ste")
ALPHA = 1.9
D_MIN = 2.0 ** -12
_EDGE = 2.0 ** -16  # log2 margin that keeps float rounding from adding a bit at initialisation


def grad_modifier(u: torch.Tensor, mode: str, alpha: float = ALPHA) -> torch.Tensor:
    """``m(u)`` of the targeted gradient modification (see the module docstring)."""
    return _modifier_of_error(u - torch.round(u), mode, alpha)


def _modifier_of_error(r: torch.Tensor, mode: str, alpha: float = ALPHA) -> torch.Tensor:
    if mode == "ewgs":
        return r
    if mode == "atanh":
        return (0.5 / math.atanh(alpha / 2)) * torch.atanh(alpha * r)
    if mode == "ste":
        return torch.zeros_like(r)
    raise ValueError(f"unknown grad_mod {mode!r}; supported: {', '.join(GRAD_MODS)}")


def _modifier_of_error_(r: torch.Tensor, mode: str, alpha: float = ALPHA) -> torch.Tensor:
    """:func:`_modifier_of_error` computed in ``r``'s own storage (the fused backward's hot path)."""
    if mode == "ewgs":
        return r
    if mode == "atanh":
        return r.mul_(alpha).atanh_().mul_(0.5 / math.atanh(alpha / 2))
    return _modifier_of_error(r, mode, alpha)


class ModRound(torch.autograd.Function):
    """``round(u)`` (half to even) whose gradient is ``g * (1 + delta * sign(g) * m(u))``."""

    @staticmethod
    def forward(ctx, u, mode: str, delta: float):
        ctx.save_for_backward(u)
        ctx.mode, ctx.delta = mode, delta
        return torch.round(u)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        if ctx.mode == "ste" or ctx.delta == 0:
            return g, None, None
        return g * (1 + ctx.delta * torch.sign(g) * grad_modifier(u, ctx.mode)), None, None


class _DQBase(LearnedQuantizer):
    d_max = 1.0
    max_mag_bits = 15  # plus the sign bit: 16

    def _setup(self, param_shape, numerics: str, grad_mod: str, delta: float) -> None:
        if numerics not in NUMERICS:
            raise ValueError(f"unknown numerics {numerics!r}; supported: {', '.join(NUMERICS)}")
        if grad_mod not in GRAD_MODS:
            raise ValueError(f"unknown grad_mod {grad_mod!r}; supported: {', '.join(GRAD_MODS)}")
        self.param_shape = tuple(param_shape)
        self.numerics, self.grad_mod, self.delta = numerics, grad_mod, float(delta)
        self.log2_d = nn.Parameter(torch.zeros(self.param_shape))
        self.log2_xmax = nn.Parameter(torch.zeros(self.param_shape))

    # -- parameters ------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """The step ``d`` (a power of two under fixed numerics), differentiable in ``log2_d``."""
        e = round_ste(self.log2_d) if self.numerics == "fixed" else self.log2_d
        return torch.exp2(e)

    def xmax(self) -> torch.Tensor:
        return torch.exp2(self.log2_xmax)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp in place: ``d`` in ``[2^-12, d_max]``, ``xmax >= 2^-12``, ``d <= xmax`` and at most
        ``MAX_MAG_BITS`` implied magnitude bits (16-bit codes, the widest any target stores)."""
        self.log2_xmax.clamp_(min=math.log2(D_MIN))
        self.log2_d.clamp_(math.log2(D_MIN), math.log2(self.d_max))
        torch.minimum(self.log2_d, self.log2_xmax, out=self.log2_d)
        top = torch.log2(self.step().detach()) + math.log2(2.0 ** self.max_mag_bits - 1) - _EDGE
        torch.minimum(self.log2_xmax, top.to(self.log2_xmax.dtype), out=self.log2_xmax)

    clamp_ = project

    @torch.no_grad()
    def _init_params(self, xmax: torch.Tensor, c: int) -> None:
        """``d = xmax / (2^c - 1)`` (under fixed numerics the power of two whose ``c``-bit range
        covers ``xmax``), so the implied magnitude bits are ``c`` unless the clamp on ``d`` acts."""
        log2_xmax = torch.log2(xmax.double().clamp_min(1e-8))
        log2_top = math.log2(2.0 ** c - 1)
        log2_d = log2_xmax - log2_top
        if self.numerics == "fixed":
            log2_d = torch.ceil(log2_d)
        self.log2_xmax.copy_(log2_xmax)
        self.log2_d.copy_(log2_d)
        self.project()
        # xmax / d + 1 sits on 2^c: pull xmax a hair below so float rounding cannot make it c + 1
        cap = torch.log2(self.step().double()) + log2_top - _EDGE
        self.log2_xmax.copy_(torch.minimum(self.log2_xmax.double(), cap))
        self.project()

    # -- grid --------------------------------------------------------------------------------
    def _is_signed(self) -> bool:
        raise NotImplementedError

    def _mag_bits(self) -> torch.Tensor:
        """``c = ceil(log2(xmax / d + 1))``, at least 1, straight-through."""
        return ceil_ste(torch.log2(self.xmax() / self.step() + 1)).clamp_min(1)

    def bits(self) -> torch.Tensor:
        """Implied bits ``c + signed`` per group, differentiable in ``log2_d`` and ``log2_xmax``."""
        return self._mag_bits() + float(self._is_signed())

    def frozen_bits(self) -> torch.Tensor:
        return self.bits().detach().round()

    def bits_shape(self) -> tuple[int, ...]:
        return self.param_shape  # an activation's sign waits for its data

    def _codes(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _quantize(self, x: torch.Tensor, value_shape: tuple[int, ...]) -> torch.Tensor:
        d = broadcastable(self.step(), value_shape)
        lo, hi = (broadcastable(t, value_shape) for t in self._codes(self._mag_bits()))
        return _DQFakeQuant.apply(x, d, lo, hi, self.grad_mod, self.delta)


class _DQFakeQuant(torch.autograd.Function):
    """``d * ModRound(clip(x / d, lo, hi))`` in one pass each way (the composed max/min/round form
    spent about a third of a ResNet-8 training step in its backward kernels). ``x`` takes the
    gradient where the clip passes ``x / d`` through, bounds included; a bound takes it only
    strictly beyond itself. (The composed form split a tie half and half: with a learned real step
    a tie is a coincidence, and either side is a valid subgradient.)"""

    @staticmethod
    def forward(ctx, x, d, lo, hi, mode: str, delta: float):
        u = x / d
        uc = torch.clamp(u, *clamp_bounds(lo, hi, u.dtype))
        r = torch.round(uc)
        out = r * d
        # Saved in the storage of the temporaries: the region sign(u - uc) (-1 below the range, 0
        # inside or on a bound, +1 above) and the rounding error uc - r; with r they give every
        # gradient (inside the range u == uc == r + error), so u and uc need not be kept.
        region = u.sub_(uc).sign_()
        error = uc.sub_(r)
        ctx.save_for_backward(region, error, r, d, lo, hi)
        ctx.mode, ctx.delta = mode, delta
        return out

    @staticmethod
    def backward(ctx, g):
        region, error, r, d, lo, hi = ctx.saved_tensors
        need_x, need_d, need_lo, need_hi = ctx.needs_input_grad[:4]
        gm = g  # dq/du = d * dR/du, with dR/du = 1 + delta * sign(g) * m(u): g * dR/du = g + delta * |g| * m
        if ctx.mode != "ste" and ctx.delta != 0:  # m from a copy of the error: the error is still needed
            gm = g.abs().mul_(_modifier_of_error_(error.clone() if ctx.mode != "ewgs" else error, ctx.mode))
            gm = gm.mul_(ctx.delta).add_(g)
        gx = gd = glo = ghi = None
        if need_x or need_d:
            gux = region.abs().neg_().add_(1.0).mul_(gm)  # inside mask times gm; also dq/dx (q = d * R(x / d))
            gx = gux if need_x else None
            if need_d:  # dq/dd = R(u) - u * dR/du where x passes, R(u) where clipped; u = r + error inside
                gd = reduce_product(g - gux, r, d.shape) - reduce_product(gux, error, d.shape)
        if need_lo:
            glo = reduce_product(region.clamp(max=0.0), gm, lo.shape).neg_() * d.reshape(lo.shape)
        if need_hi:
            ghi = reduce_product(region.clamp(min=0.0), gm, hi.shape) * d.reshape(hi.shape)
        return gx, gd, glo, ghi, None, None


class DQWeightQuantizer(_DQBase):
    """Signed, narrow-range weights with learned step and range per group.

    ``granularity``: a name or a parameter shape tiling ``weight_shape``. With ``weight`` each group
    starts at ``xmax = min(|mu| + 3 sigma, max|w|)``, otherwise ``xmax = 1``; ``d`` is set so the
    implied bits are ``init_bits``.
    """

    def __init__(self, weight_shape: tuple[int, ...], granularity="per-channel", init_bits: int = 8,
                 weight: torch.Tensor | None = None, numerics: str = "scaled", grad_mod: str = "ewgs",
                 delta: float = 5e-3):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self._setup(_param_shape(granularity, self.weight_shape), numerics, grad_mod, delta)
        if weight is None:
            xmax = torch.ones(self.param_shape, dtype=torch.float64)
        else:
            w = weight.detach().double()
            mu = reduce_to(w, self.param_shape, "mean")
            sigma = reduce_to((w - expand(mu, self.weight_shape)) ** 2, self.param_shape, "mean").sqrt()
            xmax = torch.minimum(mu.abs() + 3 * sigma, reduce_to(w.abs(), self.param_shape))
        self._init_params(xmax, max(int(init_bits) - 1, 1))

    def _is_signed(self) -> bool:
        return True

    def _codes(self, c):
        hi = torch.exp2(c) - 1
        return -hi, hi

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        return QParams(self.step(), self.bits().detach(), signed=True, narrow=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self.weight_shape)

    @torch.no_grad()
    def frozen_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` clipped to the learned range (the implied width's largest code times ``d``), so a
        fixed quantizer that takes its range from the weights keeps the learned step."""
        top = expand(self.step() * (torch.exp2(self._mag_bits()) - 1), self.weight_shape)
        return torch.minimum(torch.maximum(w.detach(), -top), top)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed quantizer with the implied bits, and ``weight`` clipped to the learned range
        (:meth:`frozen_weight`), so the fixed quantizer (which takes its range from the weights)
        keeps the learned step."""
        weight = needs_weight(type(self).__name__, weight)
        fixed = frozen_weight_quantizer(self.qparams(weight).bits, tuple(weight.shape), numerics or self.numerics)
        return Frozen(fixed, self.frozen_weight(weight))


def _group_quantile(a: torch.Tensor, param_shape: tuple[int, ...], q: float, limit: int = 2 ** 20):
    """``q``-quantile of each group of ``a`` (batch dim first, groups tile the rest) on a strided,
    hence deterministic, subsample of at most about ``limit`` values (``torch.quantile``'s size cap)."""
    shape = tuple(a.shape[1:])
    p = (1,) * (len(shape) - len(param_shape)) + tuple(param_shape)
    split = [a.shape[0]]
    for n, full in zip(p, shape):
        split += [n, full // n]
    groups = list(range(1, 2 * len(shape), 2))
    rest = [0] + list(range(2, 2 * len(shape) + 1, 2))
    v = a.reshape(split).permute(groups + rest).reshape(math.prod(p), -1)
    v = v[:, ::max(1, math.ceil(v.numel() / limit))]
    return torch.quantile(v, q, dim=1).reshape(p)


class DQActQuantizer(_DQBase):
    """Activations with learned step and range per group (``shape``: per sample, no batch dim).

    :meth:`calibrate` sets the signedness (from the observed minimum unless ``signed`` is given) and
    ``xmax`` per group from the 99.9th percentile of ``|x|`` after clamping to ``clip`` (the fused
    activation's bounds), with ``d`` such that the implied bits are ``init_bits``. In training mode an
    uncalibrated quantizer calibrates on the first batch it sees.
    """

    d_max = 8.0

    def __init__(self, shape: tuple[int, ...], granularity="per-tensor", init_bits: int = 8,
                 numerics: str = "scaled", signed: bool | None = None, grad_mod: str = "atanh",
                 delta: float = 5e-3, clip: tuple[float, float] = (float("-inf"), float("inf"))):
        super().__init__()
        self.shape = tuple(shape)
        self.init_bits = int(init_bits)
        self.force_signed = signed
        self.clip = (float(clip[0]), float(clip[1]))
        self._setup(_param_shape(granularity, self.shape), numerics, grad_mod, delta)
        self.register_buffer("signed_flag", torch.tensor(bool(signed)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        v = torch.cat([xb.detach().double().reshape(-1, *self.shape) for xb in batches])
        v = v.clamp(*self.clip)
        signed = bool(v.min() < 0) if self.force_signed is None else bool(self.force_signed)
        self.signed_flag.fill_(signed)
        xmax = _group_quantile(v.abs(), self.param_shape, 0.999)
        self._init_params(xmax, max(self.init_bits - int(signed), 1))
        self.initialized.fill_(True)

    def _check(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError("DQ activation quantizer is not initialised: call calibrate(batches) or run "
                               "a training-mode forward pass first")

    def _is_signed(self) -> bool:
        self._check()
        return self.signed

    def _codes(self, c):
        hi = torch.exp2(c) - 1
        if not self.signed:
            return torch.zeros_like(hi), hi
        return -(hi + 1), hi

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        return QParams(self.step(), self.bits().detach(), signed=self._is_signed())

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A fixed activation quantizer with the implied bits and the learned grid
        (:func:`frozen_act_quantizer`)."""
        return freeze_learned_act(self, weight, numerics, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.calibrate([x])
        self._check()
        return self._quantize(x, self.shape)
