"""Learned precision against uniform baselines under FLASH budgets -> the "Learned precision under
FLASH budgets" table of docs/benchmarks.md; ``--timing`` -> the "Training cost of the methods" table.

    .venv/bin/python benchmarks/learned.py [--only lenet5-mnist resnet8-cifar10] [--budgets 16KiB ...]
        [--methods hgq dq uniform8 uniform4 uniform2] [--runs runs/bench-learned] [--table-only]
        [--float resnet8=runs/bench-int8/resnet8-cifar10]
    .venv/bin/python benchmarks/learned.py --fpga --float lenet5=runs/bench-int8/lenet5-mnist

For every (model, FLASH budget) on ``cortex-m4``:

- ``uniform8/4/2``: the widest model of the family (``lenet5[width=w]``, ``resnet8[width=w]``) whose
  uniform b-bit weights (8-bit activations) fit the budget, judged from shapes by the cost model
  before training, then trained float and quantization-aware: the best uniform model that fits.
- ``hgq`` and ``dq`` (per-channel weights; cortex-m4 has no per-element kernels): the widest model
  whose all-2-bit version uses at most ``--headroom`` of the budget, so the method has room to
  give some channels more bits; its budget step then guarantees the limit.
- ``hgq-u4`` and ``dq-u4``: the same at uniform4's width, from the float model of that width (uniform4's
  when it was trained here; skipped when that is the width above): method against baseline from one
  starting point.
- ``dnas``: channel-wise DNAS ({0, 2, 4, 8} bits per output channel, 0 = the channel removed) from the
  full-width model, which it narrows itself; then the budget step and fine-tune as hgq and dq.

Every run is ``mixprec search`` (the command is in the table) and resumable. Runs of the same
width share one float model (``--float-from`` the first run of that width), so the methods are
compared from the same starting point. Uniform runs get the learned runs' QAT and fine-tune
epochs together as QAT epochs, so every method trains the same number of quantized epochs.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _runs import repo_relative, run_trial  # noqa: E402
from _tables import collapse_mark, merge_rows, write_section  # noqa: E402

from mixprec.cost import Budget, BudgetError, load_target  # noqa: E402
from mixprec.models import get_model  # noqa: E402
from mixprec.quantizers.fixed import MSE_MAX_BITS  # noqa: E402
from mixprec.search import RunConfig, Trial  # noqa: E402
from mixprec.search.plan import (Family, in_float_order, share_floats, trained_floats,  # noqa: E402
                                  widest)

ROOT = Path(__file__).resolve().parent.parent
TARGET = "cortex-m4"
PRESETS = {
    "lenet5-mnist": dict(
        family=Family("lenet5", tuple(round(i / 32, 5) for i in range(32, 0, -1)), (1, 28, 28)),
        budgets=["4KiB", "8KiB", "16KiB"],
        train=dict(data="mnist", float_epochs=10, qat_epochs=8, budget_epochs=2, batch_size=128, lr=2e-3,
                   qat_lr=5e-4)),
    "resnet8-cifar10": dict(
        family=Family("resnet8", tuple(range(16, 0, -1)), (3, 32, 32)),
        budgets=["16KiB", "24KiB", "32KiB", "48KiB"],
        train=dict(data="cifar10", float_epochs=30, qat_epochs=8, budget_epochs=2, batch_size=64, lr=2e-3,
                   qat_lr=5e-4, weight_decay=0.01, optimizer="adamw")),
}
# ``hgq-u4``/``dq-u4``: the learned methods at the uniform4 model's width, from its float model, so a
# learned run and the strongest uniform baseline start from the very same float weights
METHODS = ("hgq", "dq", "hgq-u4", "dq-u4", "dnas", "dnas-keep", "dnas-layer", "uniform8", "uniform4", "uniform2")


def plan(preset: dict, budget_text: str, methods, headroom: float) -> list[dict]:
    budget = Budget.from_strings(flash=budget_text)
    family = preset["family"]

    def widest_at(bits: int, share: float = 1.0):
        return widest(family, TARGET, bits, budget, share=share)
    runs = []
    for m in methods:
        if m.startswith("uniform"):
            bits = int(m[len("uniform"):])
            w = widest_at(bits)
            extra = dict(method="uniform", bits=bits)
        elif m == "dnas":  # channel-wise with pruning: from the full width, it narrows the model itself
            w = family.widths[0]
            extra = dict(method="dnas")
        elif m in ("dnas-keep", "dnas-layer"):  # no pruning: the full width where it fits at 2 bits, else hgq's
            w = family.widths[0] if widest_at(2) == family.widths[0] else widest_at(2, headroom)
            extra = (dict(method="dnas", options={"prune": "false"}) if m == "dnas-keep"
                     else dict(method="dnas", weight_granularity="per-tensor"))
        elif m.endswith("-u4"):
            w = widest_at(4)
            if w == widest_at(2, headroom):
                continue  # the same run as the plain method's
            extra = dict(method=m[:-len("-u4")])
        else:
            w = widest_at(2, headroom)
            extra = dict(method=m)
        if w is not None:
            runs.append(dict(name=m, width=w, model=family.model(w), **extra))
    return runs


def config_for(preset: dict, run: dict, budget_text: str, float_from: str | None) -> RunConfig:
    train = dict(preset["train"])
    if run["method"] == "uniform":  # the same number of quantized epochs as the learned methods
        train["qat_epochs"] += train.pop("budget_epochs")
        train["budget_epochs"] = 0
    # uniform baselines: b-bit weights, 8-bit activations (only FLASH is budgeted; a 2-bit input and
    # 2-bit activations would make a straw man)
    extra = {"bits": run["bits"], "act_bits": 8} if run["method"] == "uniform" else {}
    if "weight_granularity" in run:
        extra["weight_granularity"] = run["weight_granularity"]
    return RunConfig(model=run["model"], target=TARGET, method=run["method"], budget={"flash": budget_text},
                     float_from=float_from, options=run.get("options", {}), **extra, **train)


def _planned(args, all_budgets: bool, methods) -> list[Trial]:
    """The trials of the presets asked for, in run order; a folder that holds a run keeps the
    configuration it was made with, whatever this call would plan."""
    trials = []
    for name in args.only:
        for budget_text in (PRESETS[name]["budgets"] if all_budgets else args.budgets or PRESETS[name]["budgets"]):
            for run in plan(PRESETS[name], budget_text, methods, args.headroom):
                out = args.runs / name / budget_text / run["name"]
                stored = out / "config.yaml"
                cfg = RunConfig.load(stored) if stored.exists() else config_for(PRESETS[name], run, budget_text, None)
                trials.append(Trial(cfg, out))
    return trials


def _float_sources(args, trials) -> dict[str, Path]:
    """Float models trained elsewhere (``--float MODEL=RUN_DIR``, with the preset's float settings)
    and by earlier invocations (any budget, any method), by float id."""
    named = {}
    for item in args.float or []:
        model, _, path = item.rpartition("=")  # model names hold '=' too: resnet8[width=13]=RUN
        named[model] = Path(path)
    known = {t.float_id: named[t.config.model] for t in trials if t.trains_float() and t.config.model in named}
    for fid, out in trained_floats(_planned(args, all_budgets=True, methods=METHODS)).items():
        known.setdefault(fid, out)
    return known


def run_all(args) -> None:
    trials = _planned(args, all_budgets=False, methods=args.methods)
    for trial in in_float_order(share_floats(trials, _float_sources(args, trials))):
        run_trial(trial.config, trial.out, run=not args.table_only, device=args.device)


ACC_TITLE = "Learned precision under FLASH budgets"


def _max_range_mark(result: dict) -> str:
    """`` †`` on a uniform 2- or 3-bit run from before the least-squares weight range (commit
    076b3e1); wider uniform runs take max-abs ranges now as then."""
    bits = {r["weight_bits_mean"] for r in result["layers"] if r.get("weight_bits_mean") is not None}
    narrow = bool(bits) and min(bits) <= MSE_MAX_BITS
    return " †" if result["method"] == "uniform" and narrow and result.get("weight_range") != "mse" else ""


def float_checkpoint(out: Path) -> Path | None:
    """The float model run ``out`` started from: its own, or the one ``--float-from`` names."""
    own = out / "checkpoints" / "float.pt"
    if own.exists():
        return own
    source = RunConfig.load(out / "config.yaml").float_from
    if not source:
        return None
    path = Path(source) if Path(source).is_absolute() else ROOT / source
    path = path / "checkpoints" / "float.pt" if path.suffix != ".pt" else path
    return path if path.exists() else None


@functools.lru_cache(maxsize=None)
def _test_split(data: str):
    from mixprec.data import load_dataset
    splits = load_dataset(data, None, 0)
    return splits.x_test, splits.y_test


def float_test_accuracy(out: Path, reported: float) -> float:
    """Test accuracy of a run's float model, scored from its checkpoint (cached beside it).

    Runs before commit ea030b5 reported it after tracing had moved the model's BatchNorm running
    statistics (ResNet-8: up to 3.5 points low); the checkpoint holds the model as trained. ``reported`` stands in
    when the checkpoint is gone.
    """
    ckpt = float_checkpoint(out)
    if ckpt is None:
        return reported
    cache = ckpt.with_name("float_test_accuracy.json")
    if cache.exists():
        return json.loads(cache.read_text())["test_accuracy"]
    from mixprec.train import evaluate_accuracy, load_checkpoint

    cfg = RunConfig.load(out / "config.yaml")
    model = get_model(cfg.model)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    acc = evaluate_accuracy(model, *_test_split(cfg.data))
    cache.write_text(json.dumps({"test_accuracy": acc}) + "\n")
    return acc


def tables(args) -> None:
    acc_rows, order = [], []
    for name, preset in PRESETS.items():
        order.append((name, "none (reference)", "uniform int8"))
        order += [(name, b, m) for b in preset["budgets"] for m in METHODS]
        ref = ROOT / "runs" / "bench-int8" / name / "result.json"  # benchmarks/uniform_int8.py
        if ref.exists():
            r = json.loads(ref.read_text())
            acc_rows.append(f"| {name} | none (reference) | uniform int8 | full | {r['accuracy']['float']:.2%} | "
                            f"{r['accuracy']['quantized']:.2%}{_max_range_mark(r)}{collapse_mark(r)} | "
                            f"{r['cost']['flash_bytes']:,} | yes | 8.00 | `python benchmarks/uniform_int8.py` |")
        for budget_text in preset["budgets"]:
            for method in METHODS:
                out = args.runs / name / budget_text / method
                if not (out / "result.json").exists():
                    continue
                r = json.loads((out / "result.json").read_text())
                cmd = (out.parent / f"{method}.command").read_text().strip()
                mean_bits = _mean_bits(r)
                float_acc = float_test_accuracy(out, r["accuracy"]["float"])
                acc_rows.append(f"| {name} | {budget_text} | {method} | {_width(r['model'])} | "
                                f"{float_acc:.2%} | {r['accuracy']['quantized']:.2%}{_max_range_mark(r)}{collapse_mark(r)} | {r['cost']['flash_bytes']:,} | "
                                f"{'yes' if r['feasible'] else 'NO'} | {mean_bits:.2f} | `{cmd}` |")
    header = ["| model | FLASH budget | method | model width | float test acc (start) | test acc (integer-exact) | "
              "FLASH B | feasible | weight bits (mean) | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    write_section(ACC_TITLE,
                  "cortex-m4 (2/4/8-bit kernels, per-channel weights). `uniformB`: the widest model of the family "
                  "whose uniform B-bit weights (8-bit activations) fit, trained float then quantization-aware. `hgq`/`dq`: the widest "
                  "model whose all-2-bit version uses at most 75% of the budget, then the method, then the budget "
                  "step (snap to 2/4/8, meet the limit) and a fine-tune with bits frozen. `hgq-u4`/`dq-u4`: the same "
                  "at uniform4's width (when it differs), from uniform4's float model (or, where that run lives on "
                  "another machine, the float model of that width this machine trained by the same command). `dnas`: "
                  "channel-wise DNAS (a width per output channel among 0/2/4/8 bits, 0 = the channel removed from "
                  "the exported layer) from the full-width float model, then the budget step and fine-tune as hgq/dq; "
                  "'model width' is where it started. `dnas-keep`: the same without pruning ({2, 4, 8} bits per "
                  "channel, `-o prune=false`), from the full width where it fits at 2 bits, else from hgq/dq's width; "
                  "`dnas-layer`: layer-wise DNAS from that width (one width per layer, `--granularity per-tensor`: "
                  "its grid per tensor too). Runs of "
                  "one width share one float model; 'float test acc' is that model's, scored from its checkpoint, "
                  "so a row's loss to quantization is the difference of its two accuracies (between widths, float training noise "
                  "of a single seed is about 0.1 points on MNIST). Accuracy on the full test set with the "
                  "integer-exact model; 'weight bits' is "
                  "the parameter-weighted mean. A missing row: no model of the family fits at that width, or "
                  "the run is not done yet. Rows whose run directory is not on the machine that wrote the table "
                  "are kept as measured before; the command of each row reproduces it. Their float figure is the one "
                  "the run reported, which before commit ea030b5 was scored after tracing had moved the float "
                  "model's BatchNorm statistics: too low for ResNet-8 (width 6: 65.29% reported, 68.78% from its "
                  "checkpoint; LeNet-5 has no BatchNorm). Their quantized models were folded from those "
                  "statistics too, which costs little: in one check (width 9) the 4-bit model before QAT "
                  "scored 59.6% against 59.2% from the intact float model. † A uniform 2-bit row measured with "
                  "max-abs weight ranges, before commit 076b3e1; the uniform method now gives each channel of "
                  "3 bits or fewer its least-squares range (wider ones keep the max-abs range, as then). FLASH is "
                  "both constant sections of the C library: since commit a401f0e that includes the layout table of "
                  "a layer whose channels have different widths (a byte per output channel), which the budget step "
                  "now meets too; hgq/dq rows kept from before count the weights section only and would carry at "
                  "most one byte per output channel more (LeNet-5 widths 0.28-0.78: 74-187 B; ResNet-8 widths "
                  "9/11/13/full: 199/241/283/346 B), so those at the budget's last bytes are over it on this count. "
                  "Since the budget step's fill (after commit 36c68f1) hgq, dq and dnas by default raise widths "
                  "into budget the method left unused where the validation loss falls; rows whose command says "
                  "`--no-fill` were measured before it, and that flag reproduces them.",
                  "python benchmarks/learned.py", header + merge_rows(ACC_TITLE, acc_rows, 3, order))


FPGA = dict(model="lenet5", data="mnist", target="fpga-hls4ml", budgets=["1e5", "3e5", "1e6"],
            train=dict(float_epochs=10, qat_epochs=8, budget_epochs=2, batch_size=128, lr=2e-3, qat_lr=5e-4))
FPGA_RUNS = {"hgq-element": dict(method="hgq", weight_granularity="per-element"),
             "hgq-channel": dict(method="hgq", weight_granularity="per-channel"),
             "hgq-element-act-channel": dict(method="hgq", weight_granularity="per-element",
                                             options={"act_granularity": "per-channel"}),
             "hgq-element-act-element": dict(method="hgq", weight_granularity="per-element",
                                             options={"act_granularity": "per-element"}),
             "dq-channel": dict(method="dq", weight_granularity="per-channel"),
             "uniform": dict(method="uniform")}


def fpga_config(name: str, budget: str, float_from: str | None) -> RunConfig:
    from mixprec.api import largest_uniform_bits

    extra = dict(FPGA_RUNS[name])
    if extra["method"] == "uniform":  # the widest uniform width (weights = activations) within the EBOPs budget
        extra["bits"] = largest_uniform_bits(get_model(FPGA["model"]), FPGA["target"], (1, 28, 28),
                                             Budget.from_strings(ebops=budget))
    return RunConfig(model=FPGA["model"], data=FPGA["data"], target=FPGA["target"], budget={"ebops": budget},
                     float_from=float_from, **extra, **FPGA["train"])


def run_fpga(args) -> None:
    """LeNet-5 on fpga-hls4ml under EBOPs budgets: HGQ per element against per channel, DQ and the
    widest uniform width; all from one float model (``--float lenet5=RUN`` or the first run's)."""
    source = next((Path(i.partition("=")[2]) for i in args.float or [] if i.startswith("lenet5=")), None)
    for budget in args.budgets_fpga or FPGA["budgets"]:
        for name in args.fpga_runs or FPGA_RUNS:
            out = args.runs / "lenet5-mnist-fpga" / budget / name
            try:
                cfg = fpga_config(name, budget, str(repo_relative(source)) if source else None)
            except BudgetError as e:  # no uniform width fits: the table has no row for it
                logging.warning("%s: %s", out, e)
                continue
            run_trial(cfg, out, run=not args.table_only, device=args.device)
            if source is None:
                source = out


FPGA_TITLE = "HGQ granularity on the FPGA"


def fpga_table(args) -> None:
    rows = []
    for budget in FPGA["budgets"]:
        for name in FPGA_RUNS:
            out = args.runs / "lenet5-mnist-fpga" / budget / name
            if not (out / "result.json").exists():
                continue
            r = json.loads((out / "result.json").read_text())
            cmd = (out.parent / f"{name}.command").read_text().strip()
            rows.append(f"| {budget} | {name} | {r['accuracy']['quantized']:.2%}{_max_range_mark(r)}{collapse_mark(r)} | {r['cost']['ebops']:,.0f} | "
                        f"{'yes' if r['feasible'] else 'NO'} | {_mean_bits(r):.2f} | `{cmd}` |")
    header = ["| EBOPs budget | run | test acc (integer-exact) | EBOPs | feasible | weight bits (mean) | command |",
              "|---|---|---|---|---|---|---|"]
    order = [(b, n) for b in FPGA["budgets"] for n in FPGA_RUNS]
    write_section(FPGA_TITLE,
                  "LeNet-5 / MNIST on `fpga-hls4ml` (fixed point, any width 0..16; EBOPs of the deployed model: "
                  "effective bits of each integer weight, highest to lowest set bit, times its input's bits). HGQ per element and per channel "
                  "(activations per tensor unless the run says otherwise; HGQ learns the input's bits per pixel, the "
                  "FPGA default), DQ "
                  "per channel, and the widest uniform width (weights = activations) that meets the budget, all "
                  "from one float model, 8 + 2 quantized epochs each.", "python benchmarks/learned.py --fpga",
                  header + merge_rows(FPGA_TITLE, rows, 2, order))


def _mean_bits(r: dict) -> float:
    rows = [x for x in r["layers"] if x.get("weight_bits_mean") is not None]
    return sum(x["weight_bits_mean"] * x["params"] for x in rows) / max(sum(x["params"] for x in rows), 1)


def time_methods(name: str, preset: dict, n_train: int, epochs: int = 3, rounds: int = 2) -> list[dict]:
    """Seconds per training epoch (validation excluded) of float training and of each method's
    quantized phase, on the full-width model, in this one process: the training cost ratio.

    The sequence (float, uniform, hgq, dq) runs ``rounds`` times and each keeps its fastest epoch:
    on a shared machine an epoch is only ever slowed by other work, so the minimum is the least
    disturbed figure, and interleaving spreads the disturbances over every method alike."""
    import dataclasses

    import torch

    from mixprec.data import load_dataset
    from mixprec.search import SearchContext, get_method
    from mixprec.train import fit

    train = preset["train"]
    data = load_dataset(train["data"], None, 0)
    data = dataclasses.replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                               x_val=data.x_val[:512], y_val=data.y_val[:512])
    budget = Budget.from_strings(flash=preset["budgets"][-1])
    common = {k: v for k, v in train.items() if k not in ("data",)}
    seconds: dict[str, list[float]] = {}
    for _ in range(rounds):
        torch.manual_seed(0)
        model = get_model(preset["family"].name)
        cfg = RunConfig(model=preset["family"].name, data=train["data"], target=TARGET, **{**common, "float_epochs": epochs})
        hist = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("float"),
                   augment=data.augment)
        seconds.setdefault("float", []).extend(h["seconds"] for h in hist)
        for method, phase, options in (("uniform", "qat", {}), ("hgq", "hgq", {}), ("dq", "dq", {"weight_epochs": 0})):
            cfg = RunConfig(model=preset["family"].name, data=train["data"], target=TARGET, method=method,
                            budget={"flash": preset["budgets"][-1]}, options=options, **{**common, "qat_epochs": epochs})
            torch.manual_seed(0)
            ctx = SearchContext(cfg, model, data, load_target(TARGET), budget, 8, 8)
            get_method(method).run(ctx)
            seconds.setdefault(method, []).extend(h["seconds"] for h in ctx.history[phase])
    return [{"method": m, "seconds": min(s)} for m, s in seconds.items()]


TIMING_TITLE = "Training cost of the methods"


def timing_table(args) -> None:
    rows = []
    for name in args.only:
        n = args.timing_samples
        t = {r["method"]: r["seconds"] for r in time_methods(name, PRESETS[name], n, rounds=args.timing_rounds)}
        f = t["float"]
        rows.append(f"| {name} | {n:,} | {f:.2f} | {t['uniform']:.2f} | {t['hgq']:.2f} | {t['dq']:.2f} | "
                    f"{t['uniform'] / f:.2f}x / {t['hgq'] / f:.2f}x / {t['dq'] / f:.2f}x |")
    header = ["| model | training samples | float s/epoch | uniform QAT | hgq | dq | ratios to float (uniform / hgq / dq) |",
              "|---|---|---|---|---|---|---|"]
    write_section(TIMING_TITLE,
                  "Fastest epoch (seconds, validation excluded) of float training and of each method's "
                  "quantized phase (DQ: the alternating phase b), on the full-width model and a subset of the "
                  "training set: float, uniform, hgq and dq run in turn, 3 epochs each, and the sequence twice "
                  "(`--timing-rounds`), in one process on this machine's 2 CPU cores with no other job of ours "
                  "running. A shared machine only ever slows an epoch down, so the fastest one is the least "
                  "disturbed figure; medians of a single pass varied by a third between two runs (ResNet-8 "
                  "hgq: 1.39x and 1.90x on 2026-12-02).", "python benchmarks/learned.py --timing",
                  header + merge_rows(TIMING_TITLE, rows, 1, [(n,) for n in PRESETS]))


def _width(model: str) -> str:
    return model.split("width=")[1].rstrip("]") if "width=" in model else "full"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    ap.add_argument("--budgets", nargs="+", help="subset of the preset's budgets")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--headroom", type=float, default=0.75, help="learned runs: all-2-bit share of the budget")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-learned")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the tables from finished runs")
    ap.add_argument("--timing", action="store_true", help="only measure the training cost table")
    ap.add_argument("--fpga", action="store_true", help="only the HGQ-granularity table on fpga-hls4ml")
    ap.add_argument("--budgets-fpga", nargs="+", help="subset of the FPGA EBOPs budgets")
    ap.add_argument("--fpga-runs", nargs="+", choices=list(FPGA_RUNS), help="subset of the FPGA runs")
    ap.add_argument("--timing-samples", type=int, default=12_800)
    ap.add_argument("--timing-rounds", type=int, default=2, help="repeat the timed sequence; each keeps its fastest epoch")
    ap.add_argument("--float", nargs="+", metavar="MODEL=RUN_DIR",
                    help="reuse these float models (trained with the preset's float settings), e.g. "
                         "resnet8=runs/bench-int8/resnet8-cifar10")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["MIXPREC_DATA"] = args.data_dir
    if args.timing:
        timing_table(args)
        return
    if args.fpga:
        if not args.table_only:
            run_fpga(args)
        fpga_table(args)
        return
    run_all(args)  # with --table-only: only each run's command file
    tables(args)


if __name__ == "__main__":
    main()
