"""The uniform search end to end on real (bundled) data, kept short."""
import json

import numpy as np
import pytest

from mixprec import BudgetError
from mixprec.execute import reference
from mixprec.search import RunConfig, load_run, run_search

FAST = dict(float_epochs=4, qat_epochs=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_search(RunConfig(budget={"flash": "12KiB"}, **FAST), out)
    return out


def test_run_directory_holds_config_checkpoints_result_and_report(run_dir):
    for name in ("config.yaml", "result.json", "report.md", "integer_model.npz", "checkpoints/float.pt",
                 "checkpoints/quantized.pt"):
        assert (run_dir / name).exists(), name
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result["accuracy"]) == {"float", "quantized", "chance"}
    assert result["degenerate"] is False and result["degenerate_reason"] is None
    assert set(result["cost"]) == {"flash_bytes", "ram_bytes", "ram_mcu_in_out", "macs", "bops", "ebops",
                                   "latency_cycles", "energy_uj"}
    assert result["budget"] == {"flash_bytes": 12 * 1024}
    assert result["feasible"] is (result["cost"]["flash_bytes"] <= 12 * 1024)
    assert result["reference_mismatches"] == 0
    assert result["accuracy"]["quantized"] > 0.8
    assert all("weight_bits" in r for r in result["layers"] if r["op"] in ("conv", "linear"))
    assert result["weight_range"] == "mse"  # the uniform method: least-squares weight ranges


def test_widest_uniform_width_that_fits_is_chosen(run_dir):
    result = json.loads((run_dir / "result.json").read_text())
    # 8-bit weights of the 14.5k-parameter digits CNN need > 12 KiB, 4-bit fit
    assert {r["weight_bits_mean"] for r in result["layers"] if "weight_bits" in r} == {4.0}
    # a FLASH-only budget does not constrain the activations: they keep 8 bits (cost no FLASH)
    assert {r["act_bits"] for r in result["layers"]} == {8.0}


def test_run_reloads_bit_exactly(run_dir, digits):
    cfg, qm, result = load_run(run_dir)
    x = digits.x_test[:64]
    ig = qm.lower()
    assert np.array_equal(qm(x).numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))
    acc = float((qm(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc == pytest.approx(result["accuracy"]["quantized"])


def test_resume_reuses_float_phase_and_refuses_other_config(run_dir):
    stamp = (run_dir / "checkpoints" / "float.pt").stat().st_mtime_ns
    run_search(RunConfig(budget={"flash": "12KiB"}, **FAST), run_dir, resume=True)
    assert (run_dir / "checkpoints" / "float.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different configuration"):
        run_search(RunConfig(budget={"flash": "10KiB"}, **FAST), run_dir, resume=True)
    with pytest.raises(ValueError, match="pass --resume"):
        run_search(RunConfig(budget={"flash": "12KiB"}, **FAST), run_dir)


def test_impossible_budget_is_refused_before_training_naming_the_minimum(tmp_path):
    with pytest.raises(BudgetError, match=r"FLASH budget .* below the smallest achievable"):
        run_search(RunConfig(budget={"flash": "1KiB"}, **FAST), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_given_bits_that_do_not_fit_say_which_width_does(tmp_path):
    with pytest.raises(BudgetError, match="widest uniform width that fits is 4 bits"):
        run_search(RunConfig(bits=8, budget={"flash": "12KiB"}, **FAST), tmp_path / "r")


def test_unknown_method_and_budget_key_are_clear():
    with pytest.raises(ValueError, match="available: uniform"):
        RunConfig(method="magic")
    with pytest.raises(ValueError, match="unknown budget keys"):
        RunConfig(budget={"flsh": "1KiB"})


def test_a_refused_run_leaves_the_directory_free_for_the_corrected_command(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(BudgetError):
        run_search(RunConfig(budget={"flash": "1KiB"}, **FAST), out)
    assert not (out / "config.yaml").exists()
    result = run_search(RunConfig(budget={"flash": "12KiB"}, **FAST), out)  # no --resume needed
    assert result["feasible"]
