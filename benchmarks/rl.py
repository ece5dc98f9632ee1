"""The RL search on `cortex-m7` under FLASH and RAM limits at once, against the uniform 8/4/2-bit
models that fit both (width-scaled) and against hgq/dq under the same limits -> the "RL on
cortex-m7" table of docs/benchmarks.md; and what the search costs, with the speed-up of parallel
candidates -> the "RL search cost" table.

    .venv/bin/python benchmarks/rl.py [--only lenet5-mnist resnet8-cifar10] [--budgets 24KiB/3KiB ...]
        [--methods rl uniform8 ...] [--runs DIR] [--float resnet8=RUN_DIR] [--table-only]
    .venv/bin/python benchmarks/rl.py --speed [--only lenet5-mnist] [--episodes 12]

Every row is ``mixprec search`` (its command is in the row). The methods that choose widths (rl,
hgq, dq) start from the full-width float model and get the same number of quantized epochs after
their search (rl: its final fine-tune; hgq/dq: their search + the fine-tune after the budget
step); ``uniformB``: B-bit weights and activations (the logits 8), the widest model of the family
whose uniform model meets both limits, trained quantization-aware as long. Resumable: a finished
run is read back, an unfinished one continues.

``--speed``: one search of a fixed number of episodes (the table's first budget), run three times in
this process: one local evaluator using both cores, one Ray worker (one thread), two Ray workers
(one thread each). The two Ray searches evaluate the same candidates; the local one parts from them
after its first scores (2 threads sum in another order), so the speed-ups compare seconds per
candidate.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _runs import run_trial  # noqa: E402
from _tables import collapse_mark, merge_rows, write_section  # noqa: E402

from mixprec.cost import Budget  # noqa: E402
from mixprec.search import RunConfig, Trial  # noqa: E402
from mixprec.search.plan import Family, in_float_order, share_floats, trained_floats, widest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = "cortex-m7"
UNIFORM = (8, 4, 2)
METHODS = ("rl", "hgq", "dq") + tuple(f"uniform{b}" for b in UNIFORM)
PRESETS = {
    "lenet5-mnist": dict(
        family=Family("lenet5", tuple(round(i / 32, 5) for i in range(32, 0, -1)), (1, 28, 28)),
        budgets=["24KiB/3KiB", "20KiB/2KiB"],
        train=dict(data="mnist", float_epochs=10, qat_epochs=8, budget_epochs=2, batch_size=128, lr=2e-3,
                   qat_lr=5e-4),
        rl=dict(episodes="60", warmup="20", steps="60")),
    "resnet8-cifar10": dict(
        family=Family("resnet8", tuple(range(16, 0, -1)), (3, 32, 32)),
        budgets=["32KiB/24KiB", "24KiB/16KiB"],  # int8 ResNet-8 needs 48 KiB of arena
        train=dict(data="cifar10", float_epochs=30, qat_epochs=8, budget_epochs=2, batch_size=64, lr=2e-3,
                   qat_lr=5e-4, weight_decay=0.01, optimizer="adamw"),
        rl=dict(episodes="60", warmup="20", steps="100")),
}


def limits(budget_text: str) -> dict:
    flash, ram = budget_text.split("/")
    return {"flash": flash, "ram": ram}


def plan(preset: dict, budget_text: str, methods) -> list[dict]:
    family, budget = preset["family"], Budget.from_strings(**limits(budget_text))
    runs = []
    for m in methods:
        if m.startswith("uniform"):
            bits = int(m[len("uniform"):])
            width = widest(family, TARGET, bits, budget, act_bits=bits)
            if width is not None:
                runs.append(dict(name=m, model=family.model(width), method="uniform", bits=bits, act_bits=bits))
        else:
            runs.append(dict(name=m, model=family.model(family.widths[0]), method=m))
    return runs


def config_for(preset: dict, run: dict, budget_text: str) -> RunConfig:
    train = dict(preset["train"])
    epochs = train["qat_epochs"] + train["budget_epochs"]
    if run["method"] in ("uniform", "rl"):  # as many quantized epochs as hgq/dq's search and fine-tune
        train.update(qat_epochs=epochs, budget_epochs=0 if run["method"] == "uniform" else train["budget_epochs"])
    extra = {k: run[k] for k in ("bits", "act_bits") if k in run}
    options = dict(preset["rl"]) if run["method"] == "rl" else {}
    return RunConfig(model=run["model"], target=TARGET, method=run["method"], budget=limits(budget_text),
                     options=options, **extra, **train)


def _folder(budget_text: str) -> str:
    return budget_text.replace("/", "-")


def planned(args, everything: bool = False) -> list[Trial]:
    trials = []
    for name in args.only:
        preset = PRESETS[name]
        for budget_text in (preset["budgets"] if everything else args.budgets or preset["budgets"]):
            for run in plan(preset, budget_text, METHODS if everything else args.methods):
                out = args.runs / name / _folder(budget_text) / run["name"]
                stored = out / "config.yaml"
                cfg = RunConfig.load(stored) if stored.exists() else config_for(preset, run, budget_text)
                trials.append(Trial(cfg, out))
    return trials


def run_all(args) -> None:
    trials = planned(args)
    known = trained_floats(planned(args, everything=True))
    for item in args.float or []:
        model, _, path = item.rpartition("=")
        known.update({t.float_id: Path(path) for t in trials if t.trains_float() and t.config.model == model})
    for trial in in_float_order(share_floats(trials, known)):
        run_trial(trial.config, trial.out, run=not args.table_only, device=args.device)


TITLE = "RL on cortex-m7: FLASH and RAM limits at once"


def _mean_bits(result: dict, kind: str) -> str:
    rows = [r for r in result["layers"] if r["op"] in ("conv", "linear")]
    if kind == "weights":
        n = sum(r["params"] for r in rows)
        return f"{sum(r['weight_bits_mean'] * r['params'] for r in rows) / n:.2f}"
    return "/".join(f"{r['act_bits']:.0f}" for r in result["layers"] if r["op"] != "input")


def table(args) -> None:
    rows, order = [], []
    for name in args.only:
        for budget_text in PRESETS[name]["budgets"]:
            for m in METHODS:
                order.append((name, budget_text, m))
                out = args.runs / name / _folder(budget_text) / m
                if not (out / "result.json").exists():
                    continue
                r = json.loads((out / "result.json").read_text())
                c, model = r["cost"], RunConfig.load(out / "config.yaml").model
                width = model.split("width=")[1].rstrip("]") if "width=" in model else "full"
                cmd = (out.parent / f"{m}.command").read_text().strip()
                rows.append(f"| {name} | {budget_text} | {m} | {width} | {r['accuracy']['float']:.2%} | "
                            f"{r['accuracy']['quantized']:.2%}{collapse_mark(r)} | {c['flash_bytes']:,.0f} | {c['ram_bytes']:,.0f} | "
                            f"{c['ram_mcu_in_out']:,.0f} | {'yes' if r['feasible'] else 'NO'} | "
                            f"{_mean_bits(r, 'weights')} | `{cmd}` |")
    header = ["| model | FLASH/RAM budget | method | model width | float test acc | test acc (integer-exact) | "
              "FLASH B | RAM B (arena) | in+out RAM B | feasible | mean weight bits | command |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    about = ("`cortex-m7` (2/4/8-bit weights and activations), a FLASH limit and a RAM limit (the planned arena, "
             "`--ram-model liveness`) at once; every row's costs are measured on the deployed artifact. `rl`: the "
             "DDPG search (the first and last layers' weights at 8 bits, every candidate scored after a short fine-tune from a "
             "shared 8-bit start, the best policy fine-tuned); `hgq`/`dq`: the learned methods under the same "
             "limits (hgq's controller steers FLASH, its first limit, and leaves RAM to the budget step, which refits the "
             "ranges of the activations it narrows: steering RAM too, `-o cost=flash,ram`, took HGQ's max-range "
             "activations to 2-4 bits and the ResNet-8 24KiB/16KiB search fell to chance); all three from the "
             "full-width float model, with the same quantized epochs after their search. "
             "`uniformB`: B-bit weights and activations, the widest model of the family that fits both limits. "
             "One seed. Activations observed at 4 bits or fewer take the least-squares clip of their range, and RL "
             "candidates refit the ranges of the activations a policy narrows (since commit bfd1e96); rows whose run is "
             "not on the machine that wrote the table were measured before, with max ranges (ResNet-8 24KiB/16KiB rl "
             "then: 57.22%), and their command measures them again with the current code. Since commit c691dea rl's "
             "budget step fills what its policy leaves unused, as hgq's and dq's do; rl rows whose command says "
             "`--no-fill` were measured before.")
    write_section(TITLE, about, "python benchmarks/rl.py", header + merge_rows(TITLE, rows, 3, order))


# -- search cost --------------------------------------------------------------------------------------
SPEED_TITLE = "RL search cost: parallel candidates"


def speed(args) -> None:
    """One search, three ways; the table of wall times."""
    from mixprec.search.evaluator import CandidateEvaluator, EvaluatorSpec
    from mixprec.search.rl.env import build_episode
    from mixprec.search.rl.executors import make_executor
    from mixprec.search.rl.search import RLSearch, Schedule

    rows = []
    for name in args.only:
        preset, budget_text = PRESETS[name], PRESETS[name]["budgets"][0]
        run_dir = args.runs / name / _folder(budget_text) / "rl"
        start = run_dir / "checkpoints" / "rl-start.pt"
        if not start.exists():
            raise SystemExit(f"{start}: run the table's rl row first (benchmarks/rl.py --only {name} --methods rl)")
        cfg = RunConfig.load(run_dir / "config.yaml")
        steps = int(preset["rl"]["steps"])
        ways = (("one process, both cores", "local", 1, 2), ("Ray, 1 worker", "ray", 1, 1),
                ("Ray, 2 workers", "ray", 2, 1))
        base = CandidateEvaluator(EvaluatorSpec(cfg, str(start), steps=steps))
        episode = build_episode(base.qm.graph, base.tables, base.start_choice())
        schedule = Schedule(args.episodes, args.episodes // 3, 4, 0.5, 0.99, cfg.seed)
        per_candidate = {}
        for label, executor, workers, threads in ways:
            spec = EvaluatorSpec(cfg, str(start), steps=steps, threads=threads)
            pool = make_executor(executor, spec, workers)
            search = RLSearch(episode, base.tables, Budget.from_strings(**cfg.budget).limits(), schedule, 0.0)
            began = time.perf_counter()
            try:
                search.run(pool.evaluate)
            finally:
                pool.close()
            wall = time.perf_counter() - began
            n = len(search.state.scores)
            per_candidate[label] = wall / n
            first, ray1 = per_candidate[ways[0][0]], per_candidate.get("Ray, 1 worker", wall / n)
            rows.append(f"| {name} | {label} | {args.episodes} | {n} | {wall:.0f} | {wall / n:.2f} | "
                        f"{first / (wall / n):.2f}x | {ray1 / (wall / n):.2f}x |")
            logging.info(rows[-1])
    header = ["| model | candidates evaluated by | episodes | candidates | wall s (incl. start-up) | s per candidate | "
              "speed-up per candidate over one process | over 1 Ray worker |", "|---|---|---|---|---|---|---|---|"]
    write_section(SPEED_TITLE, f"One RL search ({args.episodes} episodes, batches of 4) with its candidates "
                  "evaluated three ways on this machine's cores; wall time of the whole search including starting "
                  "the workers. A policy seen before is not evaluated again. A candidate's score depends on the "
                  "threads that trained it (sums in another order), so the one-process search (2 threads) and the "
                  "Ray ones (1 thread each) part after their first scores and evaluate different numbers of "
                  "candidates; the speed-ups compare seconds per candidate. The two Ray searches are the same search.",
                  f"python benchmarks/rl.py --speed --only {' '.join(args.only)} --episodes {args.episodes}",
                  header + merge_rows(SPEED_TITLE, rows, 2, []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--budgets", nargs="+", help="FLASH/RAM pairs as in the table (24KiB/3KiB)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-rl")
    ap.add_argument("--float", nargs="*", help="MODEL=RUN_DIR: a float model trained elsewhere (same settings)")
    ap.add_argument("--data-dir", default=os.environ.get("MIXPREC_DATA", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--speed", action="store_true", help="the search-cost table instead")
    ap.add_argument("--episodes", type=int, default=12, help="episodes of the --speed search")
    args = ap.parse_args()
    os.environ["MIXPREC_DATA"] = args.data_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.speed:
        speed(args)
        return
    run_all(args)
    table(args)


if __name__ == "__main__":
    main()
