"""Storage of a lowered model as the C library lays it out, byte for byte as the cost model counts.

* Weights: each output channel starts on a byte boundary; element ``e`` takes
  ``container(bits_e)`` bits (the smallest of the target's ``weight_containers``; 0 bits: pruned,
  no storage), least significant bit first, elements may straddle bytes
  (``cost.memory.channel_weight_bytes``).
* Activation buffers: the whole tensor packed the same way with ``act_containers``
  (``cost.memory.act_bytes``) at the cost model's storage bits (``cost.bits.act_storage_bits``:
  pooled outputs over fixed-point grids with post-shifts included), placed in one arena by
  ``cost.memory.plan_arena``.
* Per-layer parameters: int32 biases and ``requant_steps`` requantization entries of
  ``param_bytes`` (multiplier, shift, zero point) each (``cost.memory.param_flash_bytes``).

Everything here is plain NumPy; :mod:`.generate` turns it into C.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...cost.bits import act_bits, act_storage_bits
from ...cost.memory import n_scales
from ...cost.rounding import snap_up_ste
from ...granularity import expand
from ...numerics import bits_for_range
from ..base import ExportError

UNIFORM, PER_CHANNEL, PER_ELEMENT = "MP_UNIFORM", "MP_PER_CHANNEL", "MP_PER_ELEMENT"


def containers(bits: torch.Tensor, shape: tuple[int, ...], allowed) -> np.ndarray:
    """Container bits per element of a value of ``shape`` (int64, full shape): the cost model's rule."""
    snapped = snap_up_ste(expand(bits.detach().float(), tuple(shape)), allowed)
    return np.rint(snapped.numpy()).astype(np.int64).reshape(shape)


def pack_bits(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Two's complement ``codes`` in ``widths`` bits each, concatenated LSB first, padded to a byte."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    total = int(widths.sum())
    if total == 0:
        return b""
    elem = np.repeat(np.arange(codes.size), widths)
    start = np.cumsum(widths) - widths
    pos = np.arange(total) - np.repeat(start, widths)
    bits = ((codes[elem] >> pos) & 1).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


def fits(codes: np.ndarray, widths: np.ndarray, signed: bool) -> np.ndarray:
    """Whether each code fits its width (0 bits hold only 0)."""
    w = np.asarray(widths, dtype=np.int64)
    if signed:
        lo = np.where(w > 0, -(np.int64(1) << np.maximum(w - 1, 0)), 0)
        hi = np.where(w > 0, (np.int64(1) << np.maximum(w - 1, 0)) - 1, 0)
    else:
        lo = np.zeros_like(w)
        hi = np.where(w > 0, (np.int64(1) << w) - 1, 0)
    return (codes >= lo) & (codes <= hi)


class Store:
    """A growing byte blob (the weights section or the auxiliary tables)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, blob: bytes) -> int:
        off = len(self.data)
        self.data += blob
        return off

    def __len__(self) -> int:
        return len(self.data)


def le(values, width: int) -> bytes:
    """Little-endian signed integers of ``width`` bytes; raises if one does not fit."""
    out = bytearray()
    lim = 1 << (8 * width - 1) if width else 1
    for v in np.asarray(values, dtype=np.int64).reshape(-1).tolist():
        if width == 0:
            if v != 0:
                raise ValueError(f"value {v} stored in 0 bytes")
            continue
        if not -lim <= v < lim:
            raise ValueError(f"value {v} does not fit {width} bytes")
        out += int(v).to_bytes(width, "little", signed=True)
    return bytes(out)


# ----------------------------------------------------------------------------- activations


@dataclass
class ActLayout:
    """One activation buffer in the arena."""

    buffer: str
    shape: tuple[int, ...]
    bits: np.ndarray  # container bits per element (flat)
    shift: np.ndarray  # value = code << shift, per element (flat)
    signed: bool
    mode: str
    per_ch: int
    table: bytes  # per channel / per element (first bit u32, bits, shift)
    cost_bytes: int  # the cost model's bytes
    widened: list[str] = field(default_factory=list)
    first_byte: int = 0  # where it begins in ``buffer`` (a view of channels: after the channels before it)

    @property
    def nbytes(self) -> int:
        return -(-int(self.bits.sum()) // 8)

    @property
    def numel(self) -> int:
        return int(self.bits.size)


def act_layout(graph, assignment, target, ig, name: str, ranges: dict, layouts: dict) -> ActLayout:
    """Storage of buffer ``name``: the cost model's containers (of ``act_storage_bits``), the grid's
    post-shifts. The values each element can take are checked against its container; one is widened
    (and reported) only where they do not fit, which the cost model rules out when the assignment
    carries the grids' post-shifts (``mixprec.assignment``)."""
    node = ig[name]
    shape = tuple(node.out_shape)
    cost_bits = containers(act_storage_bits(assignment, graph, name), shape, target.act_containers)
    lo, hi = (np.rint(r).astype(np.int64) for r in ranges[name])
    if node.grid is not None:
        signed = bool(node.grid.signed)
        shift = np.broadcast_to(np.zeros((), np.int64) if node.grid.post_shift is None
                                else np.asarray(node.grid.post_shift, np.int64), shape)
    else:
        src = layouts[layout_source(graph, node.inputs[0])]
        signed = src.signed
        if node.op == "maxpool":  # the pooled value lies on the coarsest grid of its window's elements
            from ..checks import _window
            s = src.shift.reshape(ig[node.inputs[0]].out_shape).astype(np.float64)
            shift = np.rint(_window(s, node.attrs, np.inf).min(axis=tuple(range(-node.attrs["dims"], 0))))
            shift = shift.astype(np.int64).reshape(shape)
        elif node.op == "zeropad":  # as the cost model: each zero on its nearest element's grid
            s = src.shift.reshape(ig[node.inputs[0]].out_shape)
            shift = np.pad(s, [(0, 0)] + list(zip(node.attrs["padding"], node.attrs["padding_after"])), mode="edge")
        else:  # avgpool: the rounded mean lies on the common grid
            shift = np.zeros(shape, np.int64)
    shift = np.ascontiguousarray(shift).reshape(-1)
    lo_c, hi_c = lo.reshape(-1) >> shift, hi.reshape(-1) >> shift
    bits = cost_bits.reshape(-1).copy()
    widened = []
    ok = fits(lo_c, bits, signed) & fits(hi_c, bits, signed)
    if not ok.all():
        choices = sorted(set(target.act_containers) | {8, 16, 32})
        for e in np.flatnonzero(~ok):
            need = bits_for_range(lo_c[e], hi_c[e], signed)
            bits[e] = next(c for c in choices if c >= max(need, bits[e]))
        widened.append(f"{int((~ok).sum())} element(s) of {name!r} ({node.op}) need wider containers than the "
                       f"cost model's {sorted(set(cost_bits.reshape(-1)[~ok].tolist()))} bits: their values "
                       f"span [{int(lo_c[~ok].min())}, {int(hi_c[~ok].max())}]")
    layout = ActLayout(name, shape, bits, shift, signed, UNIFORM, 0, b"", -(-int(cost_bits.sum()) // 8), widened)
    _choose_mode(layout)
    return layout


def layout_source(graph, name: str) -> str:
    """The tensor whose layout (and C struct) ``name`` reads: through flatten to its input; a view of
    channels has its own (``view_layout``)."""
    while graph[name].op == "flatten":
        name = graph[name].inputs[0]
    return name


def view_layout(graph, ig, name: str, layouts: dict, alignment: int) -> ActLayout:
    """A view of channels (``narrow``): the layout of its elements in its input's buffer (``buffer``:
    the buffer it lies in, ``first_byte``: where it begins there). Views are made only of buffers whose
    elements share one container, from an element on the target's buffer alignment (``graph.views``):
    anything else is an ExportError."""
    node = ig[name]
    src = layouts[layout_source(graph, node.inputs[0])]
    per = int(np.prod(ig[node.inputs[0]].out_shape[1:]))
    first, last = node.attrs["start"] * per, node.attrs["stop"] * per
    bit = int(src.bits[:first].sum())
    if src.mode != UNIFORM or (src.first_byte * 8 + bit) % (8 * max(alignment, 1)):
        raise ExportError(f"{name!r} reads channels of {src.buffer!r} in place, which the C runtime can do only from "
                          f"a multiple of {alignment} bytes into a buffer whose elements share one container; "
                          f"quantize the model for this target")
    view = ActLayout(src.buffer, tuple(node.out_shape), src.bits[first:last], src.shift[first:last], src.signed,
                     UNIFORM, 0, b"", 0, first_byte=src.first_byte + bit // 8)
    _choose_mode(view)
    return view


def _choose_mode(t: ActLayout) -> None:
    bits, shift = t.bits, t.shift
    if (bits == bits[0]).all() and (shift == shift[0]).all():
        t.mode = UNIFORM
        return
    c = t.shape[0]
    per_ch = t.numel // c
    b2, s2 = bits.reshape(c, per_ch), shift.reshape(c, per_ch)
    if (b2 == b2[:, :1]).all() and (s2 == s2[:, :1]).all():
        t.mode, t.per_ch = PER_CHANNEL, per_ch
        widths = b2[:, 0] * per_ch
        first = np.cumsum(widths) - widths
        t.table = _table(first, b2[:, 0], s2[:, 0])
        return
    t.mode = PER_ELEMENT
    first = np.cumsum(bits) - bits
    t.table = _table(first, bits, shift)


def _table(first, bits, shift) -> bytes:
    if int(np.max(bits)) > 32 or int(np.max(shift)) > 255 or int(np.min(shift)) < 0:
        raise ExportError("activation containers above 32 bits or shifts outside 0..255 are not supported "
                          "by the C runtime")
    rows = np.zeros((len(first), 6), np.uint8)
    rows[:, :4] = np.asarray(first, dtype="<u4").reshape(-1, 1).view(np.uint8)
    rows[:, 4] = bits
    rows[:, 5] = shift
    return rows.tobytes()


# ----------------------------------------------------------------------------- weights


@dataclass
class WeightLayout:
    mode: str
    bits: int  # uniform container bits
    data: bytes  # packed weights, channel after channel
    table: bytes  # per-channel bits, or per-element (bits, shift)
    channel_bytes: np.ndarray


def weight_layout(name: str, w: np.ndarray, wbits: torch.Tensor, target) -> WeightLayout:
    """Pack integer weights ``w`` (as lowered, ``w = code << align``) at their assigned bits."""
    shape = tuple(w.shape)
    cout = shape[0]
    cont = containers(wbits, shape, target.weight_containers).reshape(cout, -1)
    w2 = np.asarray(w, dtype=np.int64).reshape(cout, -1)
    align = np.zeros_like(w2)
    code = w2.copy()
    bad = ~fits(code, cont, True)
    while bad.any():  # fixed point: a coarser element grid (w = code << align), found from the values
        can = bad & (code % 2 == 0) & (code != 0)
        if not can.any():
            i = np.argwhere(bad)[0]
            raise ExportError(f"layer {name!r}: weight {w2[tuple(i)]} at {tuple(int(v) for v in i)} does not fit its "
                              f"{cont[tuple(i)]}-bit container")
        code = np.where(can, code >> 1, code)
        align = np.where(can, align + 1, align)
        bad = ~fits(code, cont, True)
    if cont.max() > 32:
        raise ExportError(f"layer {name!r}: weight containers above 32 bits are not supported")
    per_channel = (cont == cont[:, :1]).all()
    if not align.any() and per_channel:
        data = b"".join(pack_bits(code[o], cont[o]) for o in range(cout))
        chan = -(-(cont[:, 0] * cont.shape[1]) // 8)
        if (cont == cont[0, 0]).all():
            return WeightLayout(UNIFORM, int(cont[0, 0]), data, b"", chan)
        return WeightLayout(PER_CHANNEL, 0, data, cont[:, 0].astype(np.uint8).tobytes(), chan)
    if align.max() > 255:
        raise ExportError(f"layer {name!r}: weight alignment shifts above 255 are not supported")
    data = b"".join(pack_bits(code[o], cont[o]) for o in range(cout))
    table = np.stack([cont, align], axis=-1).astype(np.uint8).tobytes()
    return WeightLayout(PER_ELEMENT, 0, data, table, -(-cont.sum(axis=1) // 8))


# ----------------------------------------------------------------------------- parameter entries


@dataclass
class Entries:
    """Per-element parameters compressed to entries: entry = element // div (div 0: one entry)."""

    rows: np.ndarray  # (entries, fields)
    div: int


def entries(arrays: list, shape: tuple[int, ...], n_cost: int | None = None) -> Entries:
    """Compress parameters that broadcast over ``shape`` to the fewest entries, preferring the cost
    model's ``n_cost`` steps (consecutive channel groups) when the values allow it."""
    numel = int(np.prod(shape))
    c = shape[0]
    per_ch = numel // c
    flat = np.stack([np.broadcast_to(np.asarray(a, np.int64), shape).reshape(-1) for a in arrays], axis=1)
    if n_cost and c % n_cost == 0:
        size = (c // n_cost) * per_ch
        blocks = flat.reshape(n_cost, size, -1)
        if (blocks == blocks[:, :1]).all():
            return Entries(blocks[:, 0], 0 if n_cost == 1 else size)
    if (flat == flat[:1]).all():
        return Entries(flat[:1], 0)
    chans = flat.reshape(c, per_ch, -1)
    if (chans == chans[:, :1]).all():
        return Entries(chans[:, 0], per_ch)
    return Entries(flat, 1)


def act_scales(graph, assignment, name: str) -> int:
    """Scales of a tensor as the cost model counts them (``n_scales`` of its bits)."""
    return n_scales(act_bits(assignment, graph, name))
