"""``search.learned.freeze`` through the quantizer protocol gives the fixed quantizers the
method-specific freezing it replaced gave (inlined below as it was), bit for bit."""
from types import SimpleNamespace

import pytest
import torch

from mixprec.convert import activation_clip
from mixprec.cost import load_target
from mixprec.nn.model import QuantLayer, QuantModel
from mixprec.numerics import qrange
from mixprec.quantizers.fixed import ActQuantizer, FixedWeightQuantizer
from mixprec.search import RunConfig
from mixprec.search.dq import DQOptions, dq_model
from mixprec.search.hgq import HGQOptions, hgq_model
from mixprec.search.learned import freeze


def _old_freeze(qm):
    """``search.learned.freeze`` before the protocol (``hasattr`` probes, ``_frozen_act``)."""
    layers = {}
    for name, layer in qm.layers.items():
        q = layer.quantizer
        bits = q.qparams(layer.weight).bits.detach().round().clamp_min(0)
        weight = q.frozen_weight(layer.weight) if hasattr(q, "frozen_weight") else layer.weight.detach()
        fixed = FixedWeightQuantizer(tuple(layer.weight.shape), bits.cpu(), qm.numerics, range_rule="max")
        layers[name] = QuantLayer(weight.cpu(), layer.bias.detach().cpu(), fixed, layer.fold_ratio)
    acts = {name: _old_frozen_act(qm, name, q) for name, q in qm.act_quantizers.items()}
    out = QuantModel(qm.graph, layers, acts, qm.numerics, qm.target_name)
    for q in out.act_quantizers.values():
        q.momentum = 0.0
    return out


def _old_frozen_act(qm, name, q):
    qp = q.qparams()
    node = qm.graph[name]
    bits = qp.bits.detach().round().clamp_min(1).cpu()
    if bits.numel() == 1:
        bits = bits.reshape((1,) * len(node.out_shape))
    fixed = ActQuantizer(node.out_shape, bits, qm.numerics, clip=activation_clip(node))
    _, hi = qrange(bits, qp.signed)
    top = (hi.double() * qp.scale.detach().double().cpu().reshape(bits.shape)).float()
    fixed.set_range(-top if qp.signed else torch.zeros_like(top), top)
    return fixed


def _trained(method, target, act_granularity):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU6(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(144, 3))
    ctx = SimpleNamespace(target=load_target(target), float_model=model, data=SimpleNamespace(input_shape=(1, 8, 8)),
                          config=RunConfig(target=target, weight_granularity="per-channel"))
    qm = (hgq_model(ctx, HGQOptions(init_bits=4, act_granularity=act_granularity)) if method == "hgq"
          else dq_model(ctx, DQOptions(init_bits=4, act_granularity=act_granularity)))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    qm.calibrate([x])
    qm.train()
    opt = torch.optim.SGD([p for p in qm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(4):  # move the learned grids off their initial values
        opt.zero_grad()
        torch.nn.functional.cross_entropy(qm(x), y).backward()
        opt.step()
        if method == "dq":
            for q in [layer.quantizer for layer in qm.layers.values()] + list(qm.act_quantizers.values()):
                q.project()
    return qm, x


def _rate(q: ActQuantizer) -> float:
    """How far a training-mode forward moves the observed range."""
    return q.momentum if q.observing else 0.0


@pytest.mark.parametrize("target, act_granularity", [("cortex-m4", "per-tensor"), ("fpga-hls4ml", "per-channel")])
@pytest.mark.parametrize("method", ["hgq", "dq"])
def test_freeze_matches_the_method_specific_freezing(method, target, act_granularity):
    qm, x = _trained(method, target, act_granularity)
    old, new = _old_freeze(qm), freeze(qm)
    s_old, s_new = old.state_dict(), new.state_dict()
    assert list(s_old) == list(s_new)
    for key, value in s_old.items():
        assert s_new[key].dtype == value.dtype and torch.equal(s_new[key], value), key
    for name, q in old.act_quantizers.items():
        fixed = new.act_quantizers[name]
        assert type(fixed) is ActQuantizer and fixed.clip == q.clip and fixed.numerics == q.numerics
        assert _rate(fixed) == _rate(q) == 0.0
    for name, layer in old.layers.items():
        fixed = new.layers[name].quantizer
        assert type(fixed) is FixedWeightQuantizer and fixed.numerics == layer.quantizer.numerics
        assert fixed.range_rule == layer.quantizer.range_rule == "max"
    old.eval(), new.eval()
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
