import pytest
import torch

from mixprec.numerics import qrange
from mixprec.quantizers.base import QParams, fake_quant


def _case(per_channel: bool, signed: bool, narrow: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64) * 3
    bits = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [8.0]]) if per_channel else torch.tensor([[3.0]])
    scale = (torch.rand(bits.shape[0], 1, generator=gen, dtype=torch.float64) + 0.2) if per_channel \
        else torch.tensor([[0.37]], dtype=torch.float64)
    lo, hi = qrange(bits.expand_as(x), signed, narrow)
    x[:, 0] = hi[:, 0] * scale[:, 0]  # exactly on the top edge
    x[:, 1] = (hi[:, 0] + 0.5) * scale[:, 0]  # a rounding tie next to it
    x[:, 2] = lo[:, 0] * scale[:, 0]  # the bottom edge
    return x, bits, scale, lo.to(x.dtype), hi.to(x.dtype)


def _grads(fn, x, scale, learn_scale):
    a, s = x.clone().requires_grad_(), scale.clone().requires_grad_(learn_scale)
    y = fn(a, s)
    upstream = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * upstream).sum().backward()
    return y.detach(), upstream, a.grad, s.grad


@pytest.mark.parametrize("signed,narrow", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_pass_gradient_to_x(signed, narrow, per_channel):
    """Straight through inside the range, nothing outside, half on its edges (where the min/max
    form ties), pruned (0-bit) values included."""
    x, bits, scale, lo, hi = _case(per_channel, signed, narrow)
    y, upstream, gx, _ = _grads(lambda a, s: fake_quant(a, QParams(s, bits, signed, narrow)), x, scale, False)
    k = torch.round(x / scale)
    assert torch.equal(y, torch.clamp(k, lo, hi) * scale)
    expected = torch.where((k < lo) | (k > hi), 0.0, torch.where((k == lo) | (k == hi), 0.5, 1.0))
    assert torch.equal(gx, upstream * expected)
    assert bool((expected == 0.5).any()) and bool((expected == 0).any())


@pytest.mark.parametrize("signed,narrow", [(True, True), (False, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_pass_scale_gradient_is_lsq(signed, narrow, per_channel):
    """d(k * s)/ds: ``k - x/s`` where the code is in range (edges included), ``k`` where it clips."""
    x, bits, scale, lo, hi = _case(per_channel, signed, narrow)
    _, upstream, _, gs = _grads(lambda a, s: fake_quant(a, QParams(s, bits, signed, narrow)), x, scale, True)
    t = x / scale
    k = torch.round(t)
    kc = torch.clamp(k, lo, hi)
    expected = (upstream * torch.where(k == kc, kc - t, kc)).sum(1, keepdim=True)
    if not per_channel:
        expected = expected.sum().reshape(1, 1)
    assert torch.allclose(gs, expected, rtol=1e-12, atol=1e-12)
