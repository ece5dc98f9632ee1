"""The C exporter: bit-exact against the NumPy reference on the host (a real digits run, whole test
set, and the conformance builders x granularities x both numerics), on a Cortex-M4 under QEMU,
FLASH/RAM sections equal to the cost model, and the static int32 overflow check."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mixprec.api import assignment, cost_report
from mixprec.cost.targets import load_target, target_from_dict
from mixprec.execute import reference
from mixprec.export import ExportError, ExportInput, export_run, load_export_input
from mixprec.export import checks
from mixprec.export.c import CExporter, generate, input_grid, quantize_codes
from mixprec.export.c import toolchain as tc
from mixprec.export.c.layout import pack_bits
from mixprec.lower import IntGraph, IntNode, OutputGrid
from mixprec.numerics import Requant, div_round_away, multiply_by_quantized_multiplier, shift_round

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the conformance builders
import conformance  # noqa: E402
from conformance import case_for  # noqa: E402
from mixprec.granularity import GRANULARITIES  # noqa: E402
from test_exactness import BUILDERS  # noqa: E402

HOST = tc.host_cc() is not None
FIRMWARE = tc.arm_tools() is not None and tc.qemu_arm() is not None
needs_host = pytest.mark.skipif(not HOST, reason="no host C compiler (gcc/cc) on PATH")
needs_firmware = pytest.mark.skipif(
    not FIRMWARE, reason="arm-none-eabi-gcc/size or qemu-system-arm not installed "
    "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")

# A fixed-point MCU-like target for the sweep: 2/4/8-bit containers, word-aligned arena,
# one shift byte per requantization step (no multiplier).
FIXED_MCU = target_from_dict({
    "name": "fixed-mcu", "flash_bytes": None, "ram_bytes": None, "numerics": "fixed",
    "weight_bits": "0..8", "act_bits": "1..8", "weight_granularities": list(GRANULARITIES),
    "act_granularities": list(GRANULARITIES), "weight_containers": [2, 4, 8], "act_containers": [2, 4, 8],
    "param_bytes": {"bias": 4, "multiplier": 0, "shift": 1, "zero_point": 0}, "alignment": 4,
    "clock_hz": 1e8, "power_mw": 1.0, "macs_per_cycle": {8: {8: 1.0}}, "elementwise_per_cycle": 1.0})


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def digits_run(trained_run):
    return trained_run("cortex-m4")


@pytest.fixture(scope="module")
def c_artifact(digits_run):
    return export_run(digits_run, "c")


@needs_host
def test_host_bit_exact_on_the_whole_test_set(digits_run, c_artifact):
    from mixprec.data import load_dataset

    inp = load_export_input(digits_run, n_sample=8)
    data = load_dataset("digits")
    x = data.x_test.numpy().astype(np.float32)
    got = CExporter().run(c_artifact, x)
    want = reference(inp.graph, x)
    assert got.shape == want.shape == (len(x), 10)
    assert np.array_equal(got, want), f"{int((got != want).any(axis=1).sum())} of {len(x)} test inputs differ"
    out, env = CExporter().run(c_artifact, x[:2], keep=True)
    assert np.array_equal(out, want[:2]) and env == {}


def test_artifact_files_and_sizes(digits_run, c_artifact):
    d = c_artifact.details
    result = __import__("json").loads((digits_run / "result.json").read_text())
    for f in ("model.h", "model.c", "model_weights.c", "mixprec_runtime.h"):
        assert (c_artifact.path / f).is_file()
    # the library itself, before any compiler: packed bytes == the cost model's FLASH and peak RAM
    assert d["weights_section_bytes"] == result["cost"]["flash_bytes"] == d["cost_model"]["flash_bytes"]
    assert d["arena_bytes"] == result["cost"]["ram_bytes"]
    assert d["aux_section_bytes"] == 0, c_artifact.notes
    assert d["packed_weight_bytes"] + d["param_bytes"] == d["weights_section_bytes"]
    assert all(r["weight_bytes"] == r["cost_weight_bytes"] and r["param_bytes"] == r["cost_param_bytes"]
               for r in d["layers"])
    assert d["min_int32_headroom_bits"] > 0


@needs_firmware
def test_firmware_under_qemu(c_artifact):
    fw = c_artifact.details["firmware"]
    q = fw["qemu"]
    assert q["inputs"] == fw["test_inputs"] == 256, q["output"]
    assert q["mismatching_inputs"] == 0 and q["mismatching_outputs"] == 0, q["output"]
    assert q["returncode"] == 0
    # arm-none-eabi-size -A: the model's sections are exactly the cost model's figures (uniform
    # widths: no layout tables)
    assert fw["sections"][".mixprec_weights"] == fw["cost_flash_bytes"]
    assert fw["sections"][".mixprec_arena"] == fw["cost_ram_bytes"]
    assert ".mixprec_aux" not in fw["sections"]
    assert 0 < fw["library_text_bytes"] < fw["firmware_text_bytes"]


@needs_firmware
@pytest.mark.parametrize("builder,granularity,numerics,target", [
    ("tiny-cnn", "per-channel", "scaled", "cortex-m4"), ("tiny-cnn", "per-slice", "scaled", "cortex-m4"),
    ("tiny-cnn", "per-element", "fixed", "fixed-mcu"), ("concat-with-input", "per-channel", "scaled", "cortex-m4"),
    ("concat-branches", "per-element", "fixed", "fixed-mcu"), ("table-hardswish-relu", "per-channel", "scaled", "cortex-m4"),
    ("table-hardsigmoid-flatten", "per-element", "fixed", "fixed-mcu"),
    ("mul-squeeze-excite", "per-channel", "scaled", "cortex-m4"), ("slice-chunk", "per-channel", "scaled", "cortex-m4"),
    ("pad-channels-then-conv", "per-channel", "scaled", "cortex-m4"),
    ("zeropad-read-by-conv-and-pool", "per-channel", "scaled", "cortex-m4"),
    ("zeropad-then-maxpool", "per-element", "fixed", "fixed-mcu")])
def test_firmware_flash_sections_are_the_measured_cost_with_mixed_widths(tmp_path, builder, granularity, numerics,
                                                                         target):
    """Mixed widths need layout tables in .mixprec_aux: the linked sections of a real Cortex-M4
    firmware, weights and tables together, are the FLASH that cost_report measures (and a budget
    is checked against), and the firmware stays bit-exact under QEMU (a concatenation too: each
    input rescaled into its channels of the output buffer; lookup tables of 256 codes per grid; a
    squeeze-and-excitation product; channel slices; zero channels around a tensor and its every other
    position, the CIFAR ResNets' shortcut; zeros around the positions where no convolution takes them)."""
    t = FIXED_MCU if target == "fixed-mcu" else load_target(target)
    case = case_for(builder, BUILDERS[builder], granularity, numerics)
    x = np.concatenate([v.numpy() for v in case.inputs.values()]).astype(np.float32)
    inp = ExportInput(tmp_path, case.ig, case.qm, t, tuple(x.shape[1:]), x)
    artifact = CExporter().export(inp, tmp_path / "c")
    fw = artifact.details["firmware"]
    sections = fw["sections"]
    assert sections[".mixprec_aux"] > 0
    assert sections[".mixprec_weights"] + sections[".mixprec_aux"] == cost_report(case.qm, t).totals["flash_bytes"]
    assert fw["qemu"]["mismatching_inputs"] == 0, fw["qemu"]["output"]


@needs_firmware
def test_channel_slices_read_in_place_on_the_firmware(tmp_path):
    """Per-tensor activations: a slice from the target's alignment is a view (``narrow``) of its
    input's buffer where that plans a smaller arena, with no buffer of its own; the firmware reads it
    in place, bit-exact under QEMU, and its arena is the cost model's, smaller than with copies."""
    builder = "slice-split-heads"
    t = load_target("cortex-m4")
    case = case_for(builder, BUILDERS[builder], "per-tensor", "scaled")
    views = [n.name for n in case.qm.graph if n.op == "narrow"]
    assert views and all(v not in cost_report(case.qm, t).plan.offsets for v in views)
    x = np.concatenate([v.numpy() for v in case.inputs.values()]).astype(np.float32)
    artifact = CExporter().export(ExportInput(tmp_path, case.ig, case.qm, t, tuple(x.shape[1:]), x), tmp_path / "c")
    fw = artifact.details["firmware"]
    assert fw["qemu"]["mismatching_inputs"] == 0, fw["qemu"]["output"]
    assert fw["sections"][".mixprec_arena"] == fw["cost_ram_bytes"] == cost_report(case.qm, t).totals["ram_bytes"]
    copies = conformance.build_case(builder, BUILDERS[builder], "per-tensor", "scaled", views=False).qm
    assert not any(n.op == "narrow" for n in copies.graph)
    assert cost_report(copies, t).totals["ram_bytes"] > fw["cost_ram_bytes"]


@needs_host
def test_cost_model_counts_the_width_tables_of_mixed_per_channel_weights(tmp_path):
    """What hgq and dq hand back on a microcontroller (mixed per-channel weight widths, per-tensor
    activations): the cost model alone, before lowering, predicts both FLASH sections exactly."""
    import torch

    from mixprec.convert import convert
    from mixprec.cost import evaluate
    from mixprec.graph.convert import trace
    from mixprec.models import get_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = get_model("digits-cnn").eval()
    graph, _ = trace(model, (1, 8, 8))
    wbits = {n.name: conformance.random_bits(n.weight_shape, "per-channel", rng) for n in graph.weighted()}
    qm = convert(model, (1, 8, 8), "scaled", wbits, 8, "per-channel", "per-tensor")
    qm.calibrate([torch.randn(16, 1, 8, 8)])
    t = load_target("cortex-m4")
    predicted = evaluate(qm.graph, assignment(qm), t).totals
    m = generate(qm.lower(), qm.graph, assignment(qm), t, tmp_path / "c")
    assert m.aux_bytes == predicted["table_bytes"] == sum(n.weight_shape[0] for n in graph.weighted()) > 0
    assert m.flash_bytes == predicted["flash_bytes"] == cost_report(qm, t).totals["flash_bytes"]


@needs_host
def test_pruned_activation_elements_are_exact_and_cost_what_is_stored(tmp_path):
    """What hgq hands back on a fixed-point target: per-element weight and activation bits with
    0-bit elements (pruned input features among them): the host library equals the reference, and
    its FLASH and arena are the cost model's."""
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    input_bits = torch.tensor([0.0, 3, 0, 5, 1, 0, 8, 2, 0, 4, 6, 0]).reshape(1, 3, 4)
    qm = conformance.pruned_per_element(model, (1, 3, 4), 3, input=input_bits, **{"1": [0, 4, 0, 2, 7, 3]})
    ig = qm.lower()
    x = (torch.randn(300, 1, 3, 4) * 1.5).numpy()
    m = generate(ig, qm.graph, assignment(qm), FIXED_MCU, tmp_path / "c")
    tu = tmp_path / "one.c"
    tu.write_text('#include "c/model.c"\n#include "c/model_weights.c"\n' + tc.host_driver_source([(m.prefix, "c/model.h")]))
    tc.compile_host([tu], tmp_path / "one", [tmp_path])
    codes = quantize_codes(input_grid(ig), x).reshape(len(x), -1)
    got = tc.run_host(tmp_path / "one", 0, codes, int(np.prod(m.output_shape)), tmp_path / "io")
    assert np.array_equal(got, np.asarray(reference(ig, x)).reshape(len(x), -1))
    assert m.flash_bytes == cost_report(qm, FIXED_MCU).totals["flash_bytes"] and m.ram_matches


# ----------------------------------------------------------------------------- conformance sweep


def _sweep_cases():
    """Every builder under both numerics; the granularity cycles per builder so each
    granularity x numerics pair is covered by a quarter of the builders."""
    cases = []
    for i, name in enumerate(BUILDERS):
        for j, numerics in enumerate(("scaled", "fixed")):
            cases.append((name, GRANULARITIES[(i + 2 * j) % len(GRANULARITIES)], numerics))
    return cases


@needs_host
def test_conformance_sweep_bit_exact(tmp_path):
    """All builders x {scaled, fixed} with random bits 2..8 (per tensor / channel / slice / element),
    one C translation unit holding every model: outputs equal the reference on random,
    grid and calibration inputs."""
    targets = {"scaled": load_target("generic"), "fixed": FIXED_MCU}
    models, inputs, sizes, measured = [], [], [], {}
    for k, (name, gran, numerics) in enumerate(_sweep_cases()):
        case = case_for(name, BUILDERS[name], gran, numerics)  # the exactness suite's own cases
        ig = case.ig
        a = assignment(case.qm)  # bits and the grids' post-shifts
        m = generate(ig, case.qm.graph, a, targets[numerics], tmp_path / f"m{k:03d}", prefix=f"m{k:03d}")
        measured[f"{name}-{gran}-{numerics}"] = cost_report(case.qm, targets[numerics]).totals["flash_bytes"]
        x = np.concatenate([v.numpy() for v in case.inputs.values()])
        inputs.append((f"{name}-{gran}-{numerics}", ig, x, m))
        models.append((m.prefix, f"m{k:03d}/model.h"))
        sizes.append((f"{name}-{gran}-{numerics}", m))
    tu = tmp_path / "sweep.c"
    tu.write_text("".join(f'#include "m{k:03d}/model.c"\n#include "m{k:03d}/model_weights.c"\n'
                          for k in range(len(models))) + tc.host_driver_source(models))
    exe = tmp_path / "sweep"
    tc.compile_host([tu], exe, [tmp_path])
    bad = []
    for k, (label, ig, x, m) in enumerate(inputs):
        codes = quantize_codes(input_grid(ig), x).reshape(len(x), -1)
        got = tc.run_host(exe, k, codes, int(np.prod(m.output_shape)), tmp_path / "io")
        want = np.asarray(reference(ig, x)).reshape(len(x), -1)
        if not np.array_equal(got, want):
            bad.append(f"{label}: {int((got != want).sum())} outputs differ")
    assert not bad, "\n".join(bad)
    # FLASH: the weights blob is the cost model's weights and parameters for every model; the tables
    # the containers decide are a lower bound of the aux section (clamp tables and alignments depend
    # on the lowered values), and cost_report, which measures the sections, counts both exactly.
    # RAM: the arena is the cost model's ram_bytes for every model, pooled fixed-point grids with
    # post-shifts included (no container is ever widened beyond the cost model's)
    cost = {label: m.cost for label, m in sizes}
    assert [label for label, m in sizes if m.weights_bytes != cost[label]["weight_bytes"] + cost[label]["param_bytes"]] == []
    assert [label for label, m in sizes if not cost[label]["table_bytes"] <= m.aux_bytes] == []
    assert [label for label, m in sizes if measured[label] != m.flash_bytes] == []
    assert [(label, m.arena_bytes, m.cost["ram_bytes"]) for label, m in sizes if not m.ram_matches] == []
    assert [(label, n) for label, m in sizes for n in m.notes if "wider" in n or "re-planned" in n] == []


# ----------------------------------------------------------------------------- numerics in C


@needs_host
def test_c_numerics_equal_python(tmp_path):
    """The runtime's requantization and rounding primitives against mixprec.numerics on edge cases
    and random values (ties, negative values, INT32 extremes, every shift)."""
    rng = np.random.default_rng(0)
    n = 4000
    x = np.concatenate([rng.integers(-2**31, 2**31, n), rng.integers(-300, 300, n),
                        [0, 1, -1, 2**31 - 1, -2**31, 2**30, -2**30, 5, -5, 6, -6]]).astype(np.int64)
    m = rng.integers(2**30, 2**31, x.size).astype(np.int64)
    m[:7] = [2**30, 2**31 - 1, 2**30, 2**31 - 1, 0, 2**30 + 1, 2**31 - 2]
    s = rng.integers(-31, 1, x.size).astype(np.int64)  # right shifts (no int32 overflow possible)
    ps = rng.integers(-8, 40, x.size).astype(np.int64)
    d = rng.integers(1, 50, x.size).astype(np.int64)
    xs = np.clip(x, -2**24, 2**24)  # div_round_away: window sums
    np.savetxt(tmp_path / "in.txt", np.stack([x, m, s, ps, d, xs], 1), fmt="%d")
    (tmp_path / "mixprec_runtime.h").write_text(__import__("mixprec.export.c.runtime", fromlist=["x"]).RUNTIME_H)
    (tmp_path / "t.c").write_text(r"""
#include <stdio.h>
#include <inttypes.h>
#include "mixprec_runtime.h"
int main(void) {
    FILE *f = fopen("in.txt", "r"), *g = fopen("out.txt", "w");
    long long x, m, s, ps, d, xs;
    while (fscanf(f, "%lld %lld %lld %lld %lld %lld", &x, &m, &s, &ps, &d, &xs) == 6)
        fprintf(g, "%ld %lld %ld\n", (long)mp_mbqm((int32_t)x, (int32_t)m, (int32_t)s),
                (long long)mp_shift_round((int32_t)x, (int32_t)ps), (long)mp_div_round_away((int32_t)xs, (int32_t)d));
    fclose(f); fclose(g);
    return 0;
}
""")
    tc.compile_host([tmp_path / "t.c"], tmp_path / "t", [tmp_path])
    import subprocess
    subprocess.run([str(tmp_path / "t")], cwd=tmp_path, check=True)
    got = np.loadtxt(tmp_path / "out.txt", dtype=np.int64)
    assert np.array_equal(got[:, 0], multiply_by_quantized_multiplier(x, m, s))
    assert np.array_equal(got[:, 1], shift_round(x, ps))
    assert np.array_equal(got[:, 2], div_round_away(xs, d))


def test_pack_bits_straddles_bytes_lsb_first():
    # 3 bits (-1), 8 bits (0x5a), 2 bits (1): 111 | 01011010 | 01 -> bits LSB first
    data = pack_bits(np.array([-1, 0x5A, 1]), np.array([3, 8, 2]))
    assert len(data) == 2
    v = int.from_bytes(data, "little")
    assert v & 0b111 == 0b111 and (v >> 3) & 0xFF == 0x5A and (v >> 11) & 0b11 == 1


# ----------------------------------------------------------------------------- overflow check


def _grid(bits: int, shape) -> OutputGrid:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return OutputGrid(1.0, np.array(bits), True, np.array(lo), np.array(hi), np.array(1.0))


def _linear_graph(weight: int, n_in: int, in_bits: int = 8, shift: int = -10) -> IntGraph:
    rq = Requant("tflm", np.array([1 << 30]), np.array([shift]))
    fc = IntNode("fc", "linear", ["input"], {}, (2,), _grid(8, (2,)),
                 {"weight": np.full((2, n_in), weight, np.int64), "bias": np.array([5, -5], np.int64), "requant": rq})
    return IntGraph([IntNode("input", "input", [], {}, (n_in,), _grid(in_bits, (n_in,))), fc], "fc", "scaled", 1.0)


def test_overflow_check_rejects_a_crafted_graph():
    with pytest.raises(ExportError, match=r"layer 'fc' \(linear\): the worst-case int32 accumulator is 3840000005"):
        checks.check_int32(_linear_graph(30000, 1000))
    # the accumulator fits but the requantization's left shift does not
    with pytest.raises(ExportError, match="requantization input"):
        checks.check_int32(_linear_graph(127, 100, shift=20))


def test_overflow_check_passes_a_normal_graph(c_artifact):
    bounds = checks.check_int32(_linear_graph(127, 100))
    acc = next(b for b in bounds if b.what == "accumulator")
    assert acc.bound == 128 * 127 * 100 + 5 and acc.ok
    assert all(b["headroom_bits"] > 0 for b in c_artifact.details["int32_bounds"])
    assert {b["layer"] for b in c_artifact.details["int32_bounds"] if b["what"] == "accumulator"}


# ----------------------------------------------------------------------------- raw inputs in C

QUANTIZE_DRIVER = r"""/* quantize_driver f|i8 RAW.bin CODES.bin: raw float32 or int8 samples -> int32 codes */
#include <stdint.h>
#include <stdio.h>
#include "model.h"

int main(int argc, char **argv) {
    static float xf[MIXPREC_INPUT_NUMEL];
    static int8_t xi[MIXPREC_INPUT_NUMEL];
    static mixprec_in_t q[MIXPREC_INPUT_NUMEL];
    static int32_t out[MIXPREC_INPUT_NUMEL];
    FILE *f, *g;
    uint32_t i;
    int i8;
    if (argc != 4 || !(f = fopen(argv[2], "rb")) || !(g = fopen(argv[3], "wb"))) return 2;
    i8 = argv[1][0] == 'i';
    while (i8 ? fread(xi, 1, MIXPREC_INPUT_NUMEL, f) == MIXPREC_INPUT_NUMEL
              : fread(xf, 4, MIXPREC_INPUT_NUMEL, f) == MIXPREC_INPUT_NUMEL) {
        if (i8) mixprec_quantize_input_i8(xi, q); else mixprec_quantize_input(xf, q);
        for (i = 0; i < MIXPREC_INPUT_NUMEL; ++i) out[i] = (int32_t)q[i];
        if (fwrite(out, 4, MIXPREC_INPUT_NUMEL, g) != MIXPREC_INPUT_NUMEL) return 3;
    }
    fclose(f);
    fclose(g);
    return 0;
}
"""


def c_quantize(lib: Path, raw: np.ndarray, work: Path) -> np.ndarray:
    """Codes (N, numel) of the library's ``mixprec_quantize_input`` (float32 ``raw``) or
    ``mixprec_quantize_input_i8`` (int8 ``raw``) on raw samples (N, ...)."""
    import subprocess

    exe = work / f"quantize_{lib.name}"
    if not exe.exists():
        (work / "quantize_driver.c").write_text(QUANTIZE_DRIVER)
        tc.compile_host([work / "quantize_driver.c", lib / "model.c", lib / "model_weights.c"], exe, [lib])
    kind = "i8" if raw.dtype == np.int8 else "f"
    np.ascontiguousarray(raw, np.int8 if kind == "i8" else "<f4").tofile(work / "raw.bin")
    subprocess.run([str(exe), kind, str(work / "raw.bin"), str(work / "codes.bin")], check=True)
    return np.fromfile(work / "codes.bin", "<i4").astype(np.int64).reshape(len(raw), -1)


def reference_codes(grid: dict, pre, raw: np.ndarray) -> np.ndarray:
    """What the NumPy reference quantizes raw values to: the preprocessing (float64), then
    ``quantize_codes``."""
    x = pre.apply(raw.reshape(len(raw), *grid["elem_scale"].shape))
    return quantize_codes(grid, x).reshape(len(raw), -1)


def raw_near_boundaries(grid: dict, pre, rng, n: int = 48) -> np.ndarray:
    """Raw float32 samples (M, numel): for every element, values whose normalised quotient
    ``x / scale`` is a rounding tie ``k + 0.5`` (exactly, where scales and preprocessing are dyadic),
    their float32 neighbours, random values past both ends of the grid, infinities and zeros."""
    scale, lo, hi = (grid[k].reshape(-1) for k in ("elem_scale", "lo", "hi"))
    mean, std = (np.repeat(np.array(v), scale.size // pre.channels) for v in pre.per_channel())
    to_raw = lambda x: ((x * std + mean) * pre.raw_divisor).astype(np.float32)  # noqa: E731
    tie = to_raw((rng.integers(lo - 2, hi + 2, (n, scale.size)) + 0.5) * scale)
    beyond = to_raw(rng.uniform(lo - 3, hi + 3, (n, scale.size)) * scale)
    special = np.array([np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0], np.float32)[:, None]
    return np.concatenate([tie, np.nextafter(tie, np.float32(np.inf)), np.nextafter(tie, np.float32(-np.inf)),
                           beyond, np.broadcast_to(special, (len(special), scale.size))])


def all_int8(numel: int) -> np.ndarray:
    """256 samples holding every int8 value at every position."""
    return ((np.arange(256)[:, None] + np.arange(numel)[None]) % 256 - 128).astype(np.int8)


@needs_host
def test_the_runs_preprocessing_reaches_the_c_input_helpers(digits_run, c_artifact, tmp_path):
    """The digits run's record (pixel counts 0..16, / 16) is in result.json, artifact.json and
    model.h; the test set's raw pixel counts through ``mixprec_quantize_input`` give exactly the
    codes the reference computes from the loader's inputs; near-tie, out-of-range and int8 raw
    values give the reference's codes too."""
    from mixprec.data import Preprocessing, load_dataset

    result = __import__("json").loads((digits_run / "result.json").read_text())
    pre = Preprocessing.from_dict(result["preprocessing"])
    assert pre == Preprocessing(16.0, raw=pre.raw) == load_export_input(digits_run, n_sample=1).preprocessing
    grid = dict(np.load(c_artifact.path / "input_grid.npz"))
    record = c_artifact.details["preprocessing"]
    assert record["raw_divisor"] == 16.0 and record["input_zero_point"] == 0
    assert record["input_scale"] == result["preprocessing"]["input_scale"] == float(grid["elem_scale"].flat[0])
    assert (record["input_min"], record["input_max"]) == (int(grid["lo"].min()), int(grid["hi"].max()))
    header = (c_artifact.path / "model.h").read_text()
    for line in ("#define MIXPREC_RAW_DIVISOR 16.0", "#define MIXPREC_NORM_MEAN { 0.0 }",
                 "void mixprec_quantize_input(const float *raw, mixprec_in_t *input_q);",
                 "void mixprec_quantize_input_i8(const int8_t *raw, mixprec_in_t *input_q);"):
        assert line in header

    x = load_dataset("digits").x_test.numpy()
    pixels = np.round(x * 16).astype(np.float32)
    assert np.array_equal(pixels / 16, x)  # the loader's inputs are the record applied to pixel counts
    assert np.array_equal(c_quantize(c_artifact.path, pixels, tmp_path), quantize_codes(grid, x).reshape(len(x), -1))
    raw = raw_near_boundaries(grid, pre, np.random.default_rng(0))
    assert np.array_equal(c_quantize(c_artifact.path, raw, tmp_path), reference_codes(grid, pre, raw))
    i8 = all_int8(raw.shape[1])
    assert np.array_equal(c_quantize(c_artifact.path, i8, tmp_path), reference_codes(grid, pre, i8))


@needs_host
@pytest.mark.parametrize("granularity,numerics", [("per-element", "fixed"), ("per-channel", "fixed"),
                                                  ("per-tensor", "scaled")])
def test_c_input_helpers_equal_the_reference_on_ties(tmp_path, granularity, numerics):
    """Per-channel normalisation over the 2 input channels, with per-element, per-channel and
    per-tensor input grids: the C helpers round half to even in double exactly as the reference,
    on thousands of values, exact ties among them (power-of-two scales and a dyadic
    preprocessing), and a CIFAR-like (not dyadic) preprocessing near every boundary of a scaled grid."""
    from mixprec.data import Preprocessing

    case = case_for("tiny-cnn", BUILDERS["tiny-cnn"], granularity, numerics)
    pre = (Preprocessing(4.0, (0.5, -0.25), (0.5, 2.0)) if numerics == "fixed" else
           Preprocessing(255.0, (0.4914, 0.4822), (0.2470, 0.2435)))
    target = FIXED_MCU if numerics == "fixed" else load_target("generic")
    lib = tmp_path / "c"
    generate(case.ig, case.qm.graph, assignment(case.qm), target, lib, preprocessing=pre)
    assert f"#define MIXPREC_NORM_STD {{ {', '.join(map(repr, pre.std))} }}" in (lib / "model.h").read_text()
    grid = input_grid(case.ig)
    raw = raw_near_boundaries(grid, pre, np.random.default_rng(1), n=256)
    want = reference_codes(grid, pre, raw)
    if numerics == "fixed":  # the ties are real: half of the first block sits exactly on k + 0.5
        q = pre.apply(raw[:256].reshape(256, *grid["elem_scale"].shape)) / grid["elem_scale"]
        assert np.count_nonzero(q - np.floor(q) == 0.5) > 0.4 * q.size
    assert np.array_equal(c_quantize(lib, raw, tmp_path), want)
    i8 = all_int8(raw.shape[1])
    assert np.array_equal(c_quantize(lib, i8, tmp_path), reference_codes(grid, pre, i8))


@needs_host
def test_a_run_without_a_preprocessing_record_exports_the_identity_with_a_note(trained_run, tmp_path):
    """A run from before result.json recorded its preprocessing: the helpers take the model's inputs
    as raw values, artifact.json says so in a note."""
    import json

    from mixprec.data import load_dataset

    run = trained_run("cortex-m4")
    result = json.loads((run / "result.json").read_text())
    del result["preprocessing"]
    (run / "result.json").write_text(json.dumps(result))
    inp = load_export_input(run, n_sample=4)
    assert inp.preprocessing is None
    artifact = CExporter(firmware=False).export(inp, tmp_path / "c")
    assert any("no preprocessing recorded" in n for n in artifact.notes)
    assert artifact.details["preprocessing"]["raw_divisor"] == 1.0
    assert "#define MIXPREC_RAW_DIVISOR 1.0" in (artifact.path / "model.h").read_text()
    x = load_dataset("digits").x_test.numpy()[:64]
    grid = input_grid(inp.graph)
    assert np.array_equal(c_quantize(artifact.path, x, tmp_path), quantize_codes(grid, x).reshape(len(x), -1))
