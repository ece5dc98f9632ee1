import pytest
import torch

from mixprec.cost.bits import BitAssignment, act_bits, min_assignment, uniform
from mixprec.cost.targets import load_target

from .graphs import cnn


def test_uniform_shapes():
    g = cnn()
    a = uniform(g, 4, 8, granularity="per-channel")
    assert a.weight["c1"].shape == (4, 1, 1, 1) and a.weight["fc"].shape == (10, 1)
    assert set(a.act) == {"input", "c1", "fc"}  # pass-through nodes have no entry
    assert a.act["c1"].shape == (1, 1, 1) and a.act["c1"].dtype == torch.float32


def test_pass_through_nodes_take_their_grid_source():
    g = cnn()
    a = uniform(g, 4, 8)
    a.act["c1"] = torch.tensor([2.0, 4.0, 8.0, 3.0]).reshape(4, 1, 1)
    assert torch.equal(act_bits(a, g, "pool"), a.act["c1"])
    flat = act_bits(a, g, "flat")  # flatten keeps element order: channel c covers 16 elements
    assert flat.shape == (64,) and flat[:16].eq(2).all() and flat[48:].eq(3).all()


def test_per_element_bits_through_maxpool_take_channel_max():
    g = cnn()
    a = uniform(g, 4, 8)
    a.act["c1"] = torch.full((4, 8, 8), 2.0)
    a.act["c1"][2, 5, 5] = 6.0
    assert act_bits(a, g, "pool").flatten().tolist() == [2.0, 2.0, 6.0, 2.0]


def test_missing_entries_are_named():
    g = cnn()
    a = BitAssignment(weight={}, act={})
    with pytest.raises(KeyError, match="'c1'"):
        act_bits(a, g, "c1")


def test_min_assignment_uses_smallest_nonzero_weight_width():
    g = cnn()
    a = min_assignment(g, load_target("mpic"))  # mpic allows 0 (pruned) weights
    assert a.weight["c1"].item() == 2 and a.act["input"].item() == 2
    # per tensor nothing can be pruned short of the whole layer, which is no model
    assert min_assignment(g, load_target("mpic"), allow_pruning=True).weight["c1"].item() == 2
    # per channel every hidden layer keeps its first channel; the output layer is never pruned
    p = min_assignment(g, load_target("mpic"), allow_pruning=True, weight_granularity="per-channel")
    assert p.weight["c1"].flatten().tolist() == [2.0, 0.0, 0.0, 0.0] and set(p.weight["fc"].flatten().tolist()) == {2.0}
    assert min_assignment(g, load_target("cortex-m4"), allow_pruning=True, weight_granularity="per-channel"
                          ).weight["c1"].flatten().tolist() == [2.0] * 4  # no pruning on an MCU
    f = min_assignment(g, load_target("fpga-hls4ml"))
    # a signed symmetric 1-bit weight holds only 0: the smallest width with values is 2
    assert f.weight["fc"].item() == 2 and f.act["fc"].item() == 1


def test_min_assignment_per_element_keeps_one_weight_in_every_layer():
    """Per element any weight may be pruned, the output layer's too (its channels keep their biases):
    the floor of BOPs on the FPGA is one weight per layer, not one whole row of it."""
    from mixprec.cost.budget import how_reached, smallest_costs

    g = cnn()
    t = load_target("fpga-hls4ml")
    e = min_assignment(g, t, allow_pruning=True, weight_granularity="per-element")
    assert [int(e.weight[n.name].count_nonzero()) for n in g.weighted()] == [1, 1]
    mins = smallest_costs(g, t, "per-element", allow_pruning=True)
    # BOPs count a conv weight once per output position (8 x 8 here), a dense weight once
    assert mins["bops"] == (8 * 8 + 1) * t.min_weight_bits * t.min_act_bits
    assert "all but one weight of every layer pruned" in how_reached("bops", t, "per-element", allow_pruning=True)
    kept_rows = smallest_costs(g, t, "per-channel", allow_pruning=True)["bops"]
    assert mins["bops"] < kept_rows
