"""The budget step: whatever a method leaves, the model ends within every hard budget (or the
step says why it cannot), using only widths the target runs, cutting where the loss suffers least."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import mixprec
from mixprec import Budget, BudgetError
from mixprec.cost import smallest_costs
from mixprec.cost.keys import BUDGET_KEYS
from mixprec.models import get_model
from mixprec.models.registry import get_spec
from mixprec.search import budget_step as bs

KEYS = BUDGET_KEYS  # what the step's before/after record


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors only: one intra-op thread is as fast, and immune to busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name, target, granularity=None, bits=8, seed=0):
    torch.manual_seed(seed)
    shape = get_spec(name).input_shape
    qm = mixprec.quantize(get_model(name), target, shape, bits=bits, weight_granularity=granularity)
    qm.calibrate([torch.randn(64, *shape)])
    return qm


def _widths(qm):
    w = {float(b) for layer in qm.layers.values() for b in layer.quantizer.bits().flatten()}
    a = {float(b) for q in qm.act_quantizers.values() for b in q.bits().flatten()}
    return w, a


def _smallest_here(qm, target):
    """Measured costs with every group at its narrowest non-zero width (this model's granularity)."""
    p = bs._build(qm, mixprec.as_target(target), upward=False)
    saved = bs._bits_snapshot(qm)
    bs._apply_choice(qm, p, *bs._min_choice(p))
    totals = dict(mixprec.cost_report(qm, target).totals)
    bs._restore(qm, saved)
    return totals


@pytest.mark.parametrize("name,target,gran", [("digits-cnn", "cortex-m4", None), ("lenet5", "mpic", None),
                                              ("jet-mlp", "fpga-hls4ml", "per-element"),
                                              ("resnet8", "cortex-m7", None)])
def test_cost_tables_are_the_cost_model(name, target, gran):
    """Every (group, width) cost the selection uses agrees with cost_report on random choices."""
    qm = _model(name, target, gran)
    t = mixprec.as_target(target)
    p = bs._build(qm, t, upward=True)
    rng = np.random.default_rng(0)
    for _ in range(2):
        kw = {l.name: np.array([rng.choice(np.flatnonzero(l.allowed[g])) for g in range(l.groups)]) for l in p.layers}
        ka = {q: int(rng.integers(len(a.widths))) for q, a in p.acts.items()}
        bs._apply_choice(qm, p, kw, ka)
        est, real = p.totals(kw, ka), mixprec.cost_report(qm, t).totals
        # layout tables are measured, not tabled: the tightening loop absorbs them
        assert est["flash"] + p.param_bytes + real["table_bytes"] == real["flash_bytes"]
        assert est["ebops"] == pytest.approx(real["ebops"], rel=1e-9)
        assert est["cycles"] + p.elem_cycles == pytest.approx(real["latency_cycles"], rel=1e-6)
        assert est["ram"] == real["ram_lower_bound"] <= real["ram_bytes"]
        assert est["bops"] == pytest.approx(real["bops"], rel=1e-9)
        assert est["in_out"] == real["ram_mcu_in_out"]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_milp_and_greedy_both_meet_the_budget(solver, monkeypatch):
    monkeypatch.setattr(bs.solve, "MIP_GAP", 0.0)  # solved to optimality, greedy cannot win it
    qm = _model("digits-cnn", "cortex-m4")
    full = mixprec.cost_report(qm, "cortex-m4").totals
    budget = Budget(flash_bytes=int(full["flash_bytes"] * 0.6), ebops=full["ebops"] * 0.4)
    r = bs.budget_step(qm, "cortex-m4", budget, solver=solver)
    real = mixprec.cost_report(qm, "cortex-m4")
    assert r.feasible and mixprec.cost.feasible(real, budget) and r.solver == solver
    assert r.after == {k: real.totals[k] for k in KEYS} and r.before["flash_bytes"] == full["flash_bytes"]
    assert r.changes and all(c["bits_mean_after"] <= c["bits_mean_before"] for c in r.changes)
    w, a = _widths(qm)
    assert w <= {2.0, 4.0, 8.0} and a <= {2.0, 4.0, 8.0}
    assert mixprec.verify_against_reference(qm, torch.rand(16, 1, 8, 8)) == 0
    json.dumps(r.to_dict())


CASES = [("digits-cnn", "cortex-m4", None, ("flash_bytes", "ram_bytes", "ebops")),
         ("lenet5", "mpic", None, ("flash_bytes", "ebops", "latency_cycles")),
         ("jet-mlp", "fpga-hls4ml", "per-element", ("ebops", "ram_bytes", "flash_bytes")),
         ("resnet8", "cortex-m7", None, ("flash_bytes", "ram_bytes", "ebops"))]


@pytest.mark.parametrize("name,target,gran,keys", CASES)
def test_random_budgets_end_feasible_whenever_an_assignment_exists(name, target, gran, keys):
    base = _model(name, target, gran)
    state, t = base.state_dict(), mixprec.as_target(target)
    full, least = mixprec.cost_report(base, target).totals, _smallest_here(base, target)
    rng = np.random.default_rng(len(name))
    for trial in range(3):
        chosen = rng.choice(keys, size=1 + trial % 2, replace=False)
        limits = {k: least[k] + (full[k] - least[k]) * rng.uniform(0.05, 0.8) for k in chosen}
        budget = Budget(**{k: int(v) if k.endswith("bytes") else v for k, v in limits.items()})
        qm = _model(name, target, gran)
        qm.load_state_dict(state)
        r = bs.budget_step(qm, target, budget, solver=("milp", "greedy", "auto")[trial], time_limit=5)
        assert r.feasible and mixprec.cost.feasible(mixprec.cost_report(qm, target), budget), (budget, r.after)
        w, a = _widths(qm)
        assert w <= set(map(float, t.weight_bits)) and a <= set(map(float, t.act_bits))
    # below what the narrowest assignment reaches: refused, naming the smallest achievable cost
    key = keys[0]
    qm = _model(name, target, gran)
    bits = {n: l.quantizer.bits().clone() for n, l in qm.layers.items()}
    below = min(least[key], smallest_costs(qm.graph, t)[key]) * 0.9
    with pytest.raises(BudgetError, match="smallest achievable"):
        bs.budget_step(qm, target, Budget(**{key: int(below) if key.endswith("bytes") else below}))
    assert all(torch.equal(bits[n], l.quantizer.bits()) for n, l in qm.layers.items())  # left as it was


def test_budget_the_granularity_cannot_reach_names_its_minimum():
    """Between the target's minimum (coarsest scales) and this per-channel model's minimum."""
    qm = _model("digits-cnn", "cortex-m4")
    t = mixprec.as_target("cortex-m4")
    here, anywhere = _smallest_here(qm, "cortex-m4")["flash_bytes"], smallest_costs(qm.graph, t)["flash_bytes"]
    assert anywhere < here
    with pytest.raises(BudgetError, match=r"smallest achievable .* granularit|granularit.*smallest achievable"):
        bs.budget_step(qm, "cortex-m4", Budget(flash_bytes=int((here + anywhere) / 2)))


def test_unsupported_widths_are_snapped_up_then_reduced_on_an_mcu():
    """A method's output with 3/5/7-bit channels: only the kernel widths remain, the budget holds."""
    qm = _model("lenet5", "mpic")
    g = torch.Generator().manual_seed(0)
    for layer in qm.layers.values():
        bits = layer.quantizer.bits()
        layer.quantizer.set_bits(torch.tensor([3.0, 5.0, 7.0])[torch.randint(0, 3, bits.shape, generator=g)])
    qm.act_quantizers["conv2"].set_bits(torch.tensor(5.0))
    full = mixprec.cost_report(qm, "mpic").totals
    budget = Budget(flash_bytes=int(full["flash_bytes"] * 0.7), latency_cycles=full["latency_cycles"])
    r = bs.budget_step(qm, "mpic", budget)
    w, a = _widths(qm)
    assert r.feasible and w <= {0.0, 2.0, 4.0, 8.0} and a <= {2.0, 4.0, 8.0}
    assert qm.layers["fc3"].quantizer.bits().min() > 0  # the last layer is never pruned


def test_pruned_input_features_and_activation_elements_stay_pruned_on_the_fpga():
    """Groups HGQ pruned (0-bit input features, 0-bit activation elements) are no width to snap up:
    reviving them would cost what the search saved and change the inputs the weights were trained
    on. The step cuts elsewhere; every pruned element stays at 0 bits."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conformance import pruned_per_element

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    qm = pruned_per_element(model, (1, 3, 4), 3, input=torch.tensor([0.0, 3, 0, 5, 1, 0, 8, 2, 0, 4, 6, 0]).reshape(1, 3, 4))
    pruned = {name: q.bits() == 0 for name, q in qm.act_quantizers.items()}
    assert pruned["input"].sum() == 5 and bs._supported(qm, mixprec.as_target("fpga-hls4ml"))
    ebops = mixprec.cost_report(qm, "fpga-hls4ml").totals["ebops"]
    r = bs.budget_step(qm, "fpga-hls4ml", Budget(ebops=0.6 * ebops))
    assert r.feasible and r.changed
    assert all(torch.equal(q.bits()[pruned[name]], torch.zeros(int(pruned[name].sum()))) for name, q in qm.act_quantizers.items())
    _, a = _widths(qm)
    assert a <= set(range(17)) and bs._supported(qm, mixprec.as_target("fpga-hls4ml"))


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_flash_and_ram_together_on_resnet8(solver):
    qm = _model("resnet8", "cortex-m7")
    full = mixprec.cost_report(qm, "cortex-m7").totals
    budget = Budget(flash_bytes=int(full["flash_bytes"] * 0.55), ram_bytes=int(full["ram_bytes"] * 0.6))
    r = bs.budget_step(qm, "cortex-m7", budget, solver=solver)
    real = mixprec.cost_report(qm, "cortex-m7").totals
    assert r.feasible and real["flash_bytes"] <= budget.flash_bytes and real["ram_bytes"] <= budget.ram_bytes


@pytest.mark.parametrize("solver", ["milp", "greedy"])
@pytest.mark.parametrize("key", ["bops", "ram_mcu_in_out"])
def test_bops_and_in_out_ram_budgets_are_met_keeping_what_they_do_not_need_to_cut(key, solver):
    """Halfway between the narrowest assignment and uniform 8 bits: met on the measured cost, not by
    going to the minimum (some widths stay at 8). In+out RAM depends on the activations only: the
    weights keep 8 bits."""
    qm = _model("digits-cnn", "cortex-m4")
    full, least = mixprec.cost_report(qm, "cortex-m4").totals[key], _smallest_here(qm, "cortex-m4")[key]
    limit = (least + full) / 2
    budget = Budget(**{key: int(limit) if key == "ram_mcu_in_out" else limit})
    r = bs.budget_step(qm, "cortex-m4", budget, solver=solver)
    measured = mixprec.cost_report(qm, "cortex-m4").totals[key]
    assert r.feasible and least < measured <= limit and r.after[key] == measured, (least, measured, limit)
    w, a = _widths(qm)
    assert 8.0 in (a if key == "ram_mcu_in_out" else w | a)
    if key == "ram_mcu_in_out":
        assert w == {8.0} and min(a) < 8.0


def test_in_out_ram_counts_both_inputs_of_an_add_on_resnet8():
    """At 8 bits ResNet-8's largest in+out is its first add (two 16 KiB inputs and a 16 KiB output;
    every other layer at most 32 KiB): a limit between the two is met only by narrowing a buffer
    of the add."""
    qm = _model("resnet8", "cortex-m7")
    rows = {row.name: row.in_out_bytes for row in mixprec.cost_report(qm, "cortex-m7").layers}
    assert rows.pop("block1.add") == 3 * 16384 and max(rows.values()) == 2 * 16384
    budget = Budget(ram_mcu_in_out=5 * 8192)
    r = bs.budget_step(qm, "cortex-m7", budget)
    real = mixprec.cost_report(qm, "cortex-m7").totals
    assert r.feasible and real["ram_mcu_in_out"] <= budget.ram_mcu_in_out
    assert _widths(qm)[0] == {8.0}


def test_latency_on_a_target_where_wider_is_faster_raises_widths():
    """The Cortex-M4 estimates run 8-bit kernels fastest: a latency budget moves 2-bit layers up."""
    qm = _model("digits-cnn", "cortex-m4", bits=2)
    full = mixprec.cost_report(qm, "cortex-m4").totals
    r = bs.budget_step(qm, "cortex-m4", Budget(latency_cycles=full["latency_cycles"] * 0.8))
    assert r.feasible and any(c["bits_mean_after"] > c["bits_mean_before"] for c in r.changes)


class _Residual(nn.Module):
    """x -> fc1 -> relu -> h; h + fc2(h) -> fc3. fc2's branch is scaled down to 1% of h, so its
    quantization noise barely reaches the loss although its relative noise equals fc1's."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.fc2.weight.mul_(0.01)
            self.fc2.bias.zero_()
            self.fc3.weight.mul_(30)  # confident logits: the loss feels what flips a decision

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(h + self.fc2(h))


def test_measured_sensitivity_cuts_the_layer_the_loss_does_not_feel():
    torch.manual_seed(0)
    model = _Residual()
    x = torch.randn(512, 64)
    with torch.no_grad():
        y = model(x).argmax(1)  # the float model's own labels: the 8-bit model's loss is near its floor

    def fresh():
        qm = mixprec.quantize(model, "cortex-m4", (64,), bits=8, weight_granularity="per-tensor")
        qm.calibrate([x[:256]])
        return qm
    qm = fresh()
    full = mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"]
    # 700 B less: fc2 at 2 bits (768 B) or fc1 at 4 bits (1024 B) are the cheap ways
    budget = Budget(flash_bytes=full - 700)
    r = bs.budget_step(qm, "cortex-m4", budget, x_val=x[256:], y_val=y[256:])
    bits = {n: float(l.quantizer.bits().max()) for n, l in qm.layers.items()}
    fc1 = next(n for n in qm.layers if tuple(qm.layers[n].weight.shape) == (32, 64))
    fc2 = next(n for n in qm.layers if tuple(qm.layers[n].weight.shape) == (32, 32))
    assert r.feasible and r.sensitivity == "measured"
    assert bits[fc1] == 8.0 and bits[fc2] < 8.0, bits
    # the data-free proxy ranks by relative noise alone and takes the other way
    qm = fresh()
    bs.budget_step(qm, "cortex-m4", budget)
    assert float(qm.layers[fc1].quantizer.bits().max()) < 8.0


def test_finalize_with_data_measures_fine_tunes_and_stays_within(digits):
    qm = mixprec.quantize(get_model("digits-cnn"), "cortex-m4", (1, 8, 8), bits=8)
    qm.calibrate([digits.x_train[:128]])
    calls = []
    budget = Budget.from_strings(flash="10KiB", ram="1KiB")
    report = mixprec.finalize(qm, "cortex-m4", budget, digits, fine_tune=lambda m: calls.append(m) or [])
    assert calls == [qm] and mixprec.cost.feasible(report, budget)
    report = mixprec.finalize(qm, "cortex-m4", budget)  # already fits: left alone
    assert mixprec.cost.feasible(report, budget)


def test_search_run_applies_the_step_and_records_it(tmp_path, monkeypatch, digits_float):
    """A method that ignores the budget: the run fixes it before evaluation and says how."""
    from dataclasses import replace

    from mixprec.search import RunConfig, get_method, load_run, methods, run_search
    from mixprec.search.uniform import search_uniform

    def careless(ctx):
        ctx.weight_bits, ctx.act_bits = 8, 8
        return search_uniform(ctx)
    monkeypatch.setitem(methods(), "uniform", replace(get_method("uniform"), run=careless))
    result = run_search(RunConfig(budget={"flash": "10KiB"}, qat_epochs=1, budget_epochs=1,
                                  float_from=str(digits_float)), tmp_path / "r")
    step = result["budget_step"]
    assert step["applied"] and step["before"]["flash_bytes"] > 10 * 1024 >= step["after"]["flash_bytes"]
    assert step["sensitivity"] == "measured" and step["solver"] in ("milp", "greedy") and step["changes"]
    assert result["feasible"] and result["cost"]["flash_bytes"] == step["after"]["flash_bytes"]
    assert len(result["history"]["budget"]) == 1 and result["reference_mismatches"] == 0
    saved = json.loads((tmp_path / "r" / "result.json").read_text())["budget_step"]
    assert saved["after"] == step["after"] and "budget step (" in (tmp_path / "r" / "report.md").read_text()
    _, qm, _ = load_run(tmp_path / "r")  # mixed widths reload
    assert mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"] == step["after"]["flash_bytes"]


def _trained_residual():
    """``_Residual`` with the float model's own labels, quantized at 2 bits per tensor: every
    layer loses to its 2-bit grid, so wider widths lower the loss."""
    torch.manual_seed(0)
    model = _Residual()
    x = torch.randn(768, 64)
    with torch.no_grad():
        y = model(x).argmax(1)
    qm = mixprec.quantize(model, "cortex-m4", (64,), bits=2, act_bits=8, weight_granularity="per-tensor")
    qm.calibrate([x[:256]])
    return qm, x[256:], y[256:]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_fill_raises_widths_into_unused_budget_where_the_loss_falls(solver):
    qm, x, y = _trained_residual()
    start = mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"]
    loss = bs._LossProbe(qm, x, y)
    before = loss()
    budget = Budget(flash_bytes=start + 1500)  # fc1 (2048 weights) at 8 bits would need 1536 B more
    r = bs.budget_step(qm, "cortex-m4", budget, x_val=x, y_val=y, fill=True, solver=solver)
    assert r.feasible and r.fill == solver and r.after["flash_bytes"] <= budget.flash_bytes
    assert r.after["flash_bytes"] > start + 500 and loss() < before
    assert all(c["bits_mean_after"] > c["bits_mean_before"] for c in r.changes)  # a fill only raises
    widths, _ = _widths(qm)
    assert widths <= {2.0, 4.0, 8.0}


def test_without_fill_or_without_data_a_model_that_fits_is_left_alone():
    qm, x, y = _trained_residual()
    budget = Budget(flash_bytes=mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"] + 1500)
    assert bs.budget_step(qm, "cortex-m4", budget, x_val=x, y_val=y).solver == "none"
    r = bs.budget_step(qm, "cortex-m4", budget, fill=True)  # nothing to measure a gain with
    assert r.fill == "none" and not r.changed


def test_fill_keeps_pruned_channels_pruned_and_the_model_within_budget():
    qm = _model("lenet5", "mpic", bits=2)
    name = next(iter(qm.layers))
    bits = qm.layers[name].quantizer.bits().detach().clone()
    bits[:2] = 0  # two channels pruned (the 0-bit width mpic offers)
    qm.layers[name].quantizer.set_bits(bits)
    qm.invalidate()
    shape = get_spec("lenet5").input_shape
    x = torch.randn(256, *shape)
    with torch.no_grad():
        y = qm(x).argmax(1)
    budget = Budget(flash_bytes=mixprec.cost_report(qm, "mpic").totals["flash_bytes"] * 1.5)
    r = bs.budget_step(qm, "mpic", budget, x_val=x, y_val=y, fill=True)
    after = qm.layers[name].quantizer.bits().detach()
    assert r.feasible and r.after["flash_bytes"] <= budget.flash_bytes
    assert torch.equal(after[:2], bits[:2]) and bool((after[2:] > 0).all())


def test_a_fill_before_a_fine_tune_also_spends_the_room_measured_gains_leave_on_less_noise():
    """After QAT a wider grid need not lower the loss until the weights adapt; when a fine-tune
    follows, the fill goes on where the quantization noise falls most, using the room."""
    qm, x, y = _trained_residual()
    start = mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"]
    budget = Budget(flash_bytes=start + 1500)
    tuned = []
    r = bs.budget_step(qm, "cortex-m4", budget, x_val=x, y_val=y, fill=True, fine_tune=lambda m: tuned.append(m) or [])
    # fc1 to 4 bits (+512 B), fc2 (+768 B) and fc3 (+96 B) to 8: the most that fits in 1500 B
    assert r.feasible and tuned == [qm] and r.after["flash_bytes"] >= start + 1376 - 8
    assert r.after["flash_bytes"] <= budget.flash_bytes


def test_under_an_ebops_budget_the_fill_comes_after_the_fine_tune():
    """The fine-tune moves effective EBOPs: filling first would push the model over and make the
    step cut again untrained; the fill measures on the weights the model ships with."""
    qm = _model("jet-mlp", "fpga-hls4ml", granularity="per-element", bits=3)
    shape = get_spec("jet-mlp").input_shape
    x = torch.randn(512, *shape)
    with torch.no_grad():
        y = qm(x).argmax(1)
    budget = Budget(ebops=mixprec.cost_report(qm, "fpga-hls4ml").totals["ebops"] * 1.3)
    seen = []

    def fine_tune(m):
        seen.append(bs._bits_snapshot(m))
        return []
    r = bs.budget_step(qm, "fpga-hls4ml", budget, x_val=x, y_val=y, fill=True, fine_tune=fine_tune,
                       fine_tune_always=True)
    assert r.feasible and len(seen) == 1
    raised = {k for k, v in bs._bits_snapshot(qm).items() if not torch.equal(v, seen[0][k])}
    assert r.fill == "none" or raised  # what the fill raised, it raised after the fine-tune


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fill_with_no_fine_tune_after_it_never_raises_the_measured_loss(seed):
    """Gains are measured a tensor at a time and shared among its groups; where the shares do not
    add up the fill falls back to raises it verifies one by one, so the loss it measures never rises."""
    qm = _model("jet-mlp", "fpga-hls4ml", granularity="per-element", bits=3, seed=seed)
    x = torch.randn(512, *get_spec("jet-mlp").input_shape)
    y = torch.randint(0, 5, (512,), generator=torch.Generator().manual_seed(seed))
    loss = bs._LossProbe(qm, x, y)
    before = loss()
    budget = Budget(ebops=mixprec.cost_report(qm, "fpga-hls4ml").totals["ebops"] * 1.5)
    r = bs.budget_step(qm, "fpga-hls4ml", budget, x_val=x, y_val=y, fill=True)
    assert r.feasible and r.fill in ("milp", "greedy", "verified", "none")
    assert loss() <= before and (r.fill == "none") == (not r.changes)


def test_an_activation_the_step_cuts_to_few_bits_takes_a_range_for_them(digits):
    """A RAM limit only narrow activations meet: each one the step lowers to 4 bits or fewer observes
    its range again (the least-squares clip), the ones it leaves keep theirs."""
    qm = mixprec.quantize(get_model("digits-cnn"), "cortex-m7", (1, 8, 8), bits=8)
    qm.calibrate([digits.x_train[:256]])
    before = {n: (float(q.running_max), float(q.bits().max())) for n, q in qm.act_quantizers.items()}
    full = mixprec.cost_report(qm, "cortex-m7").totals
    r = bs.budget_step(qm, "cortex-m7", Budget(ram_bytes=int(full["ram_bytes"] * 0.3)), x_val=digits.x_val,
                       y_val=digits.y_val)
    assert r.feasible
    cut = [n for n, q in qm.act_quantizers.items() if float(q.bits().max()) <= 4 < before[n][1]]
    assert cut and all(float(qm.act_quantizers[n].running_max) < before[n][0] for n in cut)
    kept = [n for n, q in qm.act_quantizers.items() if float(q.bits().max()) == before[n][1]]
    assert all(float(qm.act_quantizers[n].running_max) == before[n][0] for n in kept)
