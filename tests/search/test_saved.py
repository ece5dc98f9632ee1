"""Checkpoints come back as they were saved, also those saved before a model named its layers."""
import numpy as np
import pytest
import torch
from torch import nn

import mixprec
from mixprec.models import get_model
from mixprec.search.saved import load_float, quantized_state, rebuild_quantized, renamed_by_position
from mixprec.train import CheckpointError, save_checkpoint


def _unnamed(model: nn.Sequential) -> nn.Sequential:
    """The same modules in an unnamed Sequential (layers ``0``, ``3``, ...), as models were built before."""
    return nn.Sequential(*model.children())


def test_a_float_model_saved_under_earlier_layer_names_loads_by_position(tmp_path):
    torch.manual_seed(0)
    old = _unnamed(get_model("lenet5"))
    save_checkpoint(tmp_path / "float.pt", {"model": old.state_dict(), "history": [{"epoch": 0}]})
    new = get_model("lenet5")
    assert load_float(new, tmp_path / "float.pt", "lenet5") == [{"epoch": 0}]
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(new.eval()(x), old.eval()(x))
    with pytest.raises(ValueError, match="does not hold a float lenet5"):
        load_float(get_model("lenet5[width=0.5]"), tmp_path / "float.pt", "lenet5")


def test_a_quantized_model_saved_under_earlier_layer_names_rebuilds_exactly(tmp_path):
    torch.manual_seed(0)
    old = _unnamed(get_model("digits-cnn"))
    bits = {"0.0": torch.tensor([2.0, 4.0, 8.0, 4.0] * 4).reshape(16, 1, 1, 1), "6": 4}
    qm = mixprec.quantize(old, "cortex-m4", (1, 8, 8), bits=bits, act_bits={"0.0": 4, "3.0": 8})
    x = torch.rand(64, 1, 8, 8)
    qm.calibrate([x])
    path = tmp_path / "quantized.pt"
    save_checkpoint(path, quantized_state(qm))
    state = torch.load(path, weights_only=True)
    rebuilt = rebuild_quantized(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), state, path).eval()
    assert [n.name for n in rebuilt.graph][:3] == ["input", "conv1.0", "conv2.0"]
    assert rebuilt.weight_bits()["conv1.0"].flatten().tolist() == [2.0, 4.0, 8.0, 4.0] * 4
    assert np.array_equal(rebuilt(x).numpy(), qm.eval()(x).numpy())
    with pytest.raises(CheckpointError, match="quantized.pt"):
        rebuild_quantized(get_model("digits-cnn[width=8]"), "cortex-m4", (1, 8, 8), state, path)


def test_renaming_by_position_needs_every_entry_to_line_up():
    a = {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}
    assert list(renamed_by_position(a, {"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2)})) == ["fc.weight",
                                                                                                        "fc.bias"]
    assert renamed_by_position(a, {"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(2)}) is None  # shape
    assert renamed_by_position(a, {"fc.bias": torch.ones(2), "fc.weight": torch.ones(2, 3)}) is None  # kind
    assert renamed_by_position(a, {"fc.weight": torch.ones(2, 3)}) is None  # count
