"""Memory as the deployed artifact lays it out: FLASH (packed weights, per-channel parameters and
the layout tables the C runtime reads where containers are not uniform) and RAM (activation buffers placed in one arena by a greedy planner over tensor lifetimes).

Byte counts are torch scalars, exact in the forward pass for integer bits and differentiable in
the bits: every rounding (bits up to a storage container, bits up to whole bytes, offsets up to
the alignment) is straight-through (``rounding.ste``), so the gradient is that of the unrounded
count, e.g. d bytes / d b_e = 1/8 for every weight element.

>>> import torch
>>> from mixprec.graph.ir import Node
>>> conv = Node("c", "conv", ["input"], (4, 8, 8), [(1, 8, 8)], (4, 1, 3, 3))
>>> t = load_target("cortex-m4")
>>> int(weight_flash_bytes(conv, torch.tensor([3.0]), t))  # 3 bits stored as 4: 4 * ceil(9*4/8)
20
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..granularity import expand
from ..graph.ir import ALIAS_OPS, Graph, Node
from .bits import BitAssignment, act_bits, act_shift, act_storage_bits, weight_bits
from .rounding import align_up_ste, snap_up_ste, ste_ceil
from .targets import Target, load_target  # noqa: F401  (load_target: doctest)

# ----------------------------------------------------------------------------- FLASH


def channel_weight_bytes(node: Node, wbits: torch.Tensor, target: Target) -> torch.Tensor:
    """Bytes of each output channel's weights, shape ``(C_out,)``.

    Each channel starts on a byte boundary; each element takes the smallest target container that
    holds its bits (0 bits: pruned, 0 storage): ``ceil(sum_e container(b_e) / 8)``.
    """
    bits = snap_up_ste(expand(wbits, node.weight_shape), target.weight_containers)
    return ste_ceil(bits.reshape(node.weight_shape[0], -1).sum(dim=1) / 8)


def weight_flash_bytes(node: Node, wbits: torch.Tensor, target: Target) -> torch.Tensor:
    """Bytes of a weighted node's packed weights (sum of ``channel_weight_bytes``)."""
    return channel_weight_bytes(node, wbits, target).sum()


def n_scales(bits: torch.Tensor) -> int:
    """Scales (hence requantization parameters) a bits tensor implies: 1 per-tensor, else one per
    entry along dim 0 (per-channel: C, per-slice: slices, per-element: C)."""
    return 1 if bits.numel() == 1 else int(bits.shape[0])


def requant_steps(graph: Graph, assignment: BitAssignment, name: str) -> int:
    """Requantization steps (one multiplier + shift + zero point each) that node ``name`` stores.

    - conv / linear: one per effective scale ``s_in * s_w / s_out``: max(weight scales, output scales)
    - add: each input is rescaled to the output grid and the sum requantized: sum of input scales + output scales
    - concat: each input rescaled onto its channels of the output grid: per input, max(its scales,
      the output's scales over its channels)
    - act: one rescale from input to output grid: max(input scales, output scales)
    - slice: its channels of the input's common grid rescaled onto its own: output scales
    - pad: the input rescaled onto its channels of the output grid, as one input of a concat
    - input, maxpool, avgpool, zeropad, flatten, narrow: none (the input is quantized by the caller; the others keep
      their input's grid: average pooling divides by its window size, a constant of the kernel)
    - table: none (its lookup tables, ``table_bytes_of``, hold outputs already on the output grid)
    """
    node = graph[name]
    if node.op in ("input", "maxpool", "avgpool", "zeropad", "flatten", "narrow", "table"):
        return 0
    out = n_scales(act_bits(assignment, graph, name))
    ins = [n_scales(act_bits(assignment, graph, i)) for i in node.inputs]
    if node.has_weights:
        return max(n_scales(weight_bits(assignment, graph, name)), out)
    if node.op == "add":
        return sum(ins) + out
    if node.op == "slice":  # the input's common grid onto the slice's own: one step per output scale
        return out
    if node.op == "pad":  # the zero channels need no rescale
        return max(ins[0], concat_out_scales(node, out, 0))
    if node.op == "concat":  # each input rescaled onto its channels of the output grid
        return sum(max(i, concat_out_scales(node, out, k)) for k, i in enumerate(ins))
    return max(ins + [out])


def concat_out_scales(node: Node, out: int, k: int) -> int:
    """Output scales over input ``k``'s channels of a concat whose output has ``out`` scales (one,
    or per channel, or finer: entries along dim 0)."""
    return 1 if out == 1 else out * node.in_shapes[k][0] // node.out_shape[0]


#: One lookup table: an output code (at most 8 bits, one byte) for each of the 256 input codes
TABLE_BYTES = 256


def table_count(graph: Graph, assignment: BitAssignment, name: str) -> int:
    """Lookup tables a ``table`` node stores: one per group of elements that share the input's and
    the output's grids, the finer bits tensor's entries (row-major blocks: 1, slices, channels or
    elements)."""
    node = graph[name]
    return max(act_bits(assignment, graph, node.inputs[0]).numel(), act_bits(assignment, graph, name).numel())


def param_flash_bytes(graph: Graph, assignment: BitAssignment, name: str, target: Target) -> int:
    """Bytes of a node's stored parameters other than weights.

    Bias: ``param_bytes.bias`` per output channel of a weighted node (kept for pruned channels too:
    their output is the constant ``act(bias)``; ``attrs["bias"] = False`` drops it). Requantization:
    ``requant_steps * (multiplier + shift + zero_point)`` bytes (0 on ``fixed`` numerics targets).
    Lookup tables: ``table_count * TABLE_BYTES``.

    Independent of the bit values (only of the bit tensors' shapes), hence a plain int.
    """
    node = graph[name]
    bias = node.out_channels * target.param_bytes.bias if node.has_weights and node.attrs.get("bias", True) else 0
    tables = table_count(graph, assignment, name) * TABLE_BYTES if node.op == "table" else 0
    return bias + tables + requant_steps(graph, assignment, name) * target.param_bytes.requant


#: Bytes of one row of an activation buffer's layout table: first bit (u32), container bits, shift
ACT_TABLE_ROW_BYTES = 6
#: Bytes per element of a weight layout table that is not per channel: container bits, alignment
WEIGHT_TABLE_ELEMENT_BYTES = 2


def weight_table_bytes(node: Node, wbits: torch.Tensor, target: Target) -> int:
    """FLASH bytes of the table that tells the C runtime where a weighted layer's elements are
    (``export.c.layout``): none when every element has one container, one byte per output
    channel when each channel has one, a (container, alignment) pair per element otherwise.

    Counted from the containers alone; the exporter may also need the per-element table where a
    channel's elements lie on grids of different coarseness (fixed-point per-element scales), which
    ``mixprec.cost_report`` measures on the lowered model.
    """
    bits = wbits.detach()
    if _constant(bits):  # the common case, decided without expanding anything
        return 0
    cont = snap_up_ste(expand(bits, node.weight_shape), target.weight_containers)
    cont = cont.reshape(node.weight_shape[0], -1)
    if _constant(cont):
        return 0
    if bool((cont == cont[:, :1]).all()):
        return int(cont.shape[0])
    return WEIGHT_TABLE_ELEMENT_BYTES * int(cont.numel())


def _constant(t: torch.Tensor) -> bool:
    return t.numel() <= 1 or bool((t == t.reshape(-1)[0]).all())


def act_table_bytes(graph: Graph, assignment: BitAssignment, name: str, target: Target) -> int:
    """FLASH bytes of the layout table of the buffer ``name`` produces: none when every element
    has one container and one grid shift, a row per channel when each channel has one, a row
    per element otherwise (``ACT_TABLE_ROW_BYTES`` each)."""
    node = graph[name]
    shape = node.out_shape
    bits = act_storage_bits(assignment, graph, name).detach()
    shift = act_shift(assignment, graph, name)
    if shift is None and _constant(bits):  # the common case, decided without expanding anything
        return 0
    cont = snap_up_ste(expand(bits, shape), target.act_containers)
    cols = [cont.reshape(shape[0], -1)]
    if shift is not None:
        cols.append(expand(shift.detach().to(cont), shape).reshape(shape[0], -1))
    if all(_constant(c) for c in cols):
        return 0
    if all(bool((c == c[:, :1]).all()) for c in cols):
        return ACT_TABLE_ROW_BYTES * int(shape[0])
    return ACT_TABLE_ROW_BYTES * int(cont.numel())


def table_flash_bytes(graph: Graph, assignment: BitAssignment, name: str, target: Target) -> int:
    """Layout-table bytes node ``name`` stores: its weights' and its output buffer's."""
    node = graph[name]
    total = weight_table_bytes(node, weight_bits(assignment, graph, name), target) if node.has_weights else 0
    if node.op not in ALIAS_OPS:
        total += act_table_bytes(graph, assignment, name, target)
    return total


# ----------------------------------------------------------------------------- activations


def act_bytes(shape: tuple[int, ...], abits: torch.Tensor, target: Target) -> torch.Tensor:
    """Bytes of one activation tensor: ``ceil(sum_e container(b_e) / 8)`` (packed sub-byte).

    >>> int(act_bytes((4, 8, 8), torch.tensor([3.0]), load_target("cortex-m4")))  # 256 x 4 bits
    128
    """
    bits = snap_up_ste(expand(abits, shape), target.act_containers)
    return ste_ceil(bits.sum() / 8)


def buffer_bytes(graph: Graph, assignment: BitAssignment, target: Target) -> dict[str, torch.Tensor]:
    """Bytes of every activation buffer (one per non-aliasing node), unaligned.

    Each element at its storage bits (``bits.act_storage_bits``): its activation bits, wider after
    pooling over fixed-point grids with post-shifts, where values of coarser grids land on a finer one.
    """
    return {n.name: act_bytes(n.out_shape, act_storage_bits(assignment, graph, n.name), target)
            for n in graph if n.op not in ALIAS_OPS}


def lifetimes(graph: Graph) -> dict[str, tuple[int, int]]:
    """``buffer -> (first step, last step)``, steps = node positions in execution order, inclusive.

    A buffer is live from the step of the node that produces it until the last step that reads it
    (through any aliasing view); the graph output's buffer lives until the last step.
    """
    spans = {n.name: (i, i) for i, n in enumerate(graph) if n.op not in ALIAS_OPS}
    for step, node in enumerate(graph):
        for name in node.inputs:
            buf = graph.buffer_source(name)
            spans[buf] = (spans[buf][0], max(spans[buf][1], step))
    out = graph.buffer_source(graph.output)
    spans[out] = (spans[out][0], len(graph) - 1)
    return spans


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def live_bytes_peak(sizes: dict[str, torch.Tensor], spans: dict[str, tuple[int, int]]) -> torch.Tensor:
    """The lower bound on any arena: max over steps of the bytes of all live buffers."""
    steps = range(max(last for _, last in spans.values()) + 1)
    zero = torch.zeros((), device=next(iter(sizes.values())).device)
    return torch.stack([sum((sizes[b] for b, (s, e) in spans.items() if s <= t <= e), zero) for t in steps]).max()


def in_out_buffers(graph: Graph) -> dict[str, list[str]]:
    """Per layer, the buffers the MCU-paper figure adds: its output buffer, then its input buffers
    (views and the input node skipped; an input read twice counts twice)."""
    return {n.name: [n.name] + [graph.buffer_source(i) for i in n.inputs]
            for n in graph if n.op not in ALIAS_OPS and n.op != "input"}


def in_out_bytes(graph: Graph, sizes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MCU-paper figure per layer: input buffers + output buffer (``in_out_buffers``)."""
    return {name: sum((sizes[b] for b in bufs[1:]), sizes[bufs[0]]) for name, bufs in in_out_buffers(graph).items()}


# ----------------------------------------------------------------------------- arena planning


@dataclass
class MemoryPlan:
    """Where each activation buffer lives in the arena (offsets in bytes, all multiples of ``alignment``)."""

    offsets: dict[str, int]
    sizes: dict[str, int]  # aligned sizes, as placed
    lifetimes: dict[str, tuple[int, int]]
    arena: int
    alignment: int = 1
    below: dict[str, str | None] = field(default_factory=dict)  # buffer whose end set each offset

    def to_dict(self) -> dict:
        return {"arena": self.arena, "alignment": self.alignment, "offsets": dict(self.offsets),
                "sizes": dict(self.sizes), "lifetimes": {k: list(v) for k, v in self.lifetimes.items()}}


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_arena(sizes: dict[str, int], spans: dict[str, tuple[int, int]], alignment: int = 1) -> MemoryPlan:
    """Greedy placement like TFLite-Micro's GreedyMemoryPlanner.

    Buffers go in order of size (largest first; ties by first use, then name), each at the lowest
    offset where it overlaps no already placed buffer whose lifetime overlaps its own. Sizes are
    rounded up to ``alignment`` first, so every offset and the arena are multiples of it.

    >>> plan_arena({"a": 8, "b": 8, "c": 4}, {"a": (0, 1), "b": (1, 2), "c": (2, 3)}).offsets
    {'a': 0, 'b': 8, 'c': 0}
    """
    aligned = {b: _align(int(s), alignment) for b, s in sizes.items()}
    order = sorted(aligned, key=lambda b: (-aligned[b], spans[b][0], b))
    offsets: dict[str, int] = {}
    below: dict[str, str | None] = {}
    for buf in order:
        offsets[buf], below[buf] = _lowest_fit(buf, aligned, spans, offsets)
    arena = max((offsets[b] + aligned[b] for b in offsets), default=0)
    return MemoryPlan({b: offsets[b] for b in sizes}, aligned, dict(spans), arena, alignment, below)


def plan_buffers(graph: Graph, sizes: dict, target) -> MemoryPlan:
    """``plan_arena`` of these buffer sizes (bytes, rounded to whole bytes) over ``graph``'s lifetimes,
    at the target's alignment."""
    whole = {b: int(round(float(torch.as_tensor(s).detach()))) for b, s in sizes.items()}  # sizes may carry gradients
    return plan_arena(whole, lifetimes(graph), target.alignment)


def _lowest_fit(buf, sizes, spans, offsets) -> tuple[int, str | None]:
    placed = sorted((o, b) for b, o in offsets.items() if _overlap(spans[b], spans[buf]) and sizes[b] > 0)
    candidate, below = 0, None
    for offset, other in placed:
        if candidate + sizes[buf] <= offset:
            break
        if offset + sizes[other] > candidate:
            candidate, below = offset + sizes[other], other
    return candidate, below


def arena_torch(plan: MemoryPlan, sizes: dict[str, torch.Tensor]) -> torch.Tensor:
    """The planned arena as a differentiable function of the buffer sizes.

    Each buffer's offset is the (aligned) end of the buffer it was stacked on, so the arena is a
    sum of sizes along the stacks: exact in the forward pass for the sizes the plan was made with;
    the gradient reaches the buffers that set the arena (the plan itself is held fixed).
    """
    ends: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), device=next(iter(sizes.values())).device) if sizes else torch.zeros(())

    def end(buf: str) -> torch.Tensor:
        if buf not in ends:
            start = end(plan.below[buf]) if plan.below.get(buf) else zero
            ends[buf] = start + align_up_ste(sizes[buf], plan.alignment)
        return ends[buf]

    return torch.stack([end(b) for b in plan.offsets]).max() if plan.offsets else zero
