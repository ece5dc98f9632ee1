"""The numerics oracle against independent definitions.

Integer requantization is checked against a pure-Python big-integer transcription of the TFLite
(gemmlowp) definitions, written from their C semantics (integer division truncates toward zero,
``RoundingDivideByPOT`` rounds half away from zero) rather than from mixprec's shift tricks.
Every integer function must give identical results on NumPy arrays and torch int64 tensors.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mixprec import numerics as nm

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SETTINGS = settings(max_examples=60, deadline=None)

int32s = st.integers(INT32_MIN, INT32_MAX)
int32_lists = st.lists(int32s, min_size=1, max_size=16)


# --- independent references ------------------------------------------------------------------

def c_div(a: int, b: int) -> int:
    """C integer division: the quotient truncated toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def round_half_away(f: Fraction) -> int:
    sign = 1 if f >= 0 else -1
    return sign * math.floor(abs(f) + Fraction(1, 2))


def ref_srdhm(a: int, b: int) -> int:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 operands."""
    assert INT32_MIN <= a <= INT32_MAX and INT32_MIN <= b <= INT32_MAX
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    high = c_div(ab + nudge, 1 << 31)
    assert INT32_MIN <= high <= INT32_MAX
    return high


def ref_rdbpot(x: int, exponent: int) -> int:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero."""
    return round_half_away(Fraction(x, 2**exponent))


def ref_mbqm(x: int, multiplier: int, shift: int) -> int:
    """TFLite ``MultiplyByQuantizedMultiplier`` (int32 x, defined when ``x << left`` fits int32)."""
    left, right = max(shift, 0), max(-shift, 0)
    shifted = x * 2**left
    assert INT32_MIN <= shifted <= INT32_MAX
    return ref_rdbpot(ref_srdhm(shifted, multiplier), right)


def both(values):
    """The same integers as a NumPy int64 array and a torch int64 tensor."""
    a = np.asarray(values, dtype=np.int64)
    return a, torch.as_tensor(a)


def assert_same(np_result, torch_result, expected=None):
    assert isinstance(torch_result, torch.Tensor)
    assert torch_result.dtype == torch.int64
    assert np.array_equal(np.asarray(np_result), torch_result.numpy())
    if expected is not None:
        assert np.asarray(np_result).tolist() == list(expected)




# --- rounding ---------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def ref_round(x: float, mode: str) -> int:
    f = Fraction(x)
    if mode == "half_even":
        return round(f)  # Fraction.__round__ rounds half to even
    if mode == "half_away":
        return round_half_away(f)
    if mode == "half_up":
        return math.floor(f + Fraction(1, 2))
    return math.floor(f)


@pytest.mark.parametrize("mode", nm.ROUNDING_MODES)
@SETTINGS
@given(xs=st.lists(finite, min_size=1, max_size=16))
@example(xs=[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0])
@example(xs=[0.49999999999999994, -0.49999999999999994, 4503599627370495.5, -4503599627370495.5])
def test_round_values_matches_exact_rounding(mode, xs):
    expected = [ref_round(x, mode) for x in xs]
    got_np = nm.round_values(np.array(xs, dtype=np.float64), mode)
    got_t = nm.round_values(torch.tensor(xs, dtype=torch.float64), mode)
    assert got_np.tolist() == expected
    assert got_t.tolist() == expected


def test_round_values_rejects_unknown_mode():
    with pytest.raises(ValueError, match="half_even"):
        nm.round_values(np.array([0.5]), "stochastic")


# --- qrange -----------------------------------------------------------------------------------

def ref_qrange(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if bits == 0:
        return 0, 0
    if not signed:
        return 0, 2**bits - 1
    hi = 2 ** (bits - 1) - 1
    return (-hi if narrow else -hi - 1), hi


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(17))
def test_qrange_scalar_array_and_tensor(bits, signed, narrow):
    lo, hi = ref_qrange(bits, signed, narrow)
    assert nm.qrange(bits, signed, narrow) == (lo, hi)
    alo, ahi = nm.qrange(np.array([bits, bits]), signed, narrow)
    assert alo.tolist() == [lo, lo] and ahi.tolist() == [hi, hi]
    tlo, thi = nm.qrange(torch.tensor([float(bits)]), signed, narrow)
    assert tlo.tolist() == [lo] and thi.tolist() == [hi]


def test_qrange_examples():
    assert nm.qrange(8, True) == (-128, 127)
    assert nm.qrange(8, True, narrow=True) == (-127, 127)
    assert nm.qrange(8, False) == (0, 255)
    assert nm.qrange(1, True) == (-1, 0)
    assert nm.qrange(0, False) == (0, 0)


# --- quantize ---------------------------------------------------------------------------------

scales = st.floats(2**-12, 2**4, allow_nan=False, allow_infinity=False)
bit_widths = st.integers(0, 16)


@SETTINGS
@given(xs=st.lists(finite, min_size=1, max_size=16), scale=scales, bits=bit_widths,
       signed=st.booleans(), narrow=st.booleans(), mode=st.sampled_from(nm.ROUNDING_MODES))
def test_quantize_stays_in_qrange(xs, scale, bits, signed, narrow, mode):
    lo, hi = nm.qrange(bits, signed, narrow)
    q = nm.quantize(np.array(xs), scale, bits, signed, mode, narrow)
    assert q.dtype == np.int64
    assert np.all((q >= lo) & (q <= hi))
    qt = nm.quantize(torch.tensor(xs, dtype=torch.float64), scale, bits, signed, mode, narrow)
    assert_same(q, qt)


@SETTINGS
@given(data=st.data(), scale=scales, bits=st.integers(1, 16), signed=st.booleans(),
       mode=st.sampled_from(nm.ROUNDING_MODES))
def test_quantize_round_trips_grid_values(data, scale, bits, signed, mode):
    if mode == "floor":  # k * s / s may land an ulp below k: only exact (power-of-two) grids round-trip
        scale = 2.0 ** round(math.log2(scale))
    lo, hi = nm.qrange(bits, signed)
    ks = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=16))
    x = nm.dequantize(np.array(ks, dtype=np.float64), scale)
    assert nm.quantize(x, scale, bits, signed, mode).tolist() == ks
    assert nm.quantize(torch.tensor(x), scale, bits, signed, mode).tolist() == ks


def test_quantize_saturates_and_broadcasts_bits():
    x = np.array([[10.0, -10.0], [10.0, -10.0]])
    bits = np.array([[2], [4]])
    assert nm.quantize(x, 1.0, bits, signed=True).tolist() == [[1, -2], [7, -8]]
    assert nm.quantize(x, 1.0, bits, signed=False).tolist() == [[3, 0], [10, 0]]


def test_quantize_rounds_half_to_even_by_default():
    assert nm.quantize(np.array([0.5, 1.5, 2.5, -0.5]), 1.0, 8, True).tolist() == [0, 2, 2, 0]


# --- fixed point helpers ----------------------------------------------------------------------

@pytest.mark.parametrize("f", range(-20, 31))
def test_frac_bits_scale_round_trip(f):
    assert float(nm.scale_from_frac_bits(f)) == 2.0**-f
    assert int(nm.frac_bits_from_scale(nm.scale_from_frac_bits(f))) == f


@pytest.mark.parametrize("scale", [0.3, 3 * 2.0**-5, 1.5, np.nextafter(0.5, 1.0), [0.25, 0.1]])
def test_frac_bits_from_scale_rejects_non_powers_of_two(scale):
    with pytest.raises(ValueError, match="not a power of two"):
        nm.frac_bits_from_scale(scale)


@SETTINGS
@given(max_abs=st.floats(1e-6, 1e6), bits=st.integers(2, 16))
def test_pow2_scale_covering_is_the_smallest_power_of_two(max_abs, bits):
    _, qmax = nm.qrange(bits, True)
    s = float(nm.pow2_scale_covering(max_abs, qmax))
    assert math.log2(s) == round(math.log2(s))
    assert max_abs / s <= qmax
    assert max_abs / (s / 2) > qmax


# --- TFLite-Micro requantization -------------------------------------------------------------

reals = st.floats(2.0**-30, 2.0, exclude_max=True, allow_nan=False)


@SETTINGS
@given(real=reals)
@example(real=0.5)
@example(real=1.0)
@example(real=float(np.nextafter(1.0, 0.0)))
@example(real=float(np.nextafter(2.0, 0.0)))
def test_quantize_multiplier_range_and_accuracy(real):
    m, shift = nm.quantize_multiplier(real)
    assert 2**30 <= m < 2**31
    assert -31 <= shift <= 30
    reconstructed = Fraction(m) * Fraction(2) ** (shift - 31)
    assert abs(reconstructed - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


def test_quantize_multiplier_edge_cases():
    assert nm.quantize_multiplier(0.0) == (0, 0)
    assert nm.quantize_multiplier(-1.0) == (0, 0)
    assert nm.quantize_multiplier(2.0**-40) == (0, 0)  # underflows to zero, as TFLite does
    with pytest.raises(ValueError, match="too large"):
        nm.quantize_multiplier(2.0**31)


@SETTINGS
@given(a=int32_lists, b=int32s)
@example(a=[INT32_MIN, INT32_MIN, INT32_MAX, 0, -1], b=INT32_MIN)
@example(a=[INT32_MAX, INT32_MIN, 1, -1], b=INT32_MAX)
def test_srdhm_matches_gemmlowp(a, b):
    expected = [ref_srdhm(v, b) for v in a]
    xa, xt = both(a)
    got_np = nm.saturating_rounding_doubling_high_mul(xa, np.int64(b))
    got_t = nm.saturating_rounding_doubling_high_mul(xt, torch.tensor(b, dtype=torch.int64))
    assert_same(got_np, got_t, expected)


@SETTINGS
@given(x=int32_lists, exponent=st.integers(0, 31))
@example(x=[5, -5, 6, -6, 2, -2, 3, -3, 0, INT32_MIN, INT32_MAX], exponent=1)
@example(x=[5, -5, 6, -6, 7, -7], exponent=2)
def test_rounding_divide_by_pot_matches_gemmlowp(x, exponent):
    expected = [ref_rdbpot(v, exponent) for v in x]
    xa, xt = both(x)
    assert_same(nm.rounding_divide_by_pot(xa, exponent), nm.rounding_divide_by_pot(xt, exponent), expected)


@SETTINGS
@given(x=int32_lists, real=reals)
@example(x=[INT32_MAX, INT32_MIN, 1, -1, 0], real=float(np.nextafter(1.0, 0.0)))
@example(x=[3, -3, 5, -5, 7, -7], real=0.5)
@example(x=[INT32_MIN, INT32_MAX], real=1.0)
def test_multiply_by_quantized_multiplier_matches_tflite(x, real):
    m, shift = nm.quantize_multiplier(real)
    left = max(shift, 0)
    x = [v >> left for v in x]  # TFLite's x * (1 << left) must fit int32
    expected = [ref_mbqm(v, m, shift) for v in x]
    xa, xt = both(x)
    assert_same(nm.multiply_by_quantized_multiplier(xa, m, shift),
                nm.multiply_by_quantized_multiplier(xt, m, shift), expected)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 8))
def test_multiply_by_quantized_multiplier_per_channel(data, n):
    """Arrays of multipliers/shifts broadcast element-wise (per-channel requantization)."""
    rs = data.draw(st.lists(reals, min_size=n, max_size=n))
    x = data.draw(st.lists(st.integers(-(2**29), 2**29 - 1), min_size=n, max_size=n))  # x << 2 fits
    rq = nm.make_requant(np.array(rs), "tflm")
    expected = [ref_mbqm(v, int(m), int(s)) for v, m, s in zip(x, rq.multiplier, rq.shift)]
    xa, xt = both(x)
    assert_same(rq.apply(xa), rq.to_torch().apply(xt), expected)


def test_make_requant_kinds():
    rq = nm.make_requant(np.array([0.25, 2.0, 1.0]), "pow2")
    assert rq.kind == "pow2" and rq.shift.tolist() == [2, -1, 0]
    with pytest.raises(ValueError, match="power-of-two"):
        nm.make_requant(np.array([0.3]), "pow2")
    with pytest.raises(ValueError, match="tflm, pow2"):
        nm.make_requant(np.array([0.5]), "float")
    rq = nm.make_requant(np.array([[0.75], [0.5]]), "tflm")
    assert rq.multiplier.shape == (2, 1) and rq.shift.tolist() == [[0], [0]]


# --- power-of-two requantization --------------------------------------------------------------

def ref_shift_round(x: int, s: int) -> int:
    return (x + 2 ** (s - 1)) >> s if s > 0 else x << -s


@SETTINGS
@given(data=st.data(), n=st.integers(1, 16))
def test_shift_round_matches_python(data, n):
    x = data.draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n))
    s = data.draw(st.lists(st.integers(-10, 20), min_size=n, max_size=n))
    expected = [ref_shift_round(v, k) for v, k in zip(x, s)]
    xa, xt = both(x)
    sa, st_ = both(s)
    assert_same(nm.shift_round(xa, sa), nm.shift_round(xt, st_), expected)
    for k in set(s):  # scalar shifts too
        assert_same(nm.shift_round(xa, k), nm.shift_round(xt, k), [ref_shift_round(v, k) for v in x])


def test_shift_round_ties_round_half_up():
    xa, xt = both([-6, -2, 2, 6, -5, 5])
    assert_same(nm.shift_round(xa, 2), nm.shift_round(xt, 2), [-1, 0, 1, 2, -1, 1])
    assert_same(nm.shift_round(xa, -3), nm.shift_round(xt, -3), [-48, -16, 16, 48, -40, 40])
    assert_same(nm.shift_round(xa, 0), nm.shift_round(xt, 0), [-6, -2, 2, 6, -5, 5])


@SETTINGS
@given(x=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=16), n=st.integers(1, 64))
@example(x=[5, -5, 4, -4, 3, -3, 1, -1, 0], n=2)
@example(x=[4, -4, 5, -5, 13, -13], n=9)
def test_div_round_away_matches_exact(x, n):
    expected = [round_half_away(Fraction(v, n)) for v in x]
    xa, xt = both(x)
    assert_same(nm.div_round_away(xa, n), nm.div_round_away(xt, n), expected)


# --- saturation and the full requantization -------------------------------------------------

@SETTINGS
@given(acc=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=16), real=reals,
       bits=st.integers(2, 8), signed=st.booleans(), post=st.integers(0, 3))
def test_requantize_is_clip_then_shift(acc, real, bits, signed, post):
    lo, hi = nm.qrange(bits, signed)
    m, shift = nm.quantize_multiplier(real)
    acc = [v >> max(shift, 0) for v in acc]
    expected = [min(max(ref_mbqm(v, m, shift), lo), hi) << post for v in acc]
    rq = nm.make_requant(np.array(real), "tflm")
    xa, xt = both(acc)
    assert_same(nm.requantize(xa, rq, lo, hi, np.int64(post)),
                nm.requantize(xt, rq.to_torch(), lo, hi, torch.tensor(post)), expected)


@SETTINGS
@given(x=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=16), bits=st.integers(1, 16),
       signed=st.booleans())
def test_saturate_never_wraps(x, bits, signed):
    lo, hi = nm.qrange(bits, signed)
    xa, xt = both(x)
    assert_same(nm.saturate(xa, lo, hi), nm.saturate(xt, lo, hi), [min(max(v, lo), hi) for v in x])


def test_add_left_shift_keeps_int32_headroom():
    assert nm.add_left_shift(8) == 20
    for bits in range(2, 17):
        left = nm.add_left_shift(bits)
        assert left <= 20 and (2 ** (bits - 1)) << left < 2**31 // 2  # room for the sum of two


def test_fused_tflite_requantization_equals_the_two_steps_on_ties_and_extremes():
    """The torch kernels' fused multiply-by-quantized-multiplier gives the NumPy two-step integers
    on random and adversarial accumulators: exact halves after the high multiply, both signs,
    right shifts 0..31, multipliers at both ends of [2**30, 2**31)."""
    import torch

    from mixprec.numerics import (INT32_MAX, INT32_MIN, _fused_multiply_by_quantized_multiplier,
                                  multiply_by_quantized_multiplier)

    rng = np.random.default_rng(0)
    mult = np.array([2**30, 2**30 + 1, 1518500250, INT32_MAX - 1, INT32_MAX], dtype=np.int64)
    for right in range(0, 32):
        x = np.concatenate([rng.integers(INT32_MIN, INT32_MAX, 2000), rng.integers(-2**12, 2**12, 2000),
                            [0, 1, -1, INT32_MIN, INT32_MAX, 2**(right - 1) if right else 1, -(2**max(right - 1, 0))]])
        x = x.astype(np.int64)[:, None]
        shift = np.full(mult.shape, -right, dtype=np.int64)
        want = multiply_by_quantized_multiplier(x, mult, shift)
        got = _fused_multiply_by_quantized_multiplier(torch.from_numpy(x), torch.from_numpy(mult),
                                                      torch.from_numpy(shift))
        assert np.array_equal(got.numpy(), want), right
    # a left shift or a saturating multiplier is not fused: the general path runs
    assert _fused_multiply_by_quantized_multiplier(torch.ones(2, dtype=torch.int64), torch.tensor([2**30]),
                                                   torch.tensor([1])) is None
