"""HGQ and DQ end to end on the bundled digits data (short), and the pieces they share."""
import json
import math

import numpy as np
import pytest
import torch

from mixprec import quantize
from mixprec.cost import Budget, load_target
from mixprec.execute import reference
from mixprec.search import RunConfig, load_run, run_search
from mixprec.search.dq import DQOptions
from mixprec.search.hgq import BetaPenalty, HGQOptions
from mixprec.search.learned import ParetoFront, differentiable_costs, freeze, parse_options, relaxed

FAST = dict(float_epochs=3, qat_epochs=3, budget_epochs=1)


@pytest.fixture(scope="module")
def float_run(digits_float):
    return digits_float


@pytest.fixture(scope="module")
def hgq_run(tmp_path_factory, float_run):
    out = tmp_path_factory.mktemp("hgq")
    cfg = RunConfig(method="hgq", budget={"flash": "6KiB"}, float_from=str(float_run),
                    options={"bits_lr": "0.1"}, **FAST)
    return out, run_search(cfg, out)


@pytest.fixture(scope="module")
def dq_run(tmp_path_factory, float_run):
    out = tmp_path_factory.mktemp("dq")
    cfg = RunConfig(method="dq", budget={"flash": "6KiB", "ram": "3KiB"}, float_from=str(float_run),
                    options={"k": 2}, **FAST)
    return out, run_search(cfg, out)


@pytest.mark.parametrize("which", ["hgq_run", "dq_run"])
def test_learned_run_meets_budget_with_supported_widths(which, request, digits):
    out, result = request.getfixturevalue(which)
    t = load_target("cortex-m4")
    assert result["feasible"] is True
    assert all(c["ok"] for c in result["budget_checks"].values())
    assert result["reference_mismatches"] == 0
    assert result["accuracy"]["quantized"] > 0.8
    assert result["weight_range"] == "max"  # the learned grid, frozen into the weights
    for row in result["layers"]:
        if "weight_bits" in row:
            assert set(np.atleast_1d(row["weight_bits"]).tolist()) <= set(t.weight_bits)
        assert row["act_bits"] in t.act_bits
    # the run reloads bit-exactly
    _, qm, _ = load_run(out)
    ig = qm.lower()
    x = digits.x_test[:32]
    assert np.array_equal(qm(x).numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))


@pytest.mark.parametrize("which,phase", [("hgq_run", "hgq"), ("dq_run", "dq")])
def test_every_epoch_is_measured_and_the_pareto_front_is_kept(which, phase, request):
    out, result = request.getfixturevalue(which)
    epochs = result["history"][phase]
    assert all("cost" in e and "feasible" in e for e in epochs)
    for e in epochs:  # feasibility is judged on the measured cost
        assert e["feasible"] == (e["cost"]["flash_bytes"] <= 6 * 1024 and e["cost"]["ram_bytes"] <= (
            3 * 1024 if phase == "dq" else float("inf")))
    front = json.loads((out / "pareto" / "pareto.json").read_text())
    assert front["cost"] == "flash_bytes"
    entries = front["front"]
    assert entries and sorted(e["cost"] for e in entries) == [e["cost"] for e in entries]
    for a in entries:
        assert (out / "pareto" / a["checkpoint"]).exists()
        for b in entries:  # nobody dominates anybody
            assert a is b or not (b["val_accuracy"] >= a["val_accuracy"] and b["cost"] <= a["cost"])
    for e in epochs:  # and every epoch is dominated by (or on) the front
        assert any(f["val_accuracy"] >= e["val_accuracy"] and f["cost"] <= e["cost"]["flash_bytes"] for f in entries)
    kept = {p.name for p in (out / "pareto").glob("*.pt")}
    assert kept == {e["checkpoint"] for e in entries}


def test_hgq_controller_drives_the_cost_down(hgq_run):
    _, result = hgq_run
    epochs = result["history"]["hgq"]
    assert epochs[-1]["cost"]["flash_bytes"] < epochs[0]["cost"]["flash_bytes"]
    # over the budget, beta pushes down (a pull raises bits only under 0.97 of it)
    assert all(e["beta"] > 0 for e in epochs if e["cost"]["flash_bytes"] > 6 * 1024)


def test_hgq_steers_every_cost_it_is_given(tmp_path, float_run):
    """``-o cost=flash,ram``: a controller on each limit. Steered by FLASH alone the search kept its
    activations at 8 bits (3,072 B of arena against 1 KiB) and left RAM to the budget step."""
    from mixprec.search.hgq import steered_costs

    budget = Budget.from_strings(flash="6KiB", ram="1KiB")
    assert steered_costs(HGQOptions(), budget) == ["flash_bytes"]  # the first limit, as the paper steers one cost
    assert steered_costs(HGQOptions(cost="flash,ram"), budget) == ["flash_bytes", "ram_bytes"]
    cfg = RunConfig(method="hgq", budget={"flash": "6KiB", "ram": "1KiB"}, float_from=str(float_run),
                    options={"bits_lr": "0.1", "cost": "flash,ram"}, **FAST)
    epochs = run_search(cfg, tmp_path / "run")["history"]["hgq"]
    assert all(set(e["beta_by_cost"]) == {"flash_bytes", "ram_bytes"} for e in epochs)
    assert epochs[-1]["cost"]["ram_bytes"] < 3 * 1024 and epochs[-1]["cost"]["flash_bytes"] < epochs[0]["cost"]["flash_bytes"]


def test_dq_phases_and_float_model_reused(dq_run, hgq_run, float_run):
    _, result = dq_run
    assert len(result["history"]["dq-weights"]) == 1 and len(result["history"]["dq"]) == 2
    trained = torch.load(float_run / "checkpoints" / "float.pt", weights_only=True)["history"]
    assert result["history"]["float"] == trained
    assert result["accuracy"]["float"] == hgq_run[1]["accuracy"]["float"]


def test_float_from_missing_is_refused_before_the_run_directory_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="no float model"):
        run_search(RunConfig(method="hgq", float_from=str(tmp_path / "nope"), **FAST), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_options_are_parsed_and_checked(tmp_path):
    o = parse_options(HGQOptions, {"beta": "0.5", "penalty_every": "4", "schedule": "log"}, "hgq")
    assert o.beta == 0.5 and o.penalty_every == 4 and o.schedule == "log"
    assert parse_options(DQOptions, {"k": "3", "weight_grad": "ste"}, "dq").k == 3
    with pytest.raises(ValueError, match="known: .*beta"):
        parse_options(HGQOptions, {"bta": "1"}, "hgq")
    with pytest.raises(ValueError, match="ewgs"):
        parse_options(DQOptions, {"act_grad": "magic"}, "dq")
    with pytest.raises(ValueError, match="hgq option gamma='lots' must be a number"):
        parse_options(HGQOptions, {"gamma": "lots"}, "hgq")
    with pytest.raises(ValueError, match="takes no options"):
        run_search(RunConfig(options={"beta": "1"}, **FAST), tmp_path / "u")
    with pytest.raises(ValueError, match="controller"):  # a controller needs a budget on its cost
        run_search(RunConfig(method="hgq", options={"schedule": "controller"}, **FAST), tmp_path / "h")


def _tiny(target="cortex-m4"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    return model


def test_beta_controller_moves_towards_the_target():
    from mixprec.search.hgq import HGQOptions

    t = relaxed(load_target("cortex-m4"))
    qm = quantize(_tiny(), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([torch.randn(8, 1, 8, 8)])
    opts = HGQOptions(beta=1.0, penalty_every=1, gain=0.5)
    up = BetaPenalty(opts, "flash_bytes", "controller", 1000.0, target=1.0, total_steps=10, target_model=t)
    up.extra_loss(qm)
    down = BetaPenalty(opts, "flash_bytes", "controller", 1000.0, target=1e9, total_steps=10, target_model=t)
    down.extra_loss(qm)
    assert up.beta > 1.0 > down.beta
    ramp = BetaPenalty(HGQOptions(beta=1e-3, beta_end=1.0), "flash_bytes", "log", 1.0, None, 100, t)
    assert ramp.current_beta() == pytest.approx(1e-3)
    ramp.calls = 50
    assert ramp.current_beta() == pytest.approx(10 ** -1.5)


def test_the_controller_pulls_bits_up_under_its_band_and_holds_inside_it():
    """A budget is a target to land near: under (1 - band) x target the penalty becomes a pull that
    raises bits and grows while the cost stays there, in the band both hold, over the target the
    pull stops and beta, which kept shrinking under the target, pushes again."""
    from mixprec.search.hgq import PULL_START, HGQOptions, control_beta

    opts = HGQOptions(beta=1e-2, band=0.05)
    start = PULL_START * opts.beta
    assert control_beta(0.03, 0.0, 1.2, 1.0, opts, 0.1) == (pytest.approx(0.03 * math.exp(0.1 * 0.2)), 0.0)
    assert control_beta(0.03, 0.0, 0.97, 1.0, opts, 0.1) == (0.03, 0.0)  # in the band
    beta, pull = control_beta(0.03, 0.0, 0.5, 1.0, opts, 0.1)
    assert beta == pytest.approx(0.03 * math.exp(-0.05)) and pull == pytest.approx(start * math.exp(0.1 * (1 - 0.5 / 0.95)))
    assert control_beta(beta, pull, 0.5, 1.0, opts, 0.1)[1] > pull  # still under: pulls harder
    assert control_beta(beta, pull, 0.96, 1.0, opts, 0.1) == (beta, pull)  # back in the band: holds
    assert control_beta(beta, pull, 1.1, 1.0, opts, 0.1) == (pytest.approx(beta * math.exp(0.01)), 0.0)
    assert control_beta(1e-6, 0.5, 1.1, 1.0, opts, 0.1) == (pytest.approx(0.5 * math.exp(0.01)), 0.0)  # an overshot climb
    one_sided = HGQOptions(beta=1e-2, band=0.0)
    assert control_beta(0.03, 0.0, 0.5, 1.0, one_sided, 0.1) == (pytest.approx(0.03 * math.exp(-0.05)), 0.0)
    with pytest.raises(ValueError, match="band"):
        HGQOptions(band=1.0)


def test_landing_ranks_epochs_near_the_budget_first():
    from mixprec.search.learned import landing

    tier = landing({"ebops": 1000.0})
    assert tier({"feasible": True, "cost": {"ebops": 950.0}}) == 2
    assert tier({"feasible": True, "cost": {"ebops": 850.0}}) == 1
    assert tier({"feasible": False, "cost": {"ebops": 1100.0}}) == 0
    both = landing({"flash_bytes": 1000.0, "ram_bytes": 100.0})  # landed where the binding limit is met closely
    assert both({"feasible": True, "cost": {"flash_bytes": 500.0, "ram_bytes": 95.0}}) == 2
    assert both({"feasible": True, "cost": {"flash_bytes": 500.0, "ram_bytes": 50.0}}) == 1


def test_relaxed_target_counts_every_bit():
    t = load_target("cortex-m4")
    r = relaxed(t)
    assert r.weight_containers == tuple(range(1, 9)) and r.weight_bits == t.weight_bits


def test_pareto_front_keeps_only_non_dominated_checkpoints(tmp_path):
    front = ParetoFront(tmp_path, "flash_bytes")
    state = {"w": torch.zeros(1)}
    assert front.offer(0, 0.90, {"flash_bytes": 100.0}, state)
    assert not front.offer(1, 0.85, {"flash_bytes": 120.0}, state)  # dominated
    assert front.offer(2, 0.80, {"flash_bytes": 50.0}, state)
    assert front.offer(3, 0.95, {"flash_bytes": 90.0}, state)  # dominates epoch 0
    assert [e["epoch"] for e in front.entries] == [2, 3]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch002.pt", "epoch003.pt"]
    index = json.loads((tmp_path / "pareto.json").read_text())
    assert [e["epoch"] for e in index["front"]] == [2, 3]


@pytest.mark.parametrize("target", ["cortex-m4", "fpga-hls4ml"])
@pytest.mark.parametrize("method", ["hgq", "dq"])
def test_freeze_keeps_bits_and_activation_grids(method, target):
    from types import SimpleNamespace

    from mixprec.search.dq import DQOptions, dq_model
    from mixprec.search.hgq import HGQOptions, hgq_model

    t = load_target(target)
    x = torch.randn(32, 1, 8, 8)
    ctx = SimpleNamespace(target=t, float_model=_tiny(), data=SimpleNamespace(input_shape=(1, 8, 8)),
                          config=RunConfig(target=target))
    qm = (hgq_model(ctx, HGQOptions(init_bits=5)) if method == "hgq" else dq_model(ctx, DQOptions(init_bits=5)))
    qm.calibrate([x])
    frozen = freeze(qm)
    for name, layer in qm.layers.items():
        learned = layer.quantizer.qparams(layer.weight)
        fixed = frozen.layers[name].qparams()
        assert torch.equal(fixed.bits, learned.bits.detach().round())
        # the fixed grid is the learned one or finer (the range comes from the (clipped) weights)
        assert bool((fixed.full(tuple(layer.weight.shape)).scale <= learned.full(tuple(layer.weight.shape)).scale.detach() * (1 + 1e-6)).all())
    for name, q in qm.act_quantizers.items():
        a, b = q.qparams(), frozen.act_quantizers[name].qparams()
        assert a.signed == b.signed
        assert torch.equal(a.bits.detach().round().reshape(-1), b.bits.reshape(-1))
        assert torch.allclose(a.scale.detach().reshape(-1), b.scale.reshape(-1), rtol=1e-6)
    frozen.eval()
    ig = frozen.lower()
    assert np.array_equal(frozen(x).numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))


def test_budget_accepts_report_keys():
    assert Budget.from_strings(flash="6KiB").limits() == {"flash_bytes": 6144}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method,phase,options", [("hgq", "hgq", {"bits_lr": "0.1"}), ("dq", "dq", {"k": "2"})])
def test_interrupted_learned_run_resumes_to_the_same_result(method, phase, options, tmp_path, float_run):
    def cfg():
        return RunConfig(method=method, budget={"flash": "6KiB"}, float_from=str(float_run), options=dict(options), **FAST)

    whole = run_search(cfg(), tmp_path / "whole")

    def stop_after_first(p, epoch, stats):
        if p == phase and epoch == 0:
            raise _Stop

    with pytest.raises(_Stop):
        run_search(cfg(), tmp_path / "cut", epoch_hook=stop_after_first)
    resumed = run_search(cfg(), tmp_path / "cut", resume=True)
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["cost"] == whole["cost"]
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "samples_per_second")} for e in h]  # noqa: E731
    assert strip(resumed["history"][phase]) == strip(whole["history"][phase])
    a = torch.load(tmp_path / "whole" / "checkpoints" / "quantized.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "quantized.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    front = lambda d: json.loads((d / "pareto" / "pareto.json").read_text())["front"]  # noqa: E731
    assert front(tmp_path / "whole") == front(tmp_path / "cut")


def test_hgq_per_element_on_the_fpga_meets_an_ebops_budget(tmp_path, float_run):
    cfg = RunConfig(target="fpga-hls4ml", method="hgq", weight_granularity="per-element", budget={"ebops": "3e4"},
                    options={"bits_lr": "0.1", "init_bits": "6", "act_init_bits": "6"}, **FAST)
    result = run_search(cfg, tmp_path / "fpga")
    assert result["feasible"] and result["cost"]["ebops"] <= 3e4
    assert result["reference_mismatches"] == 0
    bits = [np.asarray(r["weight_bits"]) for r in result["layers"] if "weight_bits" in r]
    assert any(b.size > 16 and len(np.unique(b)) > 1 for b in bits)  # per-element, mixed


def test_hgq_per_element_on_the_fpga_learns_every_input_feature_and_exports_to_hls4ml(tmp_path, float_run, digits):
    """The README's FPGA recipe: per-element weights and activations, the input's bits learned per
    feature by default on the FPGA; hls4ml takes the result and matches the reference everywhere."""
    pytest.importorskip("hls4ml")
    from mixprec.export import export_run
    from mixprec.export.verify import verify_run

    cfg = RunConfig(target="fpga-hls4ml", method="hgq", weight_granularity="per-element", budget={"ebops": "3e4"},
                    options={"bits_lr": "0.1", "init_bits": "6", "act_init_bits": "6", "act_granularity": "per-element"},
                    **FAST)
    result = run_search(cfg, tmp_path / "fpga")
    assert result["feasible"] and result["reference_mismatches"] == 0
    _, qm, _ = load_run(tmp_path / "fpga")
    inp = qm.act_quantizers["input"].bits()
    assert inp.shape == (1, 8, 8) and len(torch.unique(inp)) > 1  # per feature, learned apart
    export_run(tmp_path / "fpga", "hls4ml")
    (row,) = verify_run(tmp_path / "fpga", n_inputs=None, formats=["hls4ml"])  # the whole test set
    assert row.ok and row.inputs == len(digits.x_test)


@pytest.fixture(scope="module")
def mlp_float(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp-float") / "run"
    run_search(RunConfig(model="digits-mlp", float_epochs=30, batch_size=32, lr=3e-3), out, until="float")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ebops", [2e3, 2e4, 2e5])
def test_the_controller_lands_budgets_10x_apart_within_10_percent_under(tmp_path, mlp_float, ebops):
    """A budget is a target: the digits MLP on the FPGA, per-element HGQ from 8-bit starts near 1e5
    EBOPs; at 2e3 and 2e4 the controller must come down and stay, at 2e5 go up (a positive beta
    alone never raises bits). The deployed model ends within 10% under each budget."""
    cfg = RunConfig(model="digits-mlp", target="fpga-hls4ml", method="hgq", weight_granularity="per-element",
                    budget={"ebops": f"{ebops:g}"}, float_from=str(mlp_float), qat_epochs=40, budget_epochs=5,
                    batch_size=32, qat_lr=1e-3, options={"act_granularity": "per-element"})
    result = run_search(cfg, tmp_path / "run")
    assert result["feasible"] and not result["degenerate"]
    assert 0.9 * ebops <= result["cost"]["ebops"] <= ebops


def test_hgq_front_makes_every_pareto_epoch_a_run_of_its_own(tmp_path, float_run):
    """``schedule=front``: beta ramps over the run and every (val accuracy, EBOPs) Pareto epoch becomes
    a run in RUN/front/, with the budget step and its fine-tune, costed on the deployed model,
    integer-exact, loadable and reportable like any run."""
    from typer.testing import CliRunner

    from mixprec.cli import app

    cfg = RunConfig(target="fpga-hls4ml", method="hgq", float_from=str(float_run), float_epochs=3, qat_epochs=4,
                    budget_epochs=1, options={"schedule": "front", "beta": "0.01", "beta_end": "30", "bits_lr": "0.1"})
    result = run_search(cfg, tmp_path / "front")
    rows = json.loads((tmp_path / "front" / "front" / "front.json").read_text())["front"]
    assert len(rows) >= 2 and result["front"] == rows
    costs = [r["cost"]["ebops"] for r in rows]
    assert len(set(costs)) == len(costs)  # distinct points, not one model repeated
    for row in rows:
        member = tmp_path / "front" / row["run"]
        _, qm, stored = load_run(member)
        assert stored["reference_mismatches"] == 0 and stored["cost"]["ebops"] == row["cost"]["ebops"]
        assert len(stored["history"]["budget"]) == 1  # its own fine-tune, after its own budget step
    report = CliRunner().invoke(app, ["report", str(tmp_path / "front" / "front")])
    assert report.exit_code == 0, report.output


def test_hgq_learns_the_input_only_where_features_cost_their_own_bits():
    from mixprec.cost import load_target

    auto = HGQOptions()
    assert auto.input_setup(load_target("fpga-hls4ml")) == (True, "per-element")
    assert auto.input_setup(load_target("cortex-m4")) == (False, "per-tensor")  # data comes at one width
    assert HGQOptions(learn_input="true").input_setup(load_target("cortex-m4")) == (True, "per-tensor")
    assert HGQOptions(learn_input="false").input_setup(load_target("fpga-hls4ml")) == (False, "per-tensor")
    with pytest.raises(ValueError, match="learn_input"):
        HGQOptions(learn_input="yes please")


def test_hgq_input_features_may_be_pruned():
    from mixprec.quantizers.hgq import HGQActQuantizer
    from mixprec.search.hgq import keep_activations_alive

    q = HGQActQuantizer((3,), "per-element", init_f=-20.0)
    q.train()
    q(torch.tensor([[0.5, 3.0, 1.0]]))
    keep_activations_alive([q], max_bits=8, min_bits=None)
    assert torch.all(q.bits() == 0.0)  # the network input: a feature at 0 bits is pruned, not revived


def test_hgq_keeps_activations_alive():
    from mixprec.quantizers.hgq import HGQActQuantizer
    from mixprec.search.hgq import keep_activations_alive

    q = HGQActQuantizer((3,), "per-tensor", init_f=-20.0)
    q.train()
    q(torch.tensor([[0.5, 3.0, 1.0]]))
    assert q.bits().item() == 0.0  # pruned: would pass no gradient
    keep_activations_alive([q])
    assert 1.0 <= q.bits().item() <= 2.0  # at least a bit (rounding the range up may add one)
    q.set_f(4.0)
    keep_activations_alive([q])
    assert q.f.item() == 4.0  # untouched between floor and ceiling
    q.set_f(40.0)
    keep_activations_alive([q], max_bits=8)
    assert q.bits().item() == 8.0  # a grid too fine for its range would overflow x / step


def test_hgq_dead_activation_channel_cannot_overflow_when_it_wakes():
    from mixprec.quantizers.hgq import HGQActQuantizer
    from mixprec.search.hgq import keep_activations_alive

    q = HGQActQuantizer((2,), "per-channel", init_f=130.0)  # as calibrating a channel of zeros made it
    q.train()
    q(torch.tensor([[0.5, 0.0]]))
    keep_activations_alive([q], max_bits=16)
    assert q.f[1].item() == 16.0
    y = q(torch.tensor([[0.5, 0.002]]))  # the dead channel sees its first small value
    assert torch.isfinite(y).all() and q.bits()[1].item() <= 16


def test_beta_controller_step_is_bounded_far_over_budget():
    from mixprec.search.hgq import FULL_PACE_STEPS, HGQOptions

    t = relaxed(load_target("cortex-m4"))
    qm = quantize(_tiny(), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([torch.randn(8, 1, 8, 8)])
    opts = HGQOptions(beta=1.0, penalty_every=1, gain=0.5, anneal="0")  # aimed at the budget from the first step
    far = BetaPenalty(opts, "flash_bytes", "controller", 1.0, target=1e-6, total_steps=FULL_PACE_STEPS,
                      target_model=t)
    far.extra_loss(qm)
    assert far.last_cost / far.target > 1e3  # a huge relative error ...
    assert far.beta == pytest.approx(math.exp(0.5))  # ... moves ln(beta) by at most gain * max_error


def test_a_short_phase_paces_hgq_to_reach_the_budget_and_a_long_one_keeps_the_options():
    from mixprec.search.dq import DQOptions, quantizer_lr
    from mixprec.search.hgq import HGQOptions, Pace, phase_pace

    opts = HGQOptions()
    assert phase_pace(opts, 3440) == Pace(8, 0.05, 0.03)  # LeNet-5 / MNIST, 8 epochs at batch 128
    short = phase_pace(opts, 126)  # 6 epochs of 21 steps
    assert short.every == 1
    assert short.gain * 126 == pytest.approx(opts.min_reach) and short.bits_lr * 126 == pytest.approx(opts.bits_reach)
    assert phase_pace(opts, 2000).gain * 2000 == pytest.approx(opts.min_reach)  # reach continuous at FULL_PACE_STEPS
    assert quantizer_lr(DQOptions(), 3010) == 0.05
    assert quantizer_lr(DQOptions(), 189) * (189 // 5) == pytest.approx(8.0)


def test_annealed_controller_target_falls_from_the_start_cost():
    from mixprec.search.hgq import HGQOptions

    t = relaxed(load_target("cortex-m4"))
    qm = quantize(_tiny(), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([torch.randn(8, 1, 8, 8)])
    opts = HGQOptions(beta=1.0, penalty_every=1, gain=0.5, anneal="0.5")
    c = BetaPenalty(opts, "flash_bytes", "controller", 1.0, target=1.0, total_steps=100, target_model=t)
    c.extra_loss(qm)  # first measurement: the target starts there, so beta hardly moves yet
    start = c.start_cost
    assert start > 100 and 1.0 < c.beta < 1.1
    c.calls = 25  # half way through the anneal: the geometric mean of start and target
    assert c.current_target() == pytest.approx(math.sqrt(start * 1.0))
    c.calls = 80  # past it: the final target
    assert c.current_target() == pytest.approx(1.0)
    resumed = BetaPenalty(opts, "flash_bytes", "controller", 1.0, target=1.0, total_steps=100, target_model=t)
    resumed.load_state_dict(c.state_dict())
    assert resumed.start_cost == start and resumed.current_target() == pytest.approx(1.0)
    plain = BetaPenalty(HGQOptions(beta=1.0, penalty_every=1, gain=0.5, anneal="0"), "flash_bytes", "controller", 1.0,
                        target=1.0, total_steps=100, target_model=t)
    plain.extra_loss(qm)
    assert plain.current_target() == 1.0 and plain.beta == pytest.approx(math.exp(0.5))
    for ratio, annealed in ((10.0, False), (2000.0, True)):  # auto: only a target 1000x below the start
        auto = BetaPenalty(HGQOptions(beta=1.0, penalty_every=1), "flash_bytes", "controller", 1.0,
                           target=start / ratio, total_steps=100, target_model=t)
        auto.extra_loss(qm)
        auto.calls = 25
        assert (auto.current_target() > start / ratio) == annealed and auto.anneal() == (0.5 if annealed else 0.0)
    for bad in ("1.5", "half"):
        with pytest.raises(ValueError, match="anneal"):
            HGQOptions(anneal=bad)


def test_hgq_keeps_one_group_of_every_layer_alive():
    from mixprec.quantizers.hgq import HGQWeightQuantizer
    from mixprec.search.hgq import keep_layers_alive

    w = torch.tensor([[0.1, -0.2], [0.75, 0.3], [-0.05, 0.01]])
    q = HGQWeightQuantizer(tuple(w.shape), "per-channel", init_f=-20.0)
    q(w)
    assert (q.magnitude_bits() == 0).all()  # the whole layer pruned
    keep_layers_alive([q])
    bits = q.magnitude_bits(w).flatten()
    assert bits[1] >= 1 and bits[0] == 0 and bits[2] == 0  # only the channel with the largest weight
    out = q(w)
    assert (out[1] != 0).all() and (out[[0, 2]] == 0).all()
    before = q.f.detach().clone()
    keep_layers_alive([q])
    assert torch.equal(q.f, before)  # a live layer is left alone


@pytest.mark.parametrize("name, key, learns", [("bops", "bops", "weights and activations"),
                                              ("ram_in_out", "ram_mcu_in_out", "activations")])
def test_bops_and_in_out_ram_are_costs_a_learned_method_steers_by(name, key, learns):
    """``-o cost=bops`` / ``cost=ram_in_out`` are accepted, and their differentiable figure (what HGQ
    and DQ put in the loss) has a gradient on the learned bits it depends on."""
    from mixprec.convert import convert_with
    from mixprec.quantizers.hgq import HGQActQuantizer, HGQWeightQuantizer

    assert HGQOptions(cost=name).cost == name
    t = load_target("cortex-m4")
    qm = convert_with(_tiny(), (1, 8, 8), t.numerics,
                      lambda node, w: HGQWeightQuantizer(node.weight_shape, "per-channel", init_bits=4, weight=w),
                      lambda node: HGQActQuantizer(node.out_shape, "per-tensor", init_bits=5), t.name)
    qm.calibrate([torch.randn(16, 1, 8, 8)])
    differentiable_costs(qm, relaxed(t))[key].backward()
    grads = {kind: any(q.f.grad is not None and q.f.grad.abs().sum() > 0 for q in quantizers)
             for kind, quantizers in (("weights", [l.quantizer for l in qm.layers.values()]),
                                      ("activations", list(qm.act_quantizers.values())))}
    assert grads == {"weights": "weights" in learns, "activations": True}


@pytest.mark.parametrize("granularity", ["per-element", "per-channel"])
def test_controller_ebops_match_the_deployed_count(granularity):
    """The controller steers by the EBOPs the budget is judged on, computed without lowering."""
    from mixprec.api import cost_report, effective_ebops
    from mixprec.convert import convert_with
    from mixprec.quantizers.hgq import HGQActQuantizer, HGQWeightQuantizer

    t = load_target("fpga-hls4ml")
    qm = convert_with(_tiny(), (1, 8, 8), t.numerics,
                      lambda node, w: HGQWeightQuantizer(node.weight_shape, granularity, init_bits=4, weight=w),
                      lambda node: HGQActQuantizer(node.out_shape, "per-tensor", init_bits=5), t.name)
    qm.calibrate([torch.randn(16, 1, 8, 8)])
    torch.manual_seed(1)
    for layer in qm.layers.values():  # mixed widths, some pruned, grids far apart within a channel
        layer.quantizer.set_f(torch.randint(-3, 7, layer.quantizer.f.shape).float())
    deployed = cost_report(qm, t).totals["ebops"]
    assert effective_ebops(qm) == deployed > 0
    nominal = float(differentiable_costs(qm, t)["ebops"].detach())
    assert deployed < nominal  # nominal bits count the sign and trailing zeros


@pytest.mark.parametrize("method, options", [
    ("hgq", {"bits_lr": "0.1", "init_bits": "6", "act_init_bits": "6"}),
    ("dq", {"k": "2", "init_bits": "6"})])
def test_per_channel_activations_on_the_fpga_freeze_and_reload_exactly(method, options, tmp_path, digits):
    cfg = RunConfig(target="fpga-hls4ml", method=method, weight_granularity="per-channel", budget={"ebops": "5e4"},
                    options={**options, "act_granularity": "per-channel"}, **FAST)
    result = run_search(cfg, tmp_path / "fpga")
    assert result["feasible"] and result["cost"]["ebops"] <= 5e4 and result["reference_mismatches"] == 0
    _, qm, reloaded = load_run(tmp_path / "fpga")
    acts = [q.bits() for name, q in qm.act_quantizers.items() if name != "input"]
    assert all(b.numel() > 1 for b in acts) and any(len(torch.unique(b)) > 1 for b in acts)  # per channel, mixed
    ig = qm.lower()
    x = digits.x_test[:64]
    assert np.array_equal(qm(x).numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))


@pytest.mark.parametrize("method", ["hgq", "dq"])
def test_activation_granularity_is_checked_against_the_target(method, tmp_path):
    with pytest.raises(ValueError, match="activation granularity per-tensor"):
        run_search(RunConfig(method=method, budget={"flash": "6KiB"}, options={"act_granularity": "per-channel"},
                             **FAST), tmp_path / "h")
    assert not (tmp_path / "h").exists()  # refused before the run directory is claimed


def test_dq_hinge_on_deployed_containers_stays_active_where_the_relaxed_cost_meets_the_target():
    from types import SimpleNamespace

    from mixprec.search.dq import HingePenalty, dq_model

    t = load_target("cortex-m4")
    ctx = SimpleNamespace(target=t, float_model=_tiny(), data=SimpleNamespace(input_shape=(1, 8, 8)),
                          config=RunConfig(target="cortex-m4"))
    qm = dq_model(ctx, DQOptions(init_bits=3))  # 3-bit channels: stored in 4-bit containers
    qm.calibrate([torch.randn(32, 1, 8, 8)])
    steer = relaxed(t)
    relaxed_flash = float(differentiable_costs(qm, steer)["flash_bytes"].detach())
    deployed_flash = float(differentiable_costs(qm, t)["flash_bytes"].detach())
    assert relaxed_flash < deployed_flash
    target = {"flash_bytes": (relaxed_flash + deployed_flash) / 2}

    def penalty(hinge_cost):
        opts = DQOptions(k=1, ramp_start=1.0, hinge_cost=hinge_cost)
        quantizers = [layer.quantizer for layer in qm.layers.values()]
        return HingePenalty(opts, quantizers, target, 10, steer, t)

    assert float(penalty("relaxed").extra_loss(qm).detach()) == 0.0
    deployed = penalty("deployed")
    assert float(deployed.costs(qm)["flash_bytes"].detach()) == pytest.approx(deployed_flash)
    loss = deployed.extra_loss(qm)
    assert float(loss.detach()) > 0
    loss.backward()  # the relaxed cost carries the gradient: a coarser step (fewer bits) lowers the loss
    grads = [layer.quantizer.log2_d.grad for layer in qm.layers.values()]
    assert all(g is not None for g in grads) and any(bool((g < 0).any()) for g in grads)
    with pytest.raises(ValueError, match="hinge_cost"):
        DQOptions(hinge_cost="containers")
