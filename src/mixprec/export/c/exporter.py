"""``CExporter``: a run's integer program as a C99 library, checked on the host and on a Cortex-M4.

``export`` checks int32 overflow statically, writes the library (``model.h``, ``model.c``,
``model_weights.c``, ``mixprec_runtime.h``; with helpers that quantize raw values after the run's
preprocessing, recorded in ``artifact.json`` as ``preprocessing``), the input grid
(``input_grid.npz``, so the artifact can quantize real inputs on its own), a host runner
(``host_runner.c``, built with ``gcc -std=c99 -O2 -Wall -Wextra -Werror``) and Cortex-M4 test
firmware (``firmware/``): built with arm-none-eabi-gcc, run under QEMU, section sizes compared with
the cost model. Missing tools skip their step (and say so in the notes). ``run`` executes the host
runner on real inputs.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from ...cost.bits import assignment
from ...data.base import preprocessing_record
from ...execute import reference
from ...numerics import quantize, saturate
from ..base import Artifact, ExportError, ExportInput
from ..checks import check_int32
from . import firmware as fw
from . import toolchain as tc
from .generate import CModel, generate

log = logging.getLogger(__name__)

STEM = "model"
INPUT_GRID = "input_grid.npz"
HOST_RUNNER = "host_runner"


def input_grid(ig) -> dict[str, np.ndarray]:
    """The input node's grid as full arrays (what quantizing real inputs needs)."""
    node = ig["input"]
    g, shape = node.grid, tuple(node.out_shape)
    full = lambda a: np.ascontiguousarray(np.broadcast_to(np.asarray(a), shape))  # noqa: E731
    return {"elem_scale": full(g.elem_scale).astype(np.float64), "bits": full(g.bits).astype(np.int64),
            "signed": np.array(bool(g.signed)), "lo": full(g.lo).astype(np.int64), "hi": full(g.hi).astype(np.int64)}


def quantize_codes(grid: dict, x: np.ndarray) -> np.ndarray:
    """Real inputs -> the integers ``model_run`` takes: the reference's input quantization
    (round half to even, saturate) without the per-element post-shift."""
    q = quantize(np.asarray(x), grid["elem_scale"], grid["bits"], bool(grid["signed"]))
    return saturate(q, grid["lo"], grid["hi"]).astype(np.int64)


class CExporter:
    format = "c"

    def __init__(self, firmware: bool = True, qemu: bool = True, qemu_timeout: float = 300.0,
                 prefix: str = "mixprec"):
        self.firmware, self.qemu, self.qemu_timeout, self.prefix = firmware, qemu, qemu_timeout, prefix

    # ------------------------------------------------------------------------------------- export
    def export(self, inp: ExportInput, out_dir: Path) -> Artifact:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ig, qm = inp.graph, inp.qm
        bounds = check_int32(ig)  # raises ExportError naming the layer
        model = generate(ig, qm.graph, assignment(qm), inp.target, out_dir, self.prefix, STEM,
                         preprocessing=inp.preprocessing)
        grid = input_grid(ig)
        np.savez(out_dir / INPUT_GRID, **grid)
        (out_dir / "host_runner.c").write_text(tc.host_driver_source([(self.prefix, f"{STEM}.h")]))
        files = [*model.files, INPUT_GRID, "host_runner.c"]
        notes = list(model.notes)
        if inp.preprocessing is None:
            notes.append(f"no preprocessing recorded for this model (result.json of a run from before mixprec "
                         f"recorded it): {self.prefix}_quantize_input takes the model's inputs as the raw values "
                         f"(identity); normalise raw values as the run's data loader did before calling it")
        details = {"target": inp.target.name, "numerics": ig.numerics, **model.summary(),
                   "preprocessing": preprocessing_record(inp.preprocessing, ig),
                   "int32_bounds": [b.to_dict() for b in bounds]}
        details["min_int32_headroom_bits"] = min((b["headroom_bits"] for b in details["int32_bounds"]), default=None)

        if tc.host_cc():
            details["host_build"] = " ".join(self._build_host(out_dir))
        else:
            notes.append("no host C compiler: the host runner was not built")

        if self.firmware:
            if tc.arm_tools():
                fw_details = self._firmware(model, ig, grid, inp.x_sample, out_dir)
                details["firmware"] = fw_details
                files += [f"firmware/{f}" for f in ("startup.c", "mps2_an386.ld", "main.c", "test_vectors.h", "fw.elf")]
                notes += fw_details.pop("notes")
            else:
                notes.append("arm-none-eabi-gcc not found: no Cortex-M4 firmware built "
                             "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
        return Artifact(self.format, out_dir, files, notes, details)

    def _build_host(self, out_dir: Path) -> list[str]:
        sources = [out_dir / "host_runner.c", out_dir / f"{STEM}.c", out_dir / f"{STEM}_weights.c"]
        return tc.compile_host(sources, out_dir / "build" / HOST_RUNNER, [out_dir])

    def _firmware(self, model: CModel, ig, grid: dict, x_sample: np.ndarray, out_dir: Path) -> dict:
        fdir = out_dir / "firmware"
        fdir.mkdir(parents=True, exist_ok=True)
        codes = quantize_codes(grid, x_sample)
        expected = np.asarray(reference(ig, x_sample))
        (fdir / "startup.c").write_text(fw.STARTUP_C)
        (fdir / "mps2_an386.ld").write_text(fw.LINKER_LD)
        (fdir / "main.c").write_text(fw.main_c(self.prefix, STEM))
        (fdir / "test_vectors.h").write_text(fw.test_vectors_h(self.prefix, codes, expected))
        lib = [out_dir / f"{STEM}.c", out_dir / f"{STEM}_weights.c"]
        elf = fdir / "fw.elf"
        cmd = tc.compile_arm([fdir / "startup.c", fdir / "main.c", *lib], elf, [out_dir, fdir], fdir / "mps2_an386.ld")
        size_tool = tc.arm_tools()["size"]
        sections = tc.section_sizes(elf, size_tool)
        # the library alone (what an application links): code and constant descriptors
        lib_sizes: dict[str, int] = {}
        for src in lib:
            obj = fdir / "build" / (src.stem + ".o")
            tc.compile_arm([src], obj, [out_dir], compile_only=True)
            for name, size in tc.section_sizes(obj, size_tool).items():
                key = ".text" if name.startswith(".text") else ".rodata" if name.startswith(".rodata") else name
                lib_sizes[key] = lib_sizes.get(key, 0) + size
        weights, aux = sections.get(".mixprec_weights", 0), sections.get(".mixprec_aux", 0)
        arena = sections.get(".mixprec_arena", 0)
        out = {"build": " ".join(cmd), "elf": str(elf), "sections": sections,
               "weights_section_bytes": weights, "aux_section_bytes": aux, "flash_section_bytes": weights + aux,
               "arena_section_bytes": arena,
               "cost_flash_bytes": model.cost["flash_bytes"], "cost_ram_bytes": model.cost["ram_bytes"],
               "flash_sections_equal_flash_bytes": weights + aux == model.cost["flash_bytes"],
               "arena_section_equals_ram_bytes": arena == model.cost["ram_bytes"],
               "library_text_bytes": lib_sizes.get(".text", 0), "library_rodata_bytes": lib_sizes.get(".rodata", 0),
               "library_sections": lib_sizes, "firmware_text_bytes": sections.get(".text", 0),
               "test_inputs": int(len(codes)), "notes": []}
        if not out["flash_sections_equal_flash_bytes"]:
            out["notes"].append(f".mixprec_weights + .mixprec_aux are {weights} + {aux} B, the cost model's "
                                f"flash_bytes {model.cost['flash_bytes']} B")
        if not out["arena_section_equals_ram_bytes"]:
            out["notes"].append(f".mixprec_arena is {arena} B, the cost model's ram_bytes {model.cost['ram_bytes']} B")
        if self.qemu:
            if tc.qemu_arm():
                r = tc.run_qemu(elf, self.qemu_timeout)
                out["qemu"] = {"machine": tc.QEMU_MACHINE, "returncode": r.returncode, "seconds": round(r.seconds, 3),
                               "inputs": r.inputs, "mismatching_inputs": r.mismatching_inputs,
                               "mismatching_outputs": r.mismatching_outputs, "output": r.output.strip()[-2000:]}
                if r.mismatching_inputs is None:
                    out["notes"].append(f"the firmware did not report (QEMU status {r.returncode}): {r.output[-500:]}")
                elif r.mismatching_inputs:
                    out["notes"].append(f"firmware under QEMU: {r.mismatching_inputs} of {r.inputs} inputs differ from "
                                        "the reference")
            else:
                out["notes"].append("qemu-system-arm not found: the firmware was built but not run")
        return out

    # ---------------------------------------------------------------------------------------- run
    def device_runs(self, artifact: Artifact) -> list[dict]:
        """Re-run the firmware (its embedded test inputs against their reference outputs) under QEMU."""
        elf = Path(artifact.path) / "firmware" / "fw.elf"
        if not elf.exists() or not tc.qemu_arm():
            return []
        r = tc.run_qemu(elf, self.qemu_timeout)
        failed = r.mismatching_inputs is None
        return [{"format": f"c firmware ({tc.QEMU_MACHINE}, qemu)", "inputs": r.inputs or 0,
                 "mismatches": r.inputs or 1 if failed else r.mismatching_inputs,
                 "notes": [f"the firmware did not report (QEMU status {r.returncode})"] if failed else []}]

    def run(self, artifact: Artifact, x: np.ndarray, keep: bool = False):
        path = Path(artifact.path)
        exe = path / "build" / HOST_RUNNER
        if not exe.exists():
            if not tc.host_cc():
                raise ExportError("no host C compiler (gcc or cc): cannot run the C artifact")
            self._build_host(path)
        with np.load(path / INPUT_GRID) as z:
            grid = {k: z[k] for k in z.files}
        x = np.asarray(x)
        codes = quantize_codes(grid, x).reshape(len(x), -1)
        out_shape = tuple(artifact.details["output_shape"])
        with tempfile.TemporaryDirectory(prefix="mixprec-c-") as work:
            out = tc.run_host(exe, 0, codes, int(np.prod(out_shape)), Path(work))
        out = out.reshape((len(x),) + out_shape)
        return (out, {}) if keep else out

