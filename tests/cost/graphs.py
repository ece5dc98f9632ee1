"""Small graphs built by hand for the cost tests (shapes without batch)."""
from __future__ import annotations

from mixprec.graph.ir import Graph, Node


def conv(name, src, in_shape, cout, k=3, pad=1, groups=1):
    cin, h, w = in_shape
    out = (cout, h + 2 * pad - k + 1, w + 2 * pad - k + 1)
    attrs = {"kernel_size": (k, k), "stride": (1, 1), "padding": (pad, pad), "dilation": (1, 1),
             "groups": groups, "dims": 2, "activation": "relu"}
    return Node(name, "conv", [src], out, [in_shape], (cout, cin // groups, k, k), attrs)


def cnn() -> Graph:
    """input (1,8,8) -> conv 1->4 3x3 pad 1 -> maxpool 2 -> flatten -> linear 64->10."""
    return Graph([
        Node("input", "input", [], (1, 8, 8)),
        conv("c1", "input", (1, 8, 8), 4),
        Node("pool", "maxpool", ["c1"], (4, 4, 4), [(4, 8, 8)],
             attrs={"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), "dims": 2}),
        Node("flat", "flatten", ["pool"], (64,), [(4, 4, 4)]),
        Node("fc", "linear", ["flat"], (10,), [(64,)], (10, 64), {"activation": "identity"}),
    ], output="fc")


def residual() -> Graph:
    """input (2,8,8) -> a: conv 2->4 1x1 -> b: conv 4->8 3x3 -> c: conv 8->4 1x1 -> add(a, c)."""
    return Graph([
        Node("input", "input", [], (2, 8, 8)),
        conv("a", "input", (2, 8, 8), 4, k=1, pad=0),
        conv("b", "a", (4, 8, 8), 8),
        conv("c", "b", (8, 8, 8), 4, k=1, pad=0),
        Node("add", "add", ["a", "c"], (4, 8, 8), [(4, 8, 8), (4, 8, 8)], attrs={"activation": "identity"}),
    ], output="add")


def depthwise(groups=4, cout=4) -> Graph:
    """input (4,6,6) -> grouped conv 4->cout 3x3 pad 1 (groups=4: depthwise)."""
    return Graph([Node("input", "input", [], (4, 6, 6)), conv("dw", "input", (4, 6, 6), cout, groups=groups)],
                 output="dw")


def dense(n_in=16, n_out=5) -> Graph:
    return Graph([Node("input", "input", [], (n_in,)),
                  Node("fc", "linear", ["input"], (n_out,), [(n_in,)], (n_out, n_in))], output="fc")
