"""Generate the C99 library of a lowered model: ``model.h``, ``model.c``, ``model_weights.c`` and the
shared ``mixprec_runtime.h``.

* ``model_weights.c``: ``<prefix>_weights``, one byte array in section ``.mixprec_weights``,
  layer after layer: packed weights (each output channel from a byte boundary), int32 biases,
  requantization entries (multiplier, shift, zero point at the target's ``param_bytes``),
  little-endian and unaligned, so there is no padding. The tables that say where elements are when
  containers are not uniform (per-channel / per-element widths, buffer layouts), clamp tables of
  per-element grids and shifts a target stores in 0 bytes go to ``<prefix>_aux`` in
  ``.mixprec_aux``. Both sections are FLASH: their sum is what ``mixprec.cost_report`` counts as
  ``flash_bytes`` (``flash_sections`` measures it without writing anything).
* ``model.c``: the arena ``static uint8_t <prefix>_arena[N]`` in ``.mixprec_arena``, laid out by the
  cost model's planner (``N`` = the predicted peak RAM), constant layer descriptors and
  ``<prefix>_model_run``; then the input helpers ``<prefix>_quantize_input`` (raw floats) and
  ``<prefix>_quantize_input_i8`` (raw int8 values): the run's preprocessing, whose constants
  ``model.h`` carries, and the reference's input quantization, in double.

``generate(ig, graph, assignment, target, out_dir)`` writes the files and returns a :class:`CModel`
with the sizes and the cost model's figures side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ...cost.memory import lifetimes, param_flash_bytes, plan_arena, requant_steps
from ...cost.report import evaluate
from ...data.base import Preprocessing
from ...lower import IntGraph
from ...numerics import Requant
from ..base import ExportError
from ..checks import value_ranges
from ..names import identifiers
from . import layout as L
from .runtime import RUNTIME_H

RUNTIME_FILE = "mixprec_runtime.h"

_C_TYPES = (("int8_t", -(2**7), 2**7 - 1, np.int8), ("uint8_t", 0, 2**8 - 1, np.uint8),
            ("int16_t", -(2**15), 2**15 - 1, np.int16), ("uint16_t", 0, 2**16 - 1, np.uint16),
            ("int32_t", -(2**31), 2**31 - 1, np.int32))


def c_type(lo: int, hi: int) -> tuple[str, type]:
    """The narrowest C integer type holding ``[lo, hi]``."""
    for name, tlo, thi, dt in _C_TYPES:
        if tlo <= lo and hi <= thi:
            return name, dt
    raise ExportError(f"values in [{lo}, {hi}] do not fit int32")


@dataclass
class CModel:
    """What ``generate`` wrote, with the figures to compare against the cost model."""

    prefix: str
    out_dir: Path
    files: list[str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    in_ctype: str
    out_ctype: str
    in_dtype: type
    out_dtype: type
    weights_bytes: int
    aux_bytes: int
    arena_bytes: int
    max_k: int
    cost: dict  # flash_bytes, weight_bytes, param_bytes, ram_bytes of the cost model
    packed_weight_bytes: int
    param_bytes: int
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arena_plan: dict = field(default_factory=dict)

    @property
    def flash_bytes(self) -> int:
        """What the library stores in FLASH: both constant sections."""
        return self.weights_bytes + self.aux_bytes

    @property
    def flash_matches(self) -> bool:
        return self.flash_bytes == self.cost["flash_bytes"]

    @property
    def ram_matches(self) -> bool:
        return self.arena_bytes == self.cost["ram_bytes"]

    def summary(self) -> dict:
        return {"weights_section_bytes": self.weights_bytes, "aux_section_bytes": self.aux_bytes,
                "flash_bytes": self.flash_bytes, "arena_bytes": self.arena_bytes, "packed_weight_bytes": self.packed_weight_bytes,
                "param_bytes": self.param_bytes, "cost_model": dict(self.cost),
                "flash_matches_cost_model": self.flash_matches, "ram_matches_cost_model": self.ram_matches,
                "input_ctype": self.in_ctype, "output_ctype": self.out_ctype,
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "stack_scratch_bytes": 4 * self.max_k, "layers": self.layers, "arena_plan": self.arena_plan}


class _Emitter:
    def __init__(self, ig: IntGraph, graph, assignment, target, prefix: str):
        self.ig, self.graph, self.a, self.t, self.p = ig, graph, assignment, target, prefix
        self.sym = c_symbols(graph)
        self.weights, self.aux = L.Store(), L.Store()
        self.decls: list[str] = []
        self.calls: list[str] = []
        self.notes: list[str] = []
        self.layers: list[dict] = []
        self.max_k = 0
        self.layouts: dict = {}  # buffer -> its ActLayout
        self.packed = 0
        self.params = 0

    # -- references into the blobs (address constants, patched once the aux blob is known) --------
    def wref(self, off: int) -> str:
        return f"{self.p}_weights + {off}"

    def aref(self, off: int) -> str:
        return f"{self.p}_aux + {off}"

    # -- parameters --------------------------------------------------------------------------------
    def requant(self, rq, shape, n_cost: int | None, what: str, out: str | None = None,
                post_shift=None, out_offset: int = 0) -> tuple[str, int]:
        """A ``mp_rq`` initializer; returns (text, bytes in the weights blob). Power-of-two shifts of a
        per-element grid (``post_shift``) are stored relative to it when that needs fewer entries:
        the element's storage shift in tensor ``out`` (from its element ``out_offset`` on: one input
        of a concatenation) is added back at run time."""
        pb = self.t.param_bytes
        rel = "NULL"
        if rq.kind == "pow2" and post_shift is not None:
            base = np.broadcast_to(rq.shift, shape) - np.broadcast_to(post_shift, shape)
            if len(L.entries([base], shape, n_cost).rows) < len(L.entries([rq.shift], shape, n_cost).rows):
                rq, rel = Requant("pow2", np.zeros((), np.int64), base), self.act_ref(out)
        if rq.kind == "tflm":
            ent = L.entries([rq.multiplier, rq.shift], shape, n_cost)
            mult, shift = ent.rows[:, 0], ent.rows[:, 1]
            widths = (pb.multiplier, pb.shift, pb.zero_point)
            in_blob = pb.multiplier >= 4 and pb.shift >= 1
            kind = "MP_TFLM"
        else:
            ent = L.entries([rq.shift], shape, n_cost)
            shift = ent.rows[:, 0]
            mult = np.zeros_like(shift)
            widths = (pb.multiplier, pb.shift, pb.zero_point)
            in_blob = pb.shift >= 1
            kind = "MP_POW2"
        if in_blob:
            try:
                blob = b"".join(L.le([m], widths[0]) + L.le([s], widths[1]) + L.le([0], widths[2])
                                for m, s in zip(mult.tolist(), shift.tolist()))
            except ValueError:
                in_blob = False
        if not in_blob:
            widths = (4 if rq.kind == "tflm" else 0, 1, 0)
            blob = b"".join(L.le([m], widths[0]) + L.le([s], widths[1]) for m, s in zip(mult.tolist(), shift.tolist()))
            self.notes.append(f"layer {what!r}: requantization parameters kept in .mixprec_aux ({len(blob)} B): the "
                              f"target stores multiplier/shift in {self.t.param_bytes.multiplier}/"
                              f"{self.t.param_bytes.shift} bytes, which cannot hold them")
            ref = self.aref(self.aux.add(blob))
            counted = 0
        else:
            ref = self.wref(self.weights.add(blob))
            counted = len(blob)
        text = f"{{ {ref}, {ent.div}u, {kind}, {widths[0]}, {widths[1]}, {widths[2]}, {rel}, {out_offset}u }}"
        return text, counted

    def clamp(self, grid, shape) -> str:
        ent = L.entries([grid.lo, grid.hi], shape)
        if ent.div == 0 and len(ent.rows) == 1:
            return f"{{ NULL, 0u, {int(ent.rows[0, 0])}, {int(ent.rows[0, 1])} }}"
        off = self.aux.add(L.le(ent.rows.reshape(-1), 4))
        return f"{{ {self.aref(off)}, {ent.div}u, 0, 0 }}"

    # -- tensors -----------------------------------------------------------------------------------
    def act_ref(self, name: str) -> str:
        return f"&{self.p}_t_{self.sym[L.layout_source(self.graph, name)]}"


def c_symbols(graph) -> dict[str, str]:
    """The C name of each layer's symbols (``<prefix>_t_<name>`` its tensor, ``<prefix>_n_<name>``
    its descriptor): the layer name made C-safe, ``features.3`` -> ``features_3``, distinct for
    every layer (see :func:`mixprec.export.names.identifiers`)."""
    return identifiers([n.name for n in graph])


def _comment(name: str) -> str:
    """A layer name inside a C comment (which ``*/`` would end)."""
    return name.replace("*/", "* /")


def generate(ig: IntGraph, graph, assignment, target, out_dir: str | Path, prefix: str = "mixprec",
             stem: str = "model", preprocessing: Preprocessing | None = None) -> CModel:
    """Write ``<stem>.h``, ``<stem>.c``, ``<stem>_weights.c`` and ``mixprec_runtime.h`` into ``out_dir``;
    the input helpers apply ``preprocessing`` (None: the identity) to raw values."""
    out_dir = Path(out_dir)
    model, files = _build(ig, graph, assignment, target, out_dir, prefix, stem, preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, make in files.items():
        (out_dir / fname).write_text(make())
    model.files = list(files)
    return model


def flash_sections(ig: IntGraph, graph, assignment, target, report=None) -> dict[str, int]:
    """Bytes of the library's FLASH sections for this model, laid out as ``generate`` would write
    them, without writing anything: ``{".mixprec_weights": n, ".mixprec_aux": m}``. ``report``:
    the cost model's report of this assignment when the caller has it (else it is evaluated)."""
    model, _ = _build(ig, graph, assignment, target, Path("."), "mixprec", "model", report=report)
    return {".mixprec_weights": model.weights_bytes, ".mixprec_aux": model.aux_bytes}


def _build(ig: IntGraph, graph, assignment, target, out_dir: Path, prefix: str, stem: str,
           preprocessing: Preprocessing | None = None, report=None):
    """The model's figures and, per file name, a function that renders its text."""
    if list(n.name for n in ig.nodes) != list(n.name for n in graph):
        raise ExportError("the integer program and the graph disagree on their nodes")
    if report is None:
        report = evaluate(graph, assignment, target)
    ranges = value_ranges(ig)
    e = _Emitter(ig, graph, assignment, target, prefix)
    P = prefix.upper()

    # -- activation buffers and the arena ------------------------------------------------------------
    layouts: dict[str, L.ActLayout] = {}
    views: dict[str, L.ActLayout] = {}  # channels read in place (narrow): no buffer of their own
    for node in ig.nodes:
        if node.op == "narrow":
            views[node.name] = L.view_layout(graph, ig, node.name, {**layouts, **views}, target.alignment)
        elif node.op != "flatten":
            layouts[node.name] = L.act_layout(graph, assignment, target, ig, node.name, ranges, {**layouts, **views})
    e.layouts = {**layouts, **views}
    widened = [w for t in layouts.values() for w in t.widened]
    plan = report.plan
    for name, t in layouts.items():
        if not t.widened and t.nbytes != t.cost_bytes:
            raise ExportError(f"buffer {name!r}: {t.nbytes} B packed but the cost model counts {t.cost_bytes} B")
    if widened:
        e.notes += widened
        plan = plan_arena({b: t.nbytes for b, t in layouts.items()}, lifetimes(graph), target.alignment)
        same = plan.arena == report.totals["ram_bytes"]
        e.notes.append(f"arena re-planned with the wider buffers: {plan.arena} B "
                       + ("(the predicted size still holds)" if same else
                          f"instead of the predicted {report.totals['ram_bytes']} B"))
    arena = int(plan.arena)
    for name, t in layouts.items():
        tab = "NULL"
        if t.table:
            tab = e.aref(e.aux.add(t.table))
        e.decls.append(f"/* {_comment(name)}: {'x'.join(map(str, t.shape))}, {t.nbytes} B at arena offset {plan.offsets[name]}, "
                       f"{t.mode}{'' if t.mode != L.UNIFORM else f' {int(t.bits[0])}-bit'} "
                       f"{'signed' if t.signed else 'unsigned'} */\n"
                       f"static const mp_act {prefix}_t_{e.sym[name]} = "
                       f"{{ {prefix}_arena + {plan.offsets[name]}, {tab}, "
                       f"{t.per_ch}u, {t.mode}, {int(t.bits[0]) if t.mode == L.UNIFORM else 0}, "
                       f"{int(t.shift[0]) if t.mode == L.UNIFORM else 0}, {int(t.signed)} }};")
    for name, t in views.items():
        e.decls.append(f"/* {_comment(name)}: {'x'.join(map(str, t.shape))}, channels of {_comment(t.buffer)} read in "
                       f"place from its byte {t.first_byte} */\n"
                       f"static const mp_act {prefix}_t_{e.sym[name]} = "
                       f"{{ {prefix}_arena + {plan.offsets[t.buffer] + t.first_byte}, NULL, 0u, {t.mode}, "
                       f"{int(t.bits[0])}, {int(t.shift[0])}, {int(t.signed)} }};")

    # -- input and output ----------------------------------------------------------------------------
    inp = ig["input"]
    in_lo, in_hi = int(np.min(inp.grid.lo)), int(np.max(inp.grid.hi))
    in_ctype, in_dtype = c_type(in_lo, in_hi)
    out_lo, out_hi = (int(np.min(ranges[ig.output][0])), int(np.max(ranges[ig.output][1])))
    out_ctype, out_dtype = c_type(out_lo, out_hi)
    in_numel = int(np.prod(inp.out_shape))
    out_shape = tuple(ig[ig.output].out_shape)
    out_numel = int(np.prod(out_shape))
    e.decls.append(f"static const mp_clamp {prefix}_input_clamp = {e.clamp(inp.grid, inp.out_shape)};")
    pre = preprocessing or Preprocessing()
    if in_numel % pre.channels:
        raise ExportError(f"the preprocessing has {pre.channels} channels, which do not divide the model's "
                          f"{in_numel} inputs")

    # -- layers --------------------------------------------------------------------------------------
    for node in ig.nodes:
        gnode = graph[node.name]
        if node.op in ("input", "flatten", "narrow"):
            continue
        desc = f"{prefix}_n_{e.sym[node.name]}"
        shape = tuple(node.out_shape)
        row = {"name": node.name, "symbol": desc, "op": node.op, "weight_bytes": 0, "param_bytes": 0,
               "cost_weight_bytes": 0, "cost_param_bytes": param_flash_bytes(graph, assignment, node.name, target)}
        if node.op in ("conv", "linear"):
            text, row = _weighted(e, node, gnode, row)
            e.decls.append(f"/* {_comment(node.name)}: {node.op} {_describe(node)} */\nstatic const mp_conv {desc} = {text};")
            e.calls.append(f"    mp_conv_run(&{desc}, wbuf);")
        elif node.op in ("maxpool", "avgpool"):
            e.decls.append(f"/* {_comment(node.name)}: {node.op} {_describe(node)} */\n"
                           f"static const mp_pool {desc} = {_pool(e, node)};")
            e.calls.append(f"    mp_pool_run(&{desc}, {int(node.op == 'maxpool')});")
        elif node.op == "zeropad":
            e.decls.append(f"/* {_comment(node.name)}: zeros around the positions */\n"
                           f"static const mp_zpad {desc} = {_zeropad(e, node)};")
            e.calls.append(f"    mp_zpad_run(&{desc});")
        elif node.op == "add":
            text, counted = _add(e, node, shape)
            row["param_bytes"] = counted
            e.decls.append(f"/* {_comment(node.name)}: add */\nstatic const mp_add {desc} = {text};")
            e.calls.append(f"    mp_add_run(&{desc});")
        elif node.op in ("act", "slice"):
            n_cost = requant_steps(graph, assignment, node.name)
            rq, counted = e.requant(node.params["requant"], shape, n_cost, node.name, node.name, node.grid.post_shift)
            row["param_bytes"] = counted
            e.decls.append(f"/* {_comment(node.name)}: {node.attrs.get('activation', 'act')} */\nstatic const mp_actfn {desc} = "
                           f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.name)}, {int(np.prod(shape))}u, 0u, "
                           f"{_slice_start(e, node)}u, {rq}, {e.clamp(node.grid, shape)} }};")
            e.calls.append(f"    mp_act_run(&{desc});")
        elif node.op == "concat":
            row["param_bytes"] = _concat(e, node, desc)
        elif node.op == "pad":
            row["param_bytes"] = _pad(e, node, desc)
        elif node.op == "mul":
            n_cost = requant_steps(graph, assignment, node.name)
            rq, row["param_bytes"] = e.requant(node.params["requant"], shape, n_cost, node.name, node.name,
                                               node.grid.post_shift)
            e.params += row["param_bytes"]
            numel = int(np.prod(shape))
            per = numel // int(np.prod(e.ig[node.inputs[1]].out_shape))
            e.decls.append(f"/* {_comment(node.name)}: product */\nstatic const mp_mul {desc} = "
                           f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.inputs[1])}, {e.act_ref(node.name)}, "
                           f"{numel}u, {per}u, {rq}, {e.clamp(node.grid, shape)} }};")
            e.calls.append(f"    mp_mul_run(&{desc});")
        elif node.op == "table":
            text, row["param_bytes"] = _table(e, node)
            e.decls.append(f"/* {_comment(node.name)}: {node.attrs['function']} lookup */\nstatic const mp_lut {desc} = {text};")
            e.calls.append(f"    mp_lut_run(&{desc});")
        else:
            raise ExportError(f"layer {node.name!r}: op {node.op!r} has no C kernel")
        if row["param_bytes"] != row["cost_param_bytes"] or row["weight_bytes"] != row["cost_weight_bytes"]:
            e.notes.append(f"layer {node.name!r}: stores {row['weight_bytes']} B of weights and {row['param_bytes']} B "
                           f"of parameters; the cost model counts {row['cost_weight_bytes']} B and "
                           f"{row['cost_param_bytes']} B")
        e.layers.append(row)

    cost = {k: int(report.totals[k]) for k in ("flash_bytes", "weight_bytes", "param_bytes", "table_bytes", "ram_bytes")}
    model = CModel(prefix, out_dir, [], tuple(inp.out_shape), out_shape, in_ctype, out_ctype, in_dtype, out_dtype,
                   len(e.weights), len(e.aux), arena, e.max_k, cost, e.packed, e.params, e.layers, e.notes,
                   {"offsets": {k: int(v) for k, v in plan.offsets.items()}, "arena": arena,
                    "alignment": int(plan.alignment)})
    if model.flash_bytes != cost["flash_bytes"]:
        e.notes.append(f"FLASH sections {model.weights_bytes} + {model.aux_bytes} B != the cost model's flash_bytes "
                       f"{cost['flash_bytes']} B (mixprec.cost_report counts the sections of the lowered model)")
    if arena != cost["ram_bytes"]:
        e.notes.append(f"arena {arena} B != the cost model's ram_bytes {cost['ram_bytes']} B")

    files = {f"{stem}.h": lambda: _header(model, ig, inp, out_lo, out_hi, in_lo, in_hi, in_numel, out_numel, P, stem,
                                          pre),
             f"{stem}.c": lambda: _source(model, e, ig, graph, layouts, in_numel, out_numel, P, stem,
                                          _input_helpers(model, inp.grid, tuple(inp.out_shape), P)),
             f"{stem}_weights.c": lambda: _weights_source(model, e, P, stem),
             RUNTIME_FILE: lambda: RUNTIME_H}
    return model, files


def _describe(node) -> str:
    a = node.attrs
    if node.op == "linear":
        return f"{node.params['weight'].shape[1]} -> {node.out_shape[0]}"
    parts = [f"kernel {a['kernel_size']}", f"stride {a['stride']}", f"padding {a['padding']}"]
    if node.op == "conv":
        parts += [f"dilation {a['dilation']}", f"groups {a['groups']}"]
    return ", ".join(parts) + f" -> {'x'.join(map(str, node.out_shape))}"


def _spatial(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of a 1-D or 2-D feature map (1-D: height 1), or a vector (1 x 1)."""
    if len(shape) == 1:
        return shape[0], 1, 1
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    return shape[0], shape[1], shape[2]


def _hw(t) -> tuple[int, int]:
    t = tuple(t)
    return (1, t[0]) if len(t) == 1 else (t[0], t[1])


def _weighted(e: _Emitter, node, gnode, row: dict) -> tuple[str, dict]:
    from ...cost.memory import weight_flash_bytes

    p = node.params
    w = np.asarray(p["weight"], dtype=np.int64)
    wbits = e.a.weight[node.name]
    wl = L.weight_layout(node.name, w, wbits, e.t)
    cost_w = int(round(float(weight_flash_bytes(gnode, wbits.detach().float(), e.t))))
    woff = e.weights.add(wl.data)
    wtab = e.aref(e.aux.add(wl.table)) if wl.table else "NULL"
    cout = w.shape[0]
    k = int(np.prod(w.shape[1:]))
    e.max_k = max(e.max_k, k)
    has_bias = gnode.attrs.get("bias", True)
    bias = np.asarray(p["bias"], dtype=np.int64).reshape(-1)
    counted = 0
    if has_bias:
        bb = e.t.param_bytes.bias
        if bb >= 1 and np.all(np.abs(bias) < 2 ** (8 * bb - 1)):
            blob = L.le(bias, bb)
            bias_ref = e.wref(e.weights.add(blob))
            counted += len(blob)
        else:
            bb = 4
            bias_ref = e.aref(e.aux.add(L.le(bias, 4)))
            e.notes.append(f"layer {node.name!r}: biases kept in .mixprec_aux (the target stores them in "
                           f"{e.t.param_bytes.bias} bytes)")
    else:
        if np.any(bias != 0):
            raise ExportError(f"layer {node.name!r} has no bias but a non-zero integer bias")
        bb, bias_ref = 0, "NULL"
    shape = tuple(node.out_shape)
    n_cost = requant_steps(e.graph, e.a, node.name)
    rq, rq_bytes = e.requant(p["requant"], shape, n_cost, node.name, node.name, node.grid.post_shift)
    counted += rq_bytes
    e.packed += len(wl.data)
    e.params += counted
    cin, hin, win = _spatial(e.ig[node.inputs[0]].out_shape) if node.op == "conv" else (w.shape[1], 1, 1)
    _, hout, wout = _spatial(shape) if node.op == "conv" else (cout, 1, 1)
    if node.op == "conv":
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_hw(a["kernel_size"]), _hw(a["stride"]), _hw(a["padding"]),
                                                  _hw(a["dilation"]))
        if a["dims"] == 1:
            ph, dh, sh = 0, 1, 1
        groups = a["groups"]
    else:
        kh = kw = sh = sw = dh = dw = groups = 1
        ph = pw = 0
    text = (f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.name)},\n"
            f"    {{ {e.wref(woff)}, {wtab}, {wl.mode}, {wl.bits} }},\n"
            f"    {bias_ref},\n    {rq},\n    {e.clamp(node.grid, shape)},\n"
            f"    {cin}u, {hin}u, {win}u, {cout}u, {hout}u, {wout}u,\n"
            f"    {kh}u, {kw}u, {sh}u, {sw}u, {ph}u, {pw}u, {dh}u, {dw}u, {groups}u, {bb} }}")
    row.update(weight_bytes=len(wl.data), param_bytes=counted, cost_weight_bytes=cost_w,
               weight_mode=wl.mode, weight_containers=sorted(set(np.unique(
                   L.containers(wbits, tuple(w.shape), e.t.weight_containers)).tolist())))
    return text, row


def _pool(e: _Emitter, node) -> str:
    a = node.attrs
    c, hin, win = _spatial(e.ig[node.inputs[0]].out_shape)
    _, hout, wout = _spatial(node.out_shape)
    (kh, kw), (sh, sw), (ph, pw) = _hw(a["kernel_size"]), _hw(a["stride"]), _hw(a["padding"])
    if a["dims"] == 1:
        sh, ph = 1, 0
    exclude = int(not a.get("count_include_pad", True))
    return (f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.name)}, {c}u, {hin}u, {win}u, {hout}u, {wout}u, "
            f"{kh}u, {kw}u, {sh}u, {sw}u, {ph}u, {pw}u, {exclude} }}")


def _add(e: _Emitter, node, shape) -> tuple[str, int]:
    """TFLite-Micro add (inputs shifted left, each rescaled, summed, requantized) or the fixed-point
    add, whose per-input alignments are stored as power-of-two rescale entries (exact left shifts):
    one kernel, ``requant(requant_a(a << ls) + requant_b(b << ls))``."""
    p = node.params
    numel = int(np.prod(shape))
    n_out = L.act_scales(e.graph, e.a, node.name)
    n_a, n_b = (L.act_scales(e.graph, e.a, i) for i in node.inputs)
    rq, counted = e.requant(p["requant"], shape, n_out, node.name, node.name, node.grid.post_shift)
    if "left_shift" in p:
        req_a, req_b, ls = p["requant_a"], p["requant_b"], int(p["left_shift"])
    else:
        align = lambda k: Requant("pow2", np.zeros((), np.int64), np.array(-int(p[k]), np.int64))  # noqa: E731
        req_a, req_b, ls = align("align_a"), align("align_b"), 0
    ra, ca = e.requant(req_a, shape, n_a, node.name)
    rb, cb = e.requant(req_b, shape, n_b, node.name)
    counted += ca + cb
    e.params += counted
    text = (f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.inputs[1])}, {e.act_ref(node.name)}, {numel}u, {ls},\n"
            f"    {ra},\n    {rb},\n    {rq},\n    {e.clamp(node.grid, shape)} }}")
    return text, counted


def _slice_start(e: _Emitter, node) -> int:
    """The input element where a slice's channels begin (channel-major buffers); 0 for an activation."""
    if node.op != "slice":
        return 0
    src_shape = e.ig[node.inputs[0]].out_shape
    return node.attrs["start"] * int(np.prod(src_shape[1:]))


def _concat(e: _Emitter, node, desc: str) -> int:
    """One rescale-and-store per input into its channels of the output buffer (``mp_act_run`` with
    the element where they begin); returns the requantization bytes stored."""
    from ...cost.memory import concat_out_scales

    p, counted, start = node.params, 0, 0
    n_out = L.act_scales(e.graph, e.a, node.name)
    for i, src in enumerate(node.inputs):
        n_cost = max(L.act_scales(e.graph, e.a, src), concat_out_scales(e.graph[node.name], n_out, i))
        part = {k: p.get(f"{k}_{i}") for k in ("requant", "lo", "hi", "post_shift")}
        counted += _store_channels(e, node, f"{desc}_{i}", src, part, n_cost, start, f"input {i} ({_comment(src)})")
        start += int(np.prod(e.ig[src].out_shape))
    e.params += counted
    return counted


def _store_channels(e: _Emitter, node, desc: str, src: str, part: dict, n_cost: int, start: int, what: str) -> int:
    """``src`` rescaled (``part``: its ``requant``, ``lo``, ``hi``, ``post_shift``) into ``node``'s buffer
    from element ``start`` on (``mp_act_run``); returns the requantization bytes stored."""
    shape = tuple(e.ig[src].out_shape)
    rq, counted = e.requant(part["requant"], shape, n_cost, node.name, node.name, part["post_shift"], start)
    grid = replace(node.grid, lo=part["lo"], hi=part["hi"])
    e.decls.append(f"/* {_comment(node.name)}: {what} */\nstatic const mp_actfn {desc} = "
                   f"{{ {e.act_ref(src)}, {e.act_ref(node.name)}, {int(np.prod(shape))}u, {start}u, 0u, {rq}, "
                   f"{e.clamp(grid, shape)} }};")
    e.calls.append(f"    mp_act_run(&{desc});")
    return counted


def _zeropad(e: _Emitter, node) -> str:
    """``mp_zpad``: channels, the input's and the output's rows and columns, the first row and column."""
    (c, *inner), (_, *outer) = e.ig[node.inputs[0]].out_shape, node.out_shape
    a = node.attrs
    hin, win = (1, inner[0]) if a["dims"] == 1 else inner
    hout, wout = (1, outer[0]) if a["dims"] == 1 else outer
    top, left = (0, a["padding"][0]) if a["dims"] == 1 else a["padding"]
    return (f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.name)}, {c}u, {hin}u, {win}u, {hout}u, {wout}u, "
            f"{top}u, {left}u }}")


def _pad(e: _Emitter, node, desc: str) -> int:
    """The input rescaled and stored into its channels of the output buffer (``_store_channels``),
    code 0 in the channels before and after; returns the requantization bytes stored."""
    src = node.inputs[0]
    shape = tuple(e.ig[src].out_shape)
    numel, total = int(np.prod(shape)), int(np.prod(node.out_shape))
    start = node.attrs["before"] * int(np.prod(shape[1:]))
    part = {k: node.params.get(k) for k in ("requant", "lo", "hi", "post_shift")}
    e.calls.append(f"    mp_zero_run({e.act_ref(node.name)}, 0u, {start}u);")
    counted = _store_channels(e, node, desc, src, part, requant_steps(e.graph, e.a, node.name), start,
                              f"zero channels around {_comment(src)}")
    e.calls.append(f"    mp_zero_run({e.act_ref(node.name)}, {start + numel}u, {total - start - numel}u);")
    e.params += counted
    return counted


def _table(e: _Emitter, node) -> tuple[str, int]:
    """The node's lookup tables, one per group of elements the cost model counts (each a table of the
    lowered program's), as 256 bytes of output codes in the weights blob; returns (initializer, bytes)."""
    from ...cost.memory import TABLE_BYTES, table_count

    p = node.params
    numel = int(np.prod(node.out_shape))
    shift = np.broadcast_to(p.get("in_shift", np.zeros((), np.int64)), node.out_shape).reshape(-1)
    if not np.array_equal(e.layouts[L.layout_source(e.graph, node.inputs[0])].shift, shift):
        raise ExportError(f"layer {node.name!r}: its input is stored on other grids than the ones its lookup table "
                          f"reads (an average pooling of a per-channel fixed-point grid); QONNX exports it")
    count = table_count(e.graph, e.a, node.name)
    group = np.broadcast_to(p["offset"], node.out_shape).reshape(-1)[:: numel // count] // TABLE_BYTES
    rows = np.asarray(p["table"], dtype=np.int64).reshape(-1, TABLE_BYTES)[group]
    blob = (rows.astype(np.int8) if node.grid.signed else rows.astype(np.uint8)).tobytes()
    e.params += len(blob)
    text = (f"{{ {e.act_ref(node.inputs[0])}, {e.act_ref(node.name)}, {numel}u, {0 if count == 1 else numel // count}u, "
            f"{e.wref(e.weights.add(blob))}, {int(p['base'])}, {int(node.grid.signed)} }}")
    return text, len(blob)


def _fmt_float(x: float) -> str:
    return repr(float(x))


def _header(m: CModel, ig, inp, out_lo, out_hi, in_lo, in_hi, in_numel, out_numel, P, stem,
            pre: Preprocessing) -> str:
    g = inp.grid
    per_element_in = np.asarray(g.elem_scale).size > 1
    dims_in = "".join(f"#define {P}_INPUT_DIM{i} {d}\n" for i, d in enumerate(m.input_shape))
    dims_out = "".join(f"#define {P}_OUTPUT_DIM{i} {d}\n" for i, d in enumerate(m.output_shape))
    scale_note = ("\n *   Per-element input grid: element i divides by its own scale, a power-of-two multiple of\n"
                  " *   the input scale (elem_scale in the export's input_grid.npz)." if per_element_in else "")
    return f"""/* {stem}.h -- generated by mixprec: integer inference of one quantized model (C99, no malloc).
 *
 * int {m.prefix}_model_run(const {m.prefix}_in_t *input_q, {m.prefix}_out_t *output_q);
 *
 * input_q: the input already quantized, {in_numel} integers in row-major (C, H, W) order:
 *   input_q[i] = round_half_even(x[i] / {P}_INPUT_SCALE) (zero point {P}_INPUT_ZERO_POINT, every grid is
 *   symmetric), saturated to the input grid's range (within [{P}_INPUT_MIN, {P}_INPUT_MAX]).{scale_note}
 * output_q: {out_numel} integers on the output grid: real output = output_q[i] * {P}_OUTPUT_SCALE.
 * Returns 0. Not reentrant: every call uses the one static activation arena.
 * Memory: weights and parameters in section .mixprec_weights ({P}_WEIGHTS_BYTES bytes) and layout tables
 * in .mixprec_aux ({P}_AUX_BYTES bytes): together what the cost model counts as FLASH; the arena in
 * .mixprec_arena ({P}_ARENA_BYTES bytes, the predicted peak RAM),
 * plus {P}_STACK_SCRATCH_BYTES bytes of stack for one output channel's decoded weights.
 */
#ifndef {P}_MODEL_H
#define {P}_MODEL_H

#include <stdint.h>

#define {P}_INPUT_NUMEL {in_numel}
#define {P}_INPUT_RANK {len(m.input_shape)}
{dims_in}#define {P}_INPUT_SCALE {_fmt_float(g.scale)}
#define {P}_INPUT_ZERO_POINT 0
#define {P}_INPUT_MIN ({in_lo})
#define {P}_INPUT_MAX ({in_hi})
#define {P}_OUTPUT_NUMEL {out_numel}
#define {P}_OUTPUT_RANK {len(m.output_shape)}
{dims_out}#define {P}_OUTPUT_SCALE {_fmt_float(ig.output_scale)}
#define {P}_OUTPUT_ZERO_POINT 0
#define {P}_OUTPUT_MIN ({out_lo})
#define {P}_OUTPUT_MAX ({out_hi})
#define {P}_WEIGHTS_BYTES {m.weights_bytes}u
#define {P}_AUX_BYTES {m.aux_bytes}u
#define {P}_ARENA_BYTES {m.arena_bytes}u
#define {P}_STACK_SCRATCH_BYTES {4 * max(m.max_k, 1)}u

typedef {m.in_ctype} {m.prefix}_in_t;
typedef {m.out_ctype} {m.prefix}_out_t;

int {m.prefix}_model_run(const {m.prefix}_in_t *input_q, {m.prefix}_out_t *output_q);

{_preprocessing_header(m.prefix, P, pre)}
#endif /* {P}_MODEL_H */
"""


def _preprocessing_header(p: str, P: str, pre: Preprocessing) -> str:
    """The run's preprocessing as constants, and the input helpers' prototypes."""
    mean, std = pre.per_channel()
    values = lambda v: "{ " + ", ".join(_fmt_float(x) for x in v) + " }"  # noqa: E731
    raw = _comment(pre.raw)
    return f"""/* Raw values to input_q (the run's preprocessing; artifact.json "preprocessing"): for element i of
 * channel c = i / ({P}_INPUT_NUMEL / {P}_NORM_CHANNELS),
 *   x[i] = (raw[i] / {P}_RAW_DIVISOR - mean[c]) / std[c],  mean = {P}_NORM_MEAN, std = {P}_NORM_STD,
 *   input_q[i] = round_half_even(x[i] / scale of i), saturated to the input grid's range,
 * in double, with the integers of mixprec's reference. Raw values: {raw}.
 * {p}_quantize_input takes floats, {p}_quantize_input_i8 int8 values (e.g. int8 MFCC features);
 * both write {P}_INPUT_NUMEL codes for {p}_model_run. */
#define {P}_RAW_DIVISOR {_fmt_float(pre.raw_divisor)}
#define {P}_NORM_CHANNELS {pre.channels}
#define {P}_NORM_MEAN {values(mean)}
#define {P}_NORM_STD {values(std)}

void {p}_quantize_input(const float *raw, {p}_in_t *input_q);
void {p}_quantize_input_i8(const int8_t *raw, {p}_in_t *input_q);
"""


def _comment(text: str) -> str:
    """``text`` safe inside a C block comment, on one line."""
    return " ".join(text.replace("*/", "* /").split())


def _scale_entries(elem_scale, shape: tuple[int, ...]) -> tuple[list[float], int]:
    """The input grid's scales as the fewest entries: ``(values, elements per entry)``, 0 when one
    value holds for every element (the usual, per-tensor grid)."""
    flat = np.broadcast_to(np.asarray(elem_scale, np.float64), shape).reshape(-1)
    if np.all(flat == flat[0]):
        return [float(flat[0])], 0
    per_ch = flat.size // shape[0]
    chans = flat.reshape(shape[0], per_ch)
    if np.all(chans == chans[:, :1]):
        return chans[:, 0].tolist(), per_ch
    return flat.tolist(), 1


def _input_helpers(m: CModel, grid, shape: tuple[int, ...], P: str) -> str:
    """The C of ``<prefix>_quantize_input`` and ``<prefix>_quantize_input_i8``.

    Exactness: the reference divides float64 values and rounds half to even; here every step is a
    double division or subtraction (nothing a compiler may fuse into a multiply-add) and the
    rounding is spelled out, so no <math.h>, no libm and no dependence on the rounding mode.
    """
    p = m.prefix
    scales, div = _scale_entries(grid.elem_scale, shape)
    index = "0" if div == 0 else ("i" if div == 1 else f"i / {div}u")
    rows = ",\n    ".join(", ".join(_fmt_float(s) for s in scales[k:k + 8]) for k in range(0, len(scales), 8))
    return f"""
/* ---- raw values to input_q (see model.h): the run's preprocessing, then the reference's input
 * quantization; double throughout, so the codes equal mixprec's NumPy reference bit for bit. */
static const double {p}_norm_mean[{P}_NORM_CHANNELS] = {P}_NORM_MEAN;
static const double {p}_norm_std[{P}_NORM_CHANNELS] = {P}_NORM_STD;
static const double {p}_input_scales[{len(scales)}] = {{
    {rows}
}};

/* Round half to even. |v| is capped at 1e15 first (every input grid saturates far below, and the
 * cast stays defined); NaN gives 0. */
static int64_t {p}_round_half_even(double v) {{
    int64_t t;
    double frac;
    if (v != v) return 0;
    if (v > 1e15) v = 1e15;
    if (v < -1e15) v = -1e15;
    t = (int64_t)v;        /* toward zero: exact */
    frac = v - (double)t;  /* exact: the fraction bits of v */
    if (frac > 0.5 || (frac == 0.5 && (t & 1) != 0)) return t + 1;
    if (frac < -0.5 || (frac == -0.5 && (t & 1) != 0)) return t - 1;
    return t;
}}

static {p}_in_t {p}_quantize_one(double raw, uint32_t i) {{
    const uint32_t c = i / ({P}_INPUT_NUMEL / {P}_NORM_CHANNELS);
    const double x = (raw / {P}_RAW_DIVISOR - {p}_norm_mean[c]) / {p}_norm_std[c];
    return ({p}_in_t)mp_clip(&{p}_input_clamp, i, {p}_round_half_even(x / {p}_input_scales[{index}]));
}}

void {p}_quantize_input(const float *raw, {p}_in_t *input_q) {{
    uint32_t i;
    for (i = 0; i < {P}_INPUT_NUMEL; ++i)
        input_q[i] = {p}_quantize_one((double)raw[i], i);
}}

void {p}_quantize_input_i8(const int8_t *raw, {p}_in_t *input_q) {{
    uint32_t i;
    for (i = 0; i < {P}_INPUT_NUMEL; ++i)
        input_q[i] = {p}_quantize_one((double)raw[i], i);
}}
"""


def _source(m: CModel, e: _Emitter, ig, graph, layouts, in_numel, out_numel, P, stem, helpers: str = "") -> str:
    p = m.prefix
    out_buf = graph.buffer_source(ig.output)
    externs = []
    if m.weights_bytes:
        externs.append(f"extern const uint8_t {p}_weights[{P}_WEIGHTS_BYTES];")
    if m.aux_bytes:
        externs.append(f"extern const uint8_t {p}_aux[{P}_AUX_BYTES];")
    wbuf = f"    int32_t wbuf[{max(m.max_k, 1)}];\n" if m.max_k else ""
    align = max(int(m.arena_plan.get("alignment", 1)), 4)
    decls = "\n".join(e.decls)
    calls = "\n".join(e.calls)
    return f"""/* {stem}.c -- generated by mixprec: layer descriptors and the inference function. */
#include "{stem}.h"
#include "{RUNTIME_FILE}"

{chr(10).join(externs)}

#ifndef MIXPREC_ARENA_SECTION
#define MIXPREC_ARENA_SECTION MP_SECTION(".mixprec_arena")
#endif

/* The activation arena, planned like the cost model (greedy by size over buffer lifetimes). */
static uint8_t {p}_arena[{P}_ARENA_BYTES] MIXPREC_ARENA_SECTION MP_ALIGNED({align});

{decls}

int {p}_model_run(const {p}_in_t *input_q, {p}_out_t *output_q) {{
{wbuf}    uint32_t i;
    for (i = 0; i < {P}_INPUT_NUMEL; ++i)
        mp_st_code(&{p}_t_{e.sym["input"]}, i, mp_clip(&{p}_input_clamp, i, (int64_t)input_q[i]));
{calls}
    for (i = 0; i < {P}_OUTPUT_NUMEL; ++i)
        output_q[i] = ({p}_out_t)mp_ld(&{p}_t_{e.sym[out_buf]}, i);
    return 0;
}}
{helpers}"""


def _c_bytes(data: bytes) -> str:
    rows = []
    for i in range(0, len(data), 16):
        rows.append("    " + ", ".join(f"0x{b:02x}" for b in data[i:i + 16]) + ",")
    return "\n".join(rows)


def _weights_source(m: CModel, e: _Emitter, P, stem) -> str:
    parts = [f"/* {stem}_weights.c -- generated by mixprec: packed weights and parameters. */",
             f'#include "{stem}.h"', f'#include "{RUNTIME_FILE}"', "",
             "#ifndef MIXPREC_WEIGHTS_SECTION", '#define MIXPREC_WEIGHTS_SECTION MP_SECTION(".mixprec_weights")',
             "#endif", "#ifndef MIXPREC_AUX_SECTION", '#define MIXPREC_AUX_SECTION MP_SECTION(".mixprec_aux")',
             "#endif", ""]
    if m.weights_bytes:
        parts += [f"/* {m.packed_weight_bytes} B packed weights + {m.param_bytes} B biases and requantization, "
                  "layer after layer, no padding */",
                  f"extern const uint8_t {m.prefix}_weights[{P}_WEIGHTS_BYTES];",
                  f"const uint8_t {m.prefix}_weights[{P}_WEIGHTS_BYTES] MIXPREC_WEIGHTS_SECTION = {{",
                  _c_bytes(bytes(e.weights.data)), "};", ""]
    if m.aux_bytes:
        parts += ["/* layout and clamp tables (FLASH, counted by the cost model with the weights) */",
                  f"extern const uint8_t {m.prefix}_aux[{P}_AUX_BYTES];",
                  f"const uint8_t {m.prefix}_aux[{P}_AUX_BYTES] MIXPREC_AUX_SECTION = {{",
                  _c_bytes(bytes(e.aux.data)), "};", ""]
    if not m.weights_bytes and not m.aux_bytes:
        parts.append(f"typedef int {m.prefix}_no_weights;")
    return "\n".join(parts) + "\n"
