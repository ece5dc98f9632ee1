"""Channel slices as views: where a target's buffers allow it, ``x[:, a:b]`` (``torch.split``,
``torch.chunk``) reads the input's own memory from channel ``a`` on instead of copying it.

A buffer is channel-major and packed (each element in its container, one after the other), so
the channels ``a:b`` of a tensor whose elements share one container are one contiguous run. A
slice becomes a view (op ``narrow``: the input's grid, no requantization, no buffer of its own)
when every element of its input has the same container whatever the search picks (its quantizer
is per tensor) and the run starts at a buffer alignment for every container
the target has, unless a copy plans a smaller arena (a view keeps its input's buffer alive until its
own last reader). Otherwise it stays a copy onto its own grid (op ``slice``): so does a slice with an
activation fused into it, and one the network's output is (a flatten of): the output buffer is the one the
caller reads, from its start.
"""
from __future__ import annotations

from dataclasses import replace
from math import prod

from .ir import ALIAS_OPS, Graph


def element_offset(graph: Graph, name: str) -> int:
    """Where tensor ``name`` begins in its buffer (``graph.buffer_source``), in elements."""
    node = graph[name]
    if node.op not in ALIAS_OPS:
        return 0
    below = element_offset(graph, node.inputs[0])
    if node.op == "narrow":
        below += node.attrs["start"] * prod(graph[node.inputs[0]].out_shape[1:])
    return below


def can_view(graph: Graph, name: str, containers, alignment: int, uniform) -> bool:
    """Whether slice ``name`` can read its input's memory: the input's grid is one per tensor (``uniform``
    holds the names of the grids that are) and the slice's first element lies on a multiple of
    ``alignment`` bytes for every container width."""
    node = graph[name]
    if node.op != "slice" or node.attrs.get("activation", "identity") != "identity":
        return False  # a fused activation (relu of a slice) changes values: a copy
    if graph.grid_source(node.inputs[0]) not in uniform:
        return False
    first = element_offset(graph, node.inputs[0]) + node.attrs["start"] * prod(graph[node.inputs[0]].out_shape[1:])
    return all(first * int(c) % (8 * max(int(alignment), 1)) == 0 for c in containers)


def with_views(graph: Graph, containers, alignment: int, uniform, arena=None) -> Graph:
    """``graph`` with the slices that can be views made views (``narrow``), in order, so a slice of a
    view counts its offset. ``uniform``: the names of the nodes whose output grid is one per tensor
    (one container for every element). ``arena(graph)``, when given, plans a graph's arena: a view
    saves the copy's buffer but keeps its input's alive until the view's last reader, which can raise
    the peak, alone or only together with other views (two heads of one split), so every view is
    made first, then each in turn becomes a copy again where that plans a smaller arena."""
    output_chain, name = set(), graph.output  # what the output's buffer would alias: stays a copy
    while graph[name].op in ("flatten", "slice"):
        output_chain.add(name)
        name = graph[name].inputs[0]
    original = {n.name: n for n in graph}
    for i, node in enumerate(graph.nodes):
        if node.name not in output_chain and can_view(graph, node.name, containers, alignment, uniform):
            view = replace(node, op="narrow", attrs={"start": node.attrs["start"], "stop": node.attrs["stop"]})
            graph = _with_node(graph, i, view)
    if arena is None:
        return graph
    current = arena(graph)
    for i, node in enumerate(graph.nodes):
        if node.op == "narrow" and not any(u.op in ALIAS_OPS for u in graph.users(node.name)):
            copy = _with_node(graph, i, original[node.name])  # no view reads it: its offset moves nothing
            planned = arena(copy)
            if planned < current:
                graph, current = copy, planned
    return graph


def _with_node(graph: Graph, i: int, node) -> Graph:
    return Graph(graph.nodes[:i] + [node] + graph.nodes[i + 1:], graph.output, graph.output_transform)
