"""`mixprec export` and `mixprec verify` from the command line: a table, verify.json, the exit status."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from mixprec.cli import app
from mixprec.train import load_checkpoint, save_checkpoint

runner = CliRunner()
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no host C compiler")


@pytest.fixture(scope="module")
def exported(trained_run):
    out = trained_run("cortex-m4")
    res = runner.invoke(app, ["export", str(out), "--format", "c", "--format", "qonnx"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def fpga_exported(exported_run):
    out = exported_run("fpga-hls4ml", "hls4ml")[0]  # the session's hls4ml export (its compile is the slow part)
    res = runner.invoke(app, ["export", str(out), "--format", "qonnx"])
    assert res.exit_code == 0, res.output
    return out


def test_verify_passes_and_writes_verify_json(exported):
    res = runner.invoke(app, ["verify", str(exported), "--inputs", "0"])
    assert res.exit_code == 0, res.output
    report = json.loads((exported / "verify.json").read_text())
    assert report["ok"] is True
    rows = {r["format"]: r for r in report["rows"]}
    for fmt in ("c", "qonnx"):
        assert rows[fmt]["inputs"] == 359 and rows[fmt]["mismatches"] == 0  # the whole test set
    if shutil.which("qemu-system-arm"):
        assert rows["c firmware (mps2-an386, qemu)"]["mismatches"] == 0


def test_fpga_run_verifies_in_hls4ml_and_qonnx(fpga_exported):
    res = runner.invoke(app, ["verify", str(fpga_exported), "--inputs", "0"])
    assert res.exit_code == 0, res.output
    rows = {r["format"]: r for r in json.loads((fpga_exported / "verify.json").read_text())["rows"]}
    assert set(rows) == {"hls4ml", "qonnx"}
    assert all(r["inputs"] == 359 and r["mismatches"] == 0 for r in rows.values())


def test_verify_fails_when_the_artifact_no_longer_matches_the_run(exported, tmp_path):
    tampered = tmp_path / "run"
    shutil.copytree(exported, tampered)
    ckpt = tampered / "checkpoints" / "quantized.pt"
    state = load_checkpoint(ckpt)
    key = next(k for k in state["state_dict"] if k.endswith("weight"))
    state["state_dict"][key] = -state["state_dict"][key]  # the reference changes, the C library does not
    save_checkpoint(ckpt, state)
    res = runner.invoke(app, ["verify", str(tampered), "--inputs", "64"])
    assert res.exit_code == 1
    rows = {r["format"]: r for r in json.loads((tampered / "verify.json").read_text())["rows"]}
    assert rows["c"]["mismatches"] > 0 and "no intermediate layers" in rows["c"]["first_diverging_layer"]
    # QONNX exposes its layers: the first diverging one is the tampered conv
    assert rows["qonnx"]["mismatches"] > 0 and rows["qonnx"]["first_diverging_layer"] == "conv1.0"


def test_verify_without_exports_says_what_to_run(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 2 and "mixprec export" in res.output


def test_unknown_format_lists_the_formats(exported):
    res = runner.invoke(app, ["export", str(exported), "--format", "tflite"])
    assert res.exit_code == 2 and "c, qonnx, hls4ml" in res.output


def test_export_measures_the_artifact_against_the_budget_and_verify_fails_over_it(exported, tmp_path):
    result = json.loads((exported / "result.json").read_text())
    memory = result["artifact_memory"]["c"]
    assert memory["over_budget"] == [] and result["feasible"] is True
    assert memory["flash_bytes"] == result["cost"]["flash_bytes"] <= result["budget"]["flash_bytes"]
    # the same run under a budget one byte below what its library stores
    tight = tmp_path / "run"
    shutil.copytree(exported, tight)
    result["budget"]["flash_bytes"] = memory["flash_bytes"] - 1
    (tight / "result.json").write_text(json.dumps(result))
    res = runner.invoke(app, ["export", str(tight), "--format", "c"])
    assert res.exit_code == 0, res.output
    assert "FLASH" in res.output and "exceed the budget" in res.output
    assert json.loads((tight / "result.json").read_text())["feasible"] is False
    res = runner.invoke(app, ["verify", str(tight), "--inputs", "16"])
    assert res.exit_code == 1, res.output
    rows = {r["format"]: r for r in json.loads((tight / "verify.json").read_text())["rows"]}
    assert rows["c"]["mismatches"] == 0 and "exceed the budget" in rows["c"]["over_budget"][0]
    assert rows["qonnx"]["over_budget"] == []


def test_export_is_quiet_without_verbose(trained_run):
    """Only mixprec's own lines reach the terminal: no INFO lines or deprecation warnings of onnx,
    qonnx or torch unless -v asks for them."""
    import subprocess
    import sys

    out = trained_run("cortex-m4")
    cmd = [sys.executable, "-m", "mixprec.cli", "export", str(out), "--format", "qonnx"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(" mixprec." in ln for ln in lines), proc.stderr
    assert "Warning" not in proc.stderr
