"""The numerics oracle: every rounding, saturation and requantization rule mixprec uses.

Everything here is a pure function. The integer functions accept NumPy arrays or torch integer
tensors (int64) alike, so the NumPy reference interpreter and the PyTorch integer evaluation path
run literally the same arithmetic. Accumulators are int64 everywhere: products of two int32 values
fit, and the C exporter checks statically that real accumulators fit in int32.

Two requantization forms:
  * ``tflm``: an int32 multiplier ``M`` (Q0.31) and a shift, with the TFLite-Micro / CMSIS-NN
    arithmetic (saturating rounding doubling high multiply, then rounding divide by a power of two).
  * ``pow2``: power-of-two scales (fixed point, FPGA); requantization is a shift rounding half up,
    which is ``ap_fixed``'s ``AP_RND`` mode.

>>> import numpy as np
>>> quantize(np.array([0.26, -1.0, 3.0]), 0.25, 4, signed=True).tolist()
[1, -4, 7]
>>> m, s = quantize_multiplier(0.75)
>>> int(multiply_by_quantized_multiplier(np.array([100]), m, s)[0])
75
>>> int(shift_round(np.array([-6]), 2)[0])   # -1.5 rounds half up to -1
-1
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
ROUNDING_MODES = ("half_even", "half_away", "half_up", "floor")


# --- array-agnostic helpers ---------------------------------------------------------------

def _where(cond, a, b):
    return torch.where(cond, a, b) if isinstance(cond, torch.Tensor) else np.where(cond, a, b)


def _like(x, value):
    """An integer array/tensor of the same kind as ``x`` holding ``value`` (broadcastable)."""
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(value, dtype=torch.int64, device=x.device)
    return np.asarray(value, dtype=np.int64)


def _clip(x, lo, hi):
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, _like(x, lo), _like(x, hi))
    return np.minimum(np.maximum(x, lo), hi)


def _as_int(flags):
    return flags.to(torch.int64) if isinstance(flags, torch.Tensor) else np.asarray(flags).astype(np.int64)


def pow2(exponent):
    """``2**exponent`` for a non-negative integer array (int64)."""
    return _like(exponent, 1) << exponent


# --- rounding and quantization ------------------------------------------------------------

def round_values(x, mode: str = "half_even"):
    """Round floats to integers-valued floats.

    >>> round_values(np.array([0.5, 1.5, -0.5, -1.5]), "half_even").tolist()
    [0.0, 2.0, -0.0, -2.0]
    >>> round_values(np.array([0.5, -0.5]), "half_away").tolist()
    [1.0, -1.0]
    >>> round_values(np.array([0.5, -0.5]), "half_up").tolist()
    [1.0, 0.0]
    """
    mod = torch if isinstance(x, torch.Tensor) else np
    if mode == "half_even":
        return mod.round(x)
    if mode == "half_away":
        return mod.sign(x) * _floor_half_up(mod, mod.abs(x))
    if mode == "half_up":
        return _floor_half_up(mod, x)
    if mode == "floor":
        return mod.floor(x)
    raise ValueError(f"unknown rounding mode {mode!r}; supported: {', '.join(ROUNDING_MODES)}")


def _floor_half_up(mod, x):
    """``floor(x + 0.5)`` without the float rounding of ``x + 0.5`` (0.49999999999999994 -> 0)."""
    low = mod.floor(x)
    return mod.where(x - low >= 0.5, low + 1, low)


def zero_bit_groups_allowed(numerics: str, groups: int) -> bool:
    """Whether groups of an activation grid of ``groups`` bit groups may hold 0 bits: in fixed point,
    finer than a whole tensor (a pruned input feature or activation element is always 0, costs
    nothing and is not stored); a whole tensor at 0 bits would be a dead network."""
    return numerics == "fixed" and groups > 1


def qrange(bits, signed, narrow: bool = False):
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide integer; works on arrays of bits.

    Zero bits give ``(0, 0)``: the value is pruned. ``narrow`` drops the most negative code
    (symmetric weights, as TFLite-Micro does for int8 weights).

    >>> qrange(4, True), qrange(4, False), qrange(8, True, narrow=True), qrange(0, True)
    ((-8, 7), (0, 15), (-127, 127), (0, 0))
    """
    if isinstance(bits, torch.Tensor):  # float64: 2^31 - 1 (32-bit biases) is exact; no compares, as
        b = bits.to(torch.float64)     # every training step calls this a few times per layer
        if signed:
            mag = torch.exp2(b - 1).mul_(b.clamp(0.0, 1.0).ceil_())  # 0 where pruned (bits <= 0)
            hi = (mag - 1).clamp_min_(0.0)
            return -hi if narrow else -mag, hi
        return torch.zeros_like(b), torch.exp2(b).sub_(1).clamp_min_(0.0)
    b = np.asarray(bits, dtype=np.int64)
    if signed:
        hi = np.where(b > 0, (np.int64(1) << np.maximum(b - 1, 0)) - 1, 0)
        lo = np.where(b > 0, -hi if narrow else -hi - 1, 0)
    else:
        lo = np.zeros_like(b)
        hi = np.where(b > 0, (np.int64(1) << np.maximum(b, 0)) - 1, 0)
    if lo.ndim == 0:
        return int(lo), int(hi)
    return lo, hi



def bits_for_range(lo: int, hi: int, signed: bool) -> int:
    """Smallest width whose :func:`qrange` holds every integer in ``[lo, hi]`` (at least 1).

    >>> bits_for_range(-8, 7, True), bits_for_range(-9, 0, True), bits_for_range(0, 15, False)
    (4, 5, 4)
    """
    lo, hi = int(lo), int(hi)
    if signed:
        return max(max(hi, 0).bit_length(), (-lo - 1).bit_length() if lo < 0 else 0) + 1
    if lo < 0:
        raise ValueError(f"unsigned storage cannot hold {lo}")
    return max(hi.bit_length(), 1)

def quantize(x, scale, bits, signed: bool, rounding: str = "half_even", narrow: bool = False):
    """Real values to integers: ``clip(round(x / scale), qmin, qmax)`` computed in float64.

    Returns int64. ``scale`` and ``bits`` broadcast against ``x``.
    """
    lo, hi = qrange(bits, signed, narrow)
    if isinstance(x, torch.Tensor):
        q = round_values(x.to(torch.float64) / torch.as_tensor(scale, dtype=torch.float64), rounding)
        return torch.clamp(q, torch.as_tensor(lo, dtype=q.dtype), torch.as_tensor(hi, dtype=q.dtype)).to(torch.int64)
    q = round_values(np.asarray(x, dtype=np.float64) / np.asarray(scale, dtype=np.float64), rounding)
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize(q, scale):
    """Integers back to reals: ``q * scale``."""
    return q * scale


def scale_from_frac_bits(frac_bits):
    """Fixed point with ``f`` fractional bits has scale ``2**-f``."""
    return 2.0 ** (-np.asarray(frac_bits, dtype=np.float64))


def frac_bits_from_scale(scale) -> np.ndarray:
    """Inverse of :func:`scale_from_frac_bits`; raises if a scale is not an exact power of two."""
    s = np.asarray(scale, dtype=np.float64)
    f = -np.log2(s)
    if not np.all(f == np.round(f)):
        raise ValueError(f"scale {s[f != np.round(f)].ravel()[:3]} is not a power of two")
    return np.round(f).astype(np.int64)


def fixed_point_format(bits: int, frac_bits: int, signed: bool) -> tuple[int, int]:
    """``(total bits, integer bits)`` as ``ap_fixed<W, I>`` writes it (integer bits include the sign)."""
    return bits, bits - frac_bits


def pow2_scale_covering(max_abs, qmax):
    """Smallest power-of-two scale ``s`` with ``max_abs / s <= qmax`` (fixed point, no clipping)."""
    ratio = np.maximum(np.asarray(max_abs, dtype=np.float64), 1e-30) / np.maximum(qmax, 1)
    return 2.0 ** np.ceil(np.log2(ratio))


# --- TFLite-Micro integer requantization ----------------------------------------------------

def quantize_multiplier(real: float) -> tuple[int, int]:
    """A positive real multiplier as ``(M, shift)`` with ``real ~= M * 2**(shift - 31)``,
    ``M`` in ``[2**30, 2**31)``; the TFLite-Micro ``QuantizeMultiplier``.

    >>> quantize_multiplier(0.5), quantize_multiplier(1.0)
    ((1073741824, 0), (1073741824, 1))
    """
    if real <= 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(math.floor(abs(q) * 2**31 + 0.5))  # std::round: half away from zero
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"requantization multiplier {real} too large for int32 arithmetic")
    return q_fixed, shift


def _negative_mask(x):
    """-1 where ``x < 0``, 0 elsewhere (for int64, one arithmetic shift of the sign bit)."""
    if isinstance(x, torch.Tensor):
        return x >> 63 if x.dtype == torch.int64 else -(x < 0).to(x.dtype)
    x = np.asarray(x)
    return x >> 63 if x.dtype == np.int64 else -(x < 0).astype(x.dtype)


def saturating_rounding_doubling_high_mul(a, b):
    """High 32 bits of ``2*a*b`` rounded to nearest (TFLite ``SaturatingRoundingDoublingHighMul``).

    TFLite truncates ``(a*b + nudge) / 2**31`` with ``nudge = 2**30`` for ``a*b >= 0`` and
    ``1 - 2**30`` otherwise; both cases equal ``floor((a*b + 2**30) / 2**31)``, one arithmetic shift
    (the integer-exact evaluation of a model spends most of its time here).

    >>> int(saturating_rounding_doubling_high_mul(np.array([2**30]), np.array([2**30]))[0])
    536870912
    """
    high = (a * b + (1 << 30)) >> 31
    b_min = _like(high, b) == INT32_MIN
    if not bool(b_min.any()):  # b is the (small) multiplier: settle the overflow case on it
        return high
    overflow = (a == INT32_MIN) & b_min
    return _where(overflow, _like(high, INT32_MAX), high)


def rounding_divide_by_pot(x, exponent):
    """``x / 2**exponent`` rounded half away from zero (TFLite ``RoundingDivideByPOT``): the floor
    of ``(x + 2**(e-1) - [x < 0]) / 2**e`` for ``e > 0``, ``x`` itself for ``e == 0``.

    >>> rounding_divide_by_pot(np.array([5, -5, 6, -6]), 2).tolist()
    [1, -1, 2, -2]
    """
    exponent = _like(x, exponent)
    half = pow2(exponent) >> 1
    dividing = -_as_int(exponent > 0)  # all ones where e > 0: the sign correction applies
    return (x + half + (_negative_mask(x) & dividing)) >> exponent


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """``x * M * 2**(shift-31)`` with TFLite-Micro rounding (``MultiplyByQuantizedMultiplier``)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.int64:
        fused = _fused_multiply_by_quantized_multiplier(x, _like(x, multiplier), _like(x, shift))
        if fused is not None:
            return fused
    shift = _like(x, shift)
    zero = _like(x, 0)
    if bool((shift > 0).any()):
        x = x * pow2(_where(shift > 0, shift, zero))
    right = _where(shift > 0, zero, -shift)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, _like(x, multiplier)), right)


def _fused_multiply_by_quantized_multiplier(x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor):
    """The same integers as the two TFLite steps, in four passes over ``x`` (the integer-exact eval
    path spends most of its time here), or None where the fusion does not apply (a multiplier of
    INT32_MIN, which saturates, or a left shift).

    With ``P = x M`` (exact in int64: both below 2**31), the high multiply is ``h = floor((P + 2**30)
    / 2**31)`` and the rounding divide ``floor((h + half - [h < 0]) / 2**r)``, ``half = 2**r / 2``.
    Since ``half * 2**31`` is a multiple of ``2**31``, ``h + half = floor((P + 2**30 + half 2**31) /
    2**31)``: one add of a per-channel constant and one shift; ``h < 0`` is ``h + half < half``, and
    it corrects only where ``r > 0``. Every intermediate stays below 2**63.
    """
    if bool((shift > 0).any()) or bool((m == INT32_MIN).any()):
        return None
    right = -shift
    half = (torch.ones_like(right) << right) >> 1
    p = x * m
    p += (1 << 30) + (half << 31)
    p >>= 31
    below = (p - half) >> 63  # -1 where h < 0
    if bool((right == 0).any()):
        below &= -(right > 0).to(torch.int64)
    p += below
    p >>= right
    return p


# --- power-of-two requantization ------------------------------------------------------------

def shift_round(x, shift):
    """``x / 2**shift`` rounded half up for ``shift > 0``; ``x * 2**-shift`` otherwise (exact)."""
    shift = _like(x, shift)
    zero = _like(x, 0)
    right = _where(shift > 0, shift, zero)
    left = _where(shift > 0, zero, -shift)
    half = _where(right > 0, pow2(_where(right > 0, right - 1, zero)), zero)
    return ((x + half) >> right) << left


def div_round_away(x, n):
    """Integer ``x / n`` rounded half away from zero (TFLite-Micro average pooling).

    >>> div_round_away(np.array([5, -5, 4, -4]), 2).tolist()
    [3, -3, 2, -2]
    """
    n = _like(x, n)
    half = n // 2
    pos = (x + half) // n
    neg = -((-x + half) // n)
    return _where(x >= 0, pos, neg)


@dataclass
class Requant:
    """Integer requantization from an accumulator grid to an output grid.

    ``kind`` is ``"tflm"`` (``multiplier`` and ``shift`` as TFLite-Micro) or ``"pow2"`` (``shift``
    only; ``multiplier`` unused). Arrays broadcast against the accumulator (e.g. ``(C, 1, 1)``
    for per-channel).
    """

    kind: str
    multiplier: np.ndarray
    shift: np.ndarray

    def apply(self, acc):
        if self.kind == "tflm":
            return multiply_by_quantized_multiplier(acc, self.multiplier, self.shift)
        return shift_round(acc, self.shift)

    def to_torch(self, device=None) -> "Requant":
        conv = lambda a: torch.as_tensor(a, dtype=torch.int64, device=device)  # noqa: E731
        return Requant(self.kind, conv(self.multiplier), conv(self.shift))


def make_requant(real_multiplier, kind: str) -> Requant:
    """Build requantization parameters from real multipliers ``s_acc / s_out`` (array)."""
    real = np.asarray(real_multiplier, dtype=np.float64)
    if kind == "pow2":
        log = np.log2(real)
        if not np.all(log == np.round(log)):
            raise ValueError("pow2 requantization needs power-of-two scale ratios")
        return Requant("pow2", np.zeros(real.shape, np.int64), (-np.round(log)).astype(np.int64))
    if kind != "tflm":
        raise ValueError(f"unknown requantization kind {kind!r}; supported: tflm, pow2")
    pairs = [quantize_multiplier(float(r)) for r in real.ravel()]
    mult = np.array([p[0] for p in pairs], dtype=np.int64).reshape(real.shape)
    shift = np.array([p[1] for p in pairs], dtype=np.int64).reshape(real.shape)
    return Requant("tflm", mult, shift)


def requantize(acc, requant: Requant, lo, hi, post_shift=None):
    """Accumulator to output integers: requantize, saturate to ``[lo, hi]``, then apply the
    optional per-element ``post_shift`` (a left shift onto the tensor's common grid)."""
    y = requant.apply(acc)
    if isinstance(y, torch.Tensor):  # a fresh tensor: clamp and shift it in place (no allocation)
        y.clamp_(_like(y, lo), _like(y, hi))
        if post_shift is not None:
            y <<= _like(y, post_shift)
        return y
    y = _clip(y, lo, hi)
    if post_shift is not None:
        y = y << _like(y, post_shift)
    return y


def saturate(x, lo, hi):
    """Clip integers to ``[lo, hi]`` (saturation, never wrap-around)."""
    return _clip(x, lo, hi)


def add_left_shift(max_input_bits: int) -> int:
    """Headroom shift for the TFLite-style add: 20 for 8-bit inputs, less for wider ones so
    ``x << shift`` stays within int32."""
    return int(min(20, 29 - max_input_bits))
