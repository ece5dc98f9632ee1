"""``mixprec``: a thin command line over :mod:`mixprec.api` and :mod:`mixprec.search`."""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Mixed-precision quantization for edge targets, with budgets that hold.")
console = Console()
err = Console(stderr=True)

QUICKSTART = dict(model="digits-cnn", data="digits", target="cortex-m4", budget={"flash": "12KiB"})


def _setup_logging(quiet: bool, verbose: bool) -> None:
    """mixprec's own log at INFO (DEBUG with -v, WARNING with -q); other libraries' INFO lines and
    deprecation warnings (onnx, qonnx, hls4ml, torch) only with -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mixprec").setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


class _Progress:
    """tqdm bars per training phase, or nothing with --quiet / without a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, unit="step", leave=True, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _budget(**flags) -> dict:
    """The run's ``budget`` from the budget flags given (``--energy-uj`` is ``energy``: ``cost.keys``)."""
    from .cost.keys import COSTS

    by_flag = {c.cli_flag[2:].replace("-", "_"): c.name for c in COSTS if c.budget}
    return {by_flag[k]: v for k, v in flags.items() if v is not None}


def _print_result(result: dict, out: Path) -> None:
    table = Table(title=f"{result['method']} · {result['model']} on {result['data']} · {result['target']}")
    for col in ("layer", "op", "w bits", "a bits", "weight B", "param B", "MACs"):
        table.add_column(col, justify="right" if col not in ("layer", "op") else "left")
    for r in result["layers"]:
        wb = r.get("weight_bits_mean")
        table.add_row(r["name"], r["op"], "" if wb is None else f"{wb:.2f}", f"{r['act_bits']:.0f}",
                      str(r["weight_bytes"]), str(r["param_bytes"]), f"{r['macs']:,}")
    console.print(table)
    from .cost import format_size
    from .search.result import in_out_ram

    acc, cost = result["accuracy"], result["cost"]
    console.print(f"test accuracy: float {acc['float']:.2%}  quantized (integer-exact) [bold]{acc['quantized']:.2%}[/]")
    if _on_fpga(out):  # no FLASH or arena there: every weight is its own fixed-point constant in the fabric
        detail = result.get("cost_detail") or {}
        console.print(f"EBOPs {cost['ebops']:,.0f} (resources: about LUT + 55 x DSP, the HGQ paper's estimate)  "
                      f"weights {format_size(detail.get('weight_bytes', 0))}  MACs {cost['macs']:,}")
    else:
        tables = (result.get("cost_detail") or {}).get("table_bytes") or 0
        console.print(f"FLASH {format_size(cost['flash_bytes'])}{f' ({tables:,} B layout tables)' if tables else ''}  peak RAM {format_size(cost['ram_bytes'])}"
                      f"{in_out_ram(cost)}  MACs {cost['macs']:,}  EBOPs {cost['ebops']:,.0f}  latency {cost['latency_cycles']:,.0f} cycles  "
                      f"energy {cost['energy_uj']:.3g} uJ")
    for k, c in result["budget_checks"].items():
        mark = "[green]ok[/]" if c["ok"] else "[red]over[/]"
        console.print(f"budget {k}: {c['value']:,.6g} <= {c['limit']:,.6g} {mark}")
    verdict = "[green]feasible[/]" if result["feasible"] else "[red]INFEASIBLE[/]"
    if result.get("degenerate"):
        verdict = f"[bold red]DEGENERATE[/] ({'feasible' if result['feasible'] else 'infeasible'})"
    console.print(f"{verdict}; reference mismatches: {result['reference_mismatches']}; "
                  f"{result['wall_seconds']:.1f} s; run directory: {out}")


def _on_fpga(out: Path) -> bool:
    """Whether the run's target is a fabric (fixed point, no FLASH or RAM capacity: fpga-hls4ml)."""
    from .cost import as_target
    from .search import RunConfig

    t = as_target(RunConfig.load(out / "config.yaml").target)
    return t.numerics == "fixed" and t.flash_bytes is None and t.ram_bytes is None


def _run(cfg_kwargs: dict, out: Path, quiet: bool, verbose: bool, resume: bool = False, device: str = "auto") -> dict:
    from .cost import BudgetError
    from .data import DatasetError
    from .graph.convert import UnsupportedLayerError
    from .search import RunConfig, run_search
    from .train import CheckpointError, TrainingDiverged, world

    _setup_logging(quiet or not world().is_main, verbose)
    try:
        cfg = RunConfig(**cfg_kwargs)
        result = run_search(cfg, out, progress=_Progress(not quiet and sys.stderr.isatty() and world().is_main),
                            resume=resume, device=device)
    except (BudgetError, DatasetError, UnsupportedLayerError, CheckpointError, TrainingDiverged, ValueError,
            FileNotFoundError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001  (a bug, not the user's input: say so, traceback with -v)
        if verbose:
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}. This is a mixprec bug, not your "
                  f"input; rerun with -v for the traceback and report it with the command.", highlight=False)
        raise typer.Exit(3)
    if result is None:  # a non-first torchrun process: the first one reports
        return {}
    _print_result(result, out)
    if result.get("degenerate"):
        err.print(f"[bold red]error:[/] not a usable model: {result['degenerate_reason']}. The run is kept in {out} "
                  f"(result.json says \"degenerate\": true).", highlight=False)
        raise typer.Exit(1)
    if not result["feasible"] or result["reference_mismatches"]:
        raise typer.Exit(1)
    return result


@app.command()
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), help="run directory"),
               quiet: bool = typer.Option(False, "--quiet", "-q", help="plain log, no progress bars"),
               verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Digits CNN on scikit-learn's 8x8 digits for a Cortex-M4 under a 12 KiB FLASH budget."""
    # A second quickstart continues (or re-reports) the first one rather than refusing its folder.
    _run(dict(QUICKSTART), out, quiet, verbose, resume=True)


@app.command()
def search(model: str = typer.Option(..., help="registered model name or package.module:function"),
           data: str = typer.Option(..., help="dataset name"),
           target: str = typer.Option("generic", help="target name or YAML path"),
           method: str = typer.Option("uniform", help="search method (`mixprec methods` lists them and their options)"),
           option: list[str] = typer.Option([], "--option", "-o",
                                            help="method option KEY=VALUE (repeatable), e.g. -o cost=ebops -o beta=0.1"),
           episodes: Optional[int] = typer.Option(None, help="rl: episodes of the search (-o episodes)"),
           executor: Optional[str] = typer.Option(None, help="rl: where candidates are evaluated: local, process "
                                                  "or ray (-o executor)"),
           workers: Optional[int] = typer.Option(None, help="rl: candidates evaluated at once (-o workers)"),
           ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                     help="rl: an existing Ray cluster (-o ray_address)"),
           float_from: Optional[str] = typer.Option(None, "--float-from",
                                                    help="start from this run's float model instead of training one"),
           bits: Optional[int] = typer.Option(None, help="weight bits (default: widest that fits the budget)"),
           act_bits: Optional[int] = typer.Option(None, help="activation bits (default: >= weight bits; uniform keeps the logits at >= 8)"),
           granularity: Optional[str] = typer.Option(None, help="weight granularity"),
           flash: Optional[str] = typer.Option(None, help="FLASH budget, e.g. 32KiB"),
           ram: Optional[str] = typer.Option(None, help="peak RAM budget, e.g. 16KiB"),
           ram_in_out: Optional[str] = typer.Option(None, help="in+out RAM budget: the largest input+output "
                                                    "buffers of one layer (the MCU paper's RAM constraint), e.g. 8KiB"),
           ram_model: str = typer.Option("liveness", "--ram-model",
                                         help="what --ram limits: liveness (the arena the planner lays out for the "
                                              "buffers live at once) or layer (the MCU paper's rule: the largest "
                                              "input+output buffers of one layer, as --ram-in-out)"),
           bops: Optional[str] = typer.Option(None, help="BOPs budget (bit operations: MACs x weight x input bits)"),
           ebops: Optional[str] = typer.Option(None, help="EBOPs budget"),
           energy_uj: Optional[str] = typer.Option(None, "--energy-uj", help="energy budget in uJ"),
           latency_cycles: Optional[str] = typer.Option(None, "--latency-cycles", help="latency budget in cycles"),
           float_epochs: int = typer.Option(15), qat_epochs: int = typer.Option(10),
           budget_epochs: int = typer.Option(1, help="fine-tune epochs after the budget step, when it changes bits"),
           budget_fill: Optional[bool] = typer.Option(None, "--fill/--no-fill",
                                                      help="after the method, raise widths into budget it left unused "
                                                           "where the validation loss falls (default: the method's "
                                                           "choice: on for hgq, dq and dnas)"),
           lr: float = typer.Option(3e-3), qat_lr: float = typer.Option(5e-4), batch_size: int = typer.Option(32),
           optimizer: str = typer.Option("adam", help="adam, adamw or sgd"),
           weight_decay: float = typer.Option(0.0),
           seed: int = typer.Option(0), data_dir: Optional[str] = typer.Option(None, help="or MIXPREC_DATA"),
           out: Path = typer.Option(Path("runs/search"), help="run directory"),
           resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
           device: str = typer.Option("auto", help="auto, cpu or cuda"),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars, warnings only"),
           verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Search a quantization of MODEL on DATA for TARGET under the given budgets.

    Data-parallel: torchrun --standalone --nproc-per-node N --no-python mixprec search ...
    """
    given = locals()
    ram, ram_in_out = _ram_limits(ram, ram_in_out, ram_model)
    options = _with_flags(method, _options(option), episodes=episodes, executor=executor, workers=workers,
                          ray_address=ray_address)
    _run(_config_fields(given, weight_granularity=granularity, options=options,
                        budget=_budget(flash=flash, ram=ram, ram_in_out=ram_in_out, bops=bops, ebops=ebops,
                                       energy_uj=energy_uj, latency_cycles=latency_cycles)),
         out, quiet, verbose, resume, device)


def _ram_limits(ram: str | None, ram_in_out: str | None, ram_model: str) -> tuple[str | None, str | None]:
    """``(--ram, --ram-in-out)`` as budgets: under ``--ram-model layer`` the ``--ram`` limit is the
    in+out one (the run records it so, and ``result.json`` shows both RAM figures either way)."""
    if ram_model not in ("liveness", "layer"):
        _fail(ValueError(f"--ram-model {ram_model}: choose liveness or layer"))
    if ram_model == "liveness" or ram is None:
        return ram, ram_in_out
    if ram_in_out is not None:
        _fail(ValueError("--ram-model layer makes --ram the in+out limit; give --ram or --ram-in-out, not both"))
    return None, ram


def _config_fields(given: dict, **renamed) -> dict:
    """``RunConfig``'s fields from the command's parameters of the same name, plus those the
    command names otherwise (``--granularity``, ``-o``, the budget flags)."""
    from dataclasses import fields

    from .search.config import RunConfig

    return {f.name: renamed[f.name] if f.name in renamed else given[f.name] for f in fields(RunConfig)
            if f.name in renamed or f.name in given}


def _options(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs into a dict (values stay text; the method converts them)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(ValueError(f"--option {item!r}: write KEY=VALUE, e.g. --option beta=0.1"))
        out[key.strip()] = value.strip()
    return out


def _with_flags(method: str, options: dict, **flags) -> dict:
    """The method options that have their own flag (``--episodes`` is ``-o episodes``), checked
    against the method's options: a flag the method does not take, or given both ways, is refused."""
    from dataclasses import fields

    from .search.methods import get_method, method_names

    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return options
    if method not in method_names():
        return options  # the run names the unknown method

    def takes(name: str) -> set[str]:
        m = get_method(name)
        return {f.name for f in fields(m.options)} if m.options is not None else set()

    out = dict(options)
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if key not in takes(method):
            owners = " or ".join(f"--method {n}" for n in method_names() if key in takes(n))
            _fail(ValueError(f"{flag} is an option of {owners}, not of --method {method}"))
        if key in options:
            _fail(ValueError(f"{flag} and -o {key}=... both given: give one"))
        out[key] = str(value)
    return out


@app.command()
def cost(model: Optional[str] = typer.Option(None, help="registered model or package.module:function"),
         target: str = typer.Option("generic", help="target name or YAML path"),
         bits: int = typer.Option(8, help="weight bits"), act_bits: Optional[int] = typer.Option(None),
         granularity: Optional[str] = typer.Option(None, help="weight granularity"),
         input_shape: Optional[str] = typer.Option(None, help="e.g. 3,224,224 (default: the model's)"),
         from_run: Optional[Path] = typer.Option(None, "--from", help="a run directory"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Per-layer and total cost (FLASH, peak RAM, MACs, BOPs, EBOPs, latency, energy) without training.
    EBOPs count the model's own weights as quantized (ebops_nominal: every weight at its full width)."""
    from .api import assignment, quantize
    from .cost import evaluate, format_table, load_target
    from .cost.deployed import weight_ebops

    try:
        if from_run is not None:
            from .api import cost_report
            from .search import load_run

            cfg, qm, _ = load_run(from_run)
            report = cost_report(qm, cfg.target)
        elif model is None:
            raise ValueError("give --model (with --target, --bits) or --from RUN_DIR")
        else:
            from .models import get_model, input_shape as model_input_shape

            shape = tuple(int(s) for s in input_shape.split(",")) if input_shape else model_input_shape(model)
            t = load_target(target)
            qm = quantize(get_model(model), t, shape, bits=bits, act_bits=act_bits or bits, weight_granularity=granularity)
            report = weight_ebops(evaluate(qm.graph, assignment(qm), t), qm)  # EBOPs of the model's own weights
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(format_table(report), highlight=False, soft_wrap=True)


@app.command()
def targets():
    """List the shipped targets."""
    from .cost import list_targets, load_target

    for name in list_targets():
        t = load_target(name)
        console.print(f"[bold]{name}[/]: {t.description}", highlight=False)


@app.command()
def methods():
    """List the search methods and their -o options (with defaults)."""
    from dataclasses import MISSING, fields

    from .search import methods as registered

    for name, m in registered().items():
        console.print(f"[bold]{name}[/]: {m.summary}", highlight=False)
        for f in fields(m.options) if m.options is not None else ():
            default = f.default if f.default is not MISSING else "(required)"
            console.print(f"    -o {f.name}={default}", highlight=False)


@app.command()
def models():
    """List the registered models."""
    from .models import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        console.print(f"[bold]{name}[/] input {spec.input_shape}: {spec.source}", highlight=False)


@app.command()
def report(path: Path = typer.Argument(..., help="a run directory, or a folder holding run directories"),
           quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Write PATH/report.html (self-contained) and PATH/plots/*.png for a run or a folder of runs."""
    from .report import write_report

    _setup_logging(quiet, verbose)
    try:
        out = write_report(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {out}", highlight=False)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run directory"),
           fmt: list[str] = typer.Option(..., "--format", "-f", help="c, qonnx or hls4ml (repeatable)"),
           out: Optional[Path] = typer.Option(None, help="output folder (default RUN_DIR/export/FORMAT)"),
           quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Export a run's integer program: C library for microcontrollers, QONNX, or an hls4ml project."""
    from .export import ExportError, export_run
    from .train import CheckpointError

    _setup_logging(quiet, verbose)
    for f in fmt:
        try:
            with _Status(f"exporting {f}", not quiet and sys.stderr.isatty()):
                artifact = export_run(run_dir, f, out / f if out is not None and len(fmt) > 1 else out)
        except (ExportError, CheckpointError, FileNotFoundError, ValueError) as exc:
            _fail(exc)
        console.print(f"[bold]{f}[/]: {artifact.path} ({len(artifact.files)} files)", highlight=False)
        for note in artifact.notes:
            console.print(f"  note: {note}", highlight=False)


@app.command()
def verify(run_dir: Path = typer.Argument(..., help="a run directory with exported artifacts"),
           inputs: int = typer.Option(256, "--inputs", "-n", help="test inputs per artifact (0: the whole test set)"),
           quiet: bool = typer.Option(False, "--quiet", "-q"), verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Run every exported artifact against the NumPy reference; exit 1 on any mismatch or on memory
    sections over the run's budget."""
    from .export import ExportError
    from .export.verify import verify_run

    _setup_logging(quiet, verbose)
    try:
        with _Status("verifying", not quiet and sys.stderr.isatty()):
            rows = verify_run(run_dir, inputs or None)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    table = Table(title=f"verify {run_dir}")
    for col in ("format", "inputs", "mismatches", "first diverging layer", "memory"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.format, str(r.inputs), "[green]0[/]" if not r.mismatches else f"[red]{r.mismatches}[/]",
                      r.first_diverging_layer or "", "[red]" + "; ".join(r.over_budget) + "[/]" if r.over_budget else "")
    console.print(table)
    console.print(f"wrote {run_dir / 'verify.json'}", highlight=False)
    if not all(r.ok for r in rows):
        raise typer.Exit(1)


class _Status:
    """A spinner with elapsed time for one long step (export, verify) on a terminal."""

    def __init__(self, text: str, enabled: bool):
        self.status = err.status(text) if enabled else None

    def __enter__(self):
        if self.status:
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status:
            self.status.__exit__(*exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
