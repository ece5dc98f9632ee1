"""Exported artifacts of real runs against the reference -> the "Deployment" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/deployment.py [RUN_DIR ...] [--inputs 1000] [--reuse]

Default runs: those of benchmarks/uniform_int8.py (run it first). Each run is exported to C (host
library + Cortex-M4 firmware under QEMU) and QONNX, then verified; ``--reuse`` keeps artifacts
that already exist.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

from mixprec.export import Artifact, export_run  # noqa: E402
from mixprec.export.verify import verify_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = [ROOT / "runs" / "bench-int8" / "lenet5-mnist", ROOT / "runs" / "bench-int8" / "resnet8-cifar10"]
FORMATS = ("c", "qonnx")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS)
    ap.add_argument("--inputs", type=int, default=1000, help="test inputs per artifact")
    ap.add_argument("--reuse", action="store_true", help="keep artifacts that already exist")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets"))

    rows = ["| run | weights section B = FLASH B | arena B = peak RAM B | library .text B | host C | "
            "Cortex-M4 firmware (QEMU) | QONNX | export s |", "|---|---|---|---|---|---|---|---|"]
    for run in args.runs:
        start = time.perf_counter()
        for fmt in FORMATS:
            if not (args.reuse and (run / "export" / fmt / "artifact.json").exists()):
                export_run(run, fmt)
        export_s = time.perf_counter() - start
        verified = {r.format: r for r in verify_run(run, args.inputs)}
        fw = Artifact.load(run / "export" / "c").details["firmware"]
        qemu = verified.get("c firmware (mps2-an386, qemu)")

        def cell(r):
            return "not run" if r is None else f"{r.mismatches} mismatches / {r.inputs}"

        rows.append(f"| {run.name} | {fw['weights_section_bytes']:,} = {fw['cost_flash_bytes']:,} | "
                    f"{fw['arena_section_bytes']:,} = {fw['cost_ram_bytes']:,} | {fw['library_text_bytes']:,} | "
                    f"{cell(verified.get('c'))} | {cell(qemu)} | {cell(verified.get('qonnx'))} | "
                    f"{'reused' if args.reuse else f'{export_s:.0f}'} |")
    write_section("Deployment", "Each run exported to C and QONNX and checked by `mixprec verify` against the "
                  "NumPy reference (outputs `array_equal`, counted per input). FLASH and RAM are the firmware's "
                  "`arm-none-eabi-size -A` sections `.mixprec_weights` and `.mixprec_arena` beside the cost "
                  "model's predictions; library code size is separate. The firmware runs 256 embedded test "
                  "inputs on `qemu-system-arm -M mps2-an386` (Cortex-M4).",
                  "python benchmarks/deployment.py --inputs " + str(args.inputs), rows)


if __name__ == "__main__":
    main()
