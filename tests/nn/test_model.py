"""QuantModel's training parameters: a weight that BatchNorm folding shrank keeps its relative step."""
import pytest
import torch

from mixprec.api import quantize
from mixprec.data import load_dataset
from mixprec.models import get_model
from mixprec.train import TrainConfig, evaluate_accuracy, fit


@pytest.fixture(scope="module")
def int8_digits_model():
    """The digits CNN trained on inputs of int8 magnitude (pixels 0..16 -> -128..127), as raw
    keyword-spotting MFCCs come."""
    data = load_dataset("digits")
    for name in ("x_train", "x_val", "x_test"):
        setattr(data, name, (getattr(data, name) * 255 - 128).round())
    torch.manual_seed(0)
    model = get_model("digits-cnn")
    fit(model, data.x_train, data.y_train, data.x_val, data.y_val, TrainConfig(epochs=4, lr=3e-3, seed=0))
    return model.eval(), data


def test_folding_records_how_much_it_scaled_each_weight(int8_digits_model):
    model, data = int8_digits_model
    qm = quantize(model, "cortex-m4", data.input_shape, bits=8)
    first_conv = model[0][0]
    layer = next(iter(qm.layers.values()))
    assert layer.fold_ratio == pytest.approx(float(layer.weight.detach().norm() / first_conv.weight.detach().norm()), rel=1e-5)
    assert layer.fold_ratio < 0.05  # int8-magnitude inputs: the folded weights are tiny
    groups = qm.weight_parameters()
    scaled = [g for g in groups if "lr_scale" in g]
    assert scaled and scaled[0]["params"][0] is layer.weight and scaled[0]["lr_scale"] == layer.fold_ratio
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == 2 * len(qm.layers)
    assert all(g["lr_scale"] < 1 for g in scaled)


def test_qat_on_int8_magnitude_inputs_keeps_the_first_layer(int8_digits_model):
    # Before the fix Adam moved the first folded conv by ~lr per element, many times its size
    # (83% of its norm on a DS-CNN), while the other layers moved by a few percent.
    model, data = int8_digits_model
    qm = quantize(model, "cortex-m4", data.input_shape, bits=8)
    qm.calibrate([data.x_train[:512]])
    before = {n: layer.weight.detach().clone() for n, layer in qm.layers.items()}
    fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, TrainConfig(epochs=2, lr=5e-4, seed=1),
        params=qm.weight_parameters())
    moved = {n: float((layer.weight.detach() - before[n]).norm() / before[n].norm()) for n, layer in qm.layers.items()}
    first = next(iter(moved))
    assert moved[first] < 0.25, moved
    assert evaluate_accuracy(qm, data.x_test, data.y_test) > 0.9
