"""The channel map: which producer channels a weight column reads (through pooling, act, flatten,
grouped and depthwise convolutions), which producers an add ties, and which channels stay alive
when some are pruned. Expectations are written out by hand for small traced models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mixprec.graph.channels import alive_channels, channel_map, live_columns, tie_groups
from mixprec.graph.convert import trace


class Plain(nn.Module):
    """conv1 1->3, conv2 3->4 (3x3, pad 1), ReLU, maxpool 2, flatten, fc 4*4*4 -> 5."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.conv2(self.act(self.conv1(x)))))))


class Residual(nn.Module):
    """a 2->4 (1x1), b 4->4 (3x3), c 4->4 (1x1), add(a, c), then a second block d adding onto it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)

    def forward(self, x):
        x = self.act(self.a(x))
        x = self.act(x + self.c(self.act(self.b(x))))
        x = x + self.d(x)
        return self.fc(self.flat(self.pool(x)))


class Shortcut(nn.Module):
    """The network input added to a conv: the input ties its channels alive."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 2, 1), nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(x + self.conv(x), 1))


def separable(multiplier=1) -> nn.Module:
    """pre 2->4, dw 4->4*multiplier (groups 4), pw ->5 (1x1)."""
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=4),
                         nn.ReLU(), nn.Conv2d(4 * multiplier, 5, 1))


def grouped() -> nn.Module:
    """pre 2->8, grouped 8->6 (groups 2: rows 0-2 read channels 0-3, rows 3-5 channels 4-7)."""
    return nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, groups=2))


def _graph(model, shape):
    return trace(model, shape)[0]


def _pruned(**rows) -> dict:
    """``{layer: bool (C_out,)}`` from ``{layer: (C_out, [pruned rows])}``."""
    out = {}
    for name, (cout, pruned) in rows.items():
        mask = np.zeros(cout, bool)
        mask[list(pruned)] = True
        out[name] = mask
    return out


def test_flatten_spreads_a_channel_over_its_block_of_linear_columns():
    g = _graph(Plain(), (1, 8, 8))
    alive = alive_channels(g, _pruned(conv1=(3, [0]), conv2=(4, [1, 3])))
    assert alive["input"].all() and alive["conv1"].tolist() == [False, True, True]
    assert alive["conv2"].tolist() == [True, False, True, False] and alive["pool"].tolist() == alive["conv2"].tolist()
    cols = live_columns(g, alive, "conv2")
    assert cols.shape == (4, 3) and (cols == [False, True, True]).all()  # every row loses column 0
    fc = live_columns(g, alive, "fc")
    expected = np.repeat([True, False, True, False], 16)  # 4 x 4 features per pooled channel
    assert fc.shape == (5, 64) and (fc == expected).all()
    assert channel_map(g).columns_per_channel("fc") == 16 and channel_map(g).columns_per_channel("conv2") == 1


def test_residual_channels_are_tied_and_free_columns_only_when_every_tied_channel_is_pruned():
    g = _graph(Residual(), (2, 8, 8))
    assert tie_groups(g) == [("a", "c", "d")]
    one_side = alive_channels(g, _pruned(a=(4, [1]), c=(4, [1])))  # d still carries channel 1
    assert one_side["a"].all() and one_side["add_1"].all()
    assert live_columns(g, one_side, "b").all() and live_columns(g, one_side, "fc").all()
    every = alive_channels(g, _pruned(a=(4, [1]), c=(4, [1]), d=(4, [1])))
    assert every["a"].tolist() == [True, False, True, True] and every["c"].tolist() == every["a"].tolist()
    assert (live_columns(g, every, "b") == [True, False, True, True]).all()
    assert (live_columns(g, every, "d") == [True, False, True, True]).all()
    assert (live_columns(g, every, "fc") == np.repeat([True, False, True, True], 16)).all()
    # pruning inside a branch (b) frees only the columns of c that read it
    inner = alive_channels(g, _pruned(b=(4, [2])))
    assert inner["b"].tolist() == [True, True, False, True] and inner["a"].all()
    assert (live_columns(g, inner, "c") == [True, True, False, True]).all()


class Joined(nn.Module):
    """a 2->3 and b 2->2 joined by torch.cat, c 5->4 over the join."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_a_concat_keeps_every_channel_of_its_inputs_and_is_a_producer_of_its_own():
    g = _graph(Joined(), (2, 4, 4))
    cmap = channel_map(g)
    assert cmap.producers("cat") == ("cat",) and tie_groups(g) == []
    alive = alive_channels(g, _pruned(a=(3, [0, 2]), b=(2, [1])))
    assert alive["a"].all() and alive["b"].all() and alive["cat"].all() and live_columns(g, alive, "c").all()
    probs = cmap.alive(cmap.live({"a": torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)}))
    assert probs["a"].tolist() == [1.0, 1.0, 1.0]
    assert cmap.tied_live(cmap.live({}), "a").tolist() == [1.0, 1.0, 1.0]


def test_the_network_input_keeps_every_channel_it_is_tied_to():
    g = _graph(Shortcut(), (2, 4, 4))
    assert tie_groups(g) == [("input", "conv")]
    alive = alive_channels(g, _pruned(conv=(2, [0, 1])))
    assert alive["conv"].all() and live_columns(g, alive, "fc").all()


def test_a_depthwise_channel_dies_with_its_input_channel_and_frees_the_pointwise_columns():
    g = _graph(separable(), (2, 6, 6))
    assert [n.name for n in g.weighted()] == ["0", "2", "4"]
    alive = alive_channels(g, _pruned(**{"0": (4, [1]), "2": (4, [2])}))
    assert alive["0"].tolist() == [True, False, True, True]  # pre channel 2 stays: it is not pruned
    assert alive["2"].tolist() == [True, False, False, True]  # 1: dead input, 2: pruned
    assert (live_columns(g, alive, "2") == np.array([[True], [False], [True], [True]])).all()
    assert (live_columns(g, alive, "4") == [True, False, False, True]).all()


def test_a_depthwise_multiplier_takes_every_output_of_a_dead_input():
    g = _graph(separable(multiplier=2), (2, 6, 6))
    assert channel_map(g).column_sources("2")[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    alive = alive_channels(g, _pruned(**{"0": (4, [2])}))
    assert alive["2"].tolist() == [True, True, True, True, False, False, True, True]


def test_a_grouped_conv_row_reads_its_group_and_dies_only_with_all_of_it():
    g = _graph(grouped(), (2, 6, 6))
    cmap = channel_map(g)
    assert cmap.column_sources("2").tolist() == [[0, 1, 2, 3]] * 3 + [[4, 5, 6, 7]] * 3
    one = alive_channels(g, _pruned(**{"0": (8, [5])}))
    assert one["2"].all()
    cols = live_columns(g, one, "2")
    assert cols[:3].all() and (cols[3:] == [True, False, True, True]).all()
    group = alive_channels(g, _pruned(**{"0": (8, [4, 5, 6, 7])}))
    assert group["2"].tolist() == [True] * 3 + [False] * 3


def test_probabilities_follow_the_same_rules_for_independent_channels():
    g = _graph(Residual(), (2, 8, 8))
    cmap = channel_map(g)
    p = {n: torch.full((4,), q, dtype=torch.float64) for n, q in (("a", 0.5), ("c", 0.2), ("d", 0.1), ("b", 0.3))}
    live = cmap.live(p)
    alive = cmap.alive(live)
    # the first add is live while a or c is; the tie group is stored while a, c or d is
    assert live["add"][0].item() == pytest.approx(1 - 0.5 * 0.8)
    assert alive["a"][0].item() == pytest.approx(1 - 0.5 * 0.8 * 0.9) and alive["fc"].tolist() == [1.0] * 3
    assert cmap.tied_live(live, "c")[0].item() == pytest.approx(1 - 0.5 * 0.9)
    sep = _graph(separable(), (2, 6, 6))
    smap = channel_map(sep)
    live = smap.live({"0": torch.full((4,), 0.5, dtype=torch.float64), "2": torch.full((4,), 0.4, dtype=torch.float64)})
    assert live["2"][0].item() == pytest.approx(0.2)  # depthwise: its own and its input's
