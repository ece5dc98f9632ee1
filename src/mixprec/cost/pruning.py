"""What pruned output channels free: ``CostTables.totals`` and ``expected`` when a weight group takes
width 0.

A choice with pruned channels costs what the model with those channels physically removed costs
(``graph.channels`` says which channels stay *alive*):

- weights: a row is stored while its output channel is alive, a column while the input channel it
  reads is; bytes (each row from a byte boundary), MACs, BOPs, EBOPs and cycles count the stored
  weights only;
- parameters: a bias per alive row, a requantization entry per scale that still covers an alive
  channel;
- activation buffers hold only alive channels (bytes, arena, layout tables), and add / act /
  pooling work only on them.

A pruned channel tied (through an add) to a live one stays: its row is stored at 0 bits (no bytes,
BOPs or cycles), its bias, requantization entry, buffer channel and MACs stay, as they do in the
rebuilt model.

``expected`` takes every group's width, hence every channel, as independent. MACs, BOPs, EBOPs,
cycles and parameter bytes are linear in the channels' indicators; a rounded byte count (a row's
packed bytes, a buffer's aligned bytes) is ``M ceil(X / M)`` of a sum ``X`` over independent slots
(input channels, buffer channels), whose expectation is exact from the mean of ``X`` and the
distribution of ``X mod M`` (``_round_up``: cyclic convolutions of M entries, differentiable; the
distribution of the count of present slots would cost a polynomial of the channel count per row,
20x slower on ResNet-8). The expectation is exact where channels are independent:

- each weight group is one output channel (per-channel, per-element bits; with per-slice groups a
  slice's channels are taken as independent), and no add sums two tensors whose channels derive
  from one pruned channel other than through the tie itself (true of residual and inverted-residual
  blocks);
- a row's cycles use the throughput at its widest weight and the layer's widest input, over all
  columns (the rebuilt model: over the stored ones; equal for per-tensor activations and rows of
  one width);
- the weight layout table classifies a row by all its columns (a per-element row whose stored
  columns share one container while the rest do not is counted as mixed);
- a requantization count ``max(n_weight, n_output)`` takes the finer of two nested scale tensors.

``totals`` is exact in every case: it computes the rebuilt model's weights, tables and cycles from
the choice's bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch
import torch.nn.functional as F

from ..granularity import expand
from ..graph.channels import ChannelMap, channel_map
from . import compute, memory
from .bits import BitAssignment, act_bits, act_shift, act_storage_bits, weight_bits
from .rounding import snap_up_ste

NO_REQUANT_OPS = ("input", "maxpool", "avgpool", "zeropad", "flatten", "narrow")


# ----------------------------------------------------------------------------- per-channel tables


@dataclass
class Rows:
    """A weighted layer per output channel ``o``, width index ``k`` and input-width index ``a``."""

    src: torch.Tensor  # (C, I) input dim-0 index each weight column reads
    block: int  # consecutive columns one input channel feeds
    zero: torch.Tensor  # (C, K) the row holds no weights (pruned)
    slot_bits: torch.Tensor  # (C, K, S) container bits of the columns of each input channel
    row_class: torch.Tensor  # (C, K) the row's container where all its elements share one, else -1
    w_top: torch.Tensor  # (C, K) the row's widest bits
    same_bits: torch.Tensor  # (C, K) every element of the row has those bits
    a_max: torch.Tensor  # (A,) the widest input bits
    cpm: torch.Tensor  # (C, K, A) cycles per MAC at w_top and a_max
    col_eff: torch.Tensor  # (C, K, I) EBOPs weight bits per column (summed over the kernel)
    col_nom: torch.Tensor  # (C, K, I) nominal bits per column
    col_in: torch.Tensor  # (A, C, I) input bits each column multiplies
    macs_per_column: int
    positions: int
    kernel: int
    grouped: bool


@dataclass
class Buffer:
    """An activation buffer per act width index ``a`` and dim-0 entry ``c`` (after a flatten,
    ``block`` consecutive entries hold one channel of the tie group)."""

    bits: torch.Tensor  # (A, C / block) container bits of each channel
    entry_class: torch.Tensor  # (A, C) id of each entry's (container, shift) where uniform, else -1
    elements: int  # per dim-0 entry
    block: int


def channel_map_of(tables) -> ChannelMap:
    return _cached(tables, ("channels",), lambda: channel_map(tables.graph))


def rows(tables, name: str) -> Rows:
    return _cached(tables, ("rows", name), lambda: _build_rows(tables, name))


def buffer(tables, name: str) -> Buffer:
    return _cached(tables, ("buffer", name), lambda: _build_buffer(tables, name))


def _cached(tables, key, make):
    if key not in tables._pruning:
        tables._pruning[key] = make()
    return tables._pruning[key]


def _build_rows(tables, name: str) -> Rows:
    layer, node, t = tables.layers[name], tables.graph[name], tables.target
    ws, cmap = tuple(node.weight_shape), channel_map_of(tables)
    cout, cols = ws[:2]
    full = torch.stack([expand(layer.bits(np.full(layer.groups, k)), ws) for k in range(len(layer.widths))], 1)
    cont = snap_up_ste(full, t.weight_containers).double().reshape(cout, len(layer.widths), -1)
    block = cmap.columns_per_channel(name)
    col_in = torch.from_numpy(layer.col_in_bits)
    flat = full.reshape(cout, len(layer.widths), -1)
    w_top = flat.amax(-1)
    a_max = col_in.reshape(col_in.shape[0], -1).amax(1)
    uniform = (cont == cont[..., :1]).all(-1)
    positions = compute.positions(node)
    return Rows(torch.from_numpy(np.ascontiguousarray(cmap.column_sources(name))), block,
                w_top <= 0, cont.reshape(cout, len(layer.widths), cols // block, -1).sum(-1),
                torch.where(uniform, cont[..., 0], torch.full_like(cont[..., 0], -1.0)),
                w_top, (flat == flat[..., :1]).all(-1), a_max,
                compute.cycles_per_mac(t, a_max[None, None, :], w_top[..., None]).double(),
                torch.from_numpy(layer.col_eff), torch.from_numpy(layer.col_nom), col_in,
                prod(ws[2:]) * positions, positions, prod(ws[2:]),
                node.op == "conv" and node.attrs.get("groups", 1) > 1)


def _build_buffer(tables, name: str) -> Buffer:
    q, graph, t = tables.buffer_act[name], tables.graph, tables.target
    act, shape, base = tables.acts[q], graph[name].out_shape, tables.base
    bits, entry_class = [], []
    for i in range(len(act.widths)):
        a = BitAssignment(base.weight, {**base.act, q: act.bits(i)}, base.act_shift)
        cont = snap_up_ste(expand(act_storage_bits(a, graph, name), shape), t.act_containers).reshape(shape[0], -1)
        shift = act_shift(a, graph, name)
        shift = torch.zeros_like(cont) if shift is None else expand(shift.to(cont), shape).reshape(shape[0], -1)
        bits.append(cont.double().sum(1))
        entry_class.append(_uniform_class(cont, shift))
    block = channel_map_of(tables).block[name]
    per_channel = torch.stack(bits).reshape(len(bits), -1, block).sum(-1)
    return Buffer(per_channel, torch.stack(entry_class), prod(shape[1:]), block)


def _uniform_class(cont: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per channel: an id of its (container, shift) where every element shares them, else -1."""
    uniform = (cont == cont[:, :1]).all(1) & (shift == shift[:, :1]).all(1)
    ids = torch.unique(torch.stack([cont[:, 0], shift[:, 0]], 1), dim=0, return_inverse=True)[1]
    return torch.where(uniform, ids, torch.full_like(ids, -1))


def can_prune(tables) -> bool:
    """Whether any width leaves a row of some layer without weights (decided without building
    the per-channel tables: a group is empty at width 0 or where its base bits are all 0)."""
    return any(bool((layer.widths <= 0).any() or (_group_top(layer) <= 0).any()) for layer in tables.layers.values())


def _prunes(tables, weights: dict) -> bool:
    return any(bool((layer.widths[np.asarray(weights[n])] <= 0).any() or (_group_top(layer) <= 0).any())
               for n, layer in tables.layers.items())


def _group_top(layer) -> np.ndarray:
    return layer.base.reshape(layer.groups, -1).amax(1).numpy()


# ----------------------------------------------------------------------------- one choice


def totals(tables, weights: dict, acts: dict) -> dict[str, float] | None:
    """The cost of one choice with its pruned channels removed; None where no channel is pruned."""
    if not _prunes(tables, weights):
        return None
    per_row = {n: _per_row(tables, n, weights[n]) for n in tables.layers}
    keep = {n: (~rows(tables, n).zero[torch.arange(len(k)), k]).double() for n, k in per_row.items()}
    cmap = channel_map_of(tables)
    alive = cmap.alive(cmap.live(keep))
    out = {k: 0.0 for k in ("weight_bytes", "ebops", "bops", "cycles", "macs", "table_bytes")}
    for name, layer in tables.layers.items():
        row = _stored_weights(tables, name, weights[name], per_row[name], acts[layer.in_act], alive)
        out = {k: out[k] + row[k] for k in out}
    sizes, aligned = {}, {}
    for b, q in tables.buffer_act.items():
        buf, alive_b = buffer(tables, b), alive[b]
        sizes[b] = int(np.ceil(float((buf.bits[acts[q]] * alive_b[::buf.block]).sum()) / 8 - 1e-9))
        aligned[b] = -(-sizes[b] // tables.target.alignment) * tables.target.alignment
        out["table_bytes"] += float(_act_table(buf, acts[q], alive_b))
    return _finish(tables, out, sizes, aligned, alive)


def _per_row(tables, name: str, choice) -> torch.Tensor:
    """Each output channel's width index from its group's."""
    layer = tables.layers[name]
    return torch.from_numpy(np.repeat(np.asarray(choice).reshape(-1), tables.graph[name].out_channels // layer.groups))


def _finish(tables, out: dict, sizes: dict, aligned: dict, alive: dict) -> dict[str, float]:
    t, graph = tables.target, tables.graph
    plan = memory.plan_arena(sizes, _cached(tables, ("lifetimes",), lambda: memory.lifetimes(graph)), t.alignment)
    in_out = memory.in_out_bytes(graph, {b: torch.tensor(float(s)) for b, s in sizes.items()})
    params = float(param_bytes(tables, alive))
    latency = out.pop("cycles") + float(elementwise_cycles(tables, alive))
    return {"flash_bytes": out["weight_bytes"] + params + out["table_bytes"], "weight_bytes": out["weight_bytes"],
            "ebops": out["ebops"], "bops": out["bops"], "table_bytes": out["table_bytes"], "param_bytes": params,
            "ram_bytes": float(plan.arena),
            "ram_lower_bound": max((float(sum(aligned[b] for b in s)) for s in tables.live_sets), default=0.0),
            "ram_mcu_in_out": float(max(in_out.values())) if in_out else 0.0, "macs": out["macs"],
            "latency_cycles": latency, "energy_uj": compute.energy_uj(latency, t)}


def _stored_weights(tables, name: str, choice, k: torch.Tensor, a: int, alive: dict) -> dict[str, float]:
    """A layer's weight costs over its stored rows and columns (rows at width indices ``k``)."""
    r, node = rows(tables, name), tables.graph[name]
    index = torch.arange(len(k))
    stored_rows = alive[name] > 0.5
    columns = alive[node.inputs[0]][r.src] > 0.5
    mask = stored_rows[:, None] & columns
    m, col_in = mask.double(), r.col_in[a]
    macs_row = m.sum(1) * r.macs_per_column
    row_bytes = torch.ceil((m[:, ::r.block] * r.slot_bits[index, k]).sum(1) / 8 - 1e-9)
    return {"weight_bytes": float(row_bytes.sum()),
            "ebops": float((m * r.col_eff[index, k] * col_in).sum()),
            "bops": float((m * r.col_nom[index, k] * col_in).sum()) * r.positions,
            "cycles": float((macs_row * _stored_cycles_per_mac(tables, name, choice, k, a, mask, columns)).sum()),
            "macs": float(macs_row.sum()),
            "table_bytes": _stored_weight_table(tables, name, choice, k, mask, stored_rows)}


def _stored_cycles_per_mac(tables, name, choice, k, a, mask, columns) -> torch.Tensor:
    """Cycles per MAC of each row at its widest stored weight and the widest stored input."""
    r, index = rows(tables, name), torch.arange(len(k))
    a_max = r.col_in[a][columns].max() if bool(columns.any()) else r.a_max[a]
    w_top = r.w_top[index, k]
    if bool(r.same_bits[index, k].all()) and float(a_max) == float(r.a_max[a]):
        return r.cpm[index, k, a]
    w_c = (_full_bits(tables, name, choice) * _over_kernel(mask, tables.graph[name])).reshape(len(k), -1).amax(1)
    w_c = torch.where(mask.any(1), w_c, w_top)
    return compute.cycles_per_mac(tables.target, a_max.float(), w_c).double()


def _stored_weight_table(tables, name, choice, k, mask, stored_rows) -> float:
    """``memory.weight_table_bytes`` of the stored elements only."""
    r, index = rows(tables, name), torch.arange(len(k))
    row_class = r.row_class[index, k][mask.any(1)]
    if bool((row_class < 0).any()):  # a stored row of mixed containers: by its stored elements
        return float(_element_table(_full_bits(tables, name, choice), mask, stored_rows, tables.target))
    if len(row_class) == 0 or bool((row_class == row_class[0]).all()):
        return 0.0
    return float(stored_rows.sum())


def _full_bits(tables, name, choice) -> torch.Tensor:
    return expand(tables.layers[name].bits(choice), tables.graph[name].weight_shape)


def _over_kernel(mask: torch.Tensor, node) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (len(node.weight_shape) - 2))


def _element_table(bits: torch.Tensor, mask: torch.Tensor, stored_rows: torch.Tensor, t) -> int:
    """``memory.weight_table_bytes`` of the elements ``mask`` (rows x columns) keeps."""
    cont = snap_up_ste(bits, t.weight_containers).reshape(mask.shape[0], mask.shape[1], -1)
    valid = mask[:, :, None].expand_as(cont)
    if not bool(valid.any()):
        return 0
    hi = torch.where(valid, cont, torch.full_like(cont, -np.inf)).amax((1, 2))
    lo = torch.where(valid, cont, torch.full_like(cont, np.inf)).amin((1, 2))
    if float(hi.max()) == float(lo.min()):
        return 0
    if bool(((hi == lo) | ~valid.any(2).any(1)).all()):
        return int(stored_rows.sum())
    return memory.WEIGHT_TABLE_ELEMENT_BYTES * int(valid.sum())


# ----------------------------------------------------------------------------- shared by both


def param_bytes(tables, alive: dict) -> torch.Tensor:
    """Biases of alive rows and requantization entries of alive scales (expected where ``alive``
    holds probabilities)."""
    t, total = tables.target, torch.zeros((), dtype=torch.float64)
    for name, (biased, combine, terms) in _param_terms(tables).items():
        if biased:
            total = total + alive[name].sum() * t.param_bytes.bias
        if combine == "table":  # lookup tables: one per group of elements, those of alive channels stored
            count, channels = terms
            tables = torch.ones((), dtype=torch.float64) if count == 1 else alive[name].sum() * (count // channels)
            total = total + tables * memory.TABLE_BYTES
            continue
        if combine == "fixed":  # concat: its inputs and output are alive whole (channels.ChannelMap.pinned)
            steps = torch.as_tensor(float(terms), dtype=torch.float64)
        elif combine == "add":  # add: each input rescaled, the sum requantized
            steps = sum((_max_scales([term], alive) for term in terms), torch.zeros((), dtype=torch.float64))
        else:
            steps = _max_scales(terms, alive)
        total = total + steps * t.param_bytes.requant
    return total


def _param_terms(tables) -> dict:
    """Per requantizing node: whether it has a bias, how ``memory.requant_steps`` combines its scale
    tensors (``max`` or ``add``), and each as ``(tensor, entries along dim 0 or 0 for one scale)``;
    a concat's count as it is (``fixed``: nothing it reads or writes loses channels)."""
    def make():
        g, base, out = tables.graph, tables.base, {}
        for node in g:
            if node.op in NO_REQUANT_OPS:
                continue
            ins = [(node.name, weight_bits(base, g, node.name))] if node.has_weights else \
                [(i, act_bits(base, g, i)) for i in node.inputs]
            scales = ins + [(node.name, act_bits(base, g, node.name))]
            terms = [(n, b.shape[0] if b.numel() > 1 else 0) for n, b in scales]
            biased = node.has_weights and node.attrs.get("bias", True)
            if node.op == "concat":
                out[node.name] = (False, "fixed", memory.requant_steps(g, base, node.name))
                continue
            if node.op == "table":
                out[node.name] = (False, "table", (memory.table_count(g, base, node.name), node.out_shape[0]))
                continue
            out[node.name] = (biased, "add" if node.op == "add" else "max", terms)
        return out
    return _cached(tables, ("params",), make)


def _max_scales(terms: list, alive: dict) -> torch.Tensor:
    """``max`` of the scale counts of bits tensors over one tensor's channels: a per-tensor one is
    1, a finer one counts its entries that cover an alive channel. The finest dominates (nested
    tilings); a per-tensor 1 adds where it sees no alive channel."""
    finer = [(name, entries) for name, entries in terms if entries]
    if not finer:
        return torch.ones((), dtype=torch.float64)
    name, entries = max(finer, key=lambda term: term[1])
    covered = 1.0 - (1.0 - alive[name].reshape(entries, -1)).prod(1)
    none_alive = (1.0 - alive[name]).prod() if len(finer) < len(terms) else 0.0
    return covered.sum() + none_alive


def elementwise_cycles(tables, alive: dict) -> torch.Tensor:
    """Cycles of add / act / pooling, per alive channel."""
    work = _cached(tables, ("elementwise",), lambda: {n.name: compute.elementwise_cycles(n, tables.target)
                                                      for n in tables.graph if compute.elementwise_ops(n)})
    return sum((cycles * alive[n].mean() for n, cycles in work.items()), torch.zeros((), dtype=torch.float64))


def _act_table(buf: Buffer, a: int, alive: torch.Tensor) -> torch.Tensor:
    """Expected (exact on 0/1) layout-table bytes of a buffer at act width ``a``."""
    entry_class = buf.entry_class[a]
    if len(entry_class) == 0 or (int(entry_class[0]) >= 0 and bool((entry_class == entry_class[0]).all())):
        return torch.zeros((), dtype=torch.float64)  # one container and shift everywhere: no table
    uniform = (entry_class >= 0).double()
    u = (alive * uniform)[:, None] * F.one_hot(entry_class.clamp_min(0), max(int(entry_class.max()) + 1, 1)).double()
    mixed = alive * (1.0 - uniform)
    return table_bytes(u, mixed, buf.elements * alive * uniform, buf.elements * mixed,
                       memory.ACT_TABLE_ROW_BYTES, memory.ACT_TABLE_ROW_BYTES)


def table_bytes(uniform: torch.Tensor, mixed: torch.Tensor, elements_uniform: torch.Tensor,
                elements_mixed: torch.Tensor, row_bytes: float, element_bytes: float) -> torch.Tensor:
    """Expected bytes of a layout table over independent rows: none when every stored row shares
    one class, ``row_bytes`` per stored row when each stored row is uniform, ``element_bytes`` per
    stored element when some stored row is mixed.

    ``uniform[r, c]``: P(row r stored and uniform of class c); ``mixed[r]``: P(stored and mixed);
    ``elements_*[r]``: E[stored elements of row r, 1[that state]].
    """
    if uniform.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    stored_uniform = uniform.sum(1)
    no_mixed_elsewhere = _prod_except(1.0 - mixed, 0)
    all_in = (uniform * _prod_except(1.0 - stored_uniform[:, None] - mixed[:, None] + uniform, 0)).sum()
    rows = (stored_uniform * no_mixed_elsewhere).sum() - all_in
    elements = (elements_uniform + elements_mixed).sum() - (elements_uniform * no_mixed_elsewhere).sum()
    return row_bytes * rows + element_bytes * elements


# ----------------------------------------------------------------------------- expectations


def expected(tables, p_weights: dict, p_acts: dict) -> dict[str, torch.Tensor]:
    """Every expected cost of ``CostTables.expected`` where widths may prune channels."""
    pk = {n: p_weights[n].double().repeat_interleave(tables.graph[n].out_channels // layer.groups, 0)
          for n, layer in tables.layers.items()}
    keep = {n: (p * ~rows(tables, n).zero).sum(1) for n, p in pk.items()}
    cmap = channel_map_of(tables)
    live = cmap.live(keep)
    alive = cmap.alive(live)
    zero = torch.zeros((), dtype=torch.float64)
    out = {k: zero for k in ("weight_bytes", "ebops", "bops", "cycles", "macs", "table_bytes")}
    for name, layer in tables.layers.items():
        row = _expected_weights(tables, name, pk[name], p_acts[layer.in_act].double(), live, alive)
        out = {k: out[k] + row[k] for k in out}
    size = {}
    for b, q in tables.buffer_act.items():
        pa, buf, alive_b = p_acts[q].double(), buffer(tables, b), alive[b]
        units = alive_b[::buf.block]
        size[b] = (pa * _round_up(1.0 - units, units, buf.bits, 8 * tables.target.alignment)).sum() / 8
        tabs = torch.stack([_act_table(buf, i, alive_b) for i in range(len(pa))])
        out["table_bytes"] = out["table_bytes"] + (pa * tabs).sum()
    live_sets = [torch.stack([size[b] for b in s]).sum() for s in tables.live_sets if s]
    params = param_bytes(tables, alive)
    latency = out.pop("cycles") + elementwise_cycles(tables, alive)
    return {"flash_bytes": out["weight_bytes"] + params + out["table_bytes"], "weight_bytes": out["weight_bytes"],
            "table_bytes": out["table_bytes"], "ebops": out["ebops"], "bops": out["bops"], "param_bytes": params,
            "ram_bytes": torch.stack(live_sets).max() if live_sets else zero, "macs": out["macs"],
            "latency_cycles": latency, "energy_uj": compute.energy_uj(latency, tables.target)}


def _expected_weights(tables, name: str, pk: torch.Tensor, pa: torch.Tensor, live: dict, alive: dict) -> dict:
    """A layer's expected weight costs; ``pk`` (C, K) the rows' width probabilities."""
    r, node, cmap = rows(tables, name), tables.graph[name], channel_map_of(tables)
    stored = alive[node.inputs[0]][r.src]  # (C, I): P(column's input channel alive)
    signal = live[node.inputs[0]][r.src]
    tied = cmap.tied_live(live, name)
    keep = (pk * ~r.zero).sum(1)
    if r.grouped:  # a row is kept while its group has a live input, or a tied producer keeps it
        column = stored - (1.0 - tied)[:, None] * (stored - signal) * _prod_except(1.0 - signal, 1)
        row_kept = 1.0 - (1.0 - tied) * (1.0 - signal).prod(1)
    else:
        column, row_kept = stored, torch.ones_like(keep)
    in_bits = torch.einsum("a,aoj->oj", pa, r.col_in)
    macs_row = keep * column.sum(1) + (1.0 - keep) * tied * stored.sum(1)
    return {"weight_bytes": _expected_row_bytes(r, pk, stored, signal, tied),
            "ebops": torch.einsum("ok,oj,okj,oj->", pk, column, r.col_eff, in_bits),
            "bops": torch.einsum("ok,oj,okj,oj->", pk, column, r.col_nom, in_bits) * r.positions,
            "cycles": torch.einsum("ok,a,oka,o->", pk, pa, r.cpm, column.sum(1)) * r.macs_per_column,
            "macs": macs_row.sum() * r.macs_per_column,
            "table_bytes": _expected_weight_table(r, pk, tied, row_kept, column, stored)}


def _expected_row_bytes(r: Rows, pk, stored, signal, tied) -> torch.Tensor:
    """E[sum_o ceil(X_o / 8)], ``X_o`` the container bits of row ``o``'s stored columns."""
    if not r.grouped:  # every row reads the same channels
        present = stored[0, ::r.block]
        return (pk * _round_up(1.0 - present, present, r.slot_bits, 8)).sum() / 8
    present, live = stored[:, None, ::r.block], signal[:, None, ::r.block]
    nbytes = _round_up(1.0 - present, present, r.slot_bits, 8)
    # no bytes while the row's group has no live input and no tie keeps it
    nbytes = nbytes - (1.0 - tied)[:, None] * _round_up(1.0 - present, present - live, r.slot_bits, 8)
    return (pk * nbytes).sum() / 8


def _expected_weight_table(r: Rows, pk, tied, row_kept, column, stored) -> torch.Tensor:
    """Expected ``memory.weight_table_bytes`` of the stored rows (rows classed by all their columns)."""
    p_stored = pk * torch.where(r.zero, tied[:, None], row_kept[:, None])  # (C, K) stored at width k
    n = torch.where(r.zero, tied[:, None] * stored.sum(1, keepdim=True), column.sum(1, keepdim=True)) * r.kernel
    mixed = r.row_class < 0
    classes = torch.unique(r.row_class[~mixed])
    onehot = (r.row_class[..., None] == classes).double()
    tab = table_bytes(torch.einsum("ok,okc->oc", p_stored, onehot), (p_stored * mixed).sum(1),
                      (pk * n * ~mixed).sum(1), (pk * n * mixed).sum(1), 1, memory.WEIGHT_TABLE_ELEMENT_BYTES)
    if r.grouped:
        return tab
    return tab * (1.0 - (1.0 - stored[0, ::r.block]).prod())  # no table without a stored column


# ----------------------------------------------------------------------------- sums of slots


def _round_up(absent: torch.Tensor, present: torch.Tensor, weight: torch.Tensor, modulus: int) -> torch.Tensor:
    """``E[M ceil(X / M) 1[E]]`` over the last dim's independent slots, ``X = sum_s weight_s`` over
    the present slots (integer weights), ``E`` every slot absent or present: ``absent_s + present_s``
    is P(slot's event), below 1 for an unnormalised (conditioned) sum.

    ``M ceil(X / M) = X + (-X mod M)``: the mean of ``X`` is linear; ``X mod M`` has its exact
    distribution by cyclic convolution of the slots' (``_residues``).
    """
    mean = (present * weight * _prod_except(absent + present, -1)).sum(-1)
    pad = torch.remainder(-torch.arange(modulus, dtype=torch.float64), modulus)
    return mean + (_residues(absent, present, weight, modulus) * pad).sum(-1)


def _residues(absent, present, weight, modulus: int) -> torch.Tensor:
    """The (unnormalised) distribution of ``X mod M``, shape ``(..., M)``."""
    r = torch.remainder(weight.round().long(), modulus)
    if absent.dim() == 1 and r.dim() > 1:  # slots shared by every row: one sum per distinct row of weights
        rows = r.reshape(-1, r.shape[-1])
        distinct, row_of = torch.unique(rows, dim=0, return_inverse=True)
        if len(distinct) < len(rows):
            return _slot_sums(absent, present, distinct, modulus)[row_of].reshape(r.shape[:-1] + (modulus,))
    return _slot_sums(absent, present, r, modulus)


def _slot_sums(absent, present, r: torch.Tensor, modulus: int) -> torch.Tensor:
    """``_residues`` of the residues ``r`` of the slots' weights."""
    zero = torch.zeros_like(r)
    dist = absent[..., None] * F.one_hot(zero, modulus) + present[..., None] * F.one_hot(r, modulus)
    delta = F.one_hot(torch.zeros((), dtype=torch.long), modulus).double()
    if dist.shape[-2] == 0:
        return delta.expand(dist.shape[:-2] + (modulus,))
    idx = torch.remainder(torch.arange(modulus)[None, :] - torch.arange(modulus)[:, None], modulus)  # [t, r]
    while dist.shape[-2] > 1:
        if dist.shape[-2] % 2:
            dist = torch.cat([dist, delta.expand(dist.shape[:-2] + (1, modulus))], -2)
        a, b = dist[..., 0::2, :], dist[..., 1::2, :]
        dist = (a[..., :, None] * b[..., idx]).sum(-2)
    return dist[..., 0, :]


def _prod_except(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``prod_{j != i} x_j`` along ``dim`` for every ``i`` (no division: zeros are fine)."""
    x = x.movedim(dim, -1)
    ones = torch.ones_like(x[..., :1])
    before = torch.cumprod(torch.cat([ones, x[..., :-1]], -1), -1)
    after = torch.cumprod(torch.cat([ones, x.flip(-1)[..., :-1]], -1), -1).flip(-1)
    return (before * after).movedim(-1, dim)
