"""Uniform 8-bit baselines on real data -> the "Uniform int8 on real data" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/uniform_int8.py [--only lenet5-mnist resnet8-cifar10] [--runs runs/bench-int8]

Each preset is one ``mixprec search --method uniform --bits 8`` run (the command is printed in the
table); runs are resumable, so a killed benchmark continues where it stopped. ``--table-only``
rewrites the table from finished runs. Data from ``--data-dir`` or ``MIXPREC_DATA`` (default:
``../shared/datasets`` beside the repository).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

from mixprec.search import RunConfig, run_search  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "lenet5-mnist": dict(model="lenet5", data="mnist", target="cortex-m4", bits=8, act_bits=8,
                         float_epochs=10, qat_epochs=2, batch_size=128, lr=2e-3, qat_lr=2e-4),
    "resnet8-cifar10": dict(model="resnet8", data="cifar10", target="cortex-m4", bits=8, act_bits=8,
                            float_epochs=30, qat_epochs=3, batch_size=64, lr=2e-3, qat_lr=2e-4, weight_decay=0.01,
                            optimizer="adamw"),
}


def command_for(preset: dict, out: Path) -> str:
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items() if k not in ("model", "data"))
    return f"mixprec search --method uniform --model {preset['model']} --data {preset['data']} {opts} --out {out}"


def _median(values):
    # The median: robust to an epoch slowed by another job on the machine.
    return float(statistics.median(values)) if values else float("nan")


def row_for(name: str, preset: dict, result: dict, out: Path) -> str:
    hist = result["history"]
    float_s = _median([h["seconds"] for h in hist.get("float", [])])
    qat_s = _median([h["seconds"] for h in hist.get("qat", [])])
    cost = result["cost_detail"]
    return (f"| {name} | {len(hist.get('float', []))}+{len(hist.get('qat', []))} | {result['accuracy']['float']:.2%} | "
            f"{result['accuracy']['quantized']:.2%} | {float_s:.1f} | {qat_s:.1f} | {cost['weight_bytes']:,} | "
            f"{cost['flash_bytes']:,} | {cost['ram_bytes']:,} | {result['reference_mismatches']} | "
            f"`{command_for(preset, out)}` |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-int8")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table from finished runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rows = ["| run | epochs float+QAT | float test acc | int8 test acc (integer-exact) | median s/epoch float | "
            "median s/epoch QAT | weight B | FLASH B | peak RAM B | ref. mismatches | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(PRESETS):
        out = args.runs / name
        if name in args.only and not args.table_only:
            cfg = RunConfig(method="uniform", data_dir=None, **PRESETS[name])
            os.environ["MIXPREC_DATA"] = args.data_dir
            run_search(cfg, out, resume=True, device=args.device)
        if (out / "result.json").exists():
            rows.append(row_for(name, PRESETS[name], json.loads((out / "result.json").read_text()), out.relative_to(ROOT)
                                if out.is_relative_to(ROOT) else out))
    write_section("Uniform int8 on real data",
                  "Float training then 8-bit weights and activations (per-channel weights, TFLite-Micro "
                  "requantization) on the shared MNIST and CIFAR-10 copies (CIFAR-10 is a JPEG re-encoding, "
                  "about a point under published figures). Accuracy is on the full test set with the "
                  "integer-exact model; seconds per epoch on this machine's 2 CPU cores; bytes from the "
                  "cortex-m4 cost model (FLASH = packed weights + bias/multiplier/shift; RAM = planned arena).",
                  "python benchmarks/uniform_int8.py", rows)


if __name__ == "__main__":
    main()
