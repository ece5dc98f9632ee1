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

from .graphs import conv
from .pruned_models import Concat, Gated, Grouped, Plain, Residual, Separable, kept_rows, sliced, smaller

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


def _random_choice(tables, rng, prune=True):
    """Random widths (without ``prune``: none that leaves a row without weights)."""
    low = {n: 0 if prune else int((layer.widths <= 0).sum()) for n, layer in tables.layers.items()}
    kw = {n: rng.integers(low[n], len(layer.widths), size=layer.groups) for n, layer in tables.layers.items()}
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
        kw, ka = _random_choice(tables, rng, prune=False)  # qm is not rebuilt smaller: see the pruning tests
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
               Node("fc1", "linear", ["input"], (2,), [(6,)], (2, 6)),
               Node("fc2", "linear", ["fc1"], (2,), [(2,)], (2, 2))], output="fc2")
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
    # brute force: every width of every group and activation quantizer (2 + 2 groups, 3 quantizers)
    mean = _mean_over_all_choices(tables, pw, pa, ADDITIVE)
    for key in ADDITIVE:
        assert expected[key].item() == pytest.approx(mean[key], rel=1e-9), key
    # gradient of the expected latency against central differences
    expected["latency_cycles"].backward()
    v = logits["fc1"]
    for idx in [(0, 0), (1, 2), (1, 3)]:
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


# ----------------------------------------------------------------------------- pruned channels
# A choice that prunes output channels costs what the model rebuilt without them costs: the smaller
# models below are built independently, by slicing the torch weights (tests/cost/pruned_models.py).

# case: (model, pruned rows, rows the smaller model keeps, its channel counts)
PRUNED = {
    "plain": (Plain, {"conv1": [1], "conv2": [0, 3]},
              {"conv1": [0, 2, 3], "conv2": [1, 2, 4, 5]}, {"conv1": 3, "conv2": 4}),
    # one side of the tie: a's channel 1 stays (0-bit row), nothing downstream is freed
    "residual-one-side": (Residual, {"a": [1]}, {}, {}),
    "residual-both-sides": (Residual, {"a": [1], "c": [1]}, {"a": [0, 2, 3], "c": [0, 2, 3]}, {"a": 3}),
    "residual-branch": (Residual, {"b": [2]}, {"b": [0, 1, 3]}, {"b": 3}),
    # pre's channel 1 kills dw's channel 1; pw's channel 0 frees its block of fc columns
    "separable": (Separable, {"pre": [1], "pw": [0]},
                  {"pre": [0, 2, 3], "dw": [0, 2, 3], "pw": [1, 2, 3, 4]}, {"pre": 3, "pw": 4}),
    "separable-depthwise": (Separable, {"pre": [2], "dw": [2]}, {"pre": [0, 1, 3], "dw": [0, 1, 3]}, {"pre": 3}),
    "grouped-columns": (Grouped, {"pre": [1, 5], "g": [0, 4]},
                        {"pre": [0, 2, 3, 4, 6, 7], "g": [1, 2, 3, 5, 6, 7]}, {"pre": 6, "g": 6}),
    # every input of g's second group pruned: the group goes
    "grouped-whole-group": (Grouped, {"pre": [4, 5, 6, 7]}, {"pre": [0, 1, 2, 3], "g": [0, 1, 2, 3]},
                            {"pre": 4, "g": 4, "groups": 1}),
    # a concat keeps a place for every channel of a and b (their pruned rows stay at 0 bits); c's goes
    "concat": (Concat, {"a": [1], "b": [0], "c": [2]}, {"c": [0, 1, 3, 4, 5]}, {"c": 5}),
    # LeakyReLU keeps a pruned channel at 0 (it goes, with b's columns); Sigmoid makes it 0.5 (b's stays)
    "tables": (Gated, {"a": [1], "b": [2]}, {"a": [0, 2, 3]}, {"a": 3}),
}


def _pruning_choice(tables, pruned, rng):
    """Random non-zero widths per output channel, width 0 for the ``pruned`` rows."""
    kw, ka = _random_choice(tables, rng, prune=False)
    for name, rows in pruned.items():
        assert tables.layers[name].widths[0] == 0
        kw[name][rows] = 0
    return kw, ka


def _set_smaller(small, tables, kw, ka, kept):
    for name, layer in tables.layers.items():
        quant = small.layers[name].quantizer
        rows = kept.get(name, list(range(layer.groups)))
        quant.set_bits(torch.tensor(layer.widths[kw[name]][rows], dtype=torch.float32).reshape(quant.bits().shape))
    for q, act in tables.acts.items():
        small.act_quantizers[q].set_bits(act.bits(ka[q]))
    small.invalidate()


def _pruned_case(case, target, seed=0):
    cls, pruned, kept, sizes = PRUNED[case]
    torch.manual_seed(seed)
    full = cls()
    qm = mixprec.quantize(full, target, cls.SHAPE, bits=8)
    tables = build_tables(qm.graph, load_target(target), mixprec.assignment(qm))
    kw, ka = _pruning_choice(tables, pruned, np.random.default_rng(seed))
    if any(n.op == "table" for n in tables.graph):  # lookup tables take codes of at most 8 bits
        ka = {q: min(k, int(np.searchsorted(tables.acts[q].widths, 8))) for q, k in ka.items()}
    small = mixprec.quantize(smaller(full, kept, **sizes), target, cls.SHAPE, bits=8)
    small.calibrate([torch.randn(16, *cls.SHAPE)])
    _set_smaller(small, tables, kw, ka, kept)
    return tables, kw, ka, small


@pytest.mark.parametrize("target", ["mpic", "generic"])
@pytest.mark.parametrize("case", PRUNED)
def test_totals_with_pruned_channels_are_the_cost_of_the_model_without_them(case, target):
    tables, kw, ka, small = _pruned_case(case, target)
    t = load_target(target)
    est, real = tables.totals(kw, ka), mixprec.cost_report(small, t).totals
    nominal = mixprec.cost.evaluate(small.graph, mixprec.assignment(small), t).totals  # EBOPs of nominal bits
    for key in ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes", "ram_lower_bound",
                "ram_mcu_in_out", "macs"):
        assert est[key] == real[key], key
    assert est["bops"] == pytest.approx(real["bops"], rel=1e-9)
    assert est["ebops"] == pytest.approx(nominal["ebops"], rel=1e-9)
    for key in ("latency_cycles", "energy_uj"):
        assert est[key] == pytest.approx(real[key], rel=1e-6), key
    if case == "residual-one-side":  # the tie keeps a's channel: only a's own weights go
        assert est["macs"] == sum(n.macs for n in tables.graph)


@pytest.mark.parametrize("target", ["mpic", "generic"])
@pytest.mark.parametrize("case", PRUNED)
def test_expected_at_one_hot_probabilities_frees_what_totals_frees(case, target):
    tables, kw, ka, _ = _pruned_case(case, target)
    exact, expected = tables.totals(kw, ka), tables.expected(*_onehot(tables, kw, ka))
    for key in ADDITIVE + ("macs", "param_bytes"):
        assert float(expected[key]) == pytest.approx(exact[key], rel=1e-9), key
    assert float(expected["ram_bytes"]) == exact["ram_lower_bound"]


def _small_graphs():
    """Hand-built graphs of 8 output channels in all, input (2, 3, 3), for exhaustive enumeration."""
    from mixprec.graph.ir import Graph, Node

    def tail(src, c):
        return [Node("flat", "flatten", [src], (c * 9,), [(c, 3, 3)]),
                Node("fc", "linear", ["flat"], (2,), [(c * 9,)], (2, c * 9), {"activation": "identity"})]

    inp = Node("input", "input", [], (2, 3, 3))
    residual = [inp, conv("a", "input", (2, 3, 3), 2, k=1, pad=0), conv("b", "a", (2, 3, 3), 2),
                conv("c", "b", (2, 3, 3), 2, k=1, pad=0),
                Node("add", "add", ["a", "c"], (2, 3, 3), [(2, 3, 3)] * 2, attrs={"activation": "relu"})]
    separable = [inp, conv("pre", "input", (2, 3, 3), 2, k=1, pad=0), conv("dw", "pre", (2, 3, 3), 2, groups=2),
                 conv("pw", "dw", (2, 3, 3), 2, k=1, pad=0)]
    grouped = [inp, conv("pre", "input", (2, 3, 3), 4, k=1, pad=0), conv("g", "pre", (4, 3, 3), 2, groups=2)]
    return {"residual": Graph(residual + tail("add", 2), "fc"), "separable": Graph(separable + tail("pw", 2), "fc"),
            "grouped": Graph(grouped + tail("g", 2), "fc")}


def _small_tables(graph):
    from mixprec.cost.bits import uniform

    return build_tables(graph, load_target("mpic"), uniform(graph, 8, 8, "per-channel"),
                        weight_widths=lambda name, top: [0, 2],
                        act_widths=lambda q, top: [2, 4] if q == "input" else [2])


def _logits(tables, seed):
    gen = torch.Generator().manual_seed(seed)
    w = {n: torch.randn(layer.groups, len(layer.widths), generator=gen, dtype=torch.float64, requires_grad=True)
         for n, layer in tables.layers.items()}
    a = {q: torch.randn(len(act.widths), generator=gen, dtype=torch.float64, requires_grad=True)
         for q, act in tables.acts.items()}
    return w, a


def _mean_over_all_choices(tables, pw, pa, keys):
    slots = [(n, g) for n, layer in tables.layers.items() for g in range(layer.groups)]
    mean = {k: 0.0 for k in keys}
    for a_choice in itertools.product(*[range(len(a.widths)) for a in tables.acts.values()]):
        ka = dict(zip(tables.acts, a_choice))
        p_a = float(np.prod([pa[q][i].item() for q, i in ka.items()]))
        for w_choice in itertools.product(*[range(len(tables.layers[n].widths)) for n, _ in slots]):
            kw = {n: np.zeros(layer.groups, dtype=int) for n, layer in tables.layers.items()}
            p = p_a
            for (n, g), k in zip(slots, w_choice):
                kw[n][g] = k
                p *= pw[n][g, k].item()
            exact = tables.totals(kw, ka)
            for key in keys:
                mean[key] += p * exact[key]
    return mean


@pytest.mark.parametrize("name", ["residual", "separable", "grouped"])
def test_expected_with_pruning_is_the_mean_over_all_choices(name):
    """Every joint choice of 8 channels at 0 or 2 bits (and two input widths), each the cost of the
    model without its pruned channels, weighted by its probability."""
    tables = _small_tables(_small_graphs()[name])
    w, a = _logits(tables, 1)
    pw, pa = {n: v.softmax(-1) for n, v in w.items()}, {q: v.softmax(-1) for q, v in a.items()}
    keys = ADDITIVE + ("macs", "param_bytes")
    expected = tables.expected(pw, pa)
    mean = _mean_over_all_choices(tables, pw, pa, keys)
    for key in keys:
        assert expected[key].item() == pytest.approx(mean[key], rel=1e-9), key


@pytest.mark.parametrize("name", ["residual", "separable", "grouped"])
def test_expected_with_pruning_has_the_gradient_of_finite_differences(name):
    tables = _small_tables(_small_graphs()[name])
    w, a = _logits(tables, 2)
    names, quants = list(w), list(a)
    keys = ADDITIVE + ("macs", "param_bytes", "ram_bytes")

    def costs(*logits):
        pw = {n: v.softmax(-1) for n, v in zip(names, logits[:len(names)])}
        pa = {q: v.softmax(-1) for q, v in zip(quants, logits[len(names):])}
        e = tables.expected(pw, pa)
        return torch.stack([e[k] for k in keys])

    assert torch.autograd.gradcheck(costs, tuple(w.values()) + tuple(a.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_round_up_of_independent_slots_is_exact_for_every_subset():
    from mixprec.cost.pruning import _round_up

    gen = torch.Generator().manual_seed(3)
    present = torch.rand(5, generator=gen, dtype=torch.float64)
    absent = (1 - present) * torch.rand(5, generator=gen, dtype=torch.float64)  # unnormalised: some mass elsewhere
    weight = torch.tensor([3.0, 18.0, 7.0, 36.0, 1.0], dtype=torch.float64)
    for modulus in (8, 32):
        brute = 0.0
        for on in itertools.product([0, 1], repeat=5):
            p = float(np.prod([present[s] if o else absent[s] for s, o in enumerate(on)]))
            x = sum(float(weight[s]) for s, o in enumerate(on) if o)
            brute += p * modulus * np.ceil(x / modulus)
        assert _round_up(absent, present, weight, modulus).item() == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("case", ["residual-both-sides", "separable", "grouped-columns", "plain"])
def test_pruned_totals_with_per_element_weights_and_per_channel_activations(case):
    """Rows of mixed widths (per-element bits: per-element layout tables, stored columns only) and
    per-channel activation grids (per-channel buffer tables and requantization) on ``generic``."""
    from mixprec.convert import convert

    cls, pruned, kept, sizes = PRUNED[case]
    t = load_target("generic")

    def quantized(model):
        return convert(model, cls.SHAPE, t.numerics, 8, 8, "per-element", "per-channel", t.name)

    torch.manual_seed(0)
    full = cls()
    qm = quantized(full)
    gen = torch.Generator().manual_seed(1)
    for quant in list(qm.act_quantizers.values()) + [layer.quantizer for layer in qm.layers.values()]:
        quant.set_bits(torch.randint(2, 9, quant.bits().shape, generator=gen).float())
    tables = build_tables(qm.graph, t, mixprec.assignment(qm))
    kw, ka = _pruning_choice(tables, pruned, np.random.default_rng(0))
    small = quantized(smaller(full, kept, **sizes))
    for name, layer in tables.layers.items():
        small.layers[name].quantizer.set_bits(sliced(full, kept, name, layer.bits(kw[name])))
    for q, act in tables.acts.items():
        channels = list(range(qm.graph[q].out_channels)) if q == "input" else kept_rows(full, kept, _producer(q))
        small.act_quantizers[q].set_bits(act.bits(ka[q])[channels])
    small.invalidate()
    est, real = tables.totals(kw, ka), mixprec.cost.evaluate(small.graph, mixprec.assignment(small), t).totals
    assert est["table_bytes"] > 0  # the layout tables are in play
    for key in ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes", "ram_lower_bound",
                "ram_mcu_in_out", "macs"):
        assert est[key] == real[key], key
    for key in ("bops", "ebops", "latency_cycles"):
        assert est[key] == pytest.approx(real[key], rel=1e-6), key
    expected = tables.expected(*_onehot(tables, kw, ka))
    for key in ADDITIVE + ("macs", "param_bytes"):
        assert float(expected[key]) == pytest.approx(est[key], rel=1e-9), key


def _producer(q):
    """The layer whose rows are the channels of activation ``q`` (the residual sum's are a's)."""
    return {"add": "a"}.get(q, q)
