"""hls4ml export of a fixed-point run: per-layer ap_fixed types derived from the integer program,
compiled C++ emulation equal to the NumPy reference on the whole digits test set."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hls4ml")
if shutil.which("g++") is None:
    pytest.skip("hls4ml's compile() needs g++", allow_module_level=True)

import sys  # noqa: E402

from mixprec import api  # noqa: E402
from mixprec.execute import reference  # noqa: E402
from mixprec.export import Artifact, ExportError, ExportInput, get_exporter  # noqa: E402
from mixprec.models import get_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the conformance helpers
from conformance import pruned_per_element  # noqa: E402

from .conftest import export_exactly  # noqa: E402


@pytest.fixture(scope="module")
def exported(exported_run):
    return exported_run("fpga-hls4ml", "hls4ml")


def test_whole_digits_test_set_is_bit_exact(exported, digits):
    _, artifact, qm, result = exported
    x = digits.x_test.numpy()
    got = get_exporter("hls4ml").run(artifact, x)
    want = reference(qm.lower(), x)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert int((got != want).sum()) == 0
    assert float((got.argmax(1) == digits.y_test.numpy()).mean()) == pytest.approx(result["accuracy"]["quantized"])


def test_artifact_reloads_and_runs_from_disk(exported, digits):
    run_dir, artifact, qm, _ = exported
    again = Artifact.load(Path(run_dir) / "export" / "hls4ml")
    x = digits.x_test[:32].numpy()
    assert np.array_equal(get_exporter("hls4ml").run(again, x), reference(qm.lower(), x))
    assert (Path(again.path) / again.details["library"]).exists()


def test_types_follow_the_integer_program(exported):
    _, artifact, qm, _ = exported
    ig = qm.lower()
    precision = artifact.details["precision"]
    assert precision["x"]["result"].endswith("AP_RND_CONV,AP_SAT>")  # the input quantizer: half even, saturate
    for node, layer in artifact.details["node_layers"].items():
        n = ig[node]
        if n.op in ("conv", "linear"):
            result = precision[layer]["result"]
            bits = int(np.asarray(n.grid.bits).max())
            frac = int(-np.log2(n.grid.scale))
            assert result == f"ap_{'' if n.grid.signed else 'u'}fixed<{bits},{bits - frac},AP_RND,AP_SAT>", node
    assert any("per layer" in note for note in artifact.notes)


def test_intermediate_layers_equal_reference(exported, digits):
    """Layer outputs come from the trace hooks compiled into the library: readable from disk."""
    run_dir, _, qm, _ = exported
    artifact = Artifact.load(Path(run_dir) / "export" / "hls4ml")
    x = digits.x_test[:16].numpy()
    out, ints = get_exporter("hls4ml").run(artifact, x, keep=True)
    ref, env = reference(qm.lower(), x, keep=True)
    assert np.array_equal(out, ref)
    assert set(ints) >= {n for n, layer in artifact.details["node_layers"].items() if qm.lower()[n].op != "flatten"}
    for name, values in ints.items():
        assert np.array_equal(values.reshape(env[name].shape), env[name]), name


class _Residual(torch.nn.Module):
    """Residual add, max pooling with padding, a 3x3 (non power of two) average pooling."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(3, 2, padding=1)
        self.avg = torch.nn.AvgPool2d(3, 1)
        self.fc = torch.nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(y + self.b(y))
        return self.fc(torch.flatten(self.avg(self.pool(y)), 1))


def test_residual_padded_maxpool_and_average_pool_are_exact(tmp_path):
    from mixprec.convert import convert

    torch.manual_seed(1)
    rng = np.random.default_rng(3)
    shapes = {"a": (4, 1, 1, 1), "b": (4, 1, 1, 1), "fc": (5, 1)}
    wbits = {n: torch.from_numpy(rng.integers(2, 9, size=s)).float() for n, s in shapes.items()}
    qm = convert(_Residual(), (2, 8, 8), "fixed", wbits, 7, "per-channel", "per-tensor")
    qm.calibrate([torch.randn(64, 2, 8, 8)])
    qm.eval()
    ig = qm.lower()
    xs = (torch.randn(100, 2, 8, 8) * 1.5).numpy()
    exporter = get_exporter("hls4ml")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, (2, 8, 8), xs[:8]), tmp_path / "hls4ml")
    assert np.array_equal(exporter.run(artifact, xs), reference(ig, xs))
    notes = " ".join(artifact.notes)
    assert "pads max pooling" in notes and "per-channel weight scales" in notes


def _stem_then(block, channels: int) -> torch.nn.Module:
    """A conv stem, ``block`` (``channels`` out), a dense head on 8 x 8 images."""
    return torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(), block, torch.nn.Flatten(),
                               torch.nn.Linear(channels * 64, 3))


@pytest.mark.parametrize("builder", ["two-branches", "three-with-input", "features"])
def test_concatenation_is_exact(tmp_path, builder):
    """torch.cat becomes hls4ml's Concatenate (pairwise, past two inputs) into an exact type; the
    output type's rounding and saturation (and a ReLU the concat fuses) requantize it as the
    reference does."""
    from test_exactness import Branches, Features

    torch.manual_seed(5)
    model, shape = {"two-branches": (_stem_then(Branches(), 5), (2, 8, 8)),
                    "three-with-input": (_stem_then(Branches(with_input=True), 7), (2, 8, 8)),
                    "features": (Features(), (6,))}[builder]
    artifact = export_exactly("hls4ml", model, shape, "fixed", "per-tensor", tmp_path, 200)
    assert any(node.startswith("cat") for node in artifact.details["precision"])


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return torch.relu(self.a(x)) * self.b(x)


@pytest.mark.parametrize("builder", ["conv2d-same-even", "avgpool2d-padded", "zeropad-then-maxpool",
                                     "zeropad-read-by-conv-and-pool"])
def test_padding_a_layer_cannot_take_is_a_zero_padding_layer(tmp_path, builder):
    """'same' with an even kernel pads one side more; a padded average pooling counts the zeros;
    zero padding no convolution takes alone: hls4ml's ZeroPadding2D layer, exact."""
    from test_exactness import BUILDERS

    torch.manual_seed(2)
    model, shape = BUILDERS[builder]()
    artifact = export_exactly("hls4ml", model, shape, "fixed", "per-tensor", tmp_path, 100)
    assert "ZeroPadding2D" in " ".join(artifact.notes)


@pytest.mark.parametrize("builder,message", [("table-sigmoid", "node '1': sigmoid is deployed as a lookup table"),
                                             ("gated", "node 'mul': a product"),
                                             ("avgpool2d-padded-excluded", "node '2': average pooling over the window's "
                                                                           "elements inside"),
                                             ("pad-channels-then-conv", "node '0.pad': zero channels")])
def test_what_hls4ml_cannot_take_is_refused_by_name(tmp_path, builder, message):
    from mixprec.convert import convert
    from test_exactness import BUILDERS

    model, shape = BUILDERS[builder]() if builder in BUILDERS else (_Gated(), (2, 8, 8))
    qm = convert(model, shape, "fixed", 6, 7, "per-channel", "per-tensor")
    qm.calibrate([torch.randn(32, *shape)])
    qm.eval()
    inp = ExportInput(tmp_path, qm.lower(), qm, None, shape, np.zeros((2, *shape), np.float32))
    with pytest.raises(ExportError, match=message):
        get_exporter("hls4ml").export(inp, tmp_path / "hls4ml")


@pytest.mark.parametrize("shape", [(1, 6, 6), (2, 3, 5)])
def test_mlp_on_an_image_input_is_exact(tmp_path, shape):
    """hls4ml's channels-last conversion used to reorder the first dense layer's weights for a
    flattened image input as if rows and columns were swapped: the input now arrives flat."""
    from mixprec.convert import convert

    torch.manual_seed(2)
    n = int(np.prod(shape))
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    qm = convert(mlp, shape, "fixed", 8, 8, "per-channel", "per-tensor")
    xs = torch.randn(200, *shape)
    qm.calibrate([xs[:64]])
    qm.eval()
    ig = qm.lower()
    exporter = get_exporter("hls4ml")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, shape, xs[:8].numpy()), tmp_path / "hls4ml")
    assert np.array_equal(exporter.run(artifact, xs.numpy()), reference(ig, xs.numpy()))


@pytest.mark.parametrize("model,shape", [
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)), (1, 3, 4)),
    (_Residual(), (2, 8, 8))], ids=["mlp-on-image", "residual-cnn"])
def test_per_element_precision_is_exact(tmp_path, model, shape):
    """Per-element grids of the input and of every activation (0-bit elements included) and
    per-element weight bits: hls4ml's FixedPointQuantizer layers round every element once, onto its
    own grid, as the reference does, also on inputs that lie exactly halfway between grid points."""
    qm = pruned_per_element(model, shape, 5)
    ig = qm.lower()
    assert np.unique(np.asarray(ig["input"].grid.bits)).size > 1
    xs = (torch.randn(200, *shape) * 1.5).numpy()
    step = np.broadcast_to(np.asarray(ig["input"].grid.elem_scale), shape)
    ties = ((np.round(xs[:100] / step) + 0.5) * step).astype(np.float32)
    xs = np.concatenate([xs, ties])
    exporter = get_exporter("hls4ml")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, shape, xs[:8]), tmp_path / "hls4ml")
    assert any("FixedPointQuantizer" in note for note in artifact.notes)
    out, ints = exporter.run(artifact, xs, keep=True)
    ref, env = reference(ig, xs, keep=True)
    assert np.array_equal(out, ref)
    assert set(ints) >= {n.name for n in ig.nodes if n.grid is not None}
    assert all(np.array_equal(v.reshape(env[n].shape), env[n]) for n, v in ints.items())


def test_per_element_clamps_other_than_the_type_range_are_refused(tmp_path):
    """ReLU6 at 7 bits clamps inside the element types' range: no ap_fixed saturation reproduces it."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU6(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.mul_(50.0)  # outputs well past 6: the clamp binds
    qm = pruned_per_element(model, (12,), 2, **{"1": [7, 7, 7, 7, 7, 6]})
    inp = ExportInput(tmp_path, qm.lower(), qm, None, (12,), np.zeros((1, 12), np.float32))
    with pytest.raises(ExportError, match="per-element clamps"):
        get_exporter("hls4ml").export(inp, tmp_path / "hls4ml")


def test_biases_wider_than_float32_are_exact(tmp_path):
    """A bias on a fine accumulator grid can need more than float32's 24 significant bits (an MNIST
    MLP's did): hls4ml reads the layers in float64."""
    from mixprec.convert import convert

    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    qm = convert(mlp, (12,), "fixed", 12, 8, "per-channel", "per-tensor")
    xs = torch.randn(200, 12)
    qm.calibrate([xs[:64]])
    qm.eval()
    ig = qm.lower()
    bias = np.asarray(ig["0"].params["bias"]).copy()
    bias[0] -= 2 ** 25 + 1  # 26 significant bits; the channel then sits at its ReLU's floor
    ig["0"].params["bias"] = bias
    exporter = get_exporter("hls4ml")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, (12,), xs[:8].numpy()), tmp_path / "hls4ml")
    assert np.array_equal(exporter.run(artifact, xs.numpy()), reference(ig, xs.numpy()))


class _Named(torch.nn.Module):
    """Layer names hls4ml (torch.fx) would not keep: upper case, dotted, escaping alike."""

    def __init__(self):
        super().__init__()
        self.Conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU())
        self.features_0 = torch.nn.Conv2d(4, 4, 1)  # "features.0" made an identifier is its name
        self.pool = torch.nn.MaxPool2d(2)
        self.classifier = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.Conv1(x))
        x = torch.relu(x + self.features_0(self.features(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def test_layers_are_named_after_the_models_modules(tmp_path):
    import re

    torch.manual_seed(2)
    qm = api.quantize(_Named(), "fpga-hls4ml", (1, 8, 8), bits=6)
    qm.calibrate([torch.randn(64, 1, 8, 8)])
    qm.eval()
    ig = qm.lower()
    xs = torch.randn(32, 1, 8, 8).numpy()
    exporter = get_exporter("hls4ml")
    artifact = exporter.export(ExportInput(tmp_path, ig, qm, None, (1, 8, 8), xs[:8]), tmp_path / "hls4ml")
    layers = artifact.details["node_layers"]
    assert set(layers) == {"Conv1", "features.0", "features_0", "add", "pool", "flatten", "classifier"}
    assert layers["Conv1"] == "conv1_relu" and layers["features_0"] == "features_0"
    assert layers["features.0"].startswith("features_0_") and layers["classifier"] == "classifier"
    assert len(set(layers.values())) == len(layers)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in artifact.details["precision"])
    out, ints = exporter.run(artifact, xs, keep=True)
    ref, env = reference(ig, xs, keep=True)
    assert np.array_equal(out, ref) and all(np.array_equal(v.reshape(env[n].shape), env[n]) for n, v in ints.items())


def test_scaled_numerics_are_refused(tmp_path):
    qm = api.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([torch.rand(8, 1, 8, 8)])
    qm.eval()
    inp = ExportInput(tmp_path, qm.lower(), qm, api.as_target("cortex-m4"), (1, 8, 8), np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ExportError, match="fixed-point numerics"):
        get_exporter("hls4ml").export(inp, tmp_path / "hls4ml")
