import pytest

from mixprec.cost.bits import uniform
from mixprec.cost.budget import (Budget, BudgetError, check, check_achievable, feasible, how_reached, smallest_costs,
                                 violations)
from mixprec.cost.report import evaluate
from mixprec.cost.targets import load_target
from mixprec.graph.ir import Graph, Node

from .graphs import cnn, residual

M4 = load_target("cortex-m4")


def test_from_strings():
    b = Budget.from_strings(flash="32KiB", ram="8 kB", ebops="1e4", energy="2.5", latency="1e6")
    assert b == Budget(32768, 8000, 1e4, 2.5, 1e6)
    assert Budget.from_strings(ram="1KiB").limits() == {"ram_bytes": 1024}
    with pytest.raises(ValueError, match="ambiguous"):
        Budget.from_strings(flash="32KB")


def test_bops_and_in_out_ram_are_budgets():
    b = Budget.from_strings(bops="1e6", ram_in_out="2KiB")
    assert (b.bops, b.ram_mcu_in_out) == (1e6, 2048)
    assert b.limits() == {"bops": 1e6, "ram_mcu_in_out": 2048}
    r = evaluate(cnn(), uniform(cnn(), 4, 8), M4)  # BOPs 36*64*4*8 + 640*4*8; in+out 64 + 256 at c1
    assert (r.totals["bops"], r.totals["ram_mcu_in_out"]) == (94208, 320)
    assert check(r, Budget(bops=94208, ram_mcu_in_out=319)) == {"bops": (94208, 94208, True),
                                                                "ram_mcu_in_out": (320, 319, False)}
    assert violations(r, Budget(bops=9e4, ram_mcu_in_out=320)) == "bops 94208 > 90000"


def test_check_and_feasible():
    r = evaluate(cnn(), uniform(cnn(), 4, 8), M4)  # flash 412 B, arena 320 B
    result = check(r, Budget(flash_bytes=400, ram_bytes=320))
    assert result == {"flash_bytes": (412, 400, False), "ram_bytes": (320, 320, True)}
    assert not feasible(r, Budget(flash_bytes=400)) and feasible(r, Budget(flash_bytes=412, ram_bytes=1000))
    assert feasible(r, Budget())


def test_smallest_costs():
    mins = smallest_costs(cnn(), M4)
    # all weights at 2 bits: c1 4 * ceil(18/8) = 12, fc 10 * ceil(128/8) = 160; params 24 + 48
    assert mins["flash_bytes"] == 12 + 160 + 72
    # all activations at 2 bits: input 16, c1 64, pool 16, fc 3 -> 4; step 1: 16 + 64
    assert mins["ram_bytes"] == 80
    # EBOPs count set bits: any weight may round to 0, so one 1-bit weight per layer on 2-bit inputs
    assert mins["ebops"] == 2 * 1 * 2
    # fastest M4 pair is (a8, w8) at 0.8 MAC/cycle; maxpool 256 ops / 0.25
    assert mins["latency_cycles"] == pytest.approx(2944 / 0.8 + 1024)
    # weights and activations at 2 bits: c1 36 weights x 64 positions x 2 x 2, fc 640 x 2 x 2
    assert mins["bops"] == 36 * 64 * 4 + 640 * 4
    # in+out at 2 bits: c1 reads the input (16 B) and writes 64 B
    assert mins["ram_mcu_in_out"] == 16 + 64


def test_smallest_in_out_ram_is_one_layer_not_the_peak():
    """residual at 2 bits: input 32 B, a 64, b 128, c 64, add 64. Peak RAM holds a, b and c at c's
    step (256 B); the largest in+out is one layer's: b (64 + 128), c (128 + 64), add (64 + 64 + 64)."""
    mins = smallest_costs(residual(), M4)
    assert (mins["ram_bytes"], mins["ram_mcu_in_out"]) == (256, 192)


def test_check_achievable_passes_and_returns_minima():
    assert check_achievable(cnn(), M4, Budget.from_strings(flash="1KiB", ram="1KiB"))["flash_bytes"] == 244


def test_flash_budget_below_minimum_message():
    with pytest.raises(BudgetError) as err:
        check_achievable(cnn(), M4, Budget.from_strings(flash="100"))
    assert str(err.value) == ("FLASH budget 100 B is below the smallest achievable 244 B "
                              "(all weights at 2 bits per-tensor) for this model on cortex-m4")


def test_several_violations_are_all_named():
    with pytest.raises(BudgetError) as err:
        check_achievable(cnn(), M4, Budget(ram_bytes=50, ebops=3, latency_cycles=10, energy_uj=1e-9))
    msg = str(err.value)
    assert "RAM budget 50 B is below the smallest achievable 80 B (all activations at 2 bits)" in msg
    assert "EBOPs budget 3 is below the smallest achievable 4 (one non-zero weight of one bit per layer" in msg
    assert "latency budget 10 is below" in msg and "every layer at its fastest supported widths" in msg
    assert "energy budget" in msg and "uJ" in msg


def test_bops_and_in_out_ram_below_the_smallest_are_refused_by_name():
    with pytest.raises(BudgetError) as err:
        check_achievable(cnn(), M4, Budget.from_strings(bops="1e4", ram_in_out="79"))
    msg = str(err.value)
    assert ("BOPs budget 1e+04 is below the smallest achievable 1.178e+04 (all weights at 2 bits per-tensor; "
            "activations at 2 bits)") in msg
    assert ("in+out RAM (largest input+output buffers of one layer) budget 79 B is below the smallest achievable "
            "80 B (all activations at 2 bits)") in msg
    assert check_achievable(cnn(), M4, Budget(bops=11776, ram_mcu_in_out=80))["bops"] == 11776


def test_kib_units_in_message():
    big = Graph([Node("input", "input", [], (64,)),
                 Node("fc", "linear", ["input"], (512,), [(64,)], (512, 64))], output="fc")
    with pytest.raises(BudgetError, match=r"FLASH budget 2\.0 KiB is below the smallest achievable 10\.0 KiB"):
        check_achievable(big, M4, Budget.from_strings(flash="2KiB"))  # 512 * (64*2/8 + 4 bias) + 8 = 10248


def test_budget_above_device_capacity():
    with pytest.raises(BudgetError, match=r"FLASH budget 2\.0 MiB exceeds the 1\.0 MiB of cortex-m4"):
        check_achievable(cnn(), M4, Budget.from_strings(flash="2MiB"))


def test_model_too_big_for_device():
    g = Graph([Node("input", "input", [], (1_000_000,)),
               Node("relu", "act", ["input"], (1_000_000,), [(1_000_000,)], attrs={"activation": "relu"})],
              output="relu")
    with pytest.raises(BudgetError, match=r"smallest achievable RAM 488\.3 KiB .* does not fit the 192\.0 KiB"):
        check_achievable(g, M4, Budget())  # 2 * 1e6 * 2 bits / 8 = 500000 B


def test_fpga_has_no_capacity():
    assert check_achievable(cnn(), load_target("fpga-hls4ml"), Budget(flash_bytes=10**9))["flash_bytes"] > 0


def test_one_cost_vocabulary_is_read_by_budgets_the_run_the_cli_and_the_methods():
    from dataclasses import fields

    from mixprec.cli import _budget
    from mixprec.cost.keys import BUDGET_KEYS, BUDGET_NAMES, BY_NAME
    from mixprec.search import RunConfig
    from mixprec.search.learned import cost_key

    names = ("flash", "ram", "ebops", "energy", "latency", "bops", "ram_in_out")
    assert [f.name for f in fields(Budget)] == [BY_NAME[n].key for n in names]
    assert set(BUDGET_KEYS) == {f.name for f in fields(Budget)}
    flags = dict(flash="1KiB", ram="1KiB", ram_in_out="1KiB", bops="1", ebops="1", energy_uj="1", latency_cycles="1")
    assert set(_budget(**flags)) == set(BUDGET_NAMES)
    assert Budget.from_strings(**dict.fromkeys(BUDGET_NAMES)).limits() == {}
    listed = "flash, ram, ram_in_out, bops, ebops, latency, energy"
    with pytest.raises(ValueError, match=f"unknown budget \\['bogus'\\]; budgets: {listed}"):
        Budget.from_strings(bogus="1")
    with pytest.raises(ValueError, match=f"use {listed}"):
        RunConfig(budget={"flsh": "1KiB"})
    assert cost_key("latency") == "latency_cycles" and cost_key("bops") == "bops"
    assert cost_key("ram_in_out") == "ram_mcu_in_out"
    with pytest.raises(ValueError, match="unknown cost 'macs'"):
        cost_key("macs")


def test_an_in_out_budget_above_the_device_ram_is_refused():
    with pytest.raises(BudgetError, match=r"in\+out RAM .* budget .* exceeds the .* of cortex-m4"):
        check_achievable(cnn(), M4, Budget(ram_mcu_in_out=M4.ram_bytes + 1))
    check_achievable(cnn(), M4, Budget(ram_mcu_in_out=M4.ram_bytes))


def test_a_method_that_removes_channels_reaches_the_cost_of_the_one_channel_model():
    """DNAS removes channels: its smallest FLASH/RAM/BOPs is the model with every hidden layer down
    to one channel, bias, buffer and consumer columns gone, as the pruned model measures it."""
    import mixprec
    from mixprec.models import get_model
    from mixprec.prune import prune_channels

    t = load_target("mpic")
    qm = mixprec.quantize(get_model("lenet5"), t, (1, 28, 28), bits=t.min_weight_bits, act_bits=t.min_act_bits)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        bits = qm.layers[name].quantizer.bits().clone()
        bits[1:] = 0.0
        qm.layers[name].quantizer.set_bits(bits)
    one = mixprec.cost_report(prune_channels(qm).model, t).totals
    mins = smallest_costs(qm.graph, t, "per-channel", allow_pruning=True, removes_channels=True)
    for key in ("flash_bytes", "ram_bytes", "bops", "ram_mcu_in_out"):
        assert mins[key] == pytest.approx(one[key]), key
    kept_biases = smallest_costs(qm.graph, t, "per-channel", allow_pruning=True)
    assert mins["flash_bytes"] < kept_biases["flash_bytes"] / 2
    assert "every hidden layer down to one channel" in how_reached("flash_bytes", t, "per-channel", removes_channels=True)
    assert "channel" not in how_reached("flash_bytes", t, "per-tensor", removes_channels=True)
