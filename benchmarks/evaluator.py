"""Seconds per candidate of the candidate evaluator against the same work done the way a search run
does it today -> the "Candidate evaluation" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/evaluator.py [--only lenet5-mnist resnet8-cifar10] [--candidates 4]
        [--float lenet5-mnist=runs/bench-int8/lenet5-mnist]

The work per candidate: set a mixed assignment (random 2/4/8-bit weights per channel, 4/8-bit
activations), fine-tune 200 steps, score 2,000 validation samples, cost the choice.

- evaluator: ``CandidateEvaluator.evaluate`` (built once: one trace, the cost tables, the start's
  calibration; per candidate: restore the weights, set the bits, fine-tune, fake-quantization
  validation, the tables' exact totals).
- run today: what ``run_search`` does for each candidate: ``quantize`` (trace, fold, convert),
  ``calibrate``, ``fit`` for one epoch of 200 steps (validation before and after, integer-exact),
  ``cost_report``.

The float weights do not change the work (without ``--float`` the model is the untrained one of the
seed); the data are the real datasets. Both run on this machine's CPU threads, one after the other.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

from mixprec.api import cost_report, quantize  # noqa: E402
from mixprec.models import get_model  # noqa: E402
from mixprec.search import RunConfig  # noqa: E402
from mixprec.search.evaluator import CandidateEvaluator, EvaluatorSpec  # noqa: E402
from mixprec.train import TrainConfig, fit, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "lenet5-mnist": RunConfig(model="lenet5", data="mnist", target="cortex-m4", batch_size=128, qat_lr=5e-4),
    "resnet8-cifar10": RunConfig(model="resnet8", data="cifar10", target="cortex-m4", batch_size=64, qat_lr=5e-4),
}
STEPS, VAL = 200, 2_000


def candidates(ev: CandidateEvaluator, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        weights = {name: rng.choice([2, 4, 8], size=layer.groups).tolist() for name, layer in ev.tables.layers.items()}
        acts = {q: int(rng.choice([4, 8])) for q in ev.tables.acts}
        out.append({"weights": weights, "acts": acts})
    return out


def run_today(cfg: RunConfig, float_pt: Path, data, candidate: dict) -> float:
    """Seconds for one candidate done as a search run does it now."""
    start = time.perf_counter()
    model = get_model(cfg.model)
    model.load_state_dict(torch.load(float_pt, weights_only=True)["model"])
    qm = quantize(model, cfg.target, data.input_shape, bits=8)
    for name, widths in candidate["weights"].items():
        quant = qm.layers[name].quantizer
        quant.set_bits(torch.tensor(widths, dtype=torch.float32).reshape(quant.bits().shape))
    for q, width in candidate["acts"].items():
        qm.act_quantizers[q].set_bits(width)
    qm.calibrate(torch.split(data.x_train[:2048], 256))
    n = STEPS * cfg.batch_size
    fit(qm, data.x_train[:n], data.y_train[:n], data.x_val[:VAL], data.y_val[:VAL],
        TrainConfig(epochs=1, lr=cfg.qat_lr, batch_size=cfg.batch_size), params=qm.weight_parameters())
    cost_report(qm, cfg.target)
    return time.perf_counter() - start


def measure(name: str, cfg: RunConfig, float_pt: Path, n: int) -> str:
    spec = EvaluatorSpec(cfg, str(float_pt), steps=STEPS, train_samples=STEPS * cfg.batch_size, val_samples=VAL)
    t0 = time.perf_counter()
    ev = CandidateEvaluator(spec)
    build = time.perf_counter() - t0
    cands = candidates(ev, n)
    ev_times = [ev.evaluate(c).seconds for c in cands]
    data = ev.data
    today = [run_today(cfg, float_pt, data, c) for c in cands]
    ev_s, today_s = float(np.median(ev_times)), float(np.median(today))
    return (f"| {name} | {STEPS} | {VAL:,} | {n} | {build:.1f} | {ev_s:.2f} | {today_s:.2f} | "
            f"{today_s / ev_s:.2f}x | {torch.get_num_threads()} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--float", nargs="+", default=[], metavar="PRESET=RUN_DIR")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    args = ap.parse_args()
    given = dict(f.split("=", 1) for f in args.float)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            cfg = RunConfig(**{**vars(PRESETS[name]), "data_dir": args.data_dir})
            float_pt = Path(given[name]) / "checkpoints" / "float.pt" if name in given else Path(tmp) / f"{name}.pt"
            if name not in given:
                torch.manual_seed(cfg.seed)
                save_checkpoint(float_pt, {"model": get_model(cfg.model).state_dict()})
            rows.append(measure(name, cfg, float_pt, args.candidates))
            print(rows[-1], flush=True)
    write_section(
        "Candidate evaluation",
        "Seconds per candidate assignment (median over the candidates): fine-tune 200 steps, score 2,000 "
        "validation samples, cost the choice. *evaluator*: `mixprec.search.evaluator.CandidateEvaluator` "
        "(one trace, cost tables, fake-quantization validation); *run today*: quantize + calibrate + one "
        "`fit` epoch of 200 steps with integer-exact validation + `cost_report`, what a search run does per "
        "candidate. CPU, both measured one after the other on the same machine.",
        f"python benchmarks/evaluator.py --only {' '.join(args.only)} --candidates {args.candidates}",
        ["| model | steps | val samples | candidates | build s | evaluator s/candidate | run today s/candidate "
         "| speed-up | threads |", "|---|---|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
