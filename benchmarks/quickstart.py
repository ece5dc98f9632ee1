"""Quickstart figures over several seeds -> the "Quickstart" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/quickstart.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

from mixprec.cli import QUICKSTART  # noqa: E402
from mixprec.search import RunConfig, run_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    rows = ["| seed | weight/act bits | float acc | int acc (integer-exact) | FLASH B | budget B | peak RAM B | "
            "feasible | ref. mismatches | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = run_search(RunConfig(**QUICKSTART, seed=seed), tmp)
            wall = time.perf_counter() - t0
        bits = {(row.get("weight_bits_mean"), row["act_bits"]) for row in r["layers"] if "weight_bits" in row}
        wb, ab = sorted(bits)[0]
        rows.append(f"| {seed} | {wb:.0f}/{ab:.0f} | {r['accuracy']['float']:.2%} | {r['accuracy']['quantized']:.2%} | "
                    f"{r['cost']['flash_bytes']} | {r['budget']['flash_bytes']} | {r['cost']['ram_bytes']} | "
                    f"{r['feasible']} | {r['reference_mismatches']} | {wall:.1f} |")
    write_section("Quickstart", "digits-cnn on digits (scikit-learn 8x8), cortex-m4, 12 KiB FLASH budget, "
                  "uniform method (the logits keep 8 bits); wall time of the whole run (data, float warm-up, QAT, evaluation) on this "
                  "machine's 2 cores.", "python benchmarks/quickstart.py --seeds " + " ".join(map(str, args.seeds)), rows)


if __name__ == "__main__":
    main()
