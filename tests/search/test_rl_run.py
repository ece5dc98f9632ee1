"""``--method rl`` end to end on digits for cortex-m7: a feasible, integer-exact result whose budget
the search already met, every policy within FLASH and RAM, SIGKILL mid-search then --resume ending
where an uninterrupted run ends, the RAM model, and options refused before the run claims its folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from mixprec.cli import app
from mixprec.search import RunConfig, run_search
from mixprec.train import load_checkpoint

OPTIONS = dict(episodes="8", warmup="4", batch="4", steps="8", train_samples="320", val_samples="200", threads="1")
FAST = dict(model="digits-cnn", data="digits", target="cortex-m7", method="rl", qat_epochs=2, budget_epochs=1,
            budget={"flash": "8KiB", "ram": "2KiB"})


def _config(float_run, **kw) -> RunConfig:
    return RunConfig(float_from=str(float_run), **{**FAST, "options": dict(OPTIONS), **kw})


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, digits_float):
    out = tmp_path_factory.mktemp("rl") / "run"
    return out, run_search(_config(digits_float), out)


def test_the_result_is_feasible_and_the_search_met_the_budget_itself(rl_run):
    out, result = rl_run
    assert result["feasible"] is True and not result["degenerate"] and result["reference_mismatches"] == 0
    step = result["budget_step"]  # the policy it got already fit, as every evaluated one: the step only raises
    assert step["before"]["flash_bytes"] <= 8192 and step["before"]["ram_bytes"] <= 2048
    assert all(c["bits_mean_after"] >= c["bits_mean_before"] for c in step.get("changes", []))
    episodes = result["history"]["rl"]
    assert len(episodes) == 8
    assert all(e["flash_bytes"] <= 8192 and e["ram_bytes"] <= 2048 for e in episodes)
    layers = {r["name"]: r for r in result["layers"]}
    assert layers["conv1.0"]["weight_bits_mean"] == 8 and layers["fc"]["weight_bits_mean"] == 8  # held ends
    widths = [r["weight_bits"] for r in result["layers"] if r["op"] in ("conv", "linear")]
    assert {b for w in widths for b in (w if isinstance(w, list) else [w])} <= {2, 4, 8}  # the fill: per channel
    assert (out / "checkpoints" / "rl-start.pt").exists() and (out / "checkpoints" / "rl.pt").exists()


def test_options_and_targets_it_cannot_take_are_refused_before_the_folder(digits_float, tmp_path):
    for options, message in ((dict(executor="mpi"), "executor"), (dict(ends_bits="3"), "ends_bits=3"),
                             (dict(episodes="0"), "episodes")):
        out = tmp_path / message
        with pytest.raises(ValueError, match=message):
            run_search(_config(digits_float, options={**OPTIONS, **options}), out)
        assert not out.exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(digits_float, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: its import fails
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"pip install 'mixprec\[ray\]'"):
        run_search(_config(digits_float, options={**OPTIONS, "executor": "ray"}), out)
    assert not out.exists()


def test_ram_model_layer_makes_ram_the_in_out_limit(tmp_path):
    runner = CliRunner()
    common = ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m7", "--method", "rl",
              "--ram", "2KiB", "--ram-model", "layer", "--out", str(tmp_path / "run")]
    both = runner.invoke(app, common + ["--ram-in-out", "1KiB"])
    assert both.exit_code == 2 and "not both" in both.output
    wrong = runner.invoke(app, common[:-4] + ["--ram-model", "arena", "--out", str(tmp_path / "run")])
    assert wrong.exit_code == 2 and "liveness or layer" in wrong.output
    # the limit lands on the in+out total: a budget below the in+out floor is refused naming it
    tight = runner.invoke(app, common[:-6] + ["--ram", "64", "--ram-model", "layer", "--out", str(tmp_path / "run")])
    assert tight.exit_code == 2 and "ram_mcu_in_out 768 > 64" in " ".join(tight.output.split())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ SIGKILL mid-search, in processes
def _cli(float_run, out, *extra):
    args = ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m7", "--method", "rl",
            "--flash", "8KiB", "--ram", "2KiB", "--qat-epochs", "2", "--float-from", str(float_run),
            "--out", str(out), "--quiet", "--device", "cpu"]
    for k, v in {**OPTIONS, "episodes": "12"}.items():
        args += ["-o", f"{k}={v}"]
    return [sys.executable, "-m", "mixprec.cli", *args, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every process: the same sums


def test_sigkill_mid_search_then_resume_ends_with_the_uninterrupted_result(digits_float, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cli(digits_float, straight), check=True, env=_env(), capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(digits_float, cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path, deadline = cut / "checkpoints" / "rl.pt", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if path.exists() and len(load_checkpoint(path)["log"]) >= 6:
                break
        except Exception:  # being replaced this instant: look again
            pass
        time.sleep(0.005)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(load_checkpoint(path)["log"])
    assert 6 <= done < 12 and not (cut / "result.json").exists()
    subprocess.run(_cli(digits_float, cut, "--resume"), check=True, env=_env(), capture_output=True)
    a, b = (json.loads((d / "result.json").read_text()) for d in (straight, cut))
    assert a["accuracy"] == b["accuracy"] and a["cost"] == b["cost"]
    assert a["history"]["rl"] == b["history"]["rl"]


def test_a_budget_the_held_layers_put_out_of_reach_is_refused_before_the_folder(digits_float, tmp_path):
    # digits-cnn at its narrowest: 4,664 B of FLASH, 5,000 B with the first and last layers' weights at 8 bits
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="FLASH 5,000 > 4,864.*ends_bits=0"):
        run_search(_config(digits_float, budget={"flash": "4.75KiB", "ram": "2KiB"}), out)
    assert not out.exists()
    assert run_search(_config(digits_float, budget={"flash": "4.75KiB", "ram": "2KiB"},
                              options={**OPTIONS, "ends_bits": "0", "episodes": "4"}), out)["feasible"]
