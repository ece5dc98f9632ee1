"""Channel-wise DNAS against a layer-wise search and uniform widths, on the `mpic` target:
full-width LeNet-5 / MNIST under FLASH budgets (with the weight-bit figure PLiNIO reports) and
ResNet-8 / CIFAR-10 under FLASH and energy budgets -> the "DNAS on ..." tables of docs/benchmarks.md.

    .venv/bin/python benchmarks/dnas.py [--task lenet5-mnist|resnet8-cifar10]
        [--granularities per-channel per-tensor] [--budgets 16KiB energy-90uJ ...]
        [--runs DIR] [--no-uniform] [--variants] [--table-only]

Every run is ``mixprec search --method dnas`` (or ``uniform``) on ``mpic`` ({0, 2, 4, 8}-bit weights,
8-bit activations: these budgets keep them) from one float model per task (the first run trains
it, the others start from it: ``mixprec.search.plan.share_floats``); the budget is the strength
of the search (the run's controller aims at it, the budget step guarantees it). Resumable: a
finished run is read back, an unfinished one continues.

Weight bits: ``sum over kept channels of (kept input columns x kernel elements x the channel's
bits)``, no bias, counted on the deployed (physically pruned) model: PLiNIO's size figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _runs import command_file, run_trial  # noqa: E402
from _tables import collapse_mark, merge_rows, row_cells, write_section  # noqa: E402

from mixprec.cost.keys import BY_NAME  # noqa: E402
from mixprec.granularity import expand  # noqa: E402
from mixprec.search import RunConfig, Trial, load_run  # noqa: E402
from mixprec.search.plan import in_float_order, share_floats, trained_floats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UNIFORM = (8, 4, 2)
# PLiNIO's MPS on the same task, as the issue quotes its author's measurement (one seed): not our run
PEER = ("PLiNIO MPS (quoted in issue 17, not run here): per-channel 98.71% at 180.7 kbit, 98.75% at 115.9k, "
        "98.17% at 74.2k, 95.34% at 9.0k, 90.90% at 2.4k; per-layer 99.00% at 353.5k, 98.73% at 108.7k, "
        "98.54% at 91.0k, 98.31% at 88.4k; uniform 8/4/2 bits 98.90% / 98.85% / 98.10%.")


@dataclass(frozen=True)
class Budget:
    """One strength of a search: a limit on one cost (``cost.keys`` name) at one granularity, with
    the search's ``options`` (a variant: its rows and folders apart from the default's)."""

    granularity: str
    cost: str
    value: str
    options: tuple = ()  # (key, value) pairs of -o options
    train: tuple = ()  # (key, value) pairs of the task's training settings this row changes (budget_epochs)

    @property
    def label(self) -> str:
        """As the table and the folder name it: ``16KiB`` for FLASH, ``energy-90uJ`` otherwise."""
        return self.value if self.cost == "flash" else f"{self.cost}-{self.value}{BY_NAME[self.cost].unit}"

    @property
    def search(self) -> str:
        """The table's name of the search: ``dnas per-channel``, plus the options of a variant."""
        return " ".join([f"dnas {self.granularity}"] + [f"{k}={v}" for k, v in self.options + self.train])

    @property
    def folder(self) -> Path:
        return Path(*[f"{k}-{v}" for k, v in self.options + self.train], self.granularity, self.label)


@dataclass(frozen=True)
class Task:
    title: str
    about: str
    train: dict
    budgets: tuple  # Budget, in the order they run (the first trains the float model)
    runs: Path

    def run_dir(self, runs: Path, budget: Budget) -> Path:
        return runs / budget.folder


def _budgets(granularity: str, cost: str, *values: str, train: tuple = (), **options: str) -> tuple:
    return tuple(Budget(granularity, cost, v, tuple(options.items()), train) for v in values)


# the paper's schedule, whose weights pass trains the softmax mixture (the default trains the argmax model)
PAPER = dict(weights_on="mixture")


TASKS = {
    "lenet5-mnist": Task(
        "DNAS on LeNet-5: channel-wise against layer-wise",
        "Full-width LeNet-5 (61,706 parameters) on MNIST, `mpic` target ({0,2,4,8}-bit weights, 8-bit "
        "activations), one float model for every row, one seed. `dnas per-channel`: a width per output "
        "channel, 0 = pruned (physically removed before export); `dnas per-tensor`: one width per layer, no "
        "pruning. `weights_on=mixture`: the weights pass trains the softmax mixture, as the paper does (the "
        "default trains the argmax model, the one the search returns); `prune_prior=2`: the 0-bit logit starts 2 "
        "below the others (see the ResNet-8 table); `budget_epochs=6`: the fine-tune after the budget step 6 epochs "
        "instead of 2. "
        "'weight bits': PLiNIO's size figure on the deployed model (kept weights x their bits, no "
        "bias); 'FLASH B': everything the C library stores (weights, biases, multipliers, shifts, layout "
        f"tables); 'energy': the MPIC model's estimate of one inference. {PEER}",
        dict(model="lenet5", data="mnist", target="mpic", float_epochs=10, qat_epochs=8, budget_epochs=2,
             batch_size=128, lr=2e-3, qat_lr=5e-4),
        _budgets("per-channel", "flash", "40KiB", "24KiB", "16KiB", "10KiB", "6KiB", "4KiB", "3KiB", "2.5KiB", "2.25KiB",
                 "2KiB", "1.5KiB", "1.25KiB", "1KiB", "0.875KiB", "0.8125KiB", "0.75KiB")
        + _budgets("per-tensor", "flash", "40KiB", "24KiB", "20KiB", "16KiB")  # 2-bit weights everywhere: 16.0 KiB
        + _budgets("per-channel", "flash", "40KiB", "24KiB", "16KiB", "10KiB", "6KiB", "4KiB", "3KiB", "2KiB", "1.5KiB",
                   **PAPER)
        + _budgets("per-tensor", "flash", "40KiB", "24KiB", "20KiB", "16KiB", **PAPER)
        # the 0-bit logit started below the others (as on ResNet-8): does it hold where pruning is the point?
        + _budgets("per-channel", "flash", "40KiB", "4KiB", "1KiB", "0.75KiB", prune_prior="2")
        # at the smallest sizes 85% of the channels go: the narrow model then gains from a longer fine-tune
        + _budgets("per-channel", "flash", "0.75KiB", "0.71875KiB", "0.6875KiB", train=(("budget_epochs", 6),)),
        ROOT / "runs" / "bench-dnas"),
    "resnet8-cifar10": Task(
        "DNAS on ResNet-8 / CIFAR-10: channel-wise against layer-wise, FLASH and energy",
        "Full-width ResNet-8 (MLPerf Tiny, 78,186 parameters) on CIFAR-10, `mpic` target ({0,2,4,8}-bit "
        "weights; activations at 8 bits under FLASH budgets, searched among {2,4,8} bits per tensor under "
        "energy budgets, which depend on them: `acts=auto`), one float model for every row (30 epochs, as the cortex-m4 table's), "
        "one seed; each search 4 epochs + 1 after the budget step (the uniform models 5 quantization-aware "
        "epochs). Each granularity under FLASH budgets and under energy budgets (the MPIC model's estimate "
        "of one inference; its uniform 8-bit model: 129.3 uJ, 2-bit: 108.7 uJ); channel-wise pruning ties "
        "the channels of a residual add across its branches. Variant rows (`--variants`): `prune=false`, channel-wise "
        "without the 0-bit candidate; `logits_lr=0.01`, the logits' optimiser 5x slower; `prune_prior=2`, the 0-bit "
        "logit starts 2 below the others (with equal logits Adam's first step prunes every channel whose narrowest "
        "width costs more than the expectation); `logits_on=argmax`, the logits trained on the argmax model "
        "(straight-through) instead of the softmax mixture. Columns as in the LeNet-5 table.",
        dict(model="resnet8", data="cifar10", target="mpic", float_epochs=30, qat_epochs=4, budget_epochs=1,
             batch_size=64, lr=2e-3, qat_lr=5e-4, weight_decay=0.01, optimizer="adamw"),
        _budgets("per-channel", "flash", "40KiB", "24KiB", "16KiB")
        + _budgets("per-tensor", "flash", "48KiB", "36KiB", "28KiB")
        # variants: is it the pruning that costs channel-wise accuracy here, or logits that move too fast?
        + _budgets("per-channel", "flash", "40KiB", prune="false")
        + _budgets("per-channel", "flash", "40KiB", logits_lr="0.01")
        # the 0-bit logit started below the others: no pruning before the loss can answer
        + _budgets("per-channel", "flash", "40KiB", "24KiB", "16KiB", prune_prior="2")
        + _budgets("per-channel", "flash", "40KiB", prune_prior="2", logits_on="argmax")
        + _budgets("per-channel", "energy", "110", "90", "70")
        + _budgets("per-tensor", "energy", "125", "118", "112"),
        ROOT / "runs" / "bench-dnas-resnet8"),
}


def trials(args, everything: bool = False) -> list[Trial]:
    """The runs asked for (``everything``: the whole table), a folder that holds a run keeping the
    configuration it was made with; float models trained by any run of the table are shared."""
    task, planned = TASKS[args.task], []
    for budget in task.budgets:
        asked = budget.granularity in args.granularities and budget.label in (args.budgets or [budget.label])
        if everything or (asked and (args.variants or not (budget.options or budget.train))):
            cfg = RunConfig(method="dnas", weight_granularity=budget.granularity, budget={budget.cost: budget.value},
                            options=dict(budget.options), **{**task.train, **dict(budget.train)})
            planned.append(Trial(cfg, task.run_dir(args.runs, budget)))
    for bits in (UNIFORM if everything or not args.no_uniform else ()):  # quantization-aware as long
        train = {**task.train, "qat_epochs": task.train["qat_epochs"] + task.train["budget_epochs"], "budget_epochs": 0}
        planned.append(Trial(RunConfig(method="uniform", bits=bits, act_bits=8, **train), args.runs / "uniform" / f"{bits}bit"))
    stored = [Trial(RunConfig.load(t.out / "config.yaml"), t.out) if (t.out / "config.yaml").exists() else t
              for t in planned]
    trained = {} if everything else trained_floats(trials(args, everything=True))
    return in_float_order(share_floats(stored, trained))


def run_all(args) -> None:
    for trial in trials(args):
        run_trial(trial.config, trial.out, run=not args.table_only, device=args.device)


def weight_bits(run_dir: Path) -> float:
    """PLiNIO's size figure of the deployed model: every kept weight at its channel's bits."""
    _, qm, _ = load_run(run_dir)
    return float(sum(expand(layer.quantizer.bits().detach(), tuple(layer.weight.shape)).sum()
                     for layer in qm.layers.values()))


def kilo(bits: float) -> str:
    """Thousands, with a second decimal below 10k, where PLiNIO's smallest points lie (2.4k)."""
    return f"{bits / 1000:,.{2 if bits < 10_000 else 1}f}k"


def row(run_dir: Path, label: str, budget: str) -> str:
    r = json.loads((run_dir / "result.json").read_text())
    pruned = (r.get("history", {}).get("dnas") or [{}])[-1].get("pruned_share")
    cmd = command_file(run_dir).read_text().strip()
    return (f"| {label} | {budget} | {r['accuracy']['quantized']:.2%}{collapse_mark(r)} | {kilo(weight_bits(run_dir))} | "
            f"{r['cost']['flash_bytes']:,} | {r['cost']['energy_uj']:.1f} | {'yes' if r['feasible'] else 'NO'} | "
            f"{'' if pruned is None else f'{pruned:.0%}'} | `{cmd}` |")


def savings(channel: list[dict], layer: list[dict], key: str) -> list[str]:
    """For each layer-wise result, the cheapest channel-wise one at least as accurate: what it saves
    of ``key`` (the paper's comparison at equal accuracy)."""
    out = []
    for lw in sorted(layer, key=lambda r: r["accuracy"]):
        acc = lw["accuracy"]
        cheaper = [c[key] for c in channel if c["accuracy"] >= acc]
        if not cheaper:
            out.append(f"none as accurate as {acc:.2%}")
            continue
        saved = 1 - min(cheaper) / lw[key]
        out.append(f"{saved:.0%} less at {acc:.2%}" if saved >= 0 else f"{-saved:.0%} more at {acc:.2%}")
    return out


def _measured(row: str) -> tuple[str, dict]:
    """A table row's search label and its figures (accuracy, FLASH bytes, energy)."""
    cells = row_cells(row)
    number = lambda text: float(text.split()[0].rstrip("%").replace(",", ""))  # noqa: E731
    return cells[0], {"accuracy": number(cells[2]) / 100, "flash": number(cells[4]), "energy": number(cells[5])}


def equal_accuracy(task: Task, rows: list[str]) -> list[str]:
    """Lines under the table, from its rows (those measured before included): channel-wise (the
    default, then each variant's rows) against layer-wise at equal accuracy, FLASH and energy; a
    variant against layer-wise with the same options where the table has them, else against the
    default's."""
    found = {}
    for b in task.budgets:
        found.setdefault((b.granularity, b.options), [])
    by_search = {}
    for row in rows:
        label, figures = _measured(row)
        by_search.setdefault(label, []).append(figures)
    lines = []
    for granularity, options in found:
        search = lambda g: " ".join([f"dnas {g}"] + [f"{k}={v}" for k, v in options])  # noqa: E731
        channel = by_search.get(search("per-channel"), []) if granularity == "per-channel" else []
        layer = by_search.get(search("per-tensor")) or by_search.get("dnas per-tensor")
        if not layer or len(channel) < 2:  # a single variant row is no front
            continue
        parts = [f"{label} {', '.join(savings(channel, layer, key))}" for label, key in (("FLASH", "flash"),
                                                                                      ("energy", "energy"))]
        which = "Channel-wise" + (f" ({' '.join(f'{k}={v}' for k, v in options)})" if options else "")
        lines += ["", f"{which} against layer-wise at equal accuracy (for each layer-wise row, the cheapest channel-wise "
                  "row at least as accurate), measured on the rows above: " + "; ".join(parts) + "."]
    return lines


def table(args) -> None:
    task, rows, order = TASKS[args.task], [], []
    labelled = [(b.search, b.label, task.run_dir(args.runs, b)) for b in task.budgets]
    labelled += [(f"uniform {bits}-bit", "none", args.runs / "uniform" / f"{bits}bit") for bits in UNIFORM]
    for label, budget, out in labelled:
        order.append((label, budget))
        if (out / "result.json").exists():
            rows.append(row(out, label, budget))
    header = ["| search | budget | test acc (integer-exact) | weight bits | FLASH B | energy uJ | feasible | "
              "channels pruned | command |", "|---|---|---|---|---|---|---|---|---|"]
    command = "python benchmarks/dnas.py" + ("" if args.task == "lenet5-mnist" else f" --task {args.task}")
    merged = merge_rows(task.title, rows, 2, order)
    write_section(task.title, task.about, command, header + merged + equal_accuracy(task, merged))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="lenet5-mnist", choices=list(TASKS))
    ap.add_argument("--granularities", nargs="+", default=["per-channel", "per-tensor"],
                    choices=["per-channel", "per-tensor"])
    ap.add_argument("--budgets", nargs="+", help="by their labels in the table (16KiB, energy-90uJ)")
    ap.add_argument("--runs", type=Path, help="where the runs live (default: the task's folder under runs/)")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--no-uniform", action="store_true", help="leave out the uniform rows")
    ap.add_argument("--variants", "--paper", dest="variants", action="store_true",
                    help="also the variant rows (options other than the defaults: the paper's schedule, no pruning)")
    args = ap.parse_args()
    args.runs = args.runs or TASKS[args.task].runs
    os.environ["MIXPREC_DATA"] = args.data_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_all(args)
    table(args)


if __name__ == "__main__":
    main()
