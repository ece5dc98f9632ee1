"""The C exporter: bit-exact against the NumPy reference on the host (a real digits run, whole test
set, and the conformance builders x granularities x both numerics), on a Cortex-M4 under QEMU,
FLASH/RAM sections equal to the cost model, and the static int32 overflow check."""
from __future__ import annotations

import doctest
import sys
from pathlib import Path

import numpy as np
import pytest

from mixprec.api import assignment, cost_report
from mixprec.cost.targets import load_target, target_from_dict
from mixprec.execute import reference
from mixprec.export import ExportError, export_run, load_export_input
from mixprec.export import checks
from mixprec.export.c import CExporter, generate, input_grid, quantize_codes
from mixprec.export.c import toolchain as tc
from mixprec.export.c.layout import pack_bits
from mixprec.lower import IntGraph, IntNode, OutputGrid
from mixprec.numerics import Requant, div_round_away, multiply_by_quantized_multiplier, shift_round

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the conformance builders
import conformance  # noqa: E402
from conformance import build_case  # noqa: E402
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
    # arm-none-eabi-size -A: the model's sections are exactly the cost model's figures
    assert fw["sections"][".mixprec_weights"] == fw["cost_flash_bytes"]
    assert fw["sections"][".mixprec_arena"] == fw["cost_ram_bytes"]
    assert ".mixprec_aux" not in fw["sections"]
    assert 0 < fw["library_text_bytes"] < fw["firmware_text_bytes"]


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
        case = conformance._CASES.get(("TestExactness", name, gran, numerics))  # built by test_exactness
        case = case or build_case(name, BUILDERS[name], gran, numerics)
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


def test_checks_doctests():
    result = doctest.testmod(checks, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
