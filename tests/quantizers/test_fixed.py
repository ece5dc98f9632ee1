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
