"""The command printed beside each benchmark row must reproduce that row: parsed by the real CLI, it
gives the very configuration the benchmark ran."""
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mixprec.cli as cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _runs import command_for  # noqa: E402  (what every benchmark writes beside its runs)


@pytest.fixture(scope="module")
def learned():
    spec = importlib.util.spec_from_file_location("bench_learned", ROOT / "benchmarks" / "learned.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed(command: str, monkeypatch) -> tuple[dict, Path]:
    seen = {}
    monkeypatch.setattr(cli, "_run", lambda config, out, *a: seen.update(config=config, out=out))
    words = shlex.split(command)
    assert words[0] == "mixprec"
    res = CliRunner().invoke(cli.app, words[1:])
    assert res.exit_code == 0, res.output
    return seen["config"], seen["out"]


FIELDS = ("model", "data", "target", "method", "bits", "act_bits", "weight_granularity", "float_epochs",
          "qat_epochs", "budget_epochs", "batch_size", "lr", "qat_lr", "weight_decay", "optimizer", "options")


@pytest.mark.parametrize("run", [
    dict(name="uniform4", method="uniform", bits=4, model="resnet8[width=9]"),
    dict(name="hgq", method="hgq", model="resnet8[width=11]"),
    dict(name="dq-u4", method="dq", model="resnet8[width=9]"),
    dict(name="dnas-keep", method="dnas", model="resnet8", options={"prune": "false"}),
])
def test_learned_table_commands_reproduce_their_config(learned, run, monkeypatch):
    preset = learned.PRESETS["resnet8-cifar10"]
    cfg = learned.config_for(preset, run, "16KiB", "runs/bench-learned/resnet8-cifar10/16KiB/uniform4")
    config, out = parsed(command_for(cfg, Path("runs/x")), monkeypatch)
    for field in FIELDS:
        assert config[field] == getattr(cfg, field), field
    assert config["budget"] == cfg.budget and out == Path("runs/x")
    assert Path(config["float_from"]).resolve() == Path(cfg.float_from).resolve()


@pytest.mark.parametrize("name", ["uniform", "hgq-element-act-channel"])
def test_fpga_table_commands_reproduce_their_config(learned, name, monkeypatch):
    # the uniform FPGA run leaves activation bits unset (they follow the weights)
    cfg = learned.fpga_config(name, "1e6", None)
    config, _ = parsed(command_for(cfg, Path("runs/x")), monkeypatch)
    for field in FIELDS:
        assert config[field] == getattr(cfg, field), field
    assert config["budget"] == cfg.budget and config["float_from"] is None


@pytest.fixture(scope="module")
def dnas_bench():
    spec = importlib.util.spec_from_file_location("bench_dnas", ROOT / "benchmarks" / "dnas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["lenet5-mnist", "resnet8-cifar10"])
def test_dnas_table_commands_reproduce_their_config(dnas_bench, task, tmp_path, monkeypatch):
    from types import SimpleNamespace

    args = SimpleNamespace(task=task, granularities=["per-channel", "per-tensor"], budgets=None, runs=tmp_path,
                           no_uniform=False, variants=True)
    trials = dnas_bench.trials(args)
    assert len(trials) == len(dnas_bench.TASKS[task].budgets) + len(dnas_bench.UNIFORM)
    flags = set()
    for trial in trials:
        config, out = parsed(command_for(trial.config, trial.out), monkeypatch)
        for field in FIELDS:
            assert config[field] == getattr(trial.config, field), (trial.out, field)
        assert config["budget"] == trial.config.budget and Path(out) == trial.out
        flags |= set(trial.config.budget) | set(trial.config.options)
    assert {"flash"} < flags  # energy budgets (resnet8) and the paper's schedule (lenet5) pass through too


@pytest.mark.parametrize("preset", ["lenet5-mnist", "resnet8-cifar10"])
def test_rl_table_commands_reproduce_their_config(preset, tmp_path, monkeypatch):
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_rl", ROOT / "benchmarks" / "rl.py")
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    args = SimpleNamespace(only=[preset], budgets=None, methods=list(rl.METHODS), runs=tmp_path)
    trials = rl.planned(args)
    assert {t.config.method for t in trials} == {"rl", "hgq", "dq", "uniform"}
    for trial in trials:
        config, out = parsed(command_for(trial.config, trial.out), monkeypatch)
        for field in FIELDS:
            assert config[field] == getattr(trial.config, field), (trial.out, field)
        assert config["budget"] == trial.config.budget and set(config["budget"]) == {"flash", "ram"}
        assert Path(out) == trial.out


@pytest.mark.parametrize("task", ["mnist-mlp", "digits-mlp"])
def test_hgq2_comparison_commands_reproduce_their_config(task, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_fpga", ROOT / "benchmarks" / "fpga.py")
    fpga = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_fpga", fpga)  # its dataclasses look their module up
    spec.loader.exec_module(fpga)
    trials = fpga.our_trials(fpga.TASKS[task], tmp_path)
    levels = fpga.TASKS[task].levels
    assert len(trials) == 2 * len(levels) + 1  # each level by our rule and by HGQ2's, and one front run
    assert [set(t.config.budget) for t in trials[:-1]] == [{"ebops"}] * len(levels) + [{"bops"}] * len(levels)
    for trial in trials:
        config, out = parsed(command_for(trial.config, trial.out), monkeypatch)
        for field in FIELDS:
            assert config[field] == getattr(trial.config, field), (trial.out, field)
        assert config["budget"] == trial.config.budget and Path(out) == trial.out
    assert trials[-1].config.options["schedule"] == "front"


@pytest.mark.parametrize("method,before_the_fill,flag", [("dnas", True, "--no-fill"), ("dnas", False, None),
                                                         ("uniform", True, None)])
def test_a_run_made_before_the_fill_is_reproduced_with_no_fill(tmp_path, method, before_the_fill, flag, monkeypatch):
    """Runs from before the budget step filled by default: their command says --no-fill, which
    gives the configuration they ran (uniform never fills: nothing to say)."""
    import json

    from mixprec.search import RunConfig

    cfg = RunConfig(model="lenet5", data="mnist", method=method, budget={"flash": "8KiB"})
    step = {"applied": False} if before_the_fill else {"applied": True, "fill": "milp"}
    (tmp_path / "result.json").write_text(json.dumps({"budget_step": step}))
    command = command_for(cfg, tmp_path)
    assert (flag in command) if flag else "-fill" not in command
    config, _ = parsed(command, monkeypatch)
    assert config["budget_fill"] == (False if flag else None)


def test_every_dnas_benchmark_budget_is_one_a_run_accepts():
    spec = importlib.util.spec_from_file_location("bench_dnas", ROOT / "benchmarks" / "dnas.py")
    dnas = importlib.util.module_from_spec(spec)
    sys.modules["bench_dnas"] = dnas  # its dataclasses look their module up
    spec.loader.exec_module(dnas)
    from mixprec.cost import Budget

    for task in dnas.TASKS.values():
        for budget in task.budgets:
            assert Budget.from_strings(**{budget.cost: budget.value}).limits(), budget
