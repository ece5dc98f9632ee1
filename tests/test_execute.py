"""Integer kernels and op semantics against independent definitions.

The conformance suite compares the two kernel sets with each other; both share the interpreter's
op semantics (``execute.step``), so those are pinned here against plain definitions.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixprec.execute import NumpyKernels, TorchKernels, step
from mixprec.lower import IntNode

rng = np.random.default_rng(0)
KERNELS = [NumpyKernels, TorchKernels]


def as_kernel_input(k, a):
    return torch.as_tensor(a) if k is TorchKernels else a


def to_numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


CONVS = [
    dict(dims=1, kernel_size=(3,), stride=(1,), padding=(0,), dilation=(1,), groups=1),
    dict(dims=1, kernel_size=(3,), stride=(2,), padding=(2,), dilation=(2,), groups=2),
    dict(dims=2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
    dict(dims=2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=1),
    dict(dims=2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4),
    dict(dims=2, kernel_size=(2, 2), stride=(1, 1), padding=(0, 0), dilation=(2, 2), groups=2),
]


@pytest.mark.parametrize("attrs", CONVS, ids=lambda a: f"{a['dims']}d-g{a['groups']}-s{a['stride'][0]}")
@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_conv_matches_float_convolution(k, attrs):
    c_in, c_out = 4, 4
    spatial = (7,) * attrs["dims"]
    x = rng.integers(-128, 128, size=(2, c_in) + spatial)
    w = rng.integers(-127, 128, size=(c_out, c_in // attrs["groups"]) + attrs["kernel_size"])
    fn = F.conv1d if attrs["dims"] == 1 else F.conv2d
    expected = fn(torch.as_tensor(x).double(), torch.as_tensor(w).double(), None, attrs["stride"],
                  attrs["padding"], attrs["dilation"], attrs["groups"]).round().to(torch.int64).numpy()
    got = to_numpy(k.conv(as_kernel_input(k, x), as_kernel_input(k, w), attrs))
    assert got.dtype == np.int64
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_linear_is_exact_int64(k):
    x = rng.integers(-(2**15), 2**15, size=(3, 40))
    w = rng.integers(-(2**15), 2**15, size=(5, 40))
    expected = np.array([[sum(int(a) * int(b) for a, b in zip(row, wr)) for wr in w] for row in x])
    assert np.array_equal(to_numpy(k.linear(as_kernel_input(k, x), as_kernel_input(k, w))), expected)


def brute_pool(x: np.ndarray, kernel, stride, padding, reduce, fill):
    """Pooling by explicit loops over windows of a zero-/fill-padded map."""
    pad = [(0, 0), (0, 0)] + [(p, p) for p in padding]
    xp = np.pad(x, pad, constant_values=fill)
    out_sp = [(xp.shape[2 + d] - kernel[d]) // stride[d] + 1 for d in range(len(kernel))]
    out = np.zeros(x.shape[:2] + tuple(out_sp), dtype=object)
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for pos in itertools.product(*[range(o) for o in out_sp]):
            sl = tuple(slice(p * s, p * s + kk) for p, s, kk in zip(pos, stride, kernel))
            out[(n, c) + pos] = reduce([int(v) for v in xp[(n, c) + sl].ravel()])
    return out


POOLS = [
    dict(dims=1, kernel_size=(3,), stride=(2,), padding=(1,)),
    dict(dims=2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
    dict(dims=2, kernel_size=(2, 3), stride=(1, 2), padding=(0, 1)),
]


@pytest.mark.parametrize("attrs", POOLS, ids=lambda a: f"{a['dims']}d-{a['kernel_size']}")
@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_maxpool_padding_never_wins(k, attrs):
    """Padding is -inf for max pooling: an all-negative map keeps its negative maxima."""
    x = rng.integers(-100, -1, size=(2, 3) + (6,) * attrs["dims"])
    expected = brute_pool(x, attrs["kernel_size"], attrs["stride"], attrs["padding"], max, -(2**62)).astype(np.int64)
    assert np.array_equal(to_numpy(k.maxpool(as_kernel_input(k, x), attrs)), expected)


@pytest.mark.parametrize("attrs", [dict(p, padding=(0,) * p["dims"]) for p in POOLS],
                         ids=lambda a: f"{a['dims']}d-{a['kernel_size']}")
@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_avgpool_rounds_half_away_from_zero(k, attrs):
    x = rng.integers(-50, 50, size=(2, 3) + (7,) * attrs["dims"])
    x[0, 0] = 1  # includes exact halves: windows of 1s and 0s below
    x[0, 1] = np.indices(x.shape[2:]).sum(0) % 2
    x[0, 2] = -x[0, 1]
    n = int(np.prod(attrs["kernel_size"]))
    expected = brute_pool(x, attrs["kernel_size"], attrs["stride"], (0,) * attrs["dims"],
                          lambda v: _round_half_away(Fraction(sum(v), n)), 0).astype(np.int64)
    node = IntNode("pool", "avgpool", ["x"], attrs, ())
    got = to_numpy(step(node, [as_kernel_input(k, x)], k))
    assert np.array_equal(got, expected)


def _round_half_away(f: Fraction) -> int:
    sign = 1 if f >= 0 else -1
    return sign * int(abs(f) + Fraction(1, 2))


@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_flatten_is_row_major(k):
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(to_numpy(k.flatten(as_kernel_input(k, x))), x.reshape(2, 12))


def test_unknown_op_names_the_node():
    with pytest.raises(ValueError, match="'mystery'"):
        step(IntNode("mystery", "softmax", [], {}, ()), [], NumpyKernels)


def test_torch_kernels_pick_a_float_type_that_keeps_every_sum_exact():
    import torch

    from mixprec.execute import NumpyKernels, TorchKernels, exact_float_dtype

    small = torch.full((1, 64), 127, dtype=torch.int64), torch.full((4, 64), -127, dtype=torch.int64)
    assert exact_float_dtype(*small) == torch.float32  # 64 * 127 * 127 < 2**24
    # 2048 * 127 * 127 > 2**24: float32 would round these sums; float64 is chosen and is exact
    x = torch.randint(-128, 128, (3, 2048), generator=torch.Generator().manual_seed(0))
    w = torch.randint(-127, 128, (5, 2048), generator=torch.Generator().manual_seed(1))
    x[0], w[0] = 127, 127
    assert exact_float_dtype(x, w) == torch.float64
    assert np.array_equal(TorchKernels.linear(x, w).numpy(), NumpyKernels.linear(x.numpy(), w.numpy()))


@pytest.mark.parametrize("dims,groups,stride,padding,dilation", [
    (2, 1, (1, 1), (1, 1), (1, 1)), (2, 4, (2, 1), (0, 2), (1, 2)), (2, 8, (1, 1), (1, 1), (1, 1)),
    (1, 1, (2,), (3,), (1,)), (1, 2, (1,), (0,), (3,))])
def test_gemm_convolution_equals_the_reference(dims, groups, stride, padding, dilation):
    # the exact float32 path a GPU takes (im2col + a plain matrix product, TF32 off), run on the CPU
    import torch

    from mixprec.execute import NumpyKernels, exact_float_dtype, gemm_conv

    g = torch.Generator().manual_seed(groups + dims)
    spatial = (9, 7) if dims == 2 else (23,)
    kernel = (3, 2) if dims == 2 else (5,)
    x = torch.randint(-128, 128, (3, 8, *spatial), generator=g)
    w = torch.randint(-127, 128, (16, 8 // groups, *kernel), generator=g)
    attrs = dict(dims=dims, groups=groups, stride=stride, padding=padding, dilation=dilation, kernel_size=kernel)
    assert exact_float_dtype(x, w) == torch.float32
    got = gemm_conv(x.float(), w.float(), attrs).round().to(torch.int64).numpy()
    assert np.array_equal(got, NumpyKernels.conv(x.numpy(), w.numpy(), attrs))


def test_only_a_gpu_float32_convolution_goes_through_the_gemm():
    import torch

    from mixprec.execute import ieee_float32, uses_gemm

    assert uses_gemm(torch.device("cuda"), torch.float32)
    assert not uses_gemm(torch.device("cuda"), torch.float64)  # float64 is exact in any algorithm below 2**53
    assert not uses_gemm(torch.device("cpu"), torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with ieee_float32():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
