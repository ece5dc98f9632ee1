import json

import pytest
import torch

from mixprec.cost.bits import uniform
from mixprec.cost.report import TOTALS, evaluate, evaluate_torch, format_table
from mixprec.cost.targets import load_target

from .graphs import cnn, residual

M4, MPIC = load_target("cortex-m4"), load_target("mpic")


def test_cnn_totals_on_cortex_m4():
    r = evaluate(cnn(), uniform(cnn(), 4, 8), M4)
    t = r.totals
    # weights: c1 4 * ceil(9*4/8) = 20; fc 10 * ceil(64*4/8) = 320
    assert t["weight_bytes"] == 340
    # params: c1 4*4 bias + 8 (mult+shift); fc 10*4 + 8
    assert t["param_bytes"] == 24 + 48 and t["flash_bytes"] == 412
    # activations: input 64 B, c1 256 B, pool 64 B, fc 10 B (12 aligned)
    assert (t["ram_bytes"], t["ram_lower_bound"], t["ram_mcu_in_out"]) == (320, 320, 320)
    assert t["macs"] == 2304 + 640
    assert t["bops"] == 2304 * 8 * 4 + 640 * 8 * 4
    assert t["ebops"] == 36 * 8 * 4 + 640 * 8 * 4
    # cycles at (a8, w4) 0.6 MAC/cycle; maxpool 64 outputs * 4 window / 0.25 per cycle
    cycles = 2304 / 0.6 + 640 / 0.6 + 256 / 0.25
    assert t["latency_cycles"] == pytest.approx(cycles)
    assert t["energy_uj"] == pytest.approx(cycles / 80e6 * 26.4 * 1e3)
    assert isinstance(t["flash_bytes"], int) and isinstance(t["ebops"], float)


def test_rows():
    r = evaluate(cnn(), uniform(cnn(), 4, 8), M4)
    rows = {row.name: row for row in r.layers}
    c1 = rows["c1"]
    assert (c1.params, c1.weight_bits, c1.act_bits, c1.weight_bytes, c1.param_bytes) == (36, 4.0, 8.0, 20, 24)
    assert (c1.macs, c1.in_out_bytes) == (2304, 64 + 256)
    assert rows["pool"].weight_bits is None and rows["flat"].in_out_bytes == 0
    assert sum(row.cycles for row in r.layers) == pytest.approx(r.totals["latency_cycles"])


def test_mpic_mixed_assignment():
    g = cnn()
    a = uniform(g, 8, 8)
    a.weight["c1"] = torch.tensor([2.0, 4.0, 8.0, 0.0]).reshape(4, 1, 1, 1)
    a.act["c1"] = torch.tensor([4.0]).reshape(1, 1, 1)
    r = evaluate(g, a, MPIC)
    # c1 reads the 8-bit input: 576 MACs per channel; fc reads 4-bit pool output at 8-bit weights
    cycles = 576 / 2.5 + 576 / 2.3 + 576 / 2.1 + 640 / 2.1 + 256 / 1.0
    assert r.totals["latency_cycles"] == pytest.approx(cycles)
    assert r.totals["energy_uj"] == pytest.approx(cycles / 250e6 * 5.4 * 1e3)
    assert r.totals["weight_bytes"] == 3 + 5 + 9 + 0 + 640
    assert r.totals["param_bytes"] == (16 + 4 * 8) + (40 + 8)  # per-channel c1: 4 mult/shift pairs


def test_residual_ram():
    r = evaluate(residual(), uniform(residual(), 8, 8), M4)
    assert (r.totals["ram_bytes"], r.totals["ram_lower_bound"], r.totals["ram_mcu_in_out"]) == (1024, 1024, 768)
    assert r.plan.offsets["c"] == 768


def test_evaluate_torch_matches_and_has_gradients():
    g = residual()
    a = uniform(g, 4, 8)
    for v in list(a.weight.values()) + list(a.act.values()):
        v.requires_grad_(True)
    t = evaluate_torch(g, a, M4)
    plain = evaluate(g, a, M4).totals
    assert set(t) == set(TOTALS) == set(plain)
    for key in TOTALS:
        assert t[key].item() == pytest.approx(plain[key])
    def grad(total, bits):
        return torch.autograd.grad(t[total], bits, retain_graph=True, allow_unused=True)[0]

    assert grad("flash_bytes", a.weight["b"]).item() == 8 * 36 / 8  # 8 channels of 36 weights, 1/8 B per bit
    assert grad("ram_bytes", a.act["b"]).item() == 512 / 8
    assert grad("ebops", a.act["input"]).item() == 4 * 2 * 4  # a: 4x2 weights at 4 bits read the input
    # on the M4 table narrower weights are slower: cycles fall as weight bits rise
    assert grad("latency_cycles", a.weight["b"]).item() < 0


def test_to_dict_is_json_and_table_is_text():
    r = evaluate(cnn(), uniform(cnn(), 4, 8), M4)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["totals"]["flash_bytes"] == 412 and d["memory_plan"]["arena"] == 320 and len(d["layers"]) == 5
    text = format_table(r)
    assert "c1" in text and "flash_bytes" in text and "412" in text


def test_missing_in_shapes_are_taken_from_the_producers():
    g = cnn()
    for node in g:
        node.in_shapes = []
    assert evaluate(g, uniform(g, 4, 8), M4).totals == evaluate(cnn(), uniform(cnn(), 4, 8), M4).totals
