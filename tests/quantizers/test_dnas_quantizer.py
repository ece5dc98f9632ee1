"""The DNAS supernet weight quantizer: a mixture over candidate widths whose argmax is a fixed quantizer."""
import pytest
import torch

from mixprec.quantizers import ActQuantizer, FixedWeightQuantizer, QParams, fake_quant
from mixprec.quantizers.dnas import DNASActQuantizer, DNASWeightQuantizer

SHAPE = (6, 3, 3, 3)
WIDTHS = (0, 2, 4, 8)


def _weight() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 1.0, 6).reshape(6, 1, 1, 1)


def _one_hot(q: DNASWeightQuantizer, index: list[int]) -> None:
    """Logits whose softmax is exactly one-hot at ``index[g]`` for each group."""
    with torch.no_grad():
        q.alpha.fill_(-1e4)
        q.alpha[torch.arange(len(index)), torch.tensor(index)] = 0.0


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("rule", ["mse", "max"])
def test_one_hot_forward_is_the_fixed_quantizer_of_that_width(numerics, rule):
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, WIDTHS, "per-channel", numerics, rule, temperature=5.0)
    for k, width in enumerate(WIDTHS):
        _one_hot(q, [k] * SHAPE[0])
        fixed = FixedWeightQuantizer(SHAPE, torch.full((6, 1, 1, 1), float(width)), numerics, rule)
        assert torch.equal(q(w), fixed(w)), width
    mixed = [3, 1, 0, 2, 1, 3]  # a different width per channel: each channel's grid is its own
    _one_hot(q, mixed)
    bits = torch.tensor([WIDTHS[i] for i in mixed], dtype=torch.float32).reshape(6, 1, 1, 1)
    assert torch.equal(q.bits(), bits)
    assert torch.equal(q(w), FixedWeightQuantizer(SHAPE, bits, numerics, rule)(w))


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
def test_qparams_and_freeze_are_the_argmax_grid(numerics):
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, WIDTHS, "per-channel", numerics)
    with torch.no_grad():  # every width is some channel's argmax, the softmax far from one-hot
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        q.alpha[torch.arange(6), torch.tensor([3, 1, 0, 2, 1, 3])] += 2.0
    assert q.bits().reshape(-1).tolist() == [8, 2, 0, 4, 2, 8]
    fixed, kept = q.freeze(w)
    assert type(fixed) is FixedWeightQuantizer and torch.equal(kept, w)
    assert torch.equal(fixed.bits(), q.bits())
    assert torch.equal(fixed.qparams(kept).scale, q.qparams(w).scale)
    soft = q(w)
    _one_hot(q, q.choice().tolist())
    assert torch.equal(q(w), fixed(kept))  # what the argmax candidate computed in training
    assert not torch.equal(soft, fixed(kept))


def test_hard_training_forward_is_the_argmax_model_and_gates_pruned_channels_whole():
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, WIDTHS, "per-channel", temperature=5.0)
    with torch.no_grad():
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(2)))
        q.alpha[0, 0] += 5.0  # channel 0 pruned
    q.train()
    q.set_forward("argmax")
    fixed, kept = q.freeze(w)
    assert torch.equal(q(w), fixed(kept))
    gate = q.output_gate()  # the draw of the forward before: the argmax's
    assert torch.equal(gate, (~q.pruned()).float()) and float(gate[0]) == 0.0
    q.set_forward("straight-through")  # the same forward, and the softmax's gradient to the logits
    out = q(w)
    assert torch.equal(out, fixed(kept))
    out.sum().backward()
    assert q.alpha.grad is not None and bool((q.alpha.grad != 0).any())
    q.set_forward("mixture")
    assert not torch.equal(q(w), fixed(kept))  # the softmax mixture again
    with pytest.raises(ValueError):
        q.set_forward("sample")


def test_per_layer_logits_are_one_group_and_never_prune():
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, (2, 4, 8), "per-tensor")
    assert q.alpha.shape == (1, 3) and q.output_gate() is None
    _one_hot(q, [1])
    assert torch.equal(q(w), FixedWeightQuantizer(SHAPE, torch.full((1, 1, 1, 1), 4.0), "scaled", "mse")(w))
    with pytest.raises(ValueError, match="per output channel"):
        DNASWeightQuantizer(SHAPE, WIDTHS, "per-tensor")


def test_gradient_reaches_the_logits_through_weights_and_bias_gate():
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, WIDTHS, temperature=2.0)
    q.train()
    (q(w) * w).sum().backward()
    assert bool((q.alpha.grad.abs() > 0).all())
    q.alpha.grad = None
    q(w)
    gate = q.output_gate()
    assert gate.shape == (6,) and torch.allclose(gate, torch.full((6,), 0.75))  # uniform over four widths
    gate.sum().backward()
    assert bool((q.alpha.grad[:, 0] < 0).all())  # more mass on 0 bits shrinks the bias


def test_argmax_ties_go_to_the_widest_and_a_layer_keeps_one_channel():
    q = DNASWeightQuantizer(SHAPE, WIDTHS)
    assert bool((q.bits() == 8).all())  # uniform logits: the widest, not pruned
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 6))
        q.alpha[4, 2] = 3.0  # the strongest non-zero logit: channel 4 at 4 bits
    assert q.bits().reshape(-1).tolist() == [0, 0, 0, 0, 4, 0]
    assert torch.equal(q.output_gate(hard=True), torch.tensor([0.0, 0, 0, 0, 1, 0]))
    assert q.freeze(_weight()).quantizer.bits().reshape(-1).tolist() == [0, 0, 0, 0, 4, 0]


def test_gumbel_draws_one_candidate_per_channel_and_trains_the_logits():
    w = _weight()
    q = DNASWeightQuantizer(SHAPE, WIDTHS, gumbel=True)
    q.train()
    torch.manual_seed(0)
    out = q(w)
    draw = q._draw.detach()
    assert torch.equal(draw.sum(1), torch.ones(6)) and set(draw.unique().tolist()) == {0.0, 1.0}
    bits = torch.tensor(WIDTHS, dtype=torch.float32)[draw.argmax(1)].reshape(6, 1, 1, 1)
    assert torch.equal(out.detach(), FixedWeightQuantizer(SHAPE, bits, "scaled", "mse")(w))
    assert torch.equal(q.output_gate().detach(), (bits.reshape(-1) > 0).float())
    out.sum().backward()
    assert q.alpha.grad is not None and bool(q.alpha.grad.abs().sum() > 0)


def test_candidates_are_checked_and_set_bits_is_refused():
    with pytest.raises(ValueError, match="distinct"):
        DNASWeightQuantizer(SHAPE, (0,))
    with pytest.raises(TypeError, match="freeze"):
        DNASWeightQuantizer(SHAPE, WIDTHS).set_bits(4)


def test_state_round_trips_logits_and_temperature():
    a = DNASWeightQuantizer(SHAPE, WIDTHS, temperature=5.0)
    with torch.no_grad():
        a.alpha.normal_()
    a.set_temperature(0.7)
    b = DNASWeightQuantizer(SHAPE, WIDTHS)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.probabilities(), a.probabilities()) and float(b.temperature) == pytest.approx(0.7)


# ----------------------------------------------------------------------------- activations: PACT mixture

A_SHAPE = (4, 5, 5)


def _activations(signed: bool = False) -> torch.Tensor:
    x = torch.randn((32,) + A_SHAPE, generator=torch.Generator().manual_seed(3)) * 2.0
    return x if signed else torch.relu(x)


def _act(numerics: str = "scaled", signed: bool = False, clip=(float("-inf"), float("inf"))) -> tuple:
    q = DNASActQuantizer(A_SHAPE, (2, 4, 8), numerics, clip, temperature=5.0)
    x = _activations(signed)
    q.train()
    q(x)  # calibrates
    return q, x


def test_calibration_sets_sign_and_a_tighter_clip_for_fewer_codes():
    q, x = _act()
    assert not q.signed and bool((q.clip_value > 0).all())
    clips = q.clip_value.detach()
    assert float(clips[0]) < float(clips[2]) <= float(x.max()) + 1e-6  # 2 bits clip harder than 8
    signed, _ = _act(signed=True)
    assert signed.signed
    relu6, _ = _act(clip=(0.0, 1.0))
    assert float(relu6.clip_value.detach().max()) <= 1.0  # within the fused activation's bounds


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
def test_act_one_hot_forward_is_that_candidates_pact_quantizer_and_eval_its_grid(numerics):
    q, x = _act(numerics)
    for k, width in enumerate(q.widths):
        with torch.no_grad():
            q.alpha.fill_(-1e4)
            q.alpha[0, k] = 0.0
        y = q(x)
        qp = q.qparams()
        assert int(qp.bits.reshape(-1)[0]) == width and tuple(qp.bits.shape) == (1, 1, 1)
        assert len(torch.unique(y)) <= 2 ** width
        with torch.no_grad():
            step = q.scales()[k]
        assert torch.equal(y.detach(), fake_quant(x, QParams(step, qp.bits, qp.signed))), width  # PACT at that clip
        assert torch.allclose(qp.scale.reshape(()), step, rtol=1e-6, atol=0)  # the argmax grid: as frozen
        fixed = q.freeze().quantizer
        assert type(fixed) is ActQuantizer and torch.equal(fixed.qparams().scale.reshape(()), qp.scale.reshape(()))
        if numerics == "fixed":  # powers of two
            exponent = float(torch.log2(qp.scale.detach()))
            assert exponent == round(exponent)


def test_act_gradients_reach_the_logits_and_each_clip():
    q, x = _act()
    loss = (q(x) - x).pow(2).mean()
    loss.backward()
    assert q.alpha.grad is not None and float(q.alpha.grad.abs().sum()) > 0
    assert q.clip_value.grad is not None and bool((q.clip_value.grad != 0).all())  # every candidate's clip


def test_act_quantizer_refuses_zero_bits_and_use_before_calibration():
    with pytest.raises(ValueError, match="at least 1 bit"):
        DNASActQuantizer(A_SHAPE, (0, 2, 4))
    with pytest.raises(RuntimeError, match="calibrate"):
        DNASActQuantizer(A_SHAPE, (2, 4)).qparams()
