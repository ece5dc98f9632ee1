"""Cost tables: one discrete choice costs exactly what the deployed model measures, and the
expectation over independent per-group widths is exact (one-hot: the choice's cost; any
distribution: the mean over sampled choices' costs) and has the gradient finite differences give."""
import itertools

import numpy as np
import pytest
import torch

import mixprec
from mixprec.cost import load_target
from mixprec.cost.compute import effective_bits
from mixprec.cost.tables import build_tables, cap, cap_all
from mixprec.lower import integer_weights
from mixprec.models import get_model
from mixprec.models.registry import get_spec

# (model, target, weight granularity, activation granularity): the last on a fixed-point target with
# per-channel activations, where only the lowered values decide the clamp tables (FLASH not compared)
PAIRS = [("digits-cnn", "cortex-m4", None, "per-tensor"), ("lenet5", "mpic", None, "per-tensor"),
         ("resnet8", "cortex-m7", None, "per-tensor"), ("dscnn", "cortex-m4", "per-slice", "per-tensor"),
         ("jet-mlp", "fpga-hls4ml", "per-element", "per-tensor")]


def _model(name, target, gran):
    torch.manual_seed(0)
    shape = get_spec(name).input_shape
    qm = mixprec.quantize(get_model(name), target, shape, bits=8, weight_granularity=gran)
    qm.calibrate([torch.randn(32, *shape)])
    return qm


def _effective(qm):
    """EBOPs of the integer weights at candidate bits, as cost_report counts them once calibrated."""
    def bits(name, b):
        quant = qm.layers[name].quantizer
        saved = quant.bits().detach().clone()
        try:
            quant.set_bits(b)
            w = qm.layers[name].weight.detach()
            return effective_bits(integer_weights(w, quant.qparams(w))[1])
        finally:
            quant.set_bits(saved)
    return bits


def _set(qm, tables, kw, ka):
    for name, layer in tables.layers.items():
        qm.layers[name].quantizer.set_bits(layer.bits(kw[name]))
    for q, act in tables.acts.items():
        qm.act_quantizers[q].set_bits(cap_all(act.base, act.widths[ka[q]]).reshape(act.shape))
    qm.invalidate()


def _random_choice(tables, rng):
    kw = {n: rng.integers(len(layer.widths), size=layer.groups) for n, layer in tables.layers.items()}
    for n, layer in tables.layers.items():  # a layer keeps one group with weights (pruning never takes all)
        if layer.widths[0] == 0 and (layer.widths[kw[n]] == 0).all():
            kw[n][0] = len(layer.widths) - 1
    ka = {q: int(rng.integers(len(a.widths))) for q, a in tables.acts.items()}
    return kw, ka


@pytest.mark.parametrize("name,target,gran,act_gran", PAIRS)
def test_totals_of_a_choice_are_the_measured_cost(name, target, gran, act_gran):
    qm = _model(name, target, gran)
    t = load_target(target)
    tables = build_tables(qm.graph, t, mixprec.assignment(qm), effective=_effective(qm))
    rng = np.random.default_rng(1)
    exact_flash = t.numerics == "scaled"
    for _ in range(3):
        kw, ka = _random_choice(tables, rng)
        _set(qm, tables, kw, ka)
        est, real = tables.totals(kw, ka), mixprec.cost_report(qm, t).totals
        for key in ("weight_bytes", "param_bytes", "ram_bytes", "ram_lower_bound", "ram_mcu_in_out", "macs"):
            assert est[key] == real[key], key
        for key in ("ebops", "bops"):
            assert est[key] == pytest.approx(real[key], rel=1e-9), key
        for key in ("latency_cycles", "energy_uj"):  # the report sums cycles in float32
            assert est[key] == pytest.approx(real[key], rel=1e-6), key
        if exact_flash:
            assert est["flash_bytes"] == real["flash_bytes"] and est["table_bytes"] == real["table_bytes"]
        else:
            assert est["flash_bytes"] <= real["flash_bytes"]


def _onehot(tables, kw, ka):
    pw = {n: torch.nn.functional.one_hot(torch.as_tensor(kw[n]), len(layer.widths)).double()
          for n, layer in tables.layers.items()}
    pa = {q: torch.nn.functional.one_hot(torch.tensor(ka[q]), len(a.widths)).double() for q, a in tables.acts.items()}
    return pw, pa


ADDITIVE = ("flash_bytes", "weight_bytes", "table_bytes", "ebops", "bops", "latency_cycles", "energy_uj")


@pytest.mark.parametrize("name,target", [("digits-cnn", "cortex-m4"), ("lenet5", "mpic")])
def test_expected_at_one_hot_probabilities_is_the_choice_s_cost(name, target):
    qm = _model(name, target, None)
    tables = build_tables(qm.graph, load_target(target), mixprec.assignment(qm))
    rng = np.random.default_rng(2)
    for _ in range(3):
        kw, ka = _random_choice(tables, rng)
        exact, expected = tables.totals(kw, ka), tables.expected(*_onehot(tables, kw, ka))
        for key in ADDITIVE:
            assert float(expected[key]) == pytest.approx(exact[key], rel=1e-9), key
        assert float(expected["ram_bytes"]) == exact["ram_lower_bound"]


def test_expected_is_the_mean_over_all_choices_and_its_gradient_matches_finite_differences():
    """A two-layer MLP on mpic: every joint choice enumerated and weighted by its probability."""
    from mixprec.graph.ir import Graph, Node
    from mixprec.cost.bits import uniform

    g = Graph([Node("input", "input", [], (6,)),
               Node("fc1", "linear", ["input"], (3,), [(6,)], (3, 6)),
               Node("fc2", "linear", ["fc1"], (2,), [(3,)], (2, 3))], output="fc2")
    t = load_target("mpic")
    base = uniform(g, 8, 8, "per-channel")
    tables = build_tables(g, t, base)
    gen = torch.Generator().manual_seed(0)
    logits = {n: torch.randn(layer.groups, len(layer.widths), generator=gen, dtype=torch.float64, requires_grad=True)
              for n, layer in tables.layers.items()}
    alog = {q: torch.randn(len(a.widths), generator=gen, dtype=torch.float64, requires_grad=True)
            for q, a in tables.acts.items()}

    def probs():
        return ({n: v.softmax(-1) for n, v in logits.items()}, {q: v.softmax(-1) for q, v in alog.items()})

    pw, pa = probs()
    expected = tables.expected(pw, pa)
    # brute force: every width of every group and activation quantizer (fc1: 3 groups, fc2: 2)
    names, groups = list(tables.layers), [tables.layers[n].groups for n in tables.layers]
    mean = {k: 0.0 for k in ADDITIVE}
    slots = [(n, g) for n, G in zip(names, groups) for g in range(G)]
    w_choices = itertools.product(*[range(len(tables.layers[n].widths)) for n, _ in slots])
    w_choices = list(w_choices)
    for a_choice in itertools.product(*[range(len(a.widths)) for a in tables.acts.values()]):
        ka = dict(zip(tables.acts, a_choice))
        p_a = float(np.prod([pa[q][i].item() for q, i in ka.items()]))
        for w_choice in w_choices:
            kw = {n: np.zeros(G, dtype=int) for n, G in zip(names, groups)}
            p = p_a
            for (n, gi), k in zip(slots, w_choice):
                kw[n][gi] = k
                p *= pw[n][gi, k].item()
            exact = tables.totals(kw, ka)
            for key in ADDITIVE:
                mean[key] += p * exact[key]
    for key in ADDITIVE:
        assert expected[key].item() == pytest.approx(mean[key], rel=1e-9), key
    # gradient of the expected latency against central differences
    expected["latency_cycles"].backward()
    v = logits["fc1"]
    for idx in [(0, 0), (1, 2), (2, 1)]:
        h = 1e-6
        with torch.no_grad():
            v[idx] += h
            up = float(tables.expected(*probs())["latency_cycles"])
            v[idx] -= 2 * h
            down = float(tables.expected(*probs())["latency_cycles"])
            v[idx] += h
        assert v.grad[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_cap_keeps_narrower_entries_and_raises_only_above_the_top():
    bits = torch.tensor([[2.0, 8.0], [4.0, 4.0]])
    assert cap(bits, [4.0, 8.0]).tolist() == [[2.0, 4.0], [8.0, 8.0]]
