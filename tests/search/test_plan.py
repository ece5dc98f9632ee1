"""Sweep planning: the widest model a budget admits, shared float stages, run order, and the
command that reproduces a trial."""
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mixprec.cli as cli
from mixprec import quantize
from mixprec.cost import Budget, evaluate, feasible, load_target
from mixprec.cost.bits import uniform
from mixprec.models import get_model
from mixprec.search import RunConfig, Trial
from mixprec.search.plan import Family, command_line, in_float_order, share_floats, trained_floats, widest

LENET = Family("lenet5", tuple(i / 8 for i in range(8, 0, -1)), (1, 28, 28))


def _fits(width, bits: int, budget: Budget) -> bool:
    t = load_target("cortex-m4")
    graph = quantize(get_model(f"lenet5[width={width}]"), t, (1, 28, 28), bits=bits, act_bits=8).graph
    return feasible(evaluate(graph, uniform(graph, bits, 8, "per-channel"), t), budget)


def test_widest_is_the_first_width_whose_uniform_model_fits():
    budget = Budget.from_strings(flash="8KiB")
    w = widest(LENET, "cortex-m4", 4, budget)
    i = LENET.widths.index(w)
    assert 0 < i < len(LENET.widths) - 1  # a budget that cuts inside the family
    assert _fits(w, 4, budget) and not _fits(LENET.widths[i - 1], 4, budget)
    # a share of the budget and fewer bits move the choice the way they must
    half = widest(LENET, "cortex-m4", 4, budget, share=0.5)
    assert LENET.widths.index(half) > i and _fits(half, 4, Budget.from_strings(flash="4KiB"))
    assert LENET.widths.index(widest(LENET, "cortex-m4", 2, budget)) < i
    assert widest(LENET, "cortex-m4", 8, Budget.from_strings(flash="1KiB")) is None
    assert LENET.model(1.0) == "lenet5" and LENET.model(0.5) == "lenet5[width=0.5]"


def test_trials_with_one_float_stage_share_it_and_run_after_its_trainer(tmp_path):
    base = RunConfig(budget={"flash": "12KiB"})
    trials = [Trial(RunConfig(method="hgq", budget={"flash": "12KiB"}), tmp_path / "hgq"),
              Trial(base, tmp_path / "uniform"),
              Trial(RunConfig(lr=1e-2), tmp_path / "other-float"),
              Trial(RunConfig(method="dq", float_from=str(tmp_path / "mine")), tmp_path / "dq")]
    shared = share_floats(trials)
    assert shared[0] == trials[0] and shared[2] == trials[2] and shared[3] == trials[3]
    assert shared[1].config.float_from == str(tmp_path / "hgq")  # same float settings: hgq's float model
    assert shared[1].config == replace(base, float_from=str(tmp_path / "hgq")) and shared[1].out == trials[1].out
    # a float model trained earlier (say by another sweep) is taken by every trial of its float id
    earlier = share_floats(trials[:2], {trials[0].float_id: tmp_path / "earlier"})
    assert [t.config.float_from for t in earlier] == [str(tmp_path / "earlier")] * 2

    order = in_float_order(list(reversed(shared)))
    names = [t.out.name for t in order]
    assert names.index("hgq") < names.index("uniform")


def test_trained_floats_finds_the_float_models_trials_trained(tmp_path):
    own, taker = tmp_path / "own", tmp_path / "taker"
    for out, cfg in ((own, RunConfig()), (taker, RunConfig(float_from=str(own)))):
        (out / "checkpoints").mkdir(parents=True)
        cfg.save(out / "config.yaml")
        (out / "checkpoints" / "float.pt").write_bytes(b"")
    found = trained_floats([Trial(RunConfig(), own), Trial(RunConfig(), taker), Trial(RunConfig(), tmp_path / "no")])
    assert found == {Trial(RunConfig(), own).float_id: own}


@pytest.mark.parametrize("data,fill", [("mnist", None), ("mnist[scale=unit, val_size=1000]", True), ("mnist", False)])
def test_command_line_reproduces_the_configuration(tmp_path, monkeypatch, data, fill):
    cfg = RunConfig(model="lenet5[width=0.5]", data=data, method="dq", budget={"flash": "8KiB", "ram": "4KiB", "ram_in_out": "2KiB",
                                                                  "energy": "90", "latency": "1e6"},
                    float_epochs=3, qat_lr=1e-3, seed=2, options={"weight_epochs": "1"},
                    float_from=str(tmp_path / "f"), weight_granularity="per-tensor", budget_fill=fill)
    seen = {}
    monkeypatch.setattr(cli, "_run", lambda config, out, *a: seen.update(config=config, out=out))
    words = shlex.split(command_line(cfg, "runs/x", root=tmp_path))
    assert "--float-from f" in " ".join(words)  # under the root: relative
    res = CliRunner().invoke(cli.app, words[1:])
    assert res.exit_code == 0, res.output
    assert Path(seen["out"]) == Path("runs/x")
    again = RunConfig(**{**seen["config"], "float_from": str(tmp_path / seen["config"]["float_from"])})
    assert again == cfg
