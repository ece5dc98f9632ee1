"""Physical channel pruning (``mixprec.prune``): the narrower model computes exactly what the model
with its pruned channels' biases at 0 computes (the integer evaluation, the NumPy reference on every
kept channel of every tensor, and the C library on the host), costs what the cost tables say the
assignment with those channels at width 0 costs, comes back from its checkpoint (rebuilt from the
full-width float model by its pruning record), and what the IR cannot express is refused."""
from __future__ import annotations

import json
from math import prod

import numpy as np
import pytest
import torch
from torch import nn

import mixprec
from mixprec.convert import convert
from mixprec.cost import evaluate, load_target
from mixprec.cost.tables import build_tables
from mixprec.execute import reference
from mixprec.export.c import generate, input_grid, quantize_codes
from mixprec.export.c import toolchain as tc
from mixprec.granularity import expand, reduce_to
from mixprec.graph.channels import alive_channels
from mixprec.prune import keep_channels, prune_channels, pruned_rows, zero_pruned_biases
from mixprec.quantizers import ActQuantizer, FixedWeightQuantizer
from mixprec.search.saved import quantized_state, rebuild_quantized
from mixprec.train import CheckpointError, save_checkpoint

# ----------------------------------------------------------------------------- models


class Plain(nn.Module):
    """conv1 (BN, ReLU), maxpool, conv2 (BN, ReLU), avgpool, flatten, fc1 (ReLU), fc2."""

    SHAPE = (2, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool1, self.pool2, self.act = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.ReLU()
        self.flat, self.fc1, self.fc2 = nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.Linear(12, 4)

    def forward(self, x):
        x = self.pool1(self.act(self.bn1(self.conv1(x))))
        x = self.pool2(self.act(self.bn2(self.conv2(x))))
        return self.fc2(self.act(self.fc1(self.flat(x))))


class Residual(nn.Module):
    """a (BN, ReLU) -> b (ReLU) -> c (BN); relu(a + c), maxpool, flatten, fc: a and c are tied."""

    SHAPE = (2, 6, 6)

    def __init__(self):
        super().__init__()
        self.a, self.bna = nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6)
        self.b, self.c, self.bnc = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 9, 3)

    def forward(self, x):
        y = self.act(self.bna(self.a(x)))
        z = self.bnc(self.c(self.act(self.b(y))))
        return self.fc(self.flat(self.pool(self.act(y + z))))


class Separable(nn.Module):
    """pre (ReLU), dw (depthwise 3x3, BN, ReLU), pw (ReLU), avgpool, flatten, fc."""

    SHAPE = (2, 8, 8)

    def __init__(self):
        super().__init__()
        self.pre, self.dw, self.bn = nn.Conv2d(2, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)
        self.pw, self.act, self.pool = nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AvgPool2d(2)
        self.flat, self.fc = nn.Flatten(), nn.Linear(5 * 16, 3)

    def forward(self, x):
        x = self.act(self.bn(self.dw(self.act(self.pre(x)))))
        return self.fc(self.flat(self.pool(self.act(self.pw(x)))))


class Grouped(nn.Module):
    """pre (ReLU), g (3x3, 2 groups, ReLU), maxpool, flatten, fc."""

    SHAPE = (2, 8, 8)

    def __init__(self):
        super().__init__()
        self.pre, self.g = nn.Conv2d(2, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.g(self.act(self.pre(x)))))))


class Bounded(nn.Module):
    """conv (Hardtanh(0.25, 2): act(0) = 0.25), flatten, fc."""

    SHAPE = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.Hardtanh(0.25, 2.0)
        self.flat, self.fc = nn.Flatten(), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(self.flat(self.act(self.conv(x))))


class Concat(nn.Module):
    """Two branches joined by torch.cat, a conv over the join, a dense head."""

    SHAPE = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.flat, self.fc = nn.Flatten(), nn.Linear(6 * 16, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(self.flat(torch.relu(self.c(y))))


class Gated(nn.Module):
    """a 2->4 then LeakyReLU (maps 0 to 0: a's pruned rows go), b 4->4 then Sigmoid (0 -> 0.5: b's stay),
    then a dense head."""

    SHAPE = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.leaky, self.gate, self.flat, self.fc = nn.LeakyReLU(0.2), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(self.flat(self.gate(self.b(self.leaky(self.a(x))))))


# case: (model, pruned rows per layer, the rows each layer keeps)
CASES = {
    "plain": (Plain, {"conv1": [1, 4], "conv2": [0, 3, 5], "fc1": [2, 7]},
              {"conv1": [0, 2, 3, 5], "conv2": [1, 2, 4, 6, 7], "fc1": [0, 1, 3, 4, 5, 6, 8, 9, 10, 11],
               "fc2": [0, 1, 2, 3]}),
    # a's channel 1 and c's channel 4 stay (the other branch carries them), channel 2 goes from both
    "residual": (Residual, {"a": [1, 2], "b": [0], "c": [2, 4]},
                 {"a": [0, 1, 3, 4, 5], "b": [1, 2, 3], "c": [0, 1, 3, 4, 5], "fc": [0, 1, 2]}),
    "residual-one-side": (Residual, {"a": [1, 3]},
                          {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3], "c": [0, 1, 2, 3, 4, 5], "fc": [0, 1, 2]}),
    # pre's channel 1 takes dw's channel 1 with it; channel 3 is pruned in both
    "separable": (Separable, {"pre": [1, 3], "dw": [3], "pw": [0]},
                  {"pre": [0, 2, 4, 5], "dw": [0, 2, 4, 5], "pw": [1, 2, 3, 4], "fc": [0, 1, 2]}),
    "grouped": (Grouped, {"pre": [1, 5], "g": [0, 4]},
                {"pre": [0, 2, 3, 4, 6, 7], "g": [1, 2, 3, 5, 6, 7], "fc": [0, 1, 2]}),
    # every input of g's second group goes: so does the group (2 groups -> 1)
    "grouped-whole-group": (Grouped, {"pre": [4, 5, 6, 7]},
                            {"pre": [0, 1, 2, 3], "g": [0, 1, 2, 3], "fc": [0, 1, 2]}),
    "tables": (Gated, {"a": [1, 3], "b": [2]}, {"a": [0, 2], "b": [0, 1, 2, 3], "fc": [0, 1, 2]}),
    # a concat keeps a place for every channel of its inputs: a's and b's pruned rows stay at 0 bits
    "concat": (Concat, {"a": [1], "b": [0, 2], "c": [3]},
               {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1, 2, 4, 5], "fc": [0, 1, 2]}),
}


def randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    return model.eval()


def quantized(cls, pruned: dict, seed: int = 0, act_granularity: str = "per-tensor", act_bits: dict | None = None,
              granularity: str = "per-channel", numerics: str = "scaled"):
    """``cls`` on ``generic``: random weight bits 2..8 (per group of ``granularity``), 0 for the
    ``pruned`` rows, the pruned rows' biases set positive (so that zeroing them shows), calibrated,
    in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    target = "generic" if numerics == "scaled" else "fpga-hls4ml"
    qm = convert(randomize_bn(cls()), cls.SHAPE, numerics, 8, 8, granularity, act_granularity, target)
    for name, layer in qm.layers.items():
        shape = tuple(layer.quantizer.bits().shape)
        bits = rng.integers(2, 9, size=shape).astype(np.float32)
        full = expand(torch.from_numpy(bits), tuple(layer.weight.shape)).clone()
        full[pruned.get(name, [])] = 0
        layer.quantizer.set_bits(reduce_to(full, shape, "amax"))
        with torch.no_grad():
            layer.bias[pruned.get(name, [])] = 0.5
    for name, bits in (act_bits or {}).items():
        qm.act_quantizers[name].set_bits(bits)
    qm.calibrate([torch.randn(32, *cls.SHAPE)])
    return qm.eval()


def pruned_case(case: str):
    cls, pruned, _ = CASES[case]
    qm = quantized(cls, pruned)
    return cls, qm, prune_channels(qm)


def inputs(cls, n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn((n,) + cls.SHAPE, generator=torch.Generator().manual_seed(seed)) * 1.5


def assert_exact(qm, pruned, x: torch.Tensor) -> None:
    """The pruned model computes what the bias-zeroed ``qm`` computes: the integer evaluation, and
    the reference on every kept channel of every tensor."""
    zeroed = zero_pruned_biases(qm).eval()
    assert np.array_equal(zeroed(x).numpy(), pruned.eval()(x).numpy())
    want, env_want = reference(zeroed.lower(), x.numpy(), keep=True)
    got, env_got = reference(pruned.lower(), x.numpy(), keep=True)
    assert np.array_equal(want, got)
    alive = alive_channels(qm.graph, pruned_rows(qm))
    for name, value in env_got.items():
        assert np.array_equal(env_want[name][:, alive[name]], value), name


def assert_valid_graph(qm) -> None:
    g = qm.graph
    for n in g:
        assert n.in_shapes == [g[i].out_shape for i in n.inputs], n.name
        if n.has_weights:
            layer = qm.layers[n.name]
            assert tuple(layer.weight.shape) == n.weight_shape == layer.quantizer.weight_shape, n.name
            assert tuple(layer.bias.shape) == (n.out_channels,)
            if n.op == "conv":
                assert n.in_shapes[0][0] == n.weight_shape[1] * n.attrs["groups"]
                assert n.out_channels % n.attrs["groups"] == 0
            else:
                assert n.weight_shape[1] == prod(n.in_shapes[0])
        if n.op == "flatten":
            assert n.out_shape == (prod(n.in_shapes[0]),)
        if n.name in qm.act_quantizers:
            assert qm.act_quantizers[n.name].shape == n.out_shape


# ----------------------------------------------------------------------------- what it computes


@pytest.mark.parametrize("case", CASES)
def test_the_pruned_model_computes_what_the_bias_zeroed_model_computes(case):
    cls, qm, result = pruned_case(case)
    x = inputs(cls)
    assert_exact(qm, result.model, x)
    assert_valid_graph(result.model)
    assert result.model.training is False
    result.model.train()  # the fake-quantization path runs on the narrower shapes too, and trains
    loss = result.model(x).square().mean()
    loss.backward()
    assert all(layer.weight.grad is not None for layer in result.model.layers.values())


@pytest.mark.parametrize("case", CASES)
def test_layers_are_narrower_and_the_record_names_the_kept_channels(case):
    _, qm, result = pruned_case(case)
    kept = CASES[case][2]
    assert {n: list(k) for n, k in result.kept.items()} == kept
    for name, rows in kept.items():
        w = result.model.layers[name].weight
        assert w.shape[0] == len(rows)
        assert torch.equal(result.model.layers[name].bias, zero_pruned_biases(qm).layers[name].bias[rows])
    record = json.loads(json.dumps(result.to_json()))
    assert record == {n: {"channels": qm.graph[n].out_channels, "kept": k} for n, k in kept.items()}
    assert all(set(result.removed()[n]).isdisjoint(k) for n, k in kept.items())


def test_columns_follow_flatten_blocks_pooling_and_groups():
    _, _, plain = pruned_case("plain")
    g = plain.model.graph
    assert plain.model.layers["conv2"].weight.shape == (5, 4, 3, 3)  # conv1's 4 channels through the maxpool
    assert plain.model.layers["fc1"].weight.shape == (10, 5 * 2 * 2)  # a block of 2x2 features per channel
    assert plain.model.layers["fc2"].weight.shape == (4, 10)
    assert g["flat"].out_shape == (20,) and g["pool2"].out_shape == (5, 2, 2)
    _, _, sep = pruned_case("separable")
    assert sep.model.graph["dw"].attrs["groups"] == 4 and sep.model.layers["dw"].weight.shape == (4, 1, 3, 3)
    _, _, grouped = pruned_case("grouped")
    assert grouped.model.graph["g"].attrs["groups"] == 2 and grouped.model.layers["g"].weight.shape == (6, 3, 3, 3)
    _, _, whole = pruned_case("grouped-whole-group")
    assert whole.model.graph["g"].attrs["groups"] == 1 and whole.model.layers["g"].weight.shape == (4, 4, 3, 3)


def test_pruning_removes_the_bias_too():
    """The unpruned model's pruned channels still add relu(bias) downstream: the pruned model is
    the bias-zeroed one, not the original."""
    cls, qm, result = pruned_case("plain")
    x = inputs(cls)
    assert not np.array_equal(qm(x).numpy(), result.model(x).numpy())


def test_a_tied_channel_stays_where_one_branch_prunes_it_and_goes_where_both_do():
    _, _, result = pruned_case("residual")
    pruned = result.model
    assert pruned.graph["add"].out_shape == (5, 6, 6) and pruned.layers["fc"].weight.shape == (3, 5 * 9)
    for layer, channel in (("a", 1), ("c", 4)):  # kept, at 0 bits with zero bias
        row = result.kept[layer].index(channel)
        assert pruned.layers[layer].quantizer.bits()[row].item() == 0
        assert pruned.layers[layer].bias[row].item() == 0
    _, qm, one_side = pruned_case("residual-one-side")
    assert one_side.model.layers["fc"].weight.shape == qm.layers["fc"].weight.shape
    assert one_side.model.layers["a"].weight.shape == qm.layers["a"].weight.shape


def held_grid_model():
    """Plain with conv1's channel 1 pruned and conv2's column 1 (reading it) setting every row's range."""
    qm = quantized(Plain, {"conv1": [1]})
    with torch.no_grad():
        qm.layers["conv2"].weight[:, 1] *= 20.0
    qm.invalidate()
    return qm


def test_a_row_whose_range_a_removed_column_set_keeps_its_scale():
    """conv2's rows take their range from the column reading conv1's pruned channel 1: removing that
    column would move every row's scale, so the quantizer holds the old ones (while the bits stay)."""
    qm = held_grid_model()
    result = prune_channels(qm)
    assert_exact(qm, result.model, inputs(Plain))
    layer = result.model.layers["conv2"]
    q, w = layer.quantizer, layer.weight.detach()
    assert type(q) is FixedWeightQuantizer and q.holds_grid
    plain = FixedWeightQuantizer(q.weight_shape, q.bits(), q.numerics, q.range_rule)
    assert not torch.equal(plain.qparams(w).scale, q.qparams(w).scale)  # the integers would have changed
    assert not result.model.layers["conv1"].quantizer.holds_grid  # its columns all stay
    assert not any(layer.quantizer.holds_grid for layer in qm.layers.values())
    # a row whose bits change takes its range from its weights again; the others keep theirs
    bits = q.bits().clone()
    bits[0] = 8.0 if bits[0] != 8 else 7.0
    q.set_bits(bits)
    fresh = FixedWeightQuantizer(q.weight_shape, bits, q.numerics, q.range_rule).qparams(w).scale
    held = q.qparams(w).scale
    assert held[0] == fresh[0] and not torch.equal(held[1:], fresh[1:])
    # freezing keeps the held grid
    frozen, kept = q.freeze(w)
    assert torch.equal(frozen.qparams(kept).scale, held)
    # a state dict restores it where it is held, and only there
    fresh_q = FixedWeightQuantizer(q.weight_shape, bits, q.numerics, q.range_rule)
    fresh_q.load_state_dict(q.state_dict())
    assert fresh_q.holds_grid and torch.equal(fresh_q.qparams(w).scale, held)
    fresh_q.load_state_dict(plain.state_dict())
    assert not fresh_q.holds_grid and torch.equal(fresh_q.qparams(w).scale, plain.qparams(w).scale)


@pytest.mark.parametrize("granularity, numerics, target", [
    ("per-element", "scaled", "generic"), ("per-slice", "scaled", "generic"), ("per-channel", "fixed", "fpga-hls4ml"),
    ("per-element", "fixed", None)])
@pytest.mark.parametrize("case", ["plain", "residual"])
def test_other_weight_granularities_and_fixed_point(case, granularity, numerics, target):
    """Per-element rows (a row's widest bits may sit in a removed column), per-slice bits (the pruned
    rows make whole slices, the kept ones stay per slice), fixed-point grids; per-element fixed-point
    weights are refused where a kept row's finest step sits in a removed column (it sets the row's
    integer grid)."""
    cls, pruned, _ = CASES[case]
    if granularity == "per-slice":
        pruned = {"conv1": [2, 3], "fc1": [2, 3, 4, 5]} if case == "plain" else {"a": [2, 3], "c": [2, 3]}
    qm = quantized(cls, pruned, granularity=granularity, numerics=numerics)
    if target is None:  # per-element fixed point: a kept row's finest step sits in a removed column
        with pytest.raises(ValueError, match=r"removing channels would change the integers .*\(weight\): a kept row's"):
            prune_channels(qm)
        return
    result = prune_channels(qm)
    assert_exact(qm, result.model, inputs(cls))
    assert_valid_graph(result.model)
    if granularity == "per-slice":  # 3 slices of 2 channels, one pruned
        first = "conv1" if case == "plain" else "a"
        assert tuple(result.model.layers[first].quantizer.bits().shape) == (2, 1, 1, 1)
    t = load_target(target)
    tables = build_tables(qm.graph, t, mixprec.assignment(qm))
    est, real = tables.totals(*tables.start()), mixprec.cost_report(result.model, t).totals
    keys = ("weight_bytes", "param_bytes", "ram_bytes", "macs") + (("flash_bytes",) if numerics == "scaled" else ())
    assert {k: est[k] for k in keys} == {k: real[k] for k in keys}


def test_per_channel_activation_state_is_sliced():
    """Per-channel activation bits: the kept channels' bits stay theirs (the tensor's scale follows
    the widest, which stays)."""
    abits = torch.tensor([8.0, 4.0, 6.0, 8.0, 2.0, 5.0]).reshape(6, 1, 1)
    qm = quantized(Plain, {"conv1": [1, 4]}, act_granularity="per-channel", act_bits={"conv1": abits})
    result = prune_channels(qm)
    q = result.model.act_quantizers["conv1"]
    assert isinstance(q, ActQuantizer) and q.bits().flatten().tolist() == [8.0, 6.0, 8.0, 5.0]
    assert_exact(qm, result.model, inputs(Plain))


def test_cost_tables_price_the_pruned_model_per_case():
    """``cost_report`` of the pruned model is ``CostTables.totals`` of the original assignment,
    whose 0-bit rows the tables take as removed."""
    t = load_target("generic")
    for case in CASES:
        _, qm, result = pruned_case(case)
        tables = build_tables(qm.graph, t, mixprec.assignment(qm))
        est = tables.totals(*tables.start())
        real = mixprec.cost_report(result.model, t).totals
        nominal = evaluate(result.model.graph, mixprec.assignment(result.model), t).totals
        for key in ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes", "ram_lower_bound",
                    "ram_mcu_in_out", "macs"):
            assert est[key] == real[key], (case, key)
        assert est["bops"] == pytest.approx(real["bops"], rel=1e-9), case
        assert est["ebops"] == pytest.approx(nominal["ebops"], rel=1e-9), case
        assert est["latency_cycles"] == pytest.approx(real["latency_cycles"], rel=1e-6), case
        if case != "residual-one-side":
            assert real["macs"] < sum(n.macs for n in qm.graph), case


@pytest.mark.skipif(tc.host_cc() is None, reason="no host C compiler (gcc/cc) on PATH")
def test_c_export_of_the_pruned_residual_model_is_bit_exact(tmp_path):
    cls, qm, result = pruned_case("residual")
    pruned = result.model
    ig = pruned.lower()
    m = generate(ig, pruned.graph, mixprec.assignment(pruned), load_target("generic"), tmp_path / "m000",
                 prefix="m000")
    tu = tmp_path / "main.c"
    tu.write_text('#include "m000/model.c"\n#include "m000/model_weights.c"\n'
                  + tc.host_driver_source([(m.prefix, "m000/model.h")]))
    exe = tmp_path / "prog"
    tc.compile_host([tu], exe, [tmp_path])
    x = inputs(cls, 12).numpy()
    codes = quantize_codes(input_grid(ig), x).reshape(len(x), -1)
    got = tc.run_host(exe, 0, codes, int(np.prod(m.output_shape)), tmp_path / "io")
    want = np.asarray(reference(ig, x)).reshape(len(x), -1)
    assert np.array_equal(got, want)
    assert np.array_equal(want, np.asarray(reference(zero_pruned_biases(qm).lower(), x)).reshape(len(x), -1))


# ----------------------------------------------------------------------------- checkpoints


def saved_and_rebuilt(model, cls, path):
    """``model`` saved as a run saves it and rebuilt, as ``load_run`` does, from a fresh float ``cls``
    (full width, other weights)."""
    save_checkpoint(path, quantized_state(model))
    state = torch.load(path, weights_only=True)
    torch.manual_seed(99)
    return state, rebuild_quantized(randomize_bn(cls()), "generic", cls.SHAPE, state, path).eval()


def assert_same_saved_state(a: dict, b: dict) -> None:
    assert a["pruning"] == b["pruning"]
    for key in ("state_dict", "weight_bits", "act_bits"):
        assert a[key].keys() == b[key].keys(), key
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


@pytest.mark.parametrize("case", ["plain", "residual", "separable", "grouped", "held-grid"])
def test_a_pruned_model_comes_back_from_its_checkpoint(case, tmp_path):
    """Saved with its pruning record and rebuilt from the full-width float model: the same narrower
    layers, quantizer grids (a held one included), integers and cost; saved again, the same state."""
    if case == "held-grid":
        cls, qm = Plain, held_grid_model()
        pruned = prune_channels(qm).model.eval()
    else:
        cls, qm, result = pruned_case(case)
        pruned = result.model.eval()
    state, rebuilt = saved_and_rebuilt(pruned, cls, tmp_path / "quantized.pt")
    assert rebuilt.pruning == pruned.pruning and pruned.pruning is not None
    assert any(tuple(rebuilt.layers[n].weight.shape) < tuple(layer.weight.shape) for n, layer in qm.layers.items())
    for name, layer in pruned.layers.items():
        q = rebuilt.layers[name].quantizer
        assert rebuilt.layers[name].weight.shape == layer.weight.shape, name
        assert q.holds_grid == layer.quantizer.holds_grid, name
    if case == "held-grid":
        assert rebuilt.layers["conv2"].quantizer.holds_grid
    assert rebuilt.graph == pruned.graph
    x = inputs(cls, 64)
    assert np.array_equal(rebuilt(x).numpy(), pruned(x).numpy())
    assert np.array_equal(reference(rebuilt.lower(), x.numpy()), reference(pruned.lower(), x.numpy()))
    t = load_target("generic")
    assert mixprec.cost_report(rebuilt, t).totals == mixprec.cost_report(pruned, t).totals
    assert_same_saved_state(quantized_state(rebuilt), state)


def test_pruning_a_pruned_model_again_records_channels_of_the_full_width_model(tmp_path):
    """A second pruning (say, the budget step setting more rows to 0) composes the record: indices
    stay those of the full-width model, and the twice-pruned model comes back from its checkpoint."""
    cls, qm, first = pruned_case("plain")
    model = first.model
    bits = model.layers["conv2"].quantizer.bits().clone()
    bits[[0, 2]] = 0  # rows 0 and 2 of the pruned conv2: its original channels 1 and 4
    model.layers["conv2"].quantizer.set_bits(bits)
    second = prune_channels(model)
    assert second.kept["conv2"] == (1, 3, 4)  # of the model it pruned
    assert second.model.pruning["conv2"] == {"channels": 8, "kept": [2, 6, 7]}
    assert second.model.pruning["conv1"] == first.model.pruning["conv1"] == {"channels": 6, "kept": [0, 2, 3, 5]}
    _, rebuilt = saved_and_rebuilt(second.model, cls, tmp_path / "quantized.pt")
    x = inputs(cls)
    assert rebuilt.layers["conv2"].weight.shape == (3, 4, 3, 3)
    assert np.array_equal(rebuilt(x).numpy(), second.model.eval()(x).numpy())


def test_keep_channels_replays_a_record_and_refuses_one_the_channel_map_would_not_leave():
    cls, qm, result = pruned_case("residual")
    kept = {n: r["kept"] for n, r in result.model.pruning.items()}
    replayed = keep_channels(zero_pruned_biases(qm), kept).eval()
    x = inputs(cls)
    assert replayed.pruning == result.model.pruning
    assert np.array_equal(replayed(x).numpy(), result.model.eval()(x).numpy())
    with pytest.raises(ValueError, match=r"^c: channels \[0, 1, 3, 4\] cannot be kept alone; the channel map keeps "
                                         r"\[0, 1, 3, 4, 5\]"):
        keep_channels(qm, {"a": [0, 1, 3, 4, 5], "c": [0, 1, 3, 4]})  # a keeps channel 5, tied to c's
    with pytest.raises(ValueError, match=r"^fc: the output layer's channels"):
        keep_channels(qm, {"fc": [0, 1]})
    with pytest.raises(ValueError, match=r"^b: cannot keep channels \[0, 4\] of its 4"):
        keep_channels(qm, {"b": [0, 4]})


def test_an_unpruned_model_records_no_pruning_and_a_record_must_fit_the_model(tmp_path):
    _, qm, result = pruned_case("residual-one-side")  # every channel stays
    assert qm.pruning is None and result.model.pruning is None
    assert quantized_state(qm)["pruning"] is None
    cls, _, result = pruned_case("plain")
    path = tmp_path / "quantized.pt"
    state, _ = saved_and_rebuilt(result.model, cls, path)

    class Wider(Plain):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(2, 7, 3, padding=1), nn.BatchNorm2d(7)
            self.conv2 = nn.Conv2d(7, 8, 3, padding=1)

    with pytest.raises(CheckpointError, match=r"quantized.pt does not fit this model: conv1: pruned from 6 output "
                                              r"channels, this model has 7"):
        rebuild_quantized(Wider().eval(), "generic", Plain.SHAPE, state, path)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("cls, pruned, message", [
    (Plain, {"fc2": [1]}, r"fc2: the output layer's channels are the network's outputs"),
    (Plain, {"conv1": [0, 1, 2, 3, 4, 5]}, r"^conv1: every output channel is pruned; keep at least one$"),
    (Separable, {"dw": [2]}, r"dw: depthwise channel 2 is pruned while its input channel \(2 of 'pre'\) is kept"),
    (Grouped, {"pre": [1]}, r"g: its groups would end up unequal \(input channels per group \[3, 4\]"),
    (Grouped, {"g": [4, 5, 6, 7]}, r"g: group 1 loses every output channel while 4 of its input channels are kept"),
    (Bounded, {"conv": [1]}, r"conv: its activation \(hardtanh to \[0.25, 2.0\]\) maps 0 to 0.25"),
])
def test_what_the_ir_cannot_express_is_refused(cls, pruned, message):
    qm = quantized(cls, pruned)
    with pytest.raises(ValueError, match=message):
        prune_channels(qm)


def test_a_grid_a_removed_channel_sets_is_refused():
    """Per-channel activation bits under scaled numerics: one scale from the widest channel. Removing
    the only 8-bit channel would move it, and with it every kept channel's integers."""
    abits = torch.tensor([4.0, 8.0, 4.0, 6.0, 2.0, 5.0]).reshape(6, 1, 1)
    qm = quantized(Plain, {"conv1": [1]}, act_granularity="per-channel", act_bits={"conv1": abits})
    with pytest.raises(ValueError, match=r"conv1: removing channels would change the integers .*activation grid"):
        prune_channels(qm)


def test_the_model_is_left_as_it_was():
    cls, pruned, _ = CASES["residual"]
    qm = quantized(cls, pruned)
    x = inputs(cls)
    before = qm(x).numpy()
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    prune_channels(qm)
    assert all(torch.equal(state[k], v) for k, v in qm.state_dict().items())
    assert np.array_equal(qm(x).numpy(), before)
