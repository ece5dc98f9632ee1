"""Granularity as the shape of a parameter tensor: shapes, expansion, reduction, tiling errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.granularity import GRANULARITIES, check_compatible, expand, granularity_of, reduce_to, shape_for

SETTINGS = settings(max_examples=50, deadline=None)

value_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def shape_and_param_shape(draw):
    """A value shape and a parameter shape tiling it (each dim: 1, a divisor, or the full size)."""
    shape = draw(value_shapes)
    param = tuple(draw(st.sampled_from(divisors(n))) for n in shape)
    return shape, param


# --- shape_for --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ((8, 3, 3, 3), {"per-tensor": (1, 1, 1, 1), "per-channel": (8, 1, 1, 1), "per-slice": (4, 1, 1, 1),
                    "per-element": (8, 3, 3, 3)}),
    ((6, 5), {"per-tensor": (1, 1), "per-channel": (6, 1), "per-slice": (3, 1), "per-element": (6, 5)}),
    ((7,), {"per-tensor": (1,), "per-channel": (7,), "per-slice": (1,), "per-element": (7,)}),
    ((2, 4), {"per-tensor": (1, 1), "per-channel": (2, 1), "per-slice": (2, 1), "per-element": (2, 4)}),
])
def test_shape_for_examples(shape, expected):
    for g in GRANULARITIES:
        assert shape_for(g, shape) == expected[g]


@SETTINGS
@given(shape=value_shapes, slices=st.integers(1, 8))
def test_shape_for_properties(shape, slices):
    for g in GRANULARITIES:
        p = shape_for(g, shape, slices)
        assert len(p) == len(shape)
        check_compatible(p, shape)
        assert expand(torch.zeros(p), shape).shape == shape
    assert shape_for("per-tensor", shape) == (1,) * len(shape)
    assert shape_for("per-channel", shape) == (shape[0],) + (1,) * (len(shape) - 1)
    assert shape_for("per-element", shape) == shape
    n = shape_for("per-slice", shape, slices)[0]
    # the largest count <= slices (and <= channels) that divides the channels
    assert shape[0] % n == 0 and n <= min(slices, shape[0])
    assert all(shape[0] % m for m in range(n + 1, min(slices, shape[0]) + 1))


def test_shape_for_rejects_unknown_granularity():
    with pytest.raises(ValueError, match="per-tensor"):
        shape_for("per-group", (4, 4))


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (6, 5), (12, 2, 5)])
def test_granularity_of_names_shape_for(shape):
    for g in GRANULARITIES:
        assert granularity_of(shape_for(g, shape), shape) == g


# --- expand / reduce_to -------------------------------------------------------------------------

@SETTINGS
@given(sp=shape_and_param_shape(), op=st.sampled_from(["amax", "amin", "mean"]))
def test_reduce_inverts_expand(sp, op):
    shape, pshape = sp
    p = torch.randn(pshape, dtype=torch.float64)
    full = expand(p, shape)
    assert full.shape == shape
    assert torch.allclose(reduce_to(full, pshape, op), p)
    group = full.numel() // p.numel()
    assert torch.allclose(reduce_to(full, pshape, "sum"), p * group)


@SETTINGS
@given(sp=shape_and_param_shape())
def test_expand_of_reduce_bounds_values(sp):
    shape, pshape = sp
    v = torch.randn(shape, dtype=torch.float64)
    hi = expand(reduce_to(v, pshape, "amax"), shape)
    lo = expand(reduce_to(v, pshape, "amin"), shape)
    assert torch.all(lo <= v) and torch.all(v <= hi)
    # the maximum of every group is attained inside that group
    assert torch.equal(reduce_to((v == hi).to(torch.float64), pshape, "amax"), torch.ones(pshape, dtype=torch.float64))


@SETTINGS
@given(sp=shape_and_param_shape())
def test_expand_tiles_consecutive_slices(sp):
    """Entry ``i`` of a dim of size ``n`` covers indices ``[i * full/n, (i+1) * full/n)``."""
    shape, pshape = sp
    p = torch.arange(torch.Size(pshape).numel(), dtype=torch.float64).reshape(pshape)
    full = expand(p, shape)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        src = tuple(i // (full_n // n) for i, n, full_n in zip(idx, pshape, shape))
        assert full[tuple(idx)] == p[src]


def test_expand_per_slice_example():
    p = torch.tensor([[1.0], [2.0], [3.0]])
    assert expand(p, (6, 2)).tolist() == [[1, 1], [1, 1], [2, 2], [2, 2], [3, 3], [3, 3]]
    assert reduce_to(torch.arange(12.0).reshape(6, 2), (3, 1), "amax").flatten().tolist() == [3, 7, 11]


def test_expand_broadcasts_missing_leading_dims():
    p = torch.tensor([1.0, 2.0])
    assert expand(p, (3, 2)).tolist() == [[1, 2]] * 3
    assert expand(torch.tensor(5.0), (2, 2)).tolist() == [[5, 5], [5, 5]]


@pytest.mark.parametrize("pshape, shape", [((3,), (4,)), ((4, 1), (6, 2)), ((2, 3), (2, 4)),
                                           ((1, 1, 1), (4, 4))])
def test_non_tiling_shapes_raise(pshape, shape):
    with pytest.raises(ValueError):
        expand(torch.zeros(pshape), shape)
    with pytest.raises(ValueError):
        reduce_to(torch.zeros(shape), pshape)
    with pytest.raises(ValueError):
        check_compatible(pshape, shape)
