"""Write ``report.html`` and ``plots/*.png`` for a run directory or a folder of runs."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .data import bit_rows, find_runs, is_run_dir, load_result, phases, sibling_runs, weight_shapes
from .html import Image, RunLink, folder_page, run_page
from .plots import bit_heatmap, memory_bars, memory_breakdown, png_bytes, run_point, runs_scatter, training_curves

log = logging.getLogger(__name__)

REPORT = "report.html"
PLOTS = "plots"


def write_report(path: str | Path) -> Path:
    """``report.html`` for a run directory, or for a folder holding runs (one or two levels down)."""
    path = Path(path)
    if is_run_dir(path):
        return write_run_report(path)
    if path.is_dir() and find_runs(path):
        return write_folder_report(path)
    raise FileNotFoundError(f"{path} is neither a run directory (no result.json) nor a folder of runs")


def target_info(name: str | None) -> tuple[dict, float | None]:
    """Device capacities ``{flash_bytes, ram_bytes}`` and clock of a target; empty when unknown."""
    if not name:
        return {}, None
    from ..cost import as_target

    try:
        t = as_target(name)
    except Exception as exc:  # noqa: BLE001 - a report must not fail because a custom target moved
        log.warning("target %r not found (%s); device capacities left out", name, exc)
        return {}, None
    caps = {k: getattr(t, k, None) for k in ("flash_bytes", "ram_bytes")}
    return {k: v for k, v in caps.items() if v is not None}, getattr(t, "clock_hz", None)


def _emit(fig, out_dir: Path, name: str, title: str, caption: str = "") -> Image | None:
    """Render ``fig`` once: the same PNG bytes go to ``plots/name.png`` and into the HTML.

    Without a figure, a ``name.png`` left by an earlier report is removed: plots/ shows this report.
    """
    if fig is None:
        (out_dir / PLOTS / f"{name}.png").unlink(missing_ok=True)
        return None
    png = png_bytes(fig)
    (out_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    (out_dir / PLOTS / f"{name}.png").write_bytes(png)
    return Image(title, png, caption)


def _points(run_dirs: list[Path]) -> list:
    points = []
    for d in run_dirs:
        try:
            points.append(run_point(load_result(d), str(d.resolve())))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", d, exc)
    return points


def write_run_report(run_dir: str | Path, siblings: bool = True, sibling_points: list | None = None) -> Path:
    """``report.html`` and ``plots/`` for one run; with ``siblings``, the runs beside it are plotted
    too when there are others (``sibling_points`` saves reloading them when the caller has them)."""
    run_dir = Path(run_dir)
    result = load_result(run_dir)
    capacity, clock_hz = target_info(result.get("target"))
    npz = run_dir / "integer_model.npz"
    shapes = weight_shapes(npz) if npz.is_file() else {}
    images = [
        _emit(bit_heatmap(bit_rows(result, shapes)), run_dir, "bits",
              "Bit-widths", "Weight bits per layer and output channel; activation bits per layer."),
        _emit(memory_breakdown(memory_bars(result, capacity)), run_dir, "memory", "Memory",
              "FLASH split into packed weights and per-channel parameters; RAM is the planned activation "
              "arena. Dashed: budget; dotted: device capacity."),
        _emit(training_curves(phases(result.get("history"))), run_dir, "training", "Training",
              "All phases on one epoch axis; dashed lines mark phase boundaries."),
    ]
    points = (sibling_points if sibling_points is not None else _points(sibling_runs(run_dir))) if siblings else []
    scatter = runs_scatter(points, highlight=str(run_dir.resolve())) if len(points) > 1 else None
    images.append(_emit(scatter, run_dir, "runs", "Sibling runs",
                        f"The {len(points)} runs in {run_dir.resolve().parent.name}/; ringed: this run."))
    html = run_page(result, [i for i in images if i is not None], capacity, clock_hz)
    out = run_dir / REPORT
    out.write_text(html, encoding="utf-8")
    log.info("wrote %s", out)
    return out


def write_folder_report(folder: str | Path, run_reports: bool = True) -> Path:
    """The folder's scatter and run table; with ``run_reports``, each run's own report too (linked)."""
    folder = Path(folder)
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"no run directories (with result.json) under {folder}")
    links, points = [], {}
    for d in runs:
        try:
            result = load_result(d)
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", d, exc)
            continue
        points[d] = run_point(result, str(d.resolve()))
        links.append(RunLink(Path(os.path.relpath(d / REPORT, folder)).as_posix(),
                             Path(os.path.relpath(d, folder)).as_posix(), result))
    if run_reports:
        for d in points:
            # siblings are the runs in the same parent folder, as for a single run's report
            write_run_report(d, sibling_points=[p for e, p in points.items() if e.parent == d.parent])
    image = _emit(runs_scatter(list(points.values())), folder, "runs", "Accuracy against cost")
    out = folder / REPORT
    out.write_text(folder_page(folder.resolve().name, links, [image] if image else []), encoding="utf-8")
    log.info("wrote %s (%d runs)", out, len(links))
    return out
