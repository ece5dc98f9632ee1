"""Storage of pooled outputs over fixed-point grids with post-shifts (``bits.act_storage_bits``).

A pooled element holds the value of (maxpool) or the mean of (avgpool) window elements that lie on
grids of different coarseness: ``value_j = code_j << shift_j``. Its buffer stores it relative to its
own grid (maxpool: the window's coarsest, avgpool: the common one), which needs
``max_j (b_j + shift_j) - shift_out`` bits: this is what the C exporter stores, so the arena equals
the cost model's ``ram_bytes``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixprec.cost import evaluate
from mixprec.cost.bits import BitAssignment, act_bits, act_shift, act_storage_bits
from mixprec.cost.memory import buffer_bytes
from mixprec.cost.targets import target_from_dict
from mixprec.execute import NumpyKernels, reference
from mixprec.granularity import expand
from mixprec.graph.ir import Graph, Node
from mixprec.numerics import div_round_away, qrange

FIXED = target_from_dict({
    "name": "fixed-pool", "flash_bytes": None, "ram_bytes": None, "numerics": "fixed",
    "weight_bits": "0..8", "act_bits": "1..8", "weight_granularities": ["per-tensor", "per-channel", "per-slice",
                                                                         "per-element"],
    "act_granularities": ["per-tensor", "per-channel", "per-slice", "per-element"],
    "weight_containers": [2, 4, 8], "act_containers": [2, 4, 8],
    "param_bytes": {"bias": 4, "multiplier": 0, "shift": 1, "zero_point": 0}, "alignment": 4,
    "clock_hz": 1e8, "power_mw": 1.0, "macs_per_cycle": {8: {8: 1.0}}, "elementwise_per_cycle": 1.0})


def pool_graph(op: str, in_shape: tuple[int, ...], k: int, stride: int, pad: int = 0) -> Graph:
    """input (C, L) or (C, H, W) -> one pooling node."""
    dims = len(in_shape) - 1
    out = (in_shape[0],) + tuple((n + 2 * pad - k) // stride + 1 for n in in_shape[1:])
    attrs = {"dims": dims, "kernel_size": (k,) * dims, "stride": (stride,) * dims, "padding": (pad,) * dims}
    return Graph([Node("input", "input", [], in_shape), Node("pool", op, ["input"], out, [in_shape], attrs=attrs)],
                 output="pool")


BITS = [4.0, 2.0, 3.0, 8.0, 2.0, 2.0]
SHIFT = [2.0, 3.0, 1.0, 2.0, 6.0, 2.0]  # b + shift = 6, 5, 4, 10, 8, 4


def _assignment(bits=BITS, shift=SHIFT, requires_grad=False) -> BitAssignment:
    b = torch.tensor([bits], requires_grad=requires_grad)
    return BitAssignment({}, {"input": b}, {"input": torch.tensor([shift])})


def test_avgpool_lands_on_the_common_grid():
    g = pool_graph("avgpool", (1, 6), k=3, stride=1)
    a = _assignment()
    assert act_shift(a, g, "pool") is None
    # windows {0,1,2} {1,2,3} {2,3,4} {3,4,5}: the widest b + shift of each
    assert act_storage_bits(a, g, "pool").tolist() == [[6.0, 10.0, 10.0, 10.0]]
    assert act_bits(a, g, "pool").tolist() == [[8.0]]  # the precision (and scale count) is unchanged
    # containers 8, 10, 10, 10 (above the largest container the bits are kept) -> ceil(38 / 8)
    assert int(buffer_bytes(g, a, FIXED)["pool"]) == 5


def test_maxpool_stores_relative_to_the_coarsest_grid_of_its_window():
    g = pool_graph("maxpool", (1, 6), k=3, stride=1)
    a = _assignment()
    assert act_shift(a, g, "pool").tolist() == [[1.0, 1.0, 1.0, 2.0]]
    assert act_storage_bits(a, g, "pool").tolist() == [[5.0, 9.0, 9.0, 8.0]]


def test_padded_maxpool_ignores_padding():
    g = pool_graph("maxpool", (1, 6), k=3, stride=2, pad=1)  # windows {0,1} {1,2,3} {3,4,5}
    a = _assignment()
    assert act_shift(a, g, "pool").tolist() == [[2.0, 1.0, 2.0]]
    assert act_storage_bits(a, g, "pool").tolist() == [[4.0, 9.0, 8.0]]


def test_without_post_shifts_storage_is_act_bits():
    g = pool_graph("maxpool", (2, 4, 4), k=2, stride=2)
    bits = torch.full((2, 4, 4), 2.0)
    bits[1, 3, 3] = 6.0
    for a in (BitAssignment({}, {"input": bits}), BitAssignment({}, {"input": bits}, {"input": torch.zeros(2, 1, 1)})):
        assert act_shift(a, g, "pool") is None
        assert torch.equal(act_storage_bits(a, g, "pool"), act_bits(a, g, "pool"))  # channel max
        assert act_storage_bits(a, g, "pool").flatten().tolist() == [2.0, 6.0]


@pytest.mark.parametrize("op, expected", [("maxpool", [3.0, 5.0, 2.0, 8.0]), ("avgpool", [3.0, 9.0, 2.0, 12.0])])
def test_per_channel_and_per_slice_grids_keep_their_granularity(op, expected):
    g = pool_graph(op, (4, 4, 4), k=2, stride=2)
    a = BitAssignment({}, {"input": torch.tensor([3.0, 5.0, 2.0, 8.0]).reshape(4, 1, 1)},
                      {"input": torch.tensor([0.0, 4.0, 0.0, 4.0]).reshape(4, 1, 1)})
    s = act_storage_bits(a, g, "pool")
    assert s.shape == (4, 1, 1) and s.flatten().tolist() == expected
    sliced = BitAssignment({}, {"input": torch.tensor([3.0, 8.0]).reshape(2, 1, 1)},
                           {"input": torch.tensor([4.0, 0.0]).reshape(2, 1, 1)})
    s = act_storage_bits(sliced, g, "pool")
    assert s.shape == (2, 1, 1) and s.flatten().tolist() == ([3.0, 8.0] if op == "maxpool" else [7.0, 8.0])


def test_storage_is_differentiable_in_the_bits():
    g = pool_graph("avgpool", (1, 6), k=3, stride=1)
    a = _assignment(requires_grad=True)
    buffer_bytes(g, a, FIXED)["pool"].backward()
    # 1/8 byte per bit of each pooled element, to the element that sets its width (3 wins 3 windows)
    assert a.act["input"].grad.tolist() == [[0.125, 0.0, 0.0, 0.375, 0.0, 0.0]]


@pytest.mark.parametrize("op, pad", [("maxpool", 0), ("maxpool", 1), ("avgpool", 0)])
@pytest.mark.parametrize("signed", [True, False])
def test_every_pooled_integer_fits_its_storage(op, pad, signed):
    """Brute force against the integer kernels: extreme and random codes on random grids."""
    rng = np.random.default_rng(0)
    attrs = {"dims": 2, "kernel_size": (3, 3), "stride": (2, 2), "padding": (pad, pad)}
    g = pool_graph(op, (3, 7, 7), k=3, stride=2, pad=pad)
    for _ in range(10):
        bits = rng.integers(2, 9, size=(3, 7, 7))
        shift = rng.integers(0, 5, size=(3, 7, 7))
        a = BitAssignment({}, {"input": torch.tensor(bits, dtype=torch.float32)},
                          {"input": torch.tensor(shift, dtype=torch.float32)})
        storage = act_storage_bits(a, g, "pool").numpy().astype(np.int64)
        own = act_shift(a, g, "pool")
        own = np.zeros(storage.shape, np.int64) if own is None else own.numpy().astype(np.int64)
        lo, hi = qrange(bits, signed)
        codes = np.stack([lo, hi, rng.integers(lo, hi + 1)])  # (3 draws, C, H, W) as a batch
        values = codes << shift
        if op == "maxpool":
            pooled = NumpyKernels.maxpool(values, attrs)
        else:
            pooled = div_round_away(NumpyKernels.sumpool(values, attrs), 9)
        stored = pooled >> own
        assert np.array_equal(stored << own, pooled)  # exact on the element's own grid
        s_lo, s_hi = qrange(storage, signed)
        assert (stored >= s_lo).all() and (stored <= s_hi).all()
        if op == "maxpool":  # tight: the widest element's largest code needs every bit
            need = np.maximum(np.floor(np.log2(np.maximum(stored.max(axis=0), 1))) + 1 + signed, 1)
            assert np.array_equal(need, storage)


def test_conformance_case_arena_and_lowered_grids():
    """The sweep's avgpool1d-overlapping (per-slice, fixed): the assignment's post-shifts are the
    lowered grids', the pooled buffer holds every reference integer, the arena is 32 B (28 B before
    the cost model counted post-shifts, when the C exporter had to widen it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conformance import case_for
    from test_exactness import BUILDERS

    from mixprec.api import assignment

    case = case_for("avgpool1d-overlapping", BUILDERS["avgpool1d-overlapping"], "per-slice", "fixed")
    qm, ig = case.qm, case.ig
    a = assignment(qm)
    for node in ig.nodes:
        if node.grid is not None:
            want = np.zeros(()) if node.grid.post_shift is None else node.grid.post_shift
            got = a.act_shift.get(node.name, torch.zeros(()))
            assert np.array_equal(np.broadcast_to(want, node.out_shape),
                                  np.broadcast_to(got.numpy(), node.out_shape)), node.name
    pool = next(n.name for n in qm.graph if n.op == "avgpool")
    storage = act_storage_bits(a, qm.graph, pool)
    widths = np.broadcast_to(storage.numpy(), ig[pool].out_shape)
    lo, hi = qrange(widths.astype(np.int64), ig[ig[pool].inputs[0]].grid.signed)
    for x in case.inputs.values():
        _, env = reference(ig, x.numpy(), keep=True)
        assert (env[pool] >= lo).all() and (env[pool] <= hi).all()
    assert evaluate(qm.graph, a, FIXED).totals["ram_bytes"] == 32
    assert evaluate(qm.graph, BitAssignment(qm.weight_bits(), qm.act_bits()), FIXED).totals["ram_bytes"] == 28
    assert (expand(storage, ig[pool].out_shape) > expand(act_bits(a, qm.graph, pool), ig[pool].out_shape)).any()
