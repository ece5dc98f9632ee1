"""QONNX export: qonnx's own executor reproduces the integer reference bit for bit on real runs,
the weight Quant nodes carry the true per-channel scales and bit widths, and qonnx's
inference_cost counts exactly mixprec's weight bits and MACs per precision pair."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("qonnx")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from mixprec import api  # noqa: E402
from mixprec.convert import convert  # noqa: E402
from mixprec.cost.bits import act_bits as resolve_act_bits  # noqa: E402
from mixprec.execute import reference  # noqa: E402
from mixprec.export import ExportError, ExportInput, get_exporter  # noqa: E402
from mixprec.export.qonnx import MODEL_FILE, inference_cost, weight_bit_count  # noqa: E402
from mixprec.granularity import expand  # noqa: E402
from mixprec.graph.convert import trace  # noqa: E402

from .conftest import export_exactly  # noqa: E402



@pytest.fixture(scope="module", params=["cortex-m4", "fpga-hls4ml"])
def exported(request, exported_run):
    return exported_run(request.param, "qonnx")


def test_whole_digits_test_set_is_bit_exact(exported, digits):
    _, artifact, qm, result = exported
    x = digits.x_test.numpy()
    ig = qm.lower()
    got = get_exporter("qonnx").run(artifact, x)
    want = reference(ig, x)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert int((got != want).sum()) == 0
    acc = float((got.argmax(1) == digits.y_test.numpy()).mean())
    assert acc == pytest.approx(result["accuracy"]["quantized"])


def test_every_node_integer_equal(exported, digits):
    _, artifact, qm, _ = exported
    x = digits.x_test[:24].numpy()
    out, ints = get_exporter("qonnx").run(artifact, x, keep=True)
    ref_out, env = reference(qm.lower(), x, keep=True)
    assert np.array_equal(out, ref_out)
    assert set(ints) == set(env)
    for name, values in env.items():
        assert np.array_equal(ints[name], values), name


def _quant_nodes(model: onnx.ModelProto):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits, [n for n in model.graph.node if n.op_type == "Quant"]


def test_weight_quant_nodes_carry_true_scales_and_bits(exported):
    run_dir, artifact, qm, _ = exported
    model = onnx.load(str(Path(artifact.path) / "model.onnx"))
    inits, quants = _quant_nodes(model)
    assert all(n.domain == "qonnx.custom_op.general" for n in quants)
    weight_quants = [n for n in quants if n.input[0] in inits]  # quantizing stored weights
    assert len(weight_quants) == len(qm.layers)
    for node, (name, layer) in zip(weight_quants, qm.layers.items()):
        assert node.name.startswith(f"{name}/Quant"), node.name  # ONNX nodes are named after their layer
        qp = layer.qparams()
        w_shape = tuple(layer.weight.shape)
        scale = inits[node.input[1]]
        bits = inits[node.input[3]]
        assert bits.ndim == 0 and int(bits) == int(layer.quantizer.bits().max())
        want = expand(qp.scale.detach(), w_shape).reshape(w_shape[0], -1)[:, 0].numpy()
        got = np.broadcast_to(scale, (w_shape[0],) + (1,) * (len(w_shape) - 1)).reshape(-1)
        assert np.array_equal(got, want.astype(np.float32)), name
        assert scale.shape[0] == w_shape[0]  # per-channel scales
        attrs = {a.name: a for a in node.attribute}
        assert attrs["signed"].i == 1 and attrs["narrow"].i == 1
        # the stored weights are exactly on their grid and within the bit range
        k = inits[node.input[0]].astype(np.float64) / scale
        assert np.array_equal(np.round(k), np.round(k, 4)) and np.abs(np.round(k)).max() <= 2 ** (int(bits) - 1) - 1
    # activations are typed by scale-1 Quant nodes with the activation widths
    act_widths = {int(inits[n.input[3]]) for n in quants if n not in weight_quants}
    assert act_widths >= {int(b.max()) for b in qm.act_bits().values()}
    assert Path(run_dir, "export", "qonnx", "artifact.json").exists()


def test_inference_cost_counts_our_weight_bits_and_macs(exported):
    _, artifact, qm, result = exported
    ig = qm.lower()
    cost = inference_cost(Path(artifact.path) / "model.onnx")
    ours = sum(int(expand(l.quantizer.bits().round(), tuple(l.weight.shape)).sum()) for l in qm.layers.values())
    assert weight_bit_count(ig, qm) == ours
    assert cost["total_mem_w_bits"] == ours
    assert artifact.details["inference_cost"]["total_mem_w_bits"] == ours
    # the cost model stores the same bits packed per channel (each channel starts on a byte)
    report = api.cost_report(qm, result["target"])
    channels = sum(l.weight.shape[0] for l in qm.layers.values())
    assert ours <= report.totals["weight_bytes"] * 8 < ours + 8 * channels
    # MACs per (activation, weight) precision pair
    want: dict[str, float] = {}
    assignment = api.assignment(qm)
    for node in qm.graph.weighted():
        src = qm.graph.grid_source(node.inputs[0])
        a_bits = int(resolve_act_bits(assignment, qm.graph, node.inputs[0]).max())
        a_type = ("INT" if ig[src].grid.signed else "UINT") + str(a_bits)
        key = f"op_mac_{a_type}_INT{int(qm.layers[node.name].quantizer.bits().max())}"
        want[key] = want.get(key, 0.0) + node.macs
    assert {k: v for k, v in cost.items() if k.startswith("op_mac_")} == want
    assert cost["total_macs"] == result["cost"]["macs"]


# ----------------------------------------------------------------------------- synthetic graphs


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(y + self.b(y))
        y = self.avg(self.pool(y))
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize("numerics", ["scaled", "fixed"])
def test_mixed_per_channel_widths_residual_and_pooling_are_exact(numerics, tmp_path):
    """Channels of one layer with different widths become one Quant (and Conv) per width."""
    torch.manual_seed(1)
    model = _Residual()
    rng = np.random.default_rng(3)
    graph_shapes = {"a": (4, 2, 3, 3), "b": (4, 4, 3, 3), "fc": (5, 16)}
    wbits = {n: torch.from_numpy(rng.integers(2, 9, size=(s[0],) + (1,) * (len(s) - 1))).float()
             for n, s in graph_shapes.items()}
    qm = convert(model, (2, 8, 8), numerics, wbits, 6, "per-channel", "per-tensor")
    x = torch.randn(64, 2, 8, 8)
    qm.calibrate([x])
    qm.eval()
    ig = qm.lower()
    xs = (torch.randn(40, 2, 8, 8) * 1.5).numpy()
    inp = ExportInput(tmp_path, ig, qm, None, (2, 8, 8), xs[:4])
    exporter = get_exporter("qonnx")
    artifact = exporter.export(inp, tmp_path / "qonnx")
    out, ints = exporter.run(artifact, xs, keep=True)
    ref, env = reference(ig, xs, keep=True)
    assert np.array_equal(out, ref)
    for name in env:
        assert np.array_equal(ints[name], env[name]), name
    assert any("split into" in n for n in artifact.notes)
    assert artifact.details["inference_cost"]["total_mem_w_bits"] == weight_bit_count(ig, qm)


class _PoolThenRelu(nn.Module):
    """A ReLU after max pooling cannot be fused: a standalone ``act`` requantization node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.pool(self.conv(x))), 1))


def test_standalone_activation_and_per_element_activation_widths_are_exact(tmp_path):
    torch.manual_seed(2)
    model = _PoolThenRelu()
    graph = trace(model, (2, 8, 8))[0]
    rng = np.random.default_rng(5)
    abits = {n.name: torch.from_numpy(rng.integers(3, 9, size=n.out_shape)).float()
             for n in graph if n.op in ("input", "conv", "linear", "act")}
    qm = convert(model, (2, 8, 8), "fixed", 6, abits, "per-channel", "per-element")
    qm.calibrate([torch.randn(64, 2, 8, 8)])
    qm.eval()
    ig = qm.lower()
    assert any(n.op == "act" for n in ig.nodes)
    xs = (torch.randn(40, 2, 8, 8) * 1.5).numpy()
    exporter = get_exporter("qonnx")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, (2, 8, 8), xs[:4]), tmp_path / "qonnx")
    out, ints = exporter.run(artifact, xs, keep=True)
    ref, env = reference(ig, xs, keep=True)
    assert np.array_equal(out, ref)
    assert all(np.array_equal(ints[n], env[n]) for n in env)
    assert any("per-element activation bits" in n for n in artifact.notes)


@pytest.mark.parametrize("builder,numerics,act_granularity,op_type", [
    ("concat-branches", "scaled", "per-tensor", "Concat"), ("concat-with-input", "fixed", "per-channel", "Concat"),
    ("concat-conv1d-then-conv", "scaled", "per-channel", "Concat"), ("concat-features", "fixed", "per-tensor", "Concat"),
    ("table-leaky-relu", "scaled", "per-tensor", "Gather"), ("table-hardsigmoid-flatten", "fixed", "per-channel", "Gather"),
    ("table-sigmoid", "fixed", "per-element", "Gather"), ("table-silu-gelu", "scaled", "per-tensor", "Gather"),
    ("mul-squeeze-excite", "scaled", "per-tensor", "Mul"), ("mul-same-shape", "fixed", "per-channel", "Mul"),
    ("slice-chunk", "scaled", "per-channel", "Slice"), ("slice-index-and-split", "fixed", "per-tensor", "Slice"),
    ("slice-split-heads", "scaled", "per-tensor", "Slice"),
    ("zeropad-then-maxpool", "scaled", "per-tensor", "Pad"), ("zeropad-conv1d-avgpool", "fixed", "per-channel", "Pad"),
    ("pad-channels-shortcut", "scaled", "per-tensor", "Pad"), ("pad-channels-then-conv", "fixed", "per-channel", "Pad"),
    ("conv2d-same-even", "scaled", "per-tensor", "Conv"), ("conv1d-pad-one-side", "fixed", "per-channel", "Conv"),
    ("avgpool2d-padded", "scaled", "per-tensor", "AveragePool"),
    ("avgpool2d-padded-excluded", "fixed", "per-channel", "AveragePool")])
def test_the_converters_newer_ops_are_exact(builder, numerics, act_granularity, op_type, tmp_path):
    """Each input of a concat rescaled onto its channels of the output grid, then one Concat node; a
    lookup-table activation a Gather from its tables (per element, channel or tensor); a product of
    codes (a squeeze-and-excitation gate) an int64 Mul, then the requantization; a channel slice a
    Slice (a view: no requantization after it); zero channels around a tensor a Pad after its requantization; a convolution padded more on one side a Conv with its pads (the exporter folds the Pad in); an
    average pooling with padding, counted or not, the sum of its window divided as the reference divides."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_exactness import BUILDERS

    torch.manual_seed(4)
    model, shape = BUILDERS[builder]()
    artifact = export_exactly("qonnx", model, shape, numerics, act_granularity, tmp_path, 40, 4)
    assert op_type in [n.op_type for n in onnx.load(artifact.path / MODEL_FILE).graph.node]


def _tiny(numerics, weight_bits, act_bits, granularity="per-channel", width=64):
    """A single linear layer; ``weight_bits`` may be a function of the layer's node name."""
    model = nn.Sequential(nn.Linear(width, 4))
    name = trace(model, (width,))[0].weighted()[0].name
    bits = {name: weight_bits(name)} if callable(weight_bits) else weight_bits
    qm = convert(model, (width,), numerics, bits, act_bits, granularity, "per-tensor")
    qm.calibrate([torch.randn(32, width) * 4])
    qm.eval()
    return qm


def _export(qm, tmp_path, shape):
    inp = ExportInput(tmp_path, qm.lower(), qm, None, shape, np.zeros((2,) + shape, np.float32))
    return get_exporter("qonnx").export(inp, tmp_path / "qonnx")


def test_per_element_weight_widths_are_refused(tmp_path):
    bits = torch.from_numpy(np.random.default_rng(0).integers(2, 9, size=(4, 64))).float()
    qm = _tiny("fixed", lambda name: bits, 8, "per-element")
    name = qm.graph.weighted()[0].name
    with pytest.raises(ExportError, match=f"{name}.*scalar bit width"):
        _export(qm, tmp_path, (64,))


def test_accumulator_beyond_float32_is_refused(tmp_path):
    qm = _tiny("fixed", 16, 16)
    name = qm.graph.weighted()[0].name
    with pytest.raises(ExportError, match=f"{name}.*2\\*\\*24"):
        _export(qm, tmp_path, (64,))
