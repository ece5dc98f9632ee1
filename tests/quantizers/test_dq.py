import math

import pytest
import torch

from mixprec.granularity import expand, reduce_to
from mixprec.numerics import qrange
from mixprec.quantizers.base import fake_quant
from mixprec.quantizers.dq import ALPHA, DQActQuantizer, DQWeightQuantizer, ModRound, grad_modifier

LN2 = math.log(2.0)
GRANS = [("per-element", (4, 3, 2)), ("per-channel", (4, 1, 1)), ("per-tensor", (1, 1, 1)),
         ((2, 1, 1), (2, 1, 1)), ((4, 3, 1), (4, 3, 1))]


def _w(shape=(4, 3, 2), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _set(q, d, xmax):
    with torch.no_grad():
        q.log2_d.fill_(math.log2(d))
        q.log2_xmax.fill_(math.log2(xmax))


@pytest.mark.parametrize("gran,shape", GRANS)
def test_granularity_shapes(gran, shape):
    w = _w()
    q = DQWeightQuantizer(w.shape, gran, init_bits=4, weight=w)
    assert tuple(q.log2_d.shape) == shape and tuple(q.log2_xmax.shape) == shape
    assert q(w).shape == w.shape
    qp = q.qparams(w)
    assert tuple(q.bits().shape) == shape and tuple(qp.scale.shape) == shape and tuple(qp.bits.shape) == shape
    a = DQActQuantizer((4, 3, 2), gran, init_bits=4)
    assert tuple(a.log2_d.shape) == shape
    a.train()
    assert a(torch.randn(5, 4, 3, 2)).shape == (5, 4, 3, 2)
    assert bool(a.initialized) and tuple(a.bits().shape) == shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="ewgs, atanh, ste"):
        DQWeightQuantizer((2, 2), grad_mod="lsq")
    with pytest.raises(ValueError, match="scaled"):
        DQActQuantizer((2,), numerics="float")


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("gran", [g for g, _ in GRANS])
def test_forward_equals_fake_quant(numerics, gran):
    w = _w() * 2
    q = DQWeightQuantizer(w.shape, gran, init_bits=3, weight=w, numerics=numerics)
    with torch.no_grad():  # spread the groups' steps and ranges, some elements clip
        q.log2_d.add_(torch.linspace(-1, 1, q.log2_d.numel()).reshape(q.log2_d.shape))
        q.log2_xmax.sub_(0.7)
    q.project()
    y, qp = q(w), q.qparams(w)
    assert torch.equal(y, fake_quant(w, qp))
    assert qp.signed and qp.narrow
    scale = expand(qp.scale.detach(), w.shape)
    codes = torch.round(y / scale)
    assert torch.equal(codes * scale, y)
    lo, hi = qrange(expand(qp.bits, w.shape), True, True)
    assert bool(((codes >= lo) & (codes <= hi)).all())
    assert bool(((w / scale).abs() > hi + 0.5).any())  # clipped elements are compared too
    if numerics == "fixed":
        e = torch.log2(qp.scale.detach())
        assert torch.equal(e, torch.round(e))
    for signed, data in ((False, torch.relu(_w((6, 4, 3, 2), 1))), (True, _w((6, 4, 3, 2), 1))):
        a = DQActQuantizer((4, 3, 2), gran, init_bits=3, numerics=numerics)
        a.calibrate([data])
        assert a.signed == signed
        x = data * 3  # beyond the range even when a power-of-two step rounds it up
        y, qp = a(x), a.qparams()
        assert torch.equal(y, fake_quant(x, qp)) and qp.signed == signed and not qp.narrow
        scale = expand(qp.scale.detach(), a.shape)
        codes = torch.round(y / scale)
        assert torch.equal(codes * scale, y)
        lo, hi = qrange(expand(qp.bits, a.shape), signed)
        assert bool(((codes >= lo) & (codes <= hi)).all())
        assert bool(((x / scale > hi + 0.5) | (x / scale < lo - 0.5)).any())


def test_forward_ties_round_half_even():
    q = DQWeightQuantizer((6,), "per-tensor", numerics="fixed")
    _set(q, 0.25, 2.0)  # c = ceil(log2(9)) = 4: codes [-15, 15]
    x = torch.tensor([0.125, 0.375, -0.125, -0.625, 3.875, 5.0])  # codes 0.5, 1.5, -0.5, -2.5, 15.5, 20
    y = q(x)
    assert y.tolist() == [0.0, 0.5, -0.0, -0.5, 3.75, 3.75]
    assert torch.equal(y, fake_quant(x, q.qparams(x)))


@pytest.mark.parametrize("d,xmax", [(0.1, 1.0), (0.25, 0.75), (0.5, 0.5), (1.0, 0.3), (2 ** -12, 3.0),
                                    (0.01, 7.0)])
def test_implied_bits_formula(d, xmax):
    c = max(math.ceil(math.log2(xmax / d + 1)), 1)
    q = DQWeightQuantizer((3,), "per-tensor")
    _set(q, d, xmax)
    assert q.bits().item() == c + 1 and q.frozen_bits().item() == c + 1
    assert q.qparams().bits.item() == c + 1
    for signed in (False, True):
        a = DQActQuantizer((3,), signed=signed)
        a.calibrate([torch.ones(1, 3)])
        _set(a, d, xmax)
        assert a.bits().item() == c + signed


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12])
def test_init_from_weights_gives_init_bits(numerics, bits):
    w = _w((16, 5, 3), 2) * torch.logspace(-3, 1, 16).reshape(16, 1, 1)
    q = DQWeightQuantizer(w.shape, "per-channel", init_bits=bits, weight=w, numerics=numerics)
    mu = reduce_to(w.double(), q.param_shape, "mean")
    sigma = reduce_to((w.double() - expand(mu, w.shape)) ** 2, q.param_shape, "mean").sqrt()
    xmax = torch.minimum(mu.abs() + 3 * sigma, reduce_to(w.double().abs(), q.param_shape))
    d = xmax / (2 ** (bits - 1) - 1)
    free = (d >= 2 ** -12) & (d <= 1)  # the clamp on d leaves the other groups fewer / the same bits
    assert bool(free.sum() >= 4)
    bits_now = q.bits().detach()
    assert bool((q.log2_d <= q.log2_xmax).all())
    assert bool((bits_now[free] == bits).all()) and bool((bits_now <= bits).all())
    assert bool((bits_now[d > 1] == bits).all())  # d = 1 and xmax capped to the bits' range
    if numerics == "scaled" or bits > 2:  # fixed ternary: d <= xmax snaps xmax to the power-of-two d
        assert torch.allclose(q.xmax().double()[free], xmax[free], rtol=1e-4)
    if numerics == "scaled":
        assert torch.allclose(q.step().double()[free], d[free], rtol=1e-4)
    plain = DQWeightQuantizer(w.shape, "per-channel", init_bits=bits, numerics=numerics)
    assert plain.bits().unique().tolist() == [float(bits)]
    assert torch.allclose(plain.xmax(), torch.ones(1), rtol=1e-4)


def test_init_xmax_capped_by_max_abs_and_degenerate_groups():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8])
    q = DQWeightQuantizer(w.shape, "per-channel", init_bits=4, weight=w)
    assert abs(q.xmax()[0].item() - 1.0) < 1e-4  # |mu| + 3 sigma = 1.17 > max|w| = 1
    assert q.xmax()[1].item() >= 2 ** -12 and q.step()[1].item() >= 2 ** -12
    assert torch.isfinite(q(w)).all() and torch.equal(q(w)[1], torch.zeros(8))


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
def test_activation_calibrate(numerics):
    x = torch.rand(64, 2, 50, generator=torch.Generator().manual_seed(3)) * torch.tensor([[1.0], [10.0]])
    a = DQActQuantizer((2, 50), "per-channel", init_bits=5, numerics=numerics)
    with pytest.raises(RuntimeError, match="calibrate"):
        a.qparams()
    a.eval()
    with pytest.raises(RuntimeError, match="calibrate"):
        a(x)
    a.calibrate([x[:32], x[32:]])
    assert not a.signed and a.bits().reshape(-1).tolist() == [5.0, 5.0]
    p999 = torch.quantile(x.transpose(0, 1).reshape(2, -1).double(), 0.999, dim=1)
    assert torch.allclose(a.xmax().reshape(-1).double(), p999, rtol=1e-4)
    s = DQActQuantizer((2, 50), init_bits=5, numerics=numerics)
    s.calibrate([x - 0.5])
    assert s.signed and s.bits().item() == 5.0
    r6 = DQActQuantizer((2, 50), init_bits=4, clip=(0.0, 6.0))  # ReLU6
    r6.calibrate([x * 10])
    assert abs(r6.xmax().item() - 6.0) < 1e-4 and r6.bits().item() == 4.0
    forced = DQActQuantizer((2, 50), init_bits=4, signed=True)
    forced.calibrate([x])
    assert forced.signed and forced.bits().item() == 4.0


def test_activation_initialises_on_first_training_batch():
    a = DQActQuantizer((3,), init_bits=4)
    a.train()
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    y = a(x)
    assert bool(a.initialized) and a.signed and a.bits().item() == 4.0
    assert torch.equal(y, fake_quant(x, a.qparams()))
    log2_xmax = a.log2_xmax.detach().clone()
    a(x * 100)  # initialised once only
    assert torch.equal(a.log2_xmax.detach(), log2_xmax)


def test_grad_modifier_shapes():
    half = torch.tensor([0.5 - 1e-12, -0.5 + 1e-12], dtype=torch.float64)
    assert torch.allclose(grad_modifier(half, "atanh"), half, atol=1e-9)
    assert torch.allclose(grad_modifier(half, "ewgs"), half)
    u = torch.linspace(-0.49, 0.49, 99, dtype=torch.float64)
    m = grad_modifier(u, "atanh")
    assert torch.allclose(grad_modifier(-u, "atanh"), -m)  # odd
    assert bool((m.diff() > 0).all())
    assert grad_modifier(u + 3, "atanh").sub(m).abs().max() < 1e-9  # periodic in the rounding error
    assert torch.equal(grad_modifier(u, "ste"), torch.zeros_like(u))
    k = 0.5 / math.atanh(ALPHA / 2)
    torch.autograd.gradcheck(lambda t: grad_modifier(t, "atanh"), (u[::7].clone().requires_grad_(),))
    zero = torch.zeros(1, dtype=torch.float64)
    slope0 = torch.autograd.functional.jacobian(lambda t: grad_modifier(t, "atanh"), zero)
    assert abs(slope0.item() - k * ALPHA) < 1e-12  # flatter than EWGS's 1 at the grid points


def _x_grad(grad_mod, x, g, d=0.125, xmax=0.8, delta=5e-3):
    q = DQWeightQuantizer(x.shape, "per-tensor", grad_mod=grad_mod, delta=delta).double()
    _set(q, d, xmax)
    x = x.clone().requires_grad_(True)
    (q(x) * g).sum().backward()
    return x.grad, x.detach() / d, q


def test_ste_x_gradient_is_one_inside_zero_outside():
    x = torch.tensor([-3.0, -0.9, -0.3, 0.01, 0.6, 0.93, 2.0], dtype=torch.float64)  # range: 7 * 0.125
    gx, _, q = _x_grad("ste", x, torch.ones_like(x))
    assert gx.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert q.bits().item() == 4.0


@pytest.mark.parametrize("mode", ["ewgs", "atanh"])
def test_modified_x_gradient_matches_formula(mode):
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(200, generator=gen, dtype=torch.float64) - 0.5) * 2.4  # range +-0.875: some clip
    g = torch.randn(200, generator=gen, dtype=torch.float64)
    gx, u, _ = _x_grad(mode, x, g, delta=0.3)
    inside = u.abs() < 7
    expected = g * (1 + 0.3 * torch.sign(g) * grad_modifier(u, mode))
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.allclose(gx[inside], expected[inside], rtol=0, atol=1e-14)
    assert torch.equal(gx[~inside], torch.zeros_like(gx[~inside]))
    # the modification moves the gradient away from the STE where the rounding error is large
    gs, _, _ = _x_grad("ste", x, g)
    assert not torch.allclose(gx[inside], gs[inside])


def test_mod_round_forward_is_plain_round():
    u = torch.tensor([0.5, 1.5, -0.5, 2.4999, -2.6], dtype=torch.float64, requires_grad=True)
    for mode in ("ewgs", "atanh", "ste"):
        assert torch.equal(ModRound.apply(u, mode, 0.1), torch.round(u.detach()))


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("mode", ["ste", "ewgs", "atanh"])
def test_step_gradient_lsq_and_finite_difference(numerics, mode):
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(300, generator=gen, dtype=torch.float64) - 0.5) * 1.6
    g = torch.randn(300, generator=gen, dtype=torch.float64)
    delta, d0 = 0.2, 0.125  # codes [-7, 7] cover every x: no clipping, so c takes no gradient
    q = DQWeightQuantizer(x.shape, "per-tensor", numerics=numerics, grad_mod=mode, delta=delta).double()
    _set(q, d0, 0.8)
    assert q.bits().item() == 4.0
    (q(x) * g).sum().backward()
    u = x / d0
    k = torch.round(u)
    rprime = 1 + delta * torch.sign(g) * grad_modifier(u, mode)
    dq_dd = k - u * rprime  # LSQ when rprime == 1
    assert torch.allclose(q.log2_d.grad, (g * dq_dd).sum() * d0 * LN2, rtol=1e-12)
    assert q.log2_xmax.grad.item() == 0.0

    # finite differences in log2_d (chain factor d * ln2 included) of (a) the linearised surrogate,
    # R(u) ~ k + rprime * (u - u0), and (b) the true piecewise-linear q, whose slope is k: they
    # differ by the surrogate's -u * rprime term
    def surrogate(e):
        d = 2.0 ** e
        return (g * d * (k + rprime * (x / d - u))).sum()

    def true_q(e):
        d = 2.0 ** e
        return (g * d * torch.round(x / d)).sum()

    e0, h = math.log2(d0), 1e-7
    fd_s = (surrogate(e0 + h) - surrogate(e0 - h)) / (2 * h)
    assert abs(fd_s.item() - q.log2_d.grad.item()) < 1e-6 * max(1.0, abs(fd_s.item()))
    fd_t = (true_q(e0 + h) - true_q(e0 - h)) / (2 * h)  # no element lies within h of a tie
    assert abs(fd_t.item() - (g * k).sum().item() * d0 * LN2) < 1e-6 * max(1.0, abs(fd_t.item()))


@pytest.mark.parametrize("signed", [False, True])
def test_bits_ste_gradient_matches_smooth_finite_difference(signed):
    a = DQActQuantizer((5,), "per-element", signed=signed).double()
    a.calibrate([torch.ones(1, 5)])
    with torch.no_grad():
        a.log2_d.copy_(torch.tensor([-3.0, -2.3, -5.1, -1.0, -0.2], dtype=torch.float64))
        a.log2_xmax.copy_(torch.tensor([0.4, -1.2, 1.7, 2.9, 0.1], dtype=torch.float64))
    a.bits().sum().backward()

    def smooth(lx, ld):
        return torch.log2(2.0 ** lx / 2.0 ** ld + 1)

    lx, ld, h = a.log2_xmax.detach(), a.log2_d.detach(), 1e-6
    fd_x = (smooth(lx + h, ld) - smooth(lx - h, ld)) / (2 * h)
    fd_d = (smooth(lx, ld + h) - smooth(lx, ld - h)) / (2 * h)
    assert torch.allclose(a.log2_xmax.grad, fd_x, atol=1e-6)
    assert torch.allclose(a.log2_d.grad, fd_d, atol=1e-6)
    assert bool((fd_x > 0).all()) and bool((fd_d < 0).all())


def test_clipped_elements_push_xmax():
    q = DQWeightQuantizer((4,), "per-tensor", grad_mod="ste").double()
    _set(q, 0.125, 0.8)  # codes [-7, 7]
    x = torch.tensor([5.0, 0.1, -0.2, 0.3], dtype=torch.float64)
    (q(x) * torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)).sum().backward()
    assert q.log2_xmax.grad.item() > 0  # a larger range lets q(5.0) grow
    # value: d * 2^c * ln2 (d hi / d c) * d c / d log2_xmax, with s = xmax / d
    s = 0.8 / 0.125
    assert abs(q.log2_xmax.grad.item() - 0.125 * 8 * LN2 * s / (s + 1)) < 1e-12
    q.zero_grad()
    (q(-x) * torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)).sum().backward()
    assert q.log2_xmax.grad.item() < 0
    a = DQActQuantizer((2,), grad_mod="ste", signed=False).double()
    a.calibrate([torch.ones(1, 2)])
    _set(a, 0.125, 0.8)
    a(torch.tensor([[9.0, 0.2]], dtype=torch.float64)).sum().backward()
    assert a.log2_xmax.grad.item() > 0


@pytest.mark.parametrize("cls,d_max", [(DQWeightQuantizer, 1.0), (DQActQuantizer, 8.0)])
def test_project_bounds(cls, d_max):
    q = cls((3, 2), "per-channel")
    with torch.no_grad():
        q.log2_d.copy_(torch.tensor([[-20.0], [5.0], [-1.0]]))
        q.log2_xmax.copy_(torch.tensor([[-30.0], [9.0], [-2.0]]))
    q.project()
    d, xmax = q.step().reshape(-1), q.xmax().reshape(-1)
    assert bool((d >= 2 ** -12).all()) and bool((d <= d_max).all()) and bool((d <= xmax).all())
    assert d.tolist() == [2 ** -12, d_max, 0.25] and xmax.tolist() == [2 ** -12, 512.0, 0.25]
    q.clamp_()  # alias, idempotent
    assert q.step().reshape(-1).tolist() == d.tolist()


def test_activation_state_dict_round_trip():
    x = _w((8, 3, 4), 6)
    a = DQActQuantizer((3, 4), "per-channel", init_bits=4, numerics="fixed")
    a.calibrate([x])
    with torch.no_grad():
        a.log2_d.add_(0.3)
    b = DQActQuantizer((3, 4), "per-channel", init_bits=4, numerics="fixed")
    b.load_state_dict(a.state_dict())
    b.eval()
    assert bool(b.initialized) and b.signed
    assert torch.equal(a(x), b(x)) and torch.equal(a.bits(), b.bits())


def _composed(q, x, value_shape):
    """The quantizer's forward written with plain autograd ops: the fused pass must match it."""
    d = expand(q.step(), value_shape)
    lo, hi = (expand(t, value_shape) for t in q._codes(q._mag_bits()))
    return ModRound.apply(torch.minimum(torch.maximum(x / d, lo), hi), q.grad_mod, q.delta) * d


def _grads(q, f, x, g):
    q.zero_grad()
    x = x.clone().requires_grad_(True)
    out = f(x)
    (out * g).sum().backward()
    return [out.detach(), x.grad, q.log2_d.grad.clone(), q.log2_xmax.grad.clone()]


@pytest.mark.parametrize("mode", ["ste", "ewgs", "atanh"])
@pytest.mark.parametrize("gran", [name for name, _ in GRANS])
@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_fused_pass_matches_composed_ops(mode, gran, kind):
    w = _w(seed=7, dtype=torch.float64)
    if kind == "weight":
        q = DQWeightQuantizer(w.shape, gran, init_bits=3, weight=w, grad_mod=mode, delta=0.3).double()
        x, shape = 1.5 * w, w.shape  # some weights clip
    else:
        x = 2 * torch.randn((5, *w.shape), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        q = DQActQuantizer(w.shape, gran, init_bits=3, grad_mod=mode, delta=0.3).double()
        q.calibrate([x])
        shape = w.shape
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fused = _grads(q, lambda t: q._quantize(t, shape), x, g)
    composed = _grads(q, lambda t: _composed(q, t, shape), x, g)
    assert torch.equal(fused[0], composed[0])
    for a, b in zip(fused[1:], composed[1:]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert fused[3].abs().sum() > 0  # clipped elements reached the range


def test_fused_pass_tie_with_bound_goes_to_x():
    q = DQWeightQuantizer((3,), "per-tensor", numerics="fixed").double()
    _set(q, 0.125, 0.8)  # codes [-7, 7]
    x = torch.tensor([0.875, -0.875, 1.0], dtype=torch.float64)  # on both bounds, beyond
    _, gx, _, gxmax = _grads(q, q, x, torch.ones(3, dtype=torch.float64))
    assert gx.tolist() == [1.0, 1.0, 0.0]
    # only the clipped element pulls the range: d * dhi/dc * dc/dlog2(xmax), all positive
    assert gxmax.item() > 0
