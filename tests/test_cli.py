import json

import pytest
from typer.testing import CliRunner

from mixprec.cli import app

runner = CliRunner()


def test_cost_prints_per_layer_breakdown_and_totals():
    res = runner.invoke(app, ["cost", "--model", "digits-cnn", "--target", "cortex-m4", "--bits", "4"])
    assert res.exit_code == 0, res.output
    assert "flash_bytes" in res.output and "ram_bytes" in res.output and "linear" in res.output


def test_cost_json_matches_hand_count_of_weight_bytes():
    res = runner.invoke(app, ["cost", "--model", "jet-mlp", "--target", "generic", "--bits", "8", "--json"])
    assert res.exit_code == 0, res.output
    totals = json.loads(res.output)["totals"]
    # 16x64 + 64x32 + 32x32 + 32x5 weights, one byte each at 8 bits
    assert totals["weight_bytes"] == 16 * 64 + 64 * 32 + 32 * 32 + 32 * 5
    assert totals["macs"] == 16 * 64 + 64 * 32 + 32 * 32 + 32 * 5


def test_cost_ebops_are_the_ones_a_run_reports(tmp_path, digits_float):
    """One EBOPs: ``mixprec cost`` counts the model's own weights as quantized, as result.json does
    (a weight that rounds to 0 costs nothing); every weight at its full width is ``ebops_nominal``."""
    from mixprec.search import RunConfig, run_search

    res = runner.invoke(app, ["cost", "--model", "jet-mlp", "--target", "fpga-hls4ml", "--bits", "8", "--json"])
    totals = json.loads(res.output)["totals"]
    full = (16 * 64 + 64 * 32 + 32 * 32 + 32 * 5) * 8 * 8
    assert totals["ebops_nominal"] == full and 0 < totals["ebops"] < full
    out = tmp_path / "u8"
    result = run_search(RunConfig(model="digits-cnn", data="digits", target="fpga-hls4ml", bits=8, qat_epochs=1,
                                  budget_epochs=0, float_from=str(digits_float)), out)
    res = runner.invoke(app, ["cost", "--from", str(out), "--json"])
    totals = json.loads(res.output)["totals"]
    assert totals["ebops"] == result["cost"]["ebops"] < totals["ebops_nominal"] == result["cost_detail"]["ebops_nominal"]
    from mixprec import cli

    with cli.console.capture() as printed:  # a fabric has no FLASH or arena to report
        cli._print_result(result, out)
    assert "LUT + 55 x DSP" in printed.get() and "FLASH" not in printed.get() and "peak RAM" not in printed.get()


@pytest.mark.parametrize("args, message", [
    (["--flash", "12KB"], "ambiguous"),
    (["--flash", "twelve"], "size"),
    (["--flash", "100B"], "smallest achievable"),
    (["--bits", "3"], "not supported by cortex-m4"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    res = runner.invoke(app, ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m4",
                              "--out", str(tmp_path / "r"), "--float-epochs", "1", "--qat-epochs", "1", *args])
    assert res.exit_code == 2
    assert message in res.output


def test_bops_and_in_out_ram_flags_are_budgets(tmp_path, monkeypatch):
    import mixprec.search
    from mixprec.cost import Budget

    seen = []
    monkeypatch.setattr(mixprec.search, "run_search", lambda cfg, out, **kw: seen.append(cfg))  # None: no report
    res = runner.invoke(app, ["search", "--model", "digits-cnn", "--data", "digits", "--bops", "1e6",
                              "--ram-in-out", "2KiB", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert seen[0].budget == {"bops": "1e6", "ram_in_out": "2KiB"}
    assert Budget.from_strings(**seen[0].budget).limits() == {"bops": 1e6, "ram_mcu_in_out": 2048}
    assert "--bops" in runner.invoke(app, ["search", "--help"]).output


@pytest.mark.parametrize("args, message", [
    (["--bops", "1e4"], "BOPs budget 1e+04 is below the smallest achievable"),
    (["--ram-in-out", "100B", "--flash", "512KiB"],
     "in+out RAM (largest input+output buffers of one layer) budget 100 B is below the smallest achievable 768 B"),
    # an activation-only budget is judged on the uniform activation widths, 2 bits the last
    (["--ram-in-out", "100B"], "2-bit: ram_mcu_in_out 768 > 100"),
])
def test_bops_and_in_out_ram_below_the_smallest_are_refused_before_the_run(tmp_path, args, message):
    out = tmp_path / "r"
    res = runner.invoke(app, ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m4",
                              "--out", str(out), "--float-epochs", "1", "--qat-epochs", "1", *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output  # unwrapped
    assert not out.exists()


def test_unknown_model_and_target_are_named():
    res = runner.invoke(app, ["cost", "--model", "resnet-1000", "--target", "cortex-m4"])
    assert res.exit_code == 2 and "resnet-1000" in res.output and "digits-cnn" in res.output
    res = runner.invoke(app, ["cost", "--model", "digits-cnn", "--target", "cortex-m99"])
    assert res.exit_code == 2 and "cortex-m4" in res.output


def test_search_writes_a_feasible_run(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m4",
                              "--flash", "12KiB", "--float-epochs", "3", "--qat-epochs", "1", "--quiet",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "feasible" in res.output
    assert json.loads((out / "result.json").read_text())["feasible"] is True
    res = runner.invoke(app, ["cost", "--from", str(out)])
    assert res.exit_code == 0 and "flash_bytes" in res.output


def test_targets_and_models_list():
    assert "fpga-hls4ml" in runner.invoke(app, ["targets"]).output
    assert "efficientnet-lite0" in runner.invoke(app, ["models"]).output


def test_progress_bars_show_eta_per_phase(capsys):
    from mixprec.cli import _Progress

    bars = _Progress(True)
    for done in range(1, 11):
        bars("float", done, 10)
    bars("test integer", 1, 2)
    err = capsys.readouterr().err
    assert "float" in err and "10/10" in err and "<" in err  # tqdm's "elapsed<remaining"
    assert "test integer" in err
    _Progress(False)("float", 1, 10)
    assert capsys.readouterr().err == ""


def test_non_interactive_run_logs_plain_lines_and_quiet_silences_them(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "mixprec.cli", "search", "--model", "digits-cnn", "--data", "digits",
            "--target", "cortex-m4", "--bits", "4", "--float-epochs", "1", "--qat-epochs", "1"]
    plain = subprocess.run(args + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert "epoch 0 loss" in plain.stderr and "samples/s" in plain.stderr and "\r" not in plain.stderr
    quiet = subprocess.run(args + ["--out", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "epoch 0" not in quiet.stderr


def test_rl_flags_are_its_options_and_other_methods_refuse_them(tmp_path, monkeypatch):
    import mixprec.search

    seen = []
    monkeypatch.setattr(mixprec.search, "run_search", lambda cfg, out, **kw: seen.append(cfg))
    common = ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m7", "--out", str(tmp_path / "r")]
    res = runner.invoke(app, common + ["--method", "rl", "--episodes", "30", "--executor", "ray", "--workers", "2",
                                       "--ray-address", "auto", "-o", "warmup=5"])
    assert res.exit_code == 0, res.output
    assert seen[0].options == {"warmup": "5", "episodes": "30", "executor": "ray", "workers": "2", "ray_address": "auto"}
    other = runner.invoke(app, common + ["--method", "dnas", "--episodes", "30"])
    assert other.exit_code == 2 and "--episodes is an option of --method rl, not of --method dnas" in other.output
    both = runner.invoke(app, common + ["--method", "rl", "--workers", "2", "-o", "workers=3"])
    assert both.exit_code == 2 and "both given" in both.output
    assert len(seen) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("model, method", [("tests.graph.user_models:ShuffleUnit", "dnas"),
                                           ("tests.graph.user_models:MobileNetV3SE", "hgq")])
def test_search_takes_a_users_model_with_concat_slices_tables_and_products(tmp_path, model, method):
    """``--model module:Class`` of model code as written (channel split and concat, searched with
    pruning; Hardswish and a Hardsigmoid gate multiplying the features, with learned bits), exported
    to C."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["search", "--model", model, "--data", "digits", "--target", "cortex-m4", "--method", method,
                              "--flash", "8KiB", "--float-epochs", "8", "--qat-epochs", "1", "--budget-epochs", "1",
                              "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "result.json").read_text())["reference_mismatches"] == 0
    res = runner.invoke(app, ["export", str(out), "--format", "c", "--quiet"])
    assert res.exit_code == 0, res.output
