"""Quantizers with given bit-widths: weights scaled from their own range, activations from a
running range observer. The uniform baseline uses them, and every search method freezes its
result into them for fine-tuning and export."""
from __future__ import annotations

import torch
from torch import nn

from ..granularity import expand, granularity_of, reduce_to
from ..numerics import qrange, zero_bit_groups_allowed
from .base import Frozen, QParams, Quantizer, as_bits_tensor, needs_weight, no_weight, range_scale


def _scale_group_shape(bits_shape: tuple[int, ...], value_shape: tuple[int, ...], numerics: str) -> tuple[int, ...]:
    """Range is measured per bits group. Scaled numerics have one real scale per channel at most,
    so finer bits share their channel's range there; fixed-point grids may differ per element
    (aligning powers of two is exact), so each element gets the finest step its bits can hold,
    which is HGQ's per-weight grid."""
    if numerics == "scaled" and granularity_of(bits_shape, value_shape) == "per-element":
        return (value_shape[0],) + (1,) * (len(value_shape) - 1)
    return tuple(bits_shape)


# The "mse" range rule's candidates: fractions of the max-abs range (scaled numerics), and how many
# powers of two below the step that holds the max-abs value (fixed numerics)
MSE_FRACTIONS = tuple(round(1 - 0.05 * i, 2) for i in range(15))  # 1.0 .. 0.3
MSE_POW2_STEPS = 4
# Wider groups keep the max-abs range under "mse" too: there clipping saves little rounding error,
# and a clipped weight gets no straight-through gradient, so the largest weights stop learning (a
# uniform 4-bit ResNet-8 lost 1.6 points when every width took least-squares ranges, one seed)
MSE_MAX_BITS = 3
RANGE_RULES = ("max", "mse")
# An activation observer at this width or narrower tracks each batch's least-squares clip instead of
# its max: a ReLU output's rare large values set the max, and at 2 bits the grid {0, max/3, ...}
# then rounds most activations to 0 (RL candidates on ResNet-8 at 2-bit activations scored 25%)
ACT_FIT_MAX_BITS = 4
ACT_FIT_SAMPLES = 1 << 14  # the values of a batch the clip's error is measured on (strided)


class FixedWeightQuantizer(Quantizer):
    """Symmetric signed weights with given bits (any granularity).

    Scaled numerics: one real scale per bits group (per channel at most), so integer kernels see
    one scale per output channel. Fixed numerics: power-of-two scales, which may differ per
    element since aligning powers of two is exact.

    ``range_rule``: ``"max"`` maps each group's largest |weight| onto the largest code (a learned
    grid frozen into the weights keeps its step); ``"mse"`` does too above ``MSE_MAX_BITS``, and at
    that width and below takes, of the max range and smaller candidates, the scale with the least
    squared error per group. At 2 bits the max rule rounds every weight under half the largest to
    zero (and a power of two rounded up, more), which cost a uniform 2-bit digits CNN on
    fpga-hls4ml 72 points.

    A quantizer may *hold* its grid (:meth:`hold`): each group keeps a given scale for as long as
    its bits stay what they were when held, and a group whose bits change takes its range from its
    weights again. Channel pruning holds the grid of a row whose range a removed column set
    (:mod:`mixprec.prune`), so the kept weights keep their integers; the held grid is part of the
    state dict, and a checkpoint restores it where it was held.
    """

    def __init__(self, weight_shape: tuple[int, ...], bits, numerics: str = "scaled", range_rule: str = "max",
                 held_scale: torch.Tensor | None = None):
        super().__init__()
        if range_rule not in RANGE_RULES:
            raise ValueError(f"range_rule {range_rule!r}: choose one of {', '.join(RANGE_RULES)}")
        self.weight_shape = tuple(weight_shape)
        self.numerics = numerics
        self.register_buffer("bits_param", as_bits_tensor(bits, self.weight_shape))
        # a buffer, so a checkpoint restores the rule its grids were made with
        self.register_buffer("mse_range", torch.tensor(range_rule == "mse"))
        self.register_buffer("held_scale", None)  # see hold(); None buffers stay out of the state dict
        self.register_buffer("held_bits", None)
        if held_scale is not None:
            self.hold(held_scale)

    @property
    def range_rule(self) -> str:
        return "mse" if bool(self.mse_range) else "max"

    def hold(self, scale: torch.Tensor) -> None:
        """Keep ``scale`` (shaped as ``qparams(w).scale``) as the grid of every group whose bits
        stay the current ones."""
        self.held_scale = scale.detach().clone().float().to(self.bits_param.device)
        self.held_bits = self.bits_param.detach().clone()

    @property
    def holds_grid(self) -> bool:
        return self.held_scale is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the rule existed were made with max ranges
        state_dict.setdefault(prefix + "mse_range", torch.tensor(False))
        for name in ("held_scale", "held_bits"):  # a grid is held exactly where the saved quantizer held one
            saved = state_dict.get(prefix + name)
            setattr(self, name, None if saved is None else torch.zeros_like(saved, device=self.bits_param.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bits(self) -> torch.Tensor:
        return self.bits_param

    def set_bits(self, bits) -> None:
        self.bits_param = as_bits_tensor(bits, self.weight_shape).to(self.bits_param.device)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A copy on the CPU (same bits, range rule and held grid; under other numerics, no held
        grid), and the weight as it is."""
        weight = needs_weight(type(self).__name__, weight)
        fixed = FixedWeightQuantizer(self.weight_shape, self.bits_param.detach().cpu().clone(),
                                     numerics or self.numerics, self.range_rule)
        if self.holds_grid and fixed.numerics == self.numerics:
            fixed.held_scale = self.held_scale.detach().cpu().clone()
            fixed.held_bits = self.held_bits.detach().cpu().clone()
        return Frozen(fixed, weight.detach())

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        bits = self.bits_param
        group = _scale_group_shape(tuple(bits.shape), self.weight_shape, self.numerics)
        max_abs = reduce_to(x.detach().abs(), group)
        if self.numerics == "fixed":
            scale = range_scale(expand(max_abs, self.weight_shape), expand(bits, self.weight_shape), True, "fixed", True)
            if tuple(group) == tuple(bits.shape):
                scale = reduce_to(scale, group)  # equal within a group: keep it compact
        else:
            group_bits = reduce_to(expand(bits, self.weight_shape), group)
            scale = range_scale(max_abs, group_bits, True, "scaled", True)
        if bool(self.mse_range) and float(bits.min()) <= MSE_MAX_BITS:
            fitted = least_squares_scale(x.detach(), bits, scale, self.numerics)
            narrow_groups = reduce_to(expand(bits, self.weight_shape), tuple(scale.shape), "amax") <= MSE_MAX_BITS
            scale = torch.where(narrow_groups, fitted, scale)
        if self.holds_grid:
            scale = self._held(scale)
        return QParams(scale, bits, signed=True, narrow=True)

    def _held(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` with the held grid in every group whose bits are still the held ones (in none
        where the bits or the scale changed shape)."""
        if self.bits_param.shape != self.held_bits.shape or scale.shape != self.held_scale.shape:
            return scale
        same = expand((self.bits_param == self.held_bits).float(), self.weight_shape)
        held = reduce_to(same, tuple(scale.shape), "amin") > 0
        return torch.where(held, self.held_scale, scale)


def least_squares_scale(w: torch.Tensor, bits: torch.Tensor, max_scale: torch.Tensor, numerics: str) -> torch.Tensor:
    """Per group of ``max_scale``'s shape, the candidate scale (the max-abs one or smaller) whose
    rounded and clipped ``w`` is closest to ``w`` in squared error; ties keep the larger scale.

    All candidates in a few whole-tensor passes (a pass per candidate made a ResNet-8 forward 20 ms
    slower on one core), in chunks of about 4M values."""
    if numerics == "fixed":
        factors = [2.0 ** -k for k in range(MSE_POW2_STEPS)]
    else:
        factors = list(MSE_FRACTIONS)
    group = tuple(max_scale.shape)
    split, folded = _group_split(tuple(w.shape), group)
    wv = w.reshape(split)
    flat = bits.detach().round().flatten()
    if bool((flat == flat[0]).all()):  # one width: plain bounds (tensor bounds cost a copy per pass)
        lo, hi = qrange(int(flat[0]), True, True)
    else:
        lo, hi = (t.reshape(split) for t in qrange(expand(bits.detach().round(), tuple(w.shape)), True, True))
    per_chunk = max(1, (1 << 22) // max(w.numel(), 1))
    errors = []
    for i in range(0, len(factors), per_chunk):
        f = torch.tensor(factors[i:i + per_chunk], dtype=w.dtype, device=w.device)
        s = max_scale.reshape(folded).unsqueeze(0) * f.reshape((-1,) + (1,) * len(folded))
        q = torch.round(wv / s).clamp_(lo, hi).mul_(s).sub_(wv).square_()
        errors.append(q.sum(dim=tuple(range(2, q.dim(), 2))))  # one error per candidate and group
    best = torch.cat(errors).argmin(0)  # the first minimum: the widest of tied candidates
    return max_scale * torch.tensor(factors, dtype=max_scale.dtype, device=max_scale.device)[best].reshape(group)


def _group_split(shape: tuple[int, ...], group: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """``shape`` as ``(g0, r0, g1, r1, ...)`` with ``g`` the groups along each dimension, and the
    group shape padded to match ``(g0, 1, g1, 1, ...)``."""
    group = (1,) * (len(shape) - len(group)) + tuple(group)
    split, folded = [], []
    for g, n in zip(group, shape):
        split += [g, n // g]
        folded += [g, 1]
    return split, folded


def frozen_weight_quantizer(bits: torch.Tensor, weight_shape: tuple[int, ...], numerics: str) -> FixedWeightQuantizer:
    """The fixed quantizer a learned weight grid freezes into: its bits (rounded, 0 = pruned) and
    the ``max`` range rule, so a grid kept in the (clipped) weights keeps its step."""
    bits = bits.detach().round().clamp_min(0).cpu()
    return FixedWeightQuantizer(tuple(weight_shape), bits, numerics, range_rule="max")


class ActQuantizer(Quantizer):
    """Activation quantizer with given bits and a running min/max observer.

    In training mode, while ``observing`` (:meth:`set_observing`, :func:`freeze_observers`), the
    observed range follows an exponential moving average of rate ``momentum``; otherwise, and in
    eval mode, it stays (a quantizer that has observed nothing yet takes its first training batch's
    range either way: it has no range before). Signedness follows the observed minimum, so a tensor
    after ReLU is unsigned. ``clip`` bounds the range by the fused activation (ReLU6 at 6, Hardtanh
    at its limits). The range is one per tensor, or one per bits group under fixed numerics
    (``set_range``: a learned per-channel or per-element grid frozen as it was learned).

    ``fit_narrow``: at ``ACT_FIT_MAX_BITS`` or fewer, a per-tensor observer takes from each batch
    not its min/max but that range shrunk to the candidate (``least_squares_clip``) whose grid
    reproduces the batch with the least squared error; values beyond it saturate, as the integer
    model saturates them.
    """

    def __init__(self, shape: tuple[int, ...], bits, numerics: str = "scaled", momentum: float = 0.1,
                 clip: tuple[float, float] = (float("-inf"), float("inf")), fit_narrow: bool = True):
        super().__init__()
        self.shape = tuple(shape)
        self.numerics = numerics
        self.momentum = momentum
        self.fit_narrow = bool(fit_narrow)
        self._observing = True
        self.clip = (float(clip[0]), float(clip[1]))
        self.register_buffer("bits_param", as_bits_tensor(bits, self.shape))
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def bits(self) -> torch.Tensor:
        return self.bits_param

    def set_bits(self, bits) -> None:
        self.bits_param = as_bits_tensor(bits, self.shape).to(self.bits_param.device)

    @property
    def range_rule(self) -> str:
        return "observed"

    @property
    def observing(self) -> bool:
        return self._observing

    def set_observing(self, on: bool) -> None:
        self._observing = bool(on)

    def freeze(self, weight: torch.Tensor | None = None, *, numerics: str | None = None,
               clip: tuple[float, float] | None = None) -> Frozen:
        """A copy on the CPU (same bits and observed range) that does not observe."""
        no_weight(type(self).__name__, weight)
        fixed = ActQuantizer(self.shape, self.bits_param.detach().cpu(), numerics or self.numerics, self.momentum,
                             self.clip if clip is None else clip, self.fit_narrow)
        fixed.load_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})
        fixed.set_observing(False)
        return Frozen(fixed, None)

    @property
    def signed(self) -> bool:
        return bool((self.running_min < 0).any())

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fix the observed range: scalars, or one per bits group (fixed numerics only)."""
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if lo.numel() > 1 and (self.numerics != "fixed" or tuple(lo.shape) != tuple(self.bits_param.shape)):
            raise ValueError(f"a per-group activation range needs fixed numerics and the bits' shape "
                             f"{tuple(self.bits_param.shape)}, got {tuple(lo.shape)} under {self.numerics}")
        self.running_min = lo.reshape(() if lo.numel() == 1 else lo.shape).clone().to(self.bits_param.device)
        self.running_max = hi.reshape(self.running_min.shape).clone().to(self.bits_param.device)
        self.observed.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("running_min", "running_max"):  # a per-group range comes back in its own shape
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=self.bits_param.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def observe(self, x: torch.Tensor) -> None:
        if self.running_min.dim():
            v = x.detach().to(self.running_min.dtype)
            lo = reduce_to(v.amin(0), tuple(self.running_min.shape), "amin").clamp(*self.clip)
            hi = reduce_to(v.amax(0), tuple(self.running_max.shape), "amax").clamp(*self.clip)
        else:
            lo = x.detach().min().clamp(*self.clip).to(self.running_min.dtype)
            hi = x.detach().max().clamp(*self.clip).to(self.running_max.dtype)
            bits = self.bits_param.detach().amax().round()
            if self.fit_narrow and float(bits) <= ACT_FIT_MAX_BITS:
                shrink = least_squares_clip(x.detach(), lo, hi, bits, self.numerics)
                lo, hi = lo * shrink, hi * shrink
        if not bool(self.observed):
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.observed.fill_(True)
        else:
            rate = self.momentum if self._observing else 0.0
            self.running_min.lerp_(lo, rate)
            self.running_max.lerp_(hi, rate)

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        if not bool(self.observed):
            raise RuntimeError("activation quantizer has not observed any data: run a calibration pass "
                               "(mixprec.calibrate) or a training step first")
        signed = self.signed
        max_abs = torch.maximum(self.running_max, -self.running_min) if signed else self.running_max
        bits = self.bits_param
        if self.numerics == "fixed":
            shape = tuple(max_abs.shape) if max_abs.dim() else (1,) * len(self.shape)
            scale = range_scale(expand(max_abs.reshape(shape), tuple(bits.shape)), bits, signed, "fixed")
        else:
            scale = range_scale(max_abs.reshape((1,) * len(self.shape)), bits.amax().reshape((1,) * len(self.shape)),
                                signed, "scaled")
        return QParams(scale, bits, signed=signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        return super().forward(x)


def least_squares_clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor,
                       numerics: str) -> torch.Tensor:
    """The factor (1 or smaller; the ``mse`` weight rule's candidates) that shrinks the range
    ``[lo, hi]`` of ``x`` to the per-tensor grid of ``bits`` reproducing ``x`` with the least
    squared error, measured on at most ``ACT_FIT_SAMPLES`` of its values; ties keep the wider."""
    factors = [2.0 ** -k for k in range(MSE_POW2_STEPS)] if numerics == "fixed" else list(MSE_FRACTIONS)
    v = x.reshape(-1)
    v = v[::max(1, v.numel() // ACT_FIT_SAMPLES)].to(torch.float32)
    signed = bool(lo < 0)
    max_abs = torch.maximum(hi, -lo) if signed else hi
    f = torch.tensor(factors, dtype=torch.float32, device=x.device)
    scale = range_scale(max_abs.reshape(1).to(torch.float32) * f, bits.expand(len(factors)), signed, numerics)
    qlo, qhi = qrange(int(bits), signed)
    s = scale.reshape(-1, 1)
    error = (torch.round(v / s).clamp_(qlo, qhi).mul_(s) - v).square_().sum(1)
    return f[error.argmin()].to(hi.dtype)  # the first minimum: the widest of tied candidates


def frozen_act_quantizer(qp: QParams, shape: tuple[int, ...], numerics: str,
                         clip: tuple[float, float] = (float("-inf"), float("inf"))) -> ActQuantizer:
    """The fixed activation quantizer a learned grid ``qp`` freezes into, not observing: its bits
    (rounded; at least 1 for a whole tensor, while a group learned at 0 bits, such as a pruned input
    feature, stays at 0: reviving it would cost what the search saved) and a range of the largest
    code times the learned step, one per tensor or (fixed numerics) one per bits group, symmetric
    when signed (the observer's scale is then max|range| / largest code, the learned step)."""
    bits = qp.bits.detach().round().cpu()
    if not zero_bit_groups_allowed(numerics, bits.numel()):
        bits = bits.clamp_min(1)
    if bits.numel() == 1:
        bits = bits.reshape((1,) * len(shape))
    elif numerics != "fixed":
        raise ValueError(f"per-group activation bits need fixed-point numerics (these are {numerics})")
    fixed = ActQuantizer(shape, bits, numerics, clip=clip)
    _, hi = qrange(bits, qp.signed)
    top = _range_top(hi, qp.scale.detach().cpu().reshape(bits.shape))
    fixed.set_range(-top if qp.signed else torch.zeros_like(top), top)
    fixed.set_observing(False)  # the range stays the learned one during fine-tuning
    return fixed


def freeze_learned_act(q: Quantizer, weight, numerics: str | None, clip: tuple[float, float] | None) -> Frozen:
    """``freeze`` of a learned activation quantizer ``q`` (its ``qparams``, ``shape``, ``numerics``
    and fused-activation ``clip``): the fixed quantizer of :func:`frozen_act_quantizer`."""
    no_weight(type(q).__name__, weight)
    fixed = frozen_act_quantizer(q.qparams(), q.shape, numerics or q.numerics, q.clip if clip is None else clip)
    return Frozen(fixed, None)


def settled_step(step: torch.Tensor, bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """The step the fixed quantizer of :func:`frozen_act_quantizer` computes back from the range it
    is given (the largest code times ``step``, in float32), under scaled numerics: ``step`` or one
    float32 step off it, and a settled step stays as it is. A learned grid that quantizes with it
    lowers exactly as its frozen copy will."""
    _, hi = qrange(bits.detach().round(), signed)
    hi = hi.to(step.device)
    return (_range_top(hi, step.detach()) / hi.float().clamp_min(1.0)).to(torch.float32)


def _range_top(hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The top of the range a learned grid freezes into: its largest code times its step, exact in
    float64, rounded once to float32."""
    return (hi.double() * step.double()).float()


def refit_narrow_acts(qm, batches, names=None) -> None:
    """Observe afresh, on ``batches``, the range of every per-tensor ``ActQuantizer`` of ``qm`` at
    ``ACT_FIT_MAX_BITS`` or fewer (of ``names`` only, when given): its least-squares clip at its width.
    Every quantizer observes afterwards as it did before. A range observed or learned at 8 bits spans
    the max, which at 2 bits rounds most activations to 0."""
    narrow = [q for name, q in qm.act_quantizers.items()
              if (names is None or name in names) and isinstance(q, ActQuantizer) and q.fit_narrow
              and not q.running_min.dim() and float(q.bits().amax()) <= ACT_FIT_MAX_BITS]
    if not narrow:
        return
    was = [(m, m.observing) for m in qm.modules() if isinstance(m, Quantizer)]
    freeze_observers(qm)
    for q in narrow:
        q.observed.fill_(False)
        q.set_observing(True)
    try:
        with torch.no_grad():
            qm.calibrate(batches)
    finally:
        for m, on in was:
            m.set_observing(on)


def freeze_observers(module: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) range tracking in every quantizer with an observer, e.g. for fine-tuning."""
    for m in module.modules():
        if isinstance(m, Quantizer):
            m.set_observing(not frozen)
