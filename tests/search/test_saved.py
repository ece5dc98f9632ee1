"""Checkpoints come back as they were saved, also those saved before a model named its layers, and
a run whose model lost channels (``mixprec.prune``) loads and exports the narrower model."""
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


# ----------------------------------------------------------------------------- a pruned run

PRUNED = {"conv1.0": [1, 5], "conv2.0": [0, 3, 7, 30], "conv3.0": [2]}  # digits-cnn rows set to 0 bits


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A finished digits run whose ``checkpoints/quantized.pt`` now holds its model with the
    ``PRUNED`` channels removed, as a method that prunes saves it; with that model and the
    unpruned one."""
    from mixprec.prune import prune_channels
    from mixprec.search import RunConfig, load_run, run_search

    out = tmp_path_factory.mktemp("digits-pruned") / "run"
    run_search(RunConfig(target="generic", bits=4, qat_epochs=1, float_epochs=2), out)
    _, qm, _ = load_run(out)
    for name, rows in PRUNED.items():
        bits = qm.layers[name].quantizer.bits().clone()
        bits[rows] = 0
        qm.layers[name].quantizer.set_bits(bits)
    pruned = prune_channels(qm).model.eval()
    save_checkpoint(out / "checkpoints" / "quantized.pt", quantized_state(pruned))
    return out, pruned, qm.eval()


def test_a_pruned_run_loads_its_pruned_model(pruned_run, digits):
    out, pruned, full = pruned_run
    run = mixprec.load_run(out)
    assert run.model.pruning == pruned.pruning
    assert run.model.pruning["conv2.0"]["kept"] == [i for i in range(32) if i not in PRUNED["conv2.0"]]
    for name, layer in full.layers.items():
        want = pruned.layers[name].weight.shape
        assert run.model.layers[name].weight.shape == want, name
        assert want[0] == layer.weight.shape[0] - len(PRUNED.get(name, []))
    x = digits.x_test
    assert np.array_equal(run.model(x).numpy(), pruned(x).numpy())
    assert mixprec.cost_report(run.model, "generic").totals == mixprec.cost_report(pruned, "generic").totals
    assert mixprec.evaluate(run, x, digits.y_test) == mixprec.evaluate(pruned, x, digits.y_test)


def test_a_pruned_run_exports_its_pruned_model(pruned_run, digits):
    from mixprec.execute import reference
    from mixprec.export import export_run
    from mixprec.export.c import CExporter
    from mixprec.export.c import toolchain as tc

    out, pruned, full = pruned_run
    artifact = export_run(out, "c")
    d = artifact.details
    pruned_cost = mixprec.cost_report(pruned, "generic").totals
    assert d["cost_model"]["flash_bytes"] == d["weights_section_bytes"] == pruned_cost["flash_bytes"]
    assert pruned_cost["flash_bytes"] < mixprec.cost_report(full, "generic").totals["flash_bytes"]
    assert d["arena_bytes"] == pruned_cost["ram_bytes"]
    if tc.host_cc() is None:
        assert "no host C compiler: the host runner was not built" in artifact.notes
        return
    assert "host_build" in d
    x = digits.x_test.numpy().astype(np.float32)
    got = CExporter().run(artifact, x)
    assert np.array_equal(got, reference(pruned.lower(), x))
