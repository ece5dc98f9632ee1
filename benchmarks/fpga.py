"""Our HGQ against HGQ2 on `fpga-hls4ml`, side by side -> the "FPGA: HGQ against HGQ2" table.

    .venv/bin/python benchmarks/fpga.py [--task mnist-mlp digits-mlp] [--only ours hgq2] [--epochs N]
        [--runs DIR] [--table-only]
    .venv/bin/python benchmarks/fpga.py --verify [--task digits-mlp]

``--verify``: one model per granularity (per-element, per-channel, per-tensor weights and
activations) exported through hls4ml, its compiled C++ run on the whole test set against the integer
reference -> the "FPGA: hls4ml verification" table, with the resources the HGQ paper's relation
estimates from EBOPs (about LUT + 55 x DSP; no Vivado/Vitis report here).

Needs ``pip install hgq2`` (Keras 3, run here on its torch backend) for the HGQ2 rows.

Ours: ``mixprec search --method hgq --granularity per-element -o act_granularity=per-element`` (the
input's bits learned per feature, the FPGA default) under each EBOPs level of the task, and one
``-o schedule=front`` run whose Pareto epochs become runs of their own; all from one float model.
HGQ2: the same MLP of ``QDense`` layers with HGQ2's defaults (per-weight and per-activation bits,
its input quantized per feature), trained on the same split with its beta ramped over the run
(``BetaScheduler``, log), every epoch's validation accuracy, test accuracy and EBOPs recorded; at
each level, its epoch with the best validation accuracy within the level (its Pareto front).

Both sides counted with both rules: ``ours`` (per multiplier, the integer weight's set bits times
its input's bits; a weight that rounds to 0 costs nothing) and ``nominal`` (each weight's learned
width times its input's width: HGQ2's rule without its bias term); HGQ2's own figure (with its
bias term) beside them. Our rows are integer-exact test accuracy of the deployed model; HGQ2's its
Keras model's (HGQ2 states it is bit-exact with its firmware).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _runs import repo_relative, run_trial  # noqa: E402
from _tables import COLLAPSED, merge_rows, write_section  # noqa: E402

from mixprec.cost.compute import effective_bits  # noqa: E402
from mixprec.data import load_dataset  # noqa: E402
from mixprec.search import RunConfig, Trial  # noqa: E402
from mixprec.search.plan import in_float_order, share_floats, trained_floats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TITLE = "FPGA: HGQ against HGQ2"
VERIFY_TITLE = "FPGA: hls4ml verification"
RULE_TITLE = "FPGA: HGQ against HGQ2 under one EBOPs rule"
#: (name in the table, our cost key, HGQ2's record key)
RULES = (("set bits (ours)", "ebops", "ebops"), ("nominal widths (HGQ2's)", "ebops_nominal", "ebops_nominal"))
TARGET = "fpga-hls4ml"


@dataclass(frozen=True)
class Task:
    model: str
    data: str
    hidden: tuple[int, ...]
    levels: tuple[str, ...]  # EBOPs levels, as in the table
    train: dict
    nominal_train: dict  # overrides of ``train`` for our runs budgeted by nominal widths (``--bops``)
    front: dict  # our schedule=front options
    hgq2: dict  # HGQ2: epochs, batch, lr, beta range


TASKS = {
    "mnist-mlp": Task("mnist-mlp", "mnist[scale=unit]", (64, 32), ("530k", "106k", "23k", "8.2k", "4.7k", "2.1k"),
                      dict(float_epochs=10, qat_epochs=10, budget_epochs=2, batch_size=128, lr=2e-3, qat_lr=1e-3),
                      dict(qat_epochs=30),
                      dict(beta="0.01", beta_end="100"),
                      dict(epochs=100, batch_size=128, lr=2e-3, beta0=1e-7, beta1=3e-3, lr_schedule="constant")),
    "digits-mlp": Task("digits-mlp", "digits", (32, 32), ("48k", "26k", "16.5k", "10.3k", "4.1k"),
                       dict(float_epochs=60, qat_epochs=60, budget_epochs=10, batch_size=32, lr=3e-3, qat_lr=1e-3),
                       {},
                       dict(beta="0.01", beta_end="100"),
                       dict(epochs=200, batch_size=32, lr=3e-3, beta0=1e-7, beta1=3e-3, lr_schedule="constant")),
}


def level_value(text: str) -> float:
    return float(text[:-1]) * 1e3 if text.endswith("k") else float(text)


# -- ours ---------------------------------------------------------------------------------------------
def our_trials(task: Task, runs: Path, epochs_scale: float = 1.0) -> list[Trial]:
    """Ours for a task: one run under each level as an EBOPs budget (our rule), the front run, and
    one run under each level as a BOPs budget (nominal widths times input widths: HGQ2's own rule)."""
    def scaled(train: dict) -> dict:
        return {k: max(1, round(v * epochs_scale)) if k.endswith("epochs") else v for k, v in train.items()}
    base = dict(model=task.model, data=task.data, target=TARGET, method="hgq", weight_granularity="per-element",
                **scaled(task.train))
    nominal = {**base, **scaled(task.nominal_train)}
    trials = [Trial(RunConfig(**base, budget={"ebops": f"{level_value(lv):g}"},
                              options={"act_granularity": "per-element"}), runs / task.model / "ours" / lv)
              for lv in task.levels]
    trials += [Trial(RunConfig(**nominal, budget={"bops": f"{level_value(lv):g}"},
                               options={"act_granularity": "per-element"}), runs / task.model / "ours" / f"bops-{lv}")
               for lv in task.levels]
    trials.append(Trial(RunConfig(**base, options={"act_granularity": "per-element", "schedule": "front",
                                                   **task.front}), runs / task.model / "ours" / "front"))
    return [Trial(RunConfig.load(t.out / "config.yaml"), t.out) if (t.out / "config.yaml").exists() else t
            for t in trials]


def run_ours(trials: list[Trial]) -> None:
    for trial in in_float_order(share_floats(trials, trained_floats(trials))):
        run_trial(trial.config, trial.out)


# -- HGQ2 ---------------------------------------------------------------------------------------------
def run_hgq2(task: Task, out: Path, epochs: int | None = None, settings: dict | None = None) -> list[dict]:
    """HGQ2 on the task's split; every epoch's record (``out/epochs.json``, read back when there).
    ``settings`` override the task's (beta0, beta1, lr_schedule)."""
    record = out / "epochs.json"
    if record.exists():
        return json.loads(record.read_text())["epochs"]
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    from hgq.config import LayerConfigScope, QuantizerConfigScope
    from hgq.layers import QDense
    from hgq.utils.sugar import BetaScheduler, FreeEBOPs, PieceWiseSchedule

    h = {**task.hgq2, **(settings or {})}
    epochs = epochs or h["epochs"]
    data = load_dataset(task.data, seed=0)
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
    x_train, x_val, x_test = flat(data.x_train), flat(data.x_val), flat(data.x_test)
    y_train, y_val, y_test = data.y_train.numpy(), data.y_val.numpy(), data.y_test.numpy()
    keras.utils.set_random_seed(0)
    with QuantizerConfigScope(place="all"), LayerConfigScope(enable_ebops=True, beta0=h["beta0"]):
        inp = keras.Input((x_train.shape[1],))
        x = inp
        for width in task.hidden:
            x = QDense(width, activation="relu")(x)
        model = keras.Model(inp, QDense(data.num_classes)(x))
    steps = epochs * int(np.ceil(len(x_train) / h["batch_size"]))
    lr = keras.optimizers.schedules.CosineDecay(h["lr"], steps) if h["lr_schedule"] == "cosine" else h["lr"]
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    epochs_log: list[dict] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            _, test_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
            ours, nominal = hgq2_ebops(model, x_train.shape[1])
            epochs_log.append({"epoch": epoch, "val_accuracy": float(logs["val_accuracy"]),
                               "test_accuracy": float(test_acc), "ebops_hgq2": float(logs["ebops"]),
                               "ebops": ours, "ebops_nominal": nominal, "beta": float(logs.get("beta", 0.0))})

    t0 = time.perf_counter()
    model.fit(x_train, y_train, batch_size=h["batch_size"], epochs=epochs, validation_data=(x_val, y_val),
              callbacks=[FreeEBOPs(), BetaScheduler(PieceWiseSchedule([(0, h["beta0"], "log"),
                                                                         (epochs, h["beta1"], "constant")])),
                         Record()], verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"epochs": epochs_log, "seconds": time.perf_counter() - t0,
                                  "settings": {**h, "epochs": epochs}}, indent=1))
    return epochs_log


def hgq2_ebops(model, n_in: int) -> tuple[float, float]:
    """An HGQ2 model's EBOPs by our rule (each quantized weight's set bits times its input's bits)
    and by the nominal one (its learned weight widths times its input's widths)."""
    from hgq.layers import QDense
    from keras import ops

    ours = nominal = 0.0
    width = n_in
    for layer in model.layers:
        if not isinstance(layer, QDense):
            continue
        b_in = np.asarray(ops.convert_to_numpy(layer.iq.bits_((1, width)))).reshape(-1)
        w = np.asarray(ops.convert_to_numpy(layer.qkernel), dtype=np.float64)  # (in, out), on power-of-two grids
        k = torch.from_numpy(np.round(w * 2.0 ** 40).astype(np.int64))  # exact: HGQ2 grids are far coarser
        ours += float((b_in[:, None] * effective_bits(k).numpy()).sum())
        b_w = np.asarray(ops.convert_to_numpy(layer.kq.bits_(tuple(w.shape))))
        nominal += float((b_in[:, None] * b_w).sum())
        width = w.shape[1]
    return ours, nominal


def best_within(points: list[dict], level: float, key: str) -> dict | None:
    """The point with the best validation accuracy whose ``key`` cost is within ``level``."""
    inside = [p for p in points if p[key] <= level]
    return max(inside, key=lambda p: p["val_accuracy"]) if inside else None


# -- table --------------------------------------------------------------------------------------------
def table(tasks: list[str], runs: Path) -> None:
    rows, order = [], []
    for name in tasks:
        task = TASKS[name]
        front_rows = _our_front(runs / name / "ours" / "front")
        hgq2_points = _hgq2_record(runs, name).get("epochs", [])
        for lv in task.levels:
            limit = level_value(lv)
            order += [(name, lv, m) for m in ("hgq", "hgq front", "HGQ2")]
            out = runs / name / "ours" / lv
            if (out / "result.json").exists():
                r = json.loads((out / "result.json").read_text())
                cmd = (out.parent / f"{lv}.command").read_text().strip()
                rows.append(_row(name, lv, limit, "hgq", r["accuracy"]["quantized"], r["cost"]["ebops"],
                                 r["cost_detail"]["ebops_nominal"], None, r["feasible"], f"`{cmd}`",
                                 degenerate=bool(r.get("degenerate"))))
            best = best_within(front_rows, limit, "ebops")
            if best is not None:
                cmd = (runs / name / "ours" / "front.command").read_text().strip()
                rows.append(_row(name, lv, limit, "hgq front", best["test_accuracy"], best["ebops"], best["ebops_nominal"],
                                 None, True, f"`{cmd}` ({best['run']})"))
            best = best_within(hgq2_points, limit, "ebops_hgq2")
            if best is not None:
                rows.append(_row(name, lv, limit, "HGQ2", best["test_accuracy"], best["ebops"], best["ebops_nominal"],
                                 best["ebops_hgq2"], True, f"`python benchmarks/fpga.py --task {name} --only hgq2` "
                                 f"(epoch {best['epoch']})"))
    header = ["| task | EBOPs level | run | test acc | EBOPs (ours: set bits) | of the level | EBOPs (nominal widths) | "
              "EBOPs (HGQ2's own) | within level | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    about = (f"`{TARGET}`. `hgq`: our HGQ under the level as a budget (per-element weights and activations, the "
             "input's bits learned per feature), the model as deployed (integer-exact test accuracy, EBOPs of the "
             "exported weights; its controller lands the budget from under it and the budget step's fill raises widths "
             "into what it left where the validation loss falls, by default since commit 36c68f1 (rows whose command "
             "says `--no-fill` are from before): 'of the level' is the share used); `hgq front`: one `-o schedule=front` run, its Pareto member with the best "
             "validation accuracy within the level (each member a run of its own, budget step and fine-tune "
             "applied); `HGQ2`: HGQ2 0.2 (Keras 3, torch backend) with its defaults, beta ramped (log) over its "
             f"run ({'; '.join(_hgq2_settings(runs, name) for name in tasks)}), its "
             "epoch with the best validation accuracy within the level by its own EBOPs. 'ours' counts each "
             "integer weight's set bits times its input's bits; 'nominal' each weight's learned width times its "
             "input's width (HGQ2's rule without its bias term). One seed.")
    write_section(TITLE, about, "python benchmarks/fpga.py", header + merge_rows(TITLE, rows, 3, order))


def rule_table(tasks: list[str], runs: Path) -> None:
    """Each side judged by one rule at a time: at each level, the model with the best validation
    accuracy among all of that side's models within the level by that rule (ours: every budgeted run
    and front member; HGQ2: every epoch)."""
    rows, order = [], []
    for name in tasks:
        ours = _our_models(runs / name / "ours", TASKS[name].levels)
        theirs = _hgq2_record(runs, name).get("epochs", [])
        for lv in TASKS[name].levels:
            for rule, our_key, their_key in RULES:
                mine, best = best_within(ours, level_value(lv), our_key), best_within(theirs, level_value(lv), their_key)
                order.append((name, lv, rule))
                mine_text = (f"{mine['test_accuracy']:.2%} | {mine[our_key]:,.0f} | {mine['run']}" if mine
                             else "none within | | ")
                best_text = (f"{best['test_accuracy']:.2%} | {best[their_key]:,.0f} | epoch {best['epoch']}" if best
                             else "none within | | ")
                ahead = (f"{100 * (mine['test_accuracy'] - best['test_accuracy']):+.2f}" if mine and best else "")
                rows.append(f"| {name} | {lv} | {rule} | {mine_text} | {best_text} | {ahead} |")
    header = ["| task | EBOPs level | rule | hgq: test acc | hgq: EBOPs | hgq: run | HGQ2: test acc | HGQ2: EBOPs | "
              "HGQ2: epoch | hgq ahead (points) |", "|---|---|---|---|---|---|---|---|---|---|"]
    nominal = "; ".join(f"{name} {_epochs_in_all({**TASKS[name].train, **TASKS[name].nominal_train})}"
                        for name in tasks)
    about = ("Each side judged by one EBOPs rule at a time: at each level, the model with the best validation "
             "accuracy among all of that side's models within the level by that rule. Ours (`run`): the runs "
             "of the table above under each level by our rule (`LEVEL`, `--ebops`), one more under each level "
             "by nominal widths (`bops-LEVEL`: the same command with `--bops LEVEL`; epochs in all: "
             f"{nominal}), and every front member; HGQ2: every epoch of its run. 'set bits' counts each integer "
             "weight from its highest to its lowest set bit (our `ebops`); 'nominal widths' each weight's "
             "learned width times its input's (our `bops` on these MLPs; about HGQ2's own count, the one its "
             "beta penalises). Test accuracy integer-exact for ours, HGQ2's Keras model for HGQ2. One seed.")
    write_section(RULE_TITLE, about, "python benchmarks/fpga.py --table-only",
                  header + merge_rows(RULE_TITLE, rows, 3, order))


def _our_models(ours: Path, levels: tuple[str, ...]) -> list[dict]:
    """Every model our side made for a task: the budgeted runs and the front's members."""
    runs = ([ours / lv for lv in levels] + [ours / f"bops-{lv}" for lv in levels]
            + [ours / "front" / row["run"] for row in _front_index(ours / "front")])
    models = []
    for run in runs:
        if not (run / "result.json").exists():
            continue
        r = json.loads((run / "result.json").read_text())
        if r.get("degenerate"):
            continue
        models.append({"run": str(run.relative_to(ours)), "val_accuracy": _final_val_accuracy(r),
                       "test_accuracy": r["accuracy"]["quantized"], "ebops": r["cost"]["ebops"],
                       "ebops_nominal": r["cost_detail"]["ebops_nominal"]})
    return models


def _final_val_accuracy(result: dict) -> float:
    """The validation accuracy of the model as it was saved: its last phase's last epoch."""
    phases = [epochs for epochs in result["history"].values() if epochs]
    return phases[-1][-1]["val_accuracy"]


def _hgq2_record(runs: Path, name: str) -> dict:
    """HGQ2's record of a task (``run_hgq2``): its epochs and settings; empty where it has not run."""
    record = runs / name / "hgq2" / "epochs.json"
    return json.loads(record.read_text()) if record.exists() else {}


def _epochs_in_all(train: dict) -> int:
    return sum(v for k, v in train.items() if k.endswith("epochs"))


def _front_index(run: Path) -> list[dict]:
    index = run / "front" / "front.json"
    return json.loads(index.read_text())["front"] if index.exists() else []


def _hgq2_settings(runs: Path, name: str) -> str:
    """How HGQ2 was trained on a task, from its record (the task's defaults where none), beside how
    long ours trains."""
    h = {**TASKS[name].hgq2, **_hgq2_record(runs, name).get("settings", {})}
    ours = _epochs_in_all(TASKS[name].train)
    return (f"{name}: {h['epochs']} epochs, beta {h['beta0']:g} to {h['beta1']:g}, lr {h['lr']:g} "
            f"{'cosine-decayed' if h['lr_schedule'] == 'cosine' else 'constant'}; ours {ours} epochs in all")


def _our_front(run: Path) -> list[dict]:
    points = []
    for row in _front_index(run):
        r = json.loads((run / row["run"] / "result.json").read_text())
        points.append({"run": row["run"], "val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"],
                       "ebops": r["cost"]["ebops"], "ebops_nominal": r["cost_detail"]["ebops_nominal"]})
    return points


def _row(task, level, limit, run, acc, ebops, nominal, own, within, command, degenerate: bool = False) -> str:
    own_text = f"{own:,.0f}" if own is not None else ""
    acc_text = f"{acc:.2%}" + (COLLAPSED if degenerate else "")
    return (f"| {task} | {level} | {run} | {acc_text} | {ebops:,.0f} | {ebops / limit:.0%} | {nominal:,.0f} | {own_text} | "
            f"{'yes' if within else 'NO'} | {command} |")


# -- hls4ml verification ----------------------------------------------------------------------------
#: One model per granularity: (label, weight granularity, our options, EBOPs budget as a share of the
#: task's first level); the per-element one is the first level's budgeted run itself
GRANULARITY_RUNS = (("per-element", None, None, None),
                    ("per-channel", "per-channel", {"act_granularity": "per-channel"}, 1.0),
                    ("per-tensor", "per-tensor", {"act_granularity": "per-tensor"}, 1.0))


def verify_trials(task: Task, runs: Path) -> list[tuple[str, Trial]]:
    first = our_trials(task, runs)[0]
    out = []
    for label, gran, options, share in GRANULARITY_RUNS:
        if gran is None:
            out.append((label, first))
            continue
        cfg = replace(first.config, weight_granularity=gran, options=options,
                      budget={"ebops": f"{share * level_value(task.levels[0]):g}"})
        path = runs / task.model / "verify" / label
        out.append((label, Trial(RunConfig.load(path / "config.yaml"), path) if (path / "config.yaml").exists()
                    else Trial(cfg, path)))
    return out


def run_verify(tasks: list[str], runs: Path) -> None:
    from mixprec.export import export_run
    from mixprec.export.verify import verify_run

    rows, order = [], []
    for name in tasks:
        trials = verify_trials(TASKS[name], runs)
        run_ours([t for _, t in trials])
        for label, trial in trials:
            order.append((name, label))
            t0 = time.perf_counter()
            export_run(trial.out, "hls4ml")
            (row,) = verify_run(trial.out, n_inputs=None, formats=["hls4ml"])
            seconds = time.perf_counter() - t0
            r = json.loads((trial.out / "result.json").read_text())
            cmd = (trial.out.parent / f"{trial.out.name}.command").read_text().strip()
            rows.append(f"| {name} | {label} | {r['accuracy']['quantized']:.2%} | {r['cost']['ebops']:,.0f} | "
                        f"{row.inputs:,} | {row.mismatches} | {seconds:.0f} | `{cmd}`; `mixprec export "
                        f"{repo_relative(trial.out)} --format hls4ml`; `mixprec verify {repo_relative(trial.out)} -n 0` |")
    header = ["| task | granularity (weights and activations) | test acc | EBOPs = estimated LUT + 55 x DSP | "
              "test inputs | mismatches | export + verify s | commands |", "|---|---|---|---|---|---|---|---|"]
    about = (f"`{TARGET}`: one HGQ model per granularity exported through hls4ml 1.3 (Vivado backend, "
             "`io_parallel`, latency strategy; per-element and per-channel grids through its fixed-point quantizer "
             "layers), the compiled C++ emulation run on the whole test set and compared with the integer reference "
             "output by output (`array_equal`). No Vivado/Vitis synthesis here, so no hls4ml resource report: the "
             "resource figure is the HGQ paper's estimate from EBOPs (about LUT + 55 x DSP), not a measurement.")
    write_section(VERIFY_TITLE, about, f"python benchmarks/fpga.py --verify --task {' '.join(tasks)}",
                  header + merge_rows(VERIFY_TITLE, rows, 2, order))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--only", nargs="+", default=["ours", "hgq2"], choices=["ours", "hgq2"])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-fpga")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="our runs' epochs times this (a quick look)")
    ap.add_argument("--hgq2-epochs", type=int, help="HGQ2's epochs (default: the task's)")
    ap.add_argument("--hgq2-beta", type=float, nargs=2, metavar=("START", "END"),
                    help="HGQ2's beta ramp (log), first to last epoch (default: the task's)")
    ap.add_argument("--hgq2-lr-schedule", choices=["cosine", "constant"], help="default: the task's (cosine)")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--verify", action="store_true", help="the hls4ml verification table instead")
    args = ap.parse_args()
    os.environ["MIXPREC_DATA"] = args.data_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.verify:
        run_verify(args.task, args.runs)
        return
    if not args.table_only:
        for name in args.task:
            task = TASKS[name]
            if "ours" in args.only:
                run_ours(our_trials(task, args.runs, args.epochs_scale))
            if "hgq2" in args.only:
                settings = {"lr_schedule": args.hgq2_lr_schedule} if args.hgq2_lr_schedule else {}
                if args.hgq2_beta:
                    settings.update(beta0=args.hgq2_beta[0], beta1=args.hgq2_beta[1])
                run_hgq2(task, args.runs / name / "hgq2", args.hgq2_epochs, settings)
    table(args.task, args.runs)
    rule_table(args.task, args.runs)


if __name__ == "__main__":
    main()
