"""The public API as the README shows it, run for real on the digits data."""
import re
from pathlib import Path

import numpy as np
import torch
import pytest

import mixprec
from mixprec.execute import reference
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
    # the snippet's accuracy is the integer program's: the NumPy reference scores the same
    ref = reference(env["qm"].lower(), digits.x_test.numpy()).argmax(1)
    assert float(env["accuracy"]) == pytest.approx(float((ref == digits.y_test.numpy()).mean()), abs=1e-7)


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


def test_pruned_activation_groups_load_on_a_fixed_point_target():
    """What the FPGA's search hands back (input features at 0 bits) converts again, as a run's
    checkpoint is loaded; a whole tensor at 0 bits is refused (a dead network)."""
    features = torch.tensor([0.0, 4] * 8)
    qm = mixprec.quantize(get_model("jet-mlp"), "fpga-hls4ml", (16,), bits=6, act_bits={"input": features})
    assert torch.equal(qm.act_quantizers["input"].bits().flatten(), features)
    with pytest.raises(ValueError, match="0-bit activations are not supported by fpga-hls4ml"):
        mixprec.quantize(get_model("jet-mlp"), "fpga-hls4ml", (16,), bits=6, act_bits={"input": torch.tensor(0.0)})
    with pytest.raises(ValueError, match="0-bit activations are not supported by generic"):
        mixprec.quantize(get_model("jet-mlp"), "generic", (16,), bits=6, act_bits={"input": features})


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


# ----------------------------------------------------------------------------- finished runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_float):
    """A real digits run, short (a few seconds)."""
    from mixprec.search import RunConfig, run_search

    out = tmp_path_factory.mktemp("finished") / "run"
    run_search(RunConfig(model="digits-cnn", data="digits", target="cortex-m4", bits=8, qat_epochs=1,
                         float_from=str(digits_float)), out)
    return out


def test_load_run_and_evaluate_score_the_deployed_model(finished_run, digits):
    run = mixprec.load_run(finished_run)
    assert isinstance(run, mixprec.Run) and run.dir == finished_run and not run.model.training
    assert run.config.model == "digits-cnn" and run.input_shape == (1, 8, 8)
    # result.json's preprocessing: the loader's scaling and the input grid of the integer program
    record, grid = run.result["preprocessing"], run.model.lower()["input"].grid
    assert run.preprocessing == mixprec.data.Preprocessing.from_dict(record) and run.preprocessing.raw_divisor == 16.0
    assert record["input_scale"] == float(grid.scale) and record["input_zero_point"] == 0
    assert (record["input_min"], record["input_max"]) == (int(np.min(grid.lo)), int(np.max(grid.hi)))

    acc = mixprec.evaluate(run, digits.x_test, digits.y_test)
    assert acc == run.result["accuracy"]["quantized"] > 0.5
    x, y = digits.x_test.numpy(), digits.y_test.numpy()
    assert mixprec.evaluate(run.model, x, y) == acc  # NumPy, the model alone
    assert mixprec.evaluate(run, x[:, 0], y) == acc  # (N, 8, 8): only an axis of size 1 differs
    counts = np.round(x * 16).astype(np.uint8)  # the raw pixel counts 0..16
    assert mixprec.evaluate(run, counts, y, raw=True) == acc
    assert mixprec.evaluate(run, counts, y) < acc  # taken as normalised inputs they saturate


def test_finished_run_errors_are_one_line(finished_run, tmp_path, digits):
    import shutil

    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copy(finished_run / "config.yaml", unfinished)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished_run, corrupt)
    (corrupt / "checkpoints" / "quantized.pt").write_bytes(b"not a checkpoint")
    run = mixprec.load_run(finished_run)
    x, y = digits.x_test, digits.y_test
    calls = [(lambda: mixprec.load_run(tmp_path / "nope"), "nope: no such folder"),
             (lambda: mixprec.load_run(tmp_path / "empty"), r"is not a run folder \(no config.yaml\)"),
             (lambda: mixprec.load_run(unfinished), r"holds no quantized model .*--resume"),
             (lambda: mixprec.load_run(corrupt), r"quantized.pt is corrupt"),
             (lambda: mixprec.evaluate(run, x[:, :, :4], y), r"samples of shape \(1, 4, 8\), but the model takes "
                                                             r"\(1, 8, 8\); give x of shape \(N, 1, 8, 8\)"),
             (lambda: mixprec.evaluate(run, x[:0], y[:0]), "x holds no samples"),
             (lambda: mixprec.evaluate(run, x, y[:-1]), r"y has shape \(\d+,\); give one integer label per sample"),
             (lambda: mixprec.evaluate(run.model, x, y, raw=True), "raw=True needs a Run"),
             (lambda: mixprec.evaluate(get_model("digits-cnn"), x, y), "evaluate takes a Run .* not Sequential")]
    for call, message in calls:
        with pytest.raises(mixprec.RunError, match=message) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)


def test_readme_finished_run_snippet_runs(finished_run, digits):
    readme = README.read_text()
    snippet = re.search(r"A finished run .*?```python\n(.*?)```", readme, re.S).group(1)
    run = mixprec.load_run(finished_run)
    env = {"mixprec": mixprec, "x_test": digits.x_test, "y_test": digits.y_test, "qm": run.model,
           "raw": np.round(digits.x_test.numpy() * 16)}
    exec(compile(snippet.replace("runs/quickstart", str(finished_run)), "README", "exec"), env)
    assert env["acc"] == run.result["accuracy"]["quantized"] and env["run"].dir == finished_run
