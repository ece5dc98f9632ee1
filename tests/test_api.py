"""The public API as the README shows it, run for real on the digits data."""
import re
from pathlib import Path

import numpy as np
import pytest

import mixprec
from mixprec.models import get_model
from mixprec.train import batches

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_snippet_runs(digits, tmp_path, monkeypatch):
    snippet = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    model = get_model("digits-cnn")
    env = {"model": model, "x_train": digits.x_train, "x_test": digits.x_test, "y_test": digits.y_test,
           "batches": list(batches(digits.x_train, digits.y_train, 64))[:5], "lam": 1e-6}
    env["opt"] = None
    code = snippet.replace("opt.zero_grad(); loss.backward(); opt.step()",
                           "opt = opt or torch.optim.Adam(qm.parameters(), 1e-3); "
                           "opt.zero_grad(); loss.backward(); opt.step()")
    exec(compile("import torch\n" + code, "README", "exec"), env)
    assert env["report"].totals["flash_bytes"] <= 12 * 1024
    assert (tmp_path / "out" / "model.npz").exists() and (tmp_path / "out" / "model.json").exists()
    assert 0.0 <= float(env["accuracy"]) <= 1.0


def test_finalize_lowers_bits_until_the_budget_holds(digits):
    qm = mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([digits.x_train[:128]])
    before = mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"]
    report = mixprec.finalize(qm, "cortex-m4", mixprec.Budget.from_strings(flash="10KiB"))
    assert before > 10 * 1024 >= report.totals["flash_bytes"] == mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"]
    widths = {float(b) for l in qm.layers.values() for b in l.quantizer.bits().flatten()}
    assert widths <= {2.0, 4.0, 8.0} and 8.0 in widths  # mixed: only what the budget needs is cut
    assert mixprec.verify_against_reference(qm, digits.x_test[:64]) == 0


def test_finalize_refuses_an_impossible_budget_naming_the_minimum():
    qm = mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=8)
    with pytest.raises(mixprec.BudgetError, match="smallest achievable"):
        mixprec.finalize(qm, "cortex-m4", mixprec.Budget.from_strings(flash="1KiB"))


def test_unsupported_bits_and_granularity_name_the_supported_set():
    with pytest.raises(ValueError, match="supported: 2, 4, 8"):
        mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=5)
    with pytest.raises(ValueError, match="per-tensor"):
        mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=4, weight_granularity="per-element")


def test_cost_term_is_differentiable_for_learned_bits():
    qm = mixprec.quantize(get_model("jet-mlp"), "generic", (16,), bits=6)
    bits = qm.layers["fc1"].quantizer.bits_param if "fc1" in qm.layers else next(iter(qm.layers.values())).quantizer.bits_param
    bits.requires_grad_(True)
    mixprec.cost_term(qm, "generic", "flash_bytes").backward()
    assert bits.grad is not None and float(bits.grad.abs().sum()) > 0


def test_saved_integer_model_holds_every_parameter(tmp_path, digits):
    qm = mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=4)
    qm.calibrate([digits.x_train[:64]])
    path = mixprec.save_integer_model(qm, tmp_path / "m.npz")
    arrays = np.load(path)
    ig = qm.lower()
    for node in ig.nodes:
        if node.op == "conv":
            assert np.array_equal(arrays[f"{node.name}.weight"], node.params["weight"])
            assert np.array_equal(arrays[f"{node.name}.requant.multiplier"], node.params["requant"].multiplier)
