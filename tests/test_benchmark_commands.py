"""The command printed beside each benchmark row must reproduce that row: parsed by the real CLI, it
gives the very configuration the benchmark ran."""
import importlib.util
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mixprec.cli as cli

ROOT = Path(__file__).resolve().parent.parent


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
])
def test_learned_table_commands_reproduce_their_config(learned, run, monkeypatch):
    preset = learned.PRESETS["resnet8-cifar10"]
    cfg = learned.config_for(preset, run, "16KiB", "runs/bench-learned/resnet8-cifar10/16KiB/uniform4")
    config, out = parsed(learned.command_for(cfg, Path("runs/x")), monkeypatch)
    for field in FIELDS:
        assert config[field] == getattr(cfg, field), field
    assert config["budget"] == cfg.budget and out == Path("runs/x")
    assert Path(config["float_from"]).resolve() == Path(cfg.float_from).resolve()


@pytest.mark.parametrize("name", ["uniform", "hgq-element-act-channel"])
def test_fpga_table_commands_reproduce_their_config(learned, name, monkeypatch):
    # the uniform FPGA run leaves activation bits unset (they follow the weights)
    cfg = learned.fpga_config(name, "1e6", None)
    config, _ = parsed(learned.command_for(cfg, Path("runs/x")), monkeypatch)
    for field in FIELDS:
        assert config[field] == getattr(cfg, field), field
    assert config["budget"] == cfg.budget and config["float_from"] is None
