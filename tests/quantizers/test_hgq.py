import math

import pytest
import torch

from mixprec.granularity import expand
from mixprec.quantizers.base import fake_quant
from mixprec.quantizers.hgq import HGQActQuantizer, HGQRound, HGQWeightQuantizer

LN2 = math.log(2.0)


def _w(shape=(4, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


@pytest.mark.parametrize("gran,shape", [("per-element", (4, 3, 2)), ("per-channel", (4, 1, 1)),
                                        ("per-tensor", (1, 1, 1)), ((2, 1, 1), (2, 1, 1)), ((4, 3, 1), (4, 3, 1))])
def test_granularity_shapes(gran, shape):
    w = _w()
    q = HGQWeightQuantizer(w.shape, gran, init_bits=3)
    assert tuple(q.f.shape) == shape
    q(w)
    assert tuple(q.bits().shape) == shape
    qp = q.qparams(w)
    assert tuple(qp.scale.shape) == shape and tuple(qp.bits.shape) == shape
    a = HGQActQuantizer((4, 3, 2), gran, init_bits=3)
    assert tuple(a.f.shape) == shape
    a.train()
    a(torch.randn(5, 4, 3, 2))
    assert tuple(a.bits().shape) == shape and tuple(a.running_max.shape) == shape


def test_forward_exact_on_grid_and_matches_fake_quant():
    w = _w()
    f = torch.tensor([[[2.0]], [[0.0]], [[3.0]], [[-1.0]]])
    q = HGQWeightQuantizer(w.shape, "per-channel", init_f=f + 0.3)  # rounds to f
    y = q(w)
    step = expand(torch.exp2(-f), w.shape)
    assert torch.equal(y, torch.round(w / step) * step)
    codes = y / step
    assert torch.equal(codes, torch.round(codes))
    qp = q.qparams(w)
    assert torch.equal(qp.scale, torch.exp2(-f))
    assert torch.equal(fake_quant(w, qp), y)
    # storage bits hold every code (signed, narrow): weights never saturate
    mag = codes.abs().reshape(4, -1).amax(1)
    hi = torch.exp2(qp.bits.reshape(-1) - 1) - 1
    assert bool((mag <= hi).all())
    assert bool((torch.exp2(qp.bits.reshape(-1) - 2) - 1 < mag).all())  # and are minimal


def test_weight_integer_bits_from_values():
    w = torch.tensor([[0.3, -0.2], [3.0, 0.5], [0.01, 0.0]])
    q = HGQWeightQuantizer(w.shape, "per-channel", init_f=2.0)
    # q(w) at f=2: [0.25, -0.25], [3, 0.5], [0, 0] -> I = floor(log2 max) + 1 = -1, 2, pruned
    assert q.magnitude_bits(w).reshape(-1).tolist() == [1.0, 4.0, 0.0]
    assert q.bits(w).reshape(-1).tolist() == [2.0, 5.0, 0.0]  # storage: sign bit unless pruned
    assert q.qparams(w).bits.reshape(-1).tolist() == [2.0, 5.0, 0.0]


def test_pruning_at_negative_f():
    w = torch.tensor([[0.3, -1.7, 5.0, 0.9]])
    q = HGQWeightQuantizer(w.shape, "per-element", init_f=[[-2.0, -1.0, -2.0, 0.0]])
    y = q(w)
    assert y.tolist() == [[0.0, -2.0, 4.0, 1.0]]
    assert q.magnitude_bits(w).tolist() == [[0.0, 1.0, 1.0, 1.0]]
    assert q.qparams(w).bits.tolist() == [[0.0, 2.0, 2.0, 2.0]] == q.bits(w).tolist()
    # bits() is differentiable in f (where not pruned)
    q.bits(w).sum().backward()
    assert q.f.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_surrogate_gradient_per_element():
    w = _w().double()
    q = HGQWeightQuantizer(w.shape, "per-element", init_f=2.0).double()
    y = q(w)
    y.sum().backward()
    expected = -LN2 * (y.detach() - w)  # group size 1: no scaling
    assert torch.allclose(q.f.grad, expected, atol=1e-12)


@pytest.mark.parametrize("gran,group", [("per-channel", 6), ("per-tensor", 24), ((2, 1, 1), 12), ((4, 3, 1), 2)])
def test_surrogate_gradient_group_scaling(gran, group):
    w = _w().double()
    q = HGQWeightQuantizer(w.shape, gran, init_f=3.0).double()
    g = torch.randn(w.shape, dtype=torch.float64)
    y = q(w)
    (y * g).sum().backward()
    from mixprec.granularity import reduce_to
    expected = reduce_to(g * -LN2 * (y.detach() - w), tuple(q.f.shape), "sum") / math.sqrt(group)
    assert torch.allclose(q.f.grad, expected, atol=1e-12)


def test_surrogate_matches_finite_difference_on_average():
    # d/df of the mean squared error of round-to-grid: the surrogate -ln2*(q-x) gives
    # d(0.5*sum((q-x)^2))/df = -ln2 * sum((q-x)^2); compare with a finite difference in f
    # (one extra fractional bit roughly quarters the squared error: ln(mse) falls ~ 2*ln2 per bit).
    x = torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4 - 2
    fs = 4.0
    mse = []
    for f in (fs, fs + 1):
        y = HGQRound.apply(x, torch.tensor(f, dtype=torch.float64), torch.tensor(-1e9), torch.tensor(1e9))
        mse.append(((y - x) ** 2).sum())
    fd = torch.log(mse[1]) - torch.log(mse[0])  # d ln(E)/df ~ -2 ln2
    f = torch.tensor(fs, dtype=torch.float64, requires_grad=True)
    y = HGQRound.apply(x, f, torch.tensor(-1e9), torch.tensor(1e9))
    e = ((y - x.detach()) ** 2).sum()
    # autograd through the custom function: dE/df = sum 2(q-x) * dq/df = -2 ln2 sum (q-x)^2
    e.backward()
    analytic = f.grad / e.detach()
    assert abs(float(analytic) - (-2 * LN2)) < 1e-9
    assert abs(float(fd) - (-2 * LN2)) < 0.05


def test_ste_for_x_and_saturation():
    x = torch.tensor([[-3.0, -0.6, 0.2, 0.74, 2.5]], requires_grad=True)
    f = torch.tensor(2.0)
    lo, hi = torch.tensor(-4.0), torch.tensor(3.0)  # 3-bit signed codes
    y = HGQRound.apply(x, f, lo, hi)
    assert y.tolist() == [[-1.0, -0.5, 0.25, 0.75, 0.75]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_weight_ste_for_x():
    w = _w().requires_grad_(True)
    q = HGQWeightQuantizer(w.shape, "per-channel", init_bits=3)
    g = torch.randn(w.shape)
    (q(w) * g).sum().backward()
    assert torch.equal(w.grad, g)  # never saturates


def test_activation_running_minmax_integer_bits():
    a = HGQActQuantizer((3,), "per-tensor", init_f=2.0)
    with pytest.raises(RuntimeError):
        a.qparams()
    a.train()
    a(torch.tensor([[0.1, 2.9, 1.0], [0.0, 0.5, 0.2]]))
    assert not a.signed
    # max 2.9 -> q=3.0 at f=2 -> I = 2, unsigned: 4 bits
    assert a.bits().item() == 4.0
    a(torch.tensor([[5.0, 0.0, 0.0]]))  # range only grows (momentum None)
    assert a.running_max.item() == 5.0 and a.bits().item() == 5.0
    a(torch.tensor([[-1.0, 0.0, 0.0]]))
    assert a.signed and a.bits().item() == 6.0  # sign bit
    qp = a.qparams()
    assert qp.signed and qp.bits.item() == 6.0 and qp.scale.item() == 0.25
    # not observing: the range stays, values outside it saturate to [-8, 7.75]
    a.set_observing(False)
    y = a(torch.tensor([[9.0, -9.0, 1.13]]))
    assert y.tolist() == [[7.75, -8.0, 1.25]]
    a(torch.tensor([[100.0, 0.0, 0.0]]))
    assert a.running_max.item() == 5.0
    # eval mode does not observe either
    a.set_observing(True)
    a.eval()
    a(torch.tensor([[100.0, 0.0, 0.0]]))
    assert a.running_max.item() == 5.0


def test_activation_signed_bits_cover_negative_range():
    a = HGQActQuantizer((2,), "per-tensor", init_f=0.0)
    a.train()
    a(torch.tensor([[-4.0, 3.0]]))
    # codes [-4, 3] fit 3-bit signed exactly
    assert a.bits().item() == 3.0
    assert a(torch.tensor([[-4.0, 3.0]])).tolist() == [[-4.0, 3.0]]
    b = HGQActQuantizer((2,), "per-tensor", init_f=0.0)
    b.train()
    b(torch.tensor([[-1.0, 0.0]]))
    assert b.bits().item() == 1.0 and b(torch.tensor([[-1.0, 0.0]])).tolist() == [[-1.0, 0.0]]


def test_activation_per_channel_running_range_and_calibrate():
    a = HGQActQuantizer((2, 3), "per-channel", init_f=1.0)
    x = torch.tensor([[[0.2, 0.4, 1.0], [5.0, 6.0, 7.0]], [[0.1, 0.0, 0.3], [1.0, 2.0, 3.0]]])
    a.calibrate([x])
    assert not a.observing
    assert a.running_max.reshape(-1).tolist() == [1.0, 7.0]
    assert a.bits().reshape(-1).tolist() == [2.0, 4.0]  # I = 1, 3; f = 1
    a.train()
    a(x * 10)
    assert a.running_max.reshape(-1).tolist() == [1.0, 7.0]
    a.calibrate([x], margin_bits=1)
    assert a.bits().reshape(-1).tolist() == [3.0, 5.0]


def test_activation_surrogate_gradient_with_batch():
    a = HGQActQuantizer((4,), "per-tensor", init_f=2.0).double()
    a.train()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = a(x)
    y.sum().backward()
    expected = (-LN2 * (y.detach() - x)).sum() / math.sqrt(4)
    assert torch.allclose(a.f.grad, expected.reshape(1), atol=1e-12)


def test_qparams_scale_gradient_equals_surrogate():
    # a QuantModel applies fake_quant(weight, qparams(weight)): the scale's LSQ gradient must give
    # the same f-gradient as HGQ's forward
    w = _w().double()
    q1 = HGQWeightQuantizer(w.shape, "per-channel", init_f=2.0).double()
    q2 = HGQWeightQuantizer(w.shape, "per-channel", init_f=2.0).double()
    g = torch.randn(w.shape, dtype=torch.float64)
    (q1(w) * g).sum().backward()
    qp = q2.qparams(w)
    (fake_quant(w, qp) * g).sum().backward()
    # fake_quant's torch.minimum splits the gradient on ties, so compare channels whose largest
    # code stays below the top of the range
    codes = torch.round(w / expand(qp.scale.detach(), w.shape)).abs().reshape(4, -1).amax(1)
    free = codes < torch.exp2(qp.bits.reshape(-1) - 1) - 1
    assert bool(free.any())
    assert torch.allclose(q1.f.grad.reshape(-1)[free], q2.f.grad.reshape(-1)[free], atol=1e-12)


def _hgq_model():
    import mixprec
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    qm = mixprec.quantize(model, "fpga-hls4ml", (2, 5, 5))
    assert qm.numerics == "fixed"
    grans = iter(["per-element", "per-channel"])
    for name, layer in qm.layers.items():
        layer.quantizer = HGQWeightQuantizer(tuple(layer.weight.shape), next(grans), init_bits=4,
                                             weight=layer.weight)
    for name in list(qm.act_quantizers):
        shape = qm.graph[name].out_shape if name != "input" else qm.input_shape
        gran = "per-element" if name == "input" else "per-channel"
        qm.act_quantizers[name] = HGQActQuantizer(tuple(shape), gran, init_bits=3)
    return qm


def test_quant_model_with_hgq_lowers_bit_exact():
    import numpy as np
    from mixprec import execute

    qm = _hgq_model()
    x = torch.randn(16, 2, 5, 5)
    qm.calibrate([x])
    qm.train()
    params = [p for p in qm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    target = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        (qm(x) - target).square().mean().backward()
        assert all(l.quantizer.f.grad is not None for l in qm.layers.values())
        assert all(q.f.grad is not None for q in qm.act_quantizers.values())
        opt.step()
    for q in qm.act_quantizers.values():
        q.set_observing(False)
    qm.train()
    y_fake = qm(x).detach()
    qm.eval()
    ig = qm.lower()
    for xb in (x, torch.randn(16, 2, 5, 5) * 1.5):
        y = qm(xb)
        ref = execute.reference(ig, xb.numpy())
        expected = torch.from_numpy(np.asarray(ref)).to(torch.float32) * ig.output_scale
        assert np.array_equal(y.numpy(), expected.numpy())
    # the fake-quant path agrees with the integer path up to rounding ties (a few output LSBs)
    assert torch.allclose(qm(x), y_fake, atol=8 * float(ig.output_scale) + 1e-6)
