"""Channel slices as views (``graph.views``, op ``narrow``): which slices read their input in place,
and that a view has no buffer of its own, no requantization and no quantizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.api import cost_report
from mixprec.convert import convert, quantize
from mixprec.cost.memory import lifetimes
from mixprec.graph.convert import trace
from mixprec.graph.views import can_view, element_offset, with_views

M4 = ((2, 4, 8), 4)  # cortex-m4: its activation containers and buffer alignment


class Heads(nn.Module):
    """A map split into heads that begin at channel ``at`` (one conv each), summed."""

    def __init__(self, at: int = 4):
        super().__init__()
        self.at = at
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(at, 3, 3, padding=1), nn.Conv2d(8 - at, 3, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        return self.a(y[:, :self.at]) + self.b(y[:, self.at:])


def _views(model, shape=(2, 4, 4), target="cortex-m4", act_bits=8):
    qm = quantize(model.eval(), target, shape, bits=8, act_bits=act_bits)
    return qm, {n.name: n.op for n in qm.graph if n.op in ("slice", "narrow")}


def test_a_slice_is_a_view_only_from_the_buffer_alignment_for_every_container():
    graph, _ = trace(Heads(at=4).eval(), (2, 4, 4))  # channel 4 of 16 positions: 64 codes
    names = [n.name for n in graph if n.op == "slice"]
    uniform = {n.name for n in graph}
    assert [element_offset(graph, n) for n in ("stem",)] == [0]
    assert all(can_view(graph, n, *M4, uniform) for n in names)  # 64 codes x 2 bits = 16 B, word aligned
    odd, _ = trace(Heads(at=1).eval(), (2, 4, 4))  # 16 codes x 2 bits = 4 B: aligned; x 4 bits too
    assert [can_view(odd, n.name, *M4, uniform) for n in odd if n.op == "slice"] == [True, True]
    ragged, _ = trace(Heads(at=1).eval(), (2, 3, 3))  # 9 codes: 18 bits, no byte boundary
    assert [can_view(ragged, n.name, *M4, uniform) for n in ragged if n.op == "slice"] == [True, False]
    assert not any(can_view(graph, n, *M4, uniform - {"stem"}) for n in names)  # a grid per channel: copies


def test_slices_that_change_values_or_are_the_output_stay_copies():
    graph, _ = trace(Heads().eval(), (2, 4, 4))
    graph["slice"].attrs.update(activation="relu6", act_min=0.0, act_max=6.0)  # a clamp on the slice's own grid
    made = {n.name: n.op for n in with_views(graph, *M4, {n.name for n in graph}) if n.op in ("slice", "narrow")}
    assert made == {"slice": "slice", "slice_1": "narrow"}
    tail = nn.Sequential(nn.Conv2d(2, 8, 1), nn.Flatten())

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tail

        def forward(self, x):
            return self.body(x)[:, :64]

    out, _ = trace(Last().eval(), (2, 4, 4))
    assert [n.op for n in with_views(out, *M4, {n.name for n in out})][-1] == "slice"


def test_a_view_has_no_quantizer_no_buffer_and_lowers_the_planned_arena():
    qm, ops = _views(Heads())
    assert set(ops.values()) == {"narrow"} and not set(ops) & set(qm.act_quantizers)
    qm.calibrate([torch.randn(16, 2, 4, 4)])
    report = cost_report(qm, "cortex-m4")
    assert not set(ops) & set(report.plan.offsets) and not set(ops) & set(lifetimes(qm.graph))
    # the same model with every slice a copy onto its own grid
    copied = convert(Heads().eval(), (2, 4, 4), "scaled", 8, 8, "per-channel", "per-tensor", "cortex-m4", views=False)
    assert all(op == "slice" for op in (n.op for n in copied.graph if n.op in ("slice", "narrow")))
    copied.calibrate([torch.randn(16, 2, 4, 4)])
    # the stem's 128 B live on through both heads; the copies' 64 B each need room beside them
    assert report.totals["ram_bytes"] < cost_report(copied, "cortex-m4").totals["ram_bytes"]


def test_a_copy_stays_where_it_plans_the_smaller_arena():
    """ShuffleNet's unit: one half passes to the concat, the other through a conv. Both as views keep
    the whole input alive until the concat; the half the conv reads alone as a view plans the
    smallest arena of the four choices (256 B at 8 bits; 320 B with both views or both copies)."""

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(2, 8, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a, b = F.relu(self.stem(x)).chunk(2, dim=1)
            return torch.cat([a, F.relu(self.conv(b))], dim=1)

    graph, _ = trace(Shuffle().eval(), (2, 4, 4))
    assert {n.op for n in with_views(graph, *M4, {n.name for n in graph}) if n.name.startswith("chunk")} == {"narrow"}
    qm, ops = _views(Shuffle())
    assert ops == {"chunk.0": "slice", "chunk.1": "narrow"}
    x = torch.randn(16, 2, 4, 4)
    qm.calibrate([x])
    copied = convert(Shuffle().eval(), (2, 4, 4), "scaled", 8, 8, "per-channel", "per-tensor", "cortex-m4", views=False)
    copied.calibrate([x])
    assert (cost_report(qm, "cortex-m4").totals["ram_bytes"], cost_report(copied, "cortex-m4").totals["ram_bytes"]) == \
        (256, 320)


def test_a_target_with_finer_activation_grids_copies_slices_of_them():
    qm, ops = _views(Heads(), target="generic", act_bits=8)
    assert set(ops.values()) == {"narrow"}  # per-tensor grids: views there too
    fine = convert(Heads().eval(), (2, 4, 4), "scaled", 8, 8, "per-channel", "per-channel", "generic")
    assert {n.op for n in fine.graph if n.op in ("slice", "narrow")} == {"slice"}
