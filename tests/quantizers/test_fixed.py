import pytest
import torch


def test_act_quantizer_per_group_range_fixed_numerics_only():
    from mixprec.quantizers.fixed import ActQuantizer

    bits = torch.tensor([2.0, 4.0, 8.0]).reshape(3, 1, 1)
    q = ActQuantizer((3, 2, 2), bits, "fixed")
    q.set_range(torch.zeros(3, 1, 1), torch.tensor([0.75, 1.875, 255 * 2.0 ** -9]).reshape(3, 1, 1))
    assert q.qparams().scale.flatten().tolist() == [0.25, 0.125, 2.0 ** -9]  # each group its own grid
    restored = ActQuantizer((3, 2, 2), bits, "fixed")
    restored.load_state_dict(q.state_dict())  # the per-group range comes back in its shape
    assert torch.equal(restored.qparams().scale, q.qparams().scale)
    with pytest.raises(ValueError, match="fixed numerics"):
        ActQuantizer((3, 2, 2), bits, "scaled").set_range(torch.zeros(3, 1, 1), torch.ones(3, 1, 1))


def _sq_error(q, w):
    from mixprec.quantizers.base import fake_quant

    with torch.no_grad():
        return ((fake_quant(w, q.qparams(w)) - w) ** 2).sum(dim=tuple(range(1, w.dim())))


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_range_never_worse_than_max_and_much_better_at_two_bits(numerics, bits):
    from mixprec.quantizers.fixed import FixedWeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.05, 1.0, 6).reshape(6, 1, 1, 1)
    b = torch.full((6, 1, 1, 1), float(bits))
    by_max = _sq_error(FixedWeightQuantizer(w.shape, b, numerics), w)
    by_mse = _sq_error(FixedWeightQuantizer(w.shape, b, numerics, range_rule="mse"), w)
    assert (by_mse <= by_max).all()  # the max range is one of the candidates, per channel
    if bits == 2:  # Gaussian weights: the max rule rounds most of them to zero
        assert (by_mse < 0.6 * by_max).all()
    else:  # wider groups keep the max range (clipping would stop the largest weights' gradients)
        assert torch.equal(by_mse, by_max)


def test_mse_range_only_fits_the_narrow_groups_of_a_mixed_tensor():
    from mixprec.quantizers.fixed import FixedWeightQuantizer

    torch.manual_seed(2)
    w = torch.randn(4, 16)
    bits = torch.tensor([2.0, 8.0, 3.0, 4.0]).reshape(4, 1)
    by_max = FixedWeightQuantizer(w.shape, bits, "scaled").qparams(w).scale.flatten()
    by_mse = FixedWeightQuantizer(w.shape, bits, "scaled", range_rule="mse").qparams(w).scale.flatten()
    assert by_mse[0] < by_max[0] and by_mse[2] <= by_max[2]
    assert by_mse[1] == by_max[1] and by_mse[3] == by_max[3]


def test_mse_range_picks_the_best_candidate_per_channel():
    from mixprec.quantizers.fixed import MSE_FRACTIONS, FixedWeightQuantizer, range_scale

    torch.manual_seed(1)
    w = torch.randn(3, 50)
    q = FixedWeightQuantizer(w.shape, torch.full((3, 1), 2.0), "scaled", range_rule="mse")  # per channel
    scale = q.qparams(w).scale.flatten()
    max_scale = range_scale(w.abs().amax(1), torch.full((3,), 2.0), True, "scaled", True)
    for c in range(3):  # brute force over the same candidates, one channel at a time
        errs = [((torch.clamp(torch.round(w[c] / (max_scale[c] * f)), -1, 1) * max_scale[c] * f - w[c]) ** 2).sum()
                for f in MSE_FRACTIONS]
        assert torch.isclose(scale[c], max_scale[c] * MSE_FRACTIONS[int(torch.stack(errs).argmin())])


def test_range_rule_travels_with_the_checkpoint():
    from mixprec.quantizers.fixed import FixedWeightQuantizer

    w = torch.randn(4, 8)
    q = FixedWeightQuantizer(w.shape, 2, "fixed", range_rule="mse")
    restored = FixedWeightQuantizer(w.shape, 2, "fixed")  # built with the default rule
    restored.load_state_dict(q.state_dict())
    assert restored.range_rule == "mse" and torch.equal(restored.qparams(w).scale, q.qparams(w).scale)
    old = {k: v for k, v in q.state_dict().items() if k != "mse_range"}  # a checkpoint from before the rule
    restored = FixedWeightQuantizer(w.shape, 2, "fixed", range_rule="mse")
    restored.load_state_dict(old)
    assert restored.range_rule == "max"
    with pytest.raises(ValueError, match="max, mse"):
        FixedWeightQuantizer(w.shape, 2, range_rule="percentile")


def _act_error(q, x):
    with torch.no_grad():
        return float(((q(x) - x) ** 2).sum())


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_narrow_activation_observer_tracks_the_least_squares_clip(numerics, bits):
    from mixprec.quantizers.fixed import ACT_FIT_MAX_BITS, ActQuantizer

    torch.manual_seed(0)
    x = torch.relu(torch.randn(32, 8, 6, 6)) ** 2  # a long tail: the max is rare
    fitted, by_max = ActQuantizer(x.shape[1:], bits, numerics), ActQuantizer(x.shape[1:], bits, numerics, fit_narrow=False)
    fitted.train(), by_max.train()
    fitted(x), by_max(x)
    assert float(by_max.running_max) == float(x.max())
    if bits <= ACT_FIT_MAX_BITS:  # the range shrinks, values past it saturate, the error falls
        assert float(fitted.running_max) < float(x.max()) and not fitted.signed
        assert _act_error(fitted.eval(), x) < (0.6 if bits == 2 else 1.0) * _act_error(by_max.eval(), x)
    else:  # wide grids keep the observed max
        assert float(fitted.running_max) == float(x.max())
    assert fitted.freeze().quantizer.fit_narrow


def test_narrow_activation_fit_is_the_brute_force_best_candidate():
    from mixprec.quantizers.fixed import MSE_FRACTIONS, ActQuantizer

    torch.manual_seed(3)
    x = torch.randn(4, 10)  # signed: the range stays symmetric about zero
    q = ActQuantizer((10,), 2)
    q.train()
    q(x)
    top = x.abs().max()
    errs = [((torch.clamp(torch.round(x / (top * f / 1)), -2, 1) * top * f / 1 - x) ** 2).sum() for f in MSE_FRACTIONS]
    best = MSE_FRACTIONS[int(torch.stack(errs).argmin())]
    assert q.signed and torch.isclose(torch.maximum(q.running_max, -q.running_min), top * best)
