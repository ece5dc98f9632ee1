"""Integer-exact evaluation against fake-quantization on the CPU -> the "Integer-exact evaluation
speed" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/int_eval.py [--samples 2000] [--rounds 3]

The same 8-bit quantized model (uniform, calibrated, untrained weights: the work does not depend
on them) scores the first ``--samples`` test inputs of its dataset both ways, in the evaluation
batches ``mixprec.execute.eval_batch_size`` picks on a CPU; each figure is the fastest of
``--rounds`` passes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

import mixprec  # noqa: E402
from mixprec.data import load_dataset  # noqa: E402
from mixprec.execute import eval_batch_size  # noqa: E402
from mixprec.models import get_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"lenet5-mnist": ("lenet5", "mnist"), "resnet8-cifar10": ("resnet8", "cifar10")}


def seconds(qm, x, fake: bool, rounds: int) -> float:
    qm.train(fake)
    bs = eval_batch_size(torch.device("cpu"), x)
    best = float("inf")
    with torch.no_grad():
        qm(x[:bs])
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(0, len(x), bs):
                qm(x[i:i + bs])
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    args = ap.parse_args()
    rows = []
    for name, (model, data) in PRESETS.items():
        torch.manual_seed(0)
        splits = load_dataset(data, args.data_dir, 0)
        x = splits.x_test[:args.samples]
        qm = mixprec.quantize(get_model(model), "cortex-m4", splits.input_shape, bits=8)
        qm.calibrate(torch.split(splits.x_train[:1024], 256))
        fake, exact = seconds(qm, x, True, args.rounds), seconds(qm, x, False, args.rounds)
        rows.append(f"| {name} | {len(x):,} | {eval_batch_size(torch.device('cpu'), x)} | {fake:.3f} | {exact:.3f} | "
                    f"{exact / fake:.2f}x | {torch.get_num_threads()} |")
        print(rows[-1], flush=True)
    write_section(
        "Integer-exact evaluation speed",
        "Seconds to score test inputs with the integer program (torch kernels, `array_equal` with the NumPy "
        "reference) against the fake-quantization path of the same 8-bit model, CPU, fastest of the rounds. "
        "The TFLite-Micro requantization runs fused (one int64 multiply, an add, two shifts and one sign "
        "correction, in place) and saturation clamps in place.",
        f"python benchmarks/int_eval.py --samples {args.samples} --rounds {args.rounds}",
        ["| model | inputs | batch | fake-quant s | integer-exact s | ratio | threads |",
         "|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
