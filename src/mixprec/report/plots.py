"""The report's figures: each a function of plain data returning a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so nothing accumulates in
pyplot's global state when many reports are written in one process.
"""
from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cost.units import UNITS, format_size, size_unit
from .data import BitRow, Phase, bits_label, cost_series, series

log = logging.getLogger(__name__)

DPI = 120
WEIGHTS, PARAMS, OTHER, ARENA = "#4C72B0", "#DD8452", "#8C8C8C", "#55A868"
BUDGET, DEVICE = "#C44E52", "#222222"
# a capacity line further above the bars than this would squash them; it is written out instead
OFF_SCALE = 3.0


def _figure(width: float, height: float):
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        # headless by default; but switching under a live pyplot (a notebook) would close its figures
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, path: str | Path, dpi: int = DPI) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def png_bytes(fig, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _byte_scale(values) -> tuple[str, float]:
    """The binary unit for an axis of byte values, and its size (plotted values are divided by it)."""
    unit = size_unit(max([abs(v) for v in values if v is not None] or [0]))
    return unit, float(UNITS[unit])


# ----------------------------------------------------------------------------- bit widths

def bit_heatmap(rows: list[BitRow]):
    """Weight bits per layer (rows) and output channel (columns), beside activation bits per layer
    on the same rows. Layers without weights keep their row for their activation bits.

    Returns ``None`` when there is nothing to show.
    """
    rows = [r for r in rows if len(r.values) or r.act_bits is not None]
    if not rows:
        return None
    ncols = max((len(r.values) for r in rows), default=1) or 1
    has_acts = any(r.act_bits is not None for r in rows)
    # one column (all per tensor) needs no width; a wide single column reads as a bar
    fig = _figure(11 if ncols > 1 else 7, 1.9 + (0.36 if len(rows) <= 20 else 0.26) * len(rows))
    if has_acts:
        ax, ax_act = fig.subplots(1, 2, width_ratios=[5 if ncols > 1 else 1.6, 1.1], sharey=True)
    else:
        ax, ax_act = fig.subplots(), None
    vmin, vmax = _bit_range(rows)
    _draw_heatmap(fig, ax, rows, ncols, vmin, vmax)
    if ax_act is not None:
        _draw_act_bits(ax_act, rows, vmin, vmax)
    return fig


def _bit_range(rows: list[BitRow]) -> tuple[float, float]:
    # a fixed 2..8 span keeps colours comparable between reports; wider data widens it
    values = [v for r in rows for v in r.values] + [r.act_bits for r in rows if r.act_bits is not None]
    return min([2.0] + values), max([8.0] + values)


def _draw_heatmap(fig, ax, rows: list[BitRow], ncols: int, vmin: float, vmax: float) -> None:
    import matplotlib

    grid = np.full((len(rows), ncols), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r.values)] = r.values
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{r.name} ({r.op})" for r in rows])
    if ncols > 1:
        ax.set_xlabel("output channel")
        if ncols <= 40:
            ax.set_xticks(range(0, ncols, 1 if ncols <= 16 else 4))
        ax.set_title("Weight bit-width per layer and output channel")
    else:
        ax.set_xticks([])
        ax.set_xlabel("per tensor")
        ax.set_title("Weight bit-width per layer")
    fig.colorbar(im, ax=ax, label="bits", pad=0.01, fraction=0.04)
    for i, r in enumerate(rows):
        if not len(r.values):
            ax.text(-0.5 + 0.01 * ncols, i, "no weights", va="center", fontsize=8, color="#888888", style="italic")
    if grid.size <= 800 and ncols <= 40:
        _annotate_cells(ax, grid, cmap, vmin, vmax, 9 if ncols <= 20 else 7.5)
    notes = _heatmap_notes(rows)
    if notes:  # in the axis label, so that the layout makes room for it
        ax.set_xlabel(f"{ax.get_xlabel()}\n({notes})", fontsize=9)


def _annotate_cells(ax, grid, cmap, vmin, vmax, size) -> None:
    for (i, j), v in np.ndenumerate(grid):
        if np.isnan(v):
            continue
        r, g, b, _ = cmap((v - vmin) / (vmax - vmin))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
        ax.text(j, i, f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}", ha="center", va="center",
                fontsize=size, color="white" if dark else "black")


def _heatmap_notes(rows: list[BitRow]) -> str:
    kinds = {r.kind for r in rows} - {"none"}
    notes = []
    if "per-element" in kinds:
        notes.append("per-element widths: each cell is the mean over that channel's weights")
    if "per-slice" in kinds:
        notes.append("per-slice widths: repeated over the channels of each slice")
    if "per-tensor" in kinds and len(kinds) > 1:
        notes.append("per-tensor layers: one width in the first column")
    return "; ".join(notes)


def _draw_act_bits(ax, rows: list[BitRow], vmin: float, vmax: float) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    y = [i for i, r in enumerate(rows) if r.act_bits is not None]
    bits = [rows[i].act_bits for i in y]
    ax.barh(y, bits, height=0.7, color=[cmap((b - vmin) / (vmax - vmin)) for b in bits],
            edgecolor="#333333", lw=0.5)
    ax.tick_params(axis="y", left=False, labelleft=False)  # the heat map's row labels serve both
    ax.set_xlim(0, vmax + 2)
    ax.set_xticks(range(0, int(vmax) + 1, 2 if vmax <= 10 else 4))
    ax.set_xlabel("bits")
    ax.set_title("Activation bits")
    ax.grid(axis="x", alpha=0.3)
    if len(rows) <= 60:
        for yi, b in zip(y, bits):
            ax.text(b + 0.2, yi, f"{b:g}", va="center", fontsize=8)


# ----------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryBar:
    title: str
    segments: list[tuple[str, float, str]]  # (label, bytes, colour), bottom first
    budget: float | None
    capacity: float | None


def memory_bars(result: dict, capacity: dict | None = None) -> list[MemoryBar]:
    """FLASH as weights + other parameters, RAM as the activation arena, with limits."""
    cost, detail = result.get("cost") or {}, result.get("cost_detail") or {}
    budget, capacity = result.get("budget") or {}, capacity or {}
    bars = []
    flash = detail.get("flash_bytes", cost.get("flash_bytes"))
    if flash is not None:
        w, p = detail.get("weight_bytes"), detail.get("param_bytes")
        if w is None or p is None:
            segments = [("FLASH (no breakdown)", flash, WEIGHTS)]
        else:
            segments = [("weights", w, WEIGHTS), ("bias, multipliers, shifts", p, PARAMS)]
            if flash - w - p > 0:
                segments.append(("other", flash - w - p, OTHER))
        bars.append(MemoryBar("FLASH", segments, budget.get("flash_bytes"), capacity.get("flash_bytes")))
    ram = detail.get("ram_bytes", cost.get("ram_bytes"))
    if ram is not None:
        bars.append(MemoryBar("RAM (peak)", [("activation arena", ram, ARENA)], budget.get("ram_bytes"),
                              capacity.get("ram_bytes")))
    return bars


def memory_breakdown(bars: list[MemoryBar]):
    """One panel per memory, each on its own scale (FLASH is often 10x RAM); ``None`` if empty."""
    if not bars:
        return None
    fig = _figure(4.2 * len(bars) + 1.0, 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(bars)))
    for ax, bar in zip(axes, bars):
        _draw_memory_bar(ax, bar)
    fig.suptitle("Memory as deployed", fontsize=12)
    return fig


def _draw_memory_bar(ax, bar: MemoryBar) -> None:
    total = sum(v for _, v, _ in bar.segments)
    shown = [total] + [v for v in (bar.budget,) if v is not None]
    on_scale = bar.capacity is not None and bar.capacity <= OFF_SCALE * max(shown + [1])
    if on_scale:
        shown.append(bar.capacity)
    unit, scale = _byte_scale(shown)
    bottom = 0.0
    for label, value, colour in bar.segments:
        ax.bar(0, value / scale, 0.5, bottom=bottom / scale, color=colour, edgecolor="white",
               label=f"{label}: {format_size(value)}")
        if value > 0.06 * max(shown):  # label inside the segment only where it fits
            ax.text(0, (bottom + value / 2) / scale, format_size(value), ha="center", va="center",
                    color="white", fontsize=9, fontweight="bold")
        bottom += value
    if bar.budget is not None:
        ok = total <= bar.budget
        ax.axhline(bar.budget / scale, color=BUDGET, ls="--", lw=1.6,
                   label=f"budget: {format_size(bar.budget)} ({'ok' if ok else 'OVER'})")
        ax.text(0.78, bar.budget / scale, "budget", ha="right", va="bottom", fontsize=8, color=BUDGET)
    if bar.capacity is not None and on_scale:
        ax.axhline(bar.capacity / scale, color=DEVICE, ls=":", lw=1.6,
                   label=f"device capacity: {format_size(bar.capacity)}")
        ax.text(0.78, bar.capacity / scale, "device", ha="right", va="bottom", fontsize=8, color=DEVICE)
    ax.set_ylim(0, max(max(shown), 1) / scale * 1.15)
    ax.set_xlim(-0.8, 0.8)
    ax.set_xticks([])
    ax.set_ylabel(f"bytes ({unit})")
    ax.set_title(f"{bar.title}: {format_size(total)}")
    if bar.capacity is not None and not on_scale:
        ax.text(0.5, 0.985, f"device capacity {format_size(bar.capacity)} (off scale);\n"
                f"{100 * total / bar.capacity:.2g}% used", transform=ax.transAxes, ha="center",
                va="top", fontsize=8, color=DEVICE)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)


# ----------------------------------------------------------------------------- training

def training_curves(phase_list: list[Phase]):
    """Loss, accuracy and (when recorded) cost over all phases on one epoch axis; ``None`` if empty."""
    from matplotlib.ticker import MaxNLocator

    if not phase_list:
        return None
    entries = [e for p in phase_list for e in p.entries]
    costs = cost_series(entries)
    panels = 3 if costs else 2
    fig = _figure(10, 2.6 * panels + 0.6)
    axes = fig.subplots(panels, 1, sharex=True)
    x = np.arange(len(entries))
    _plot_keys(axes[0], x, entries, [("loss", "train loss", "-"), ("val_loss", "val loss", "--")])
    axes[0].set_ylabel("loss")
    loss = series(entries, "loss")
    loss = loss[np.isfinite(loss)]
    if loss.size and loss.min() > 0 and loss.max() > 20 * loss.min():
        axes[0].set_yscale("log")  # losses spanning decades are unreadable on a linear axis
    _plot_keys(axes[1], x, entries, [("val_accuracy", "val accuracy", "-"),
                                     ("train_accuracy", "train accuracy", "--")], scale=100)
    axes[1].set_ylabel("accuracy (%)")
    if costs:
        _plot_costs(axes[2], x, costs)
    for ax in axes:
        _mark_phases(ax, phase_list, ax is axes[0])
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch (all phases)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    # a suptitle, so that it sits above the phase names rather than on them
    fig.suptitle("Training history", fontsize=12)
    return fig


def _plot_keys(ax, x, entries, keys, scale: float = 1.0) -> None:
    drawn = False
    for key, label, style in keys:
        y = series(entries, key) * scale
        if np.isfinite(y).any():
            ax.plot(x, y, style, marker="o", ms=3, label=label)
            drawn = True
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="#888888")


def _plot_costs(ax, x, costs: dict[str, np.ndarray]) -> None:
    # costs have different units: each is drawn relative to its first value, its last value in the legend
    for name, y in costs.items():
        first = next((v for v in y if np.isfinite(v) and v != 0), None)
        if first is None:
            continue
        last = y[np.isfinite(y)][-1]
        ax.plot(x, 100 * y / first, marker=".", label=f"{name} (last {_format_cost(name, last)})")
    ax.set_ylabel("cost (% of first epoch)")
    ax.legend(fontsize=8, loc="best")


def _format_cost(name: str, value: float) -> str:
    return format_size(value) if name.endswith("bytes") else f"{value:,.4g}"


def _mark_phases(ax, phase_list: list[Phase], label: bool) -> None:
    for i, p in enumerate(phase_list):
        lo, hi = p.start - 0.5, p.start + len(p.entries) - 0.5
        if i % 2:
            ax.axvspan(lo, hi, color="#000000", alpha=0.05, lw=0)
        if i:
            ax.axvline(lo, color="#555555", ls="--", lw=1)
        if label:
            n = len(p.entries)
            ax.text((lo + hi) / 2, 1.02, f"{p.name} ({n} epoch{'s' if n > 1 else ''})", ha="center",
                    va="bottom", fontsize=9, fontweight="bold", transform=ax.get_xaxis_transform())


# ----------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunPoint:
    bits: str  # e.g. "w4a8"
    model: str
    method: str
    accuracy: float | None
    flash_bytes: float | None
    ram_bytes: float | None
    ebops: float | None
    feasible: bool
    path: str = ""


    @property
    def label(self) -> str:
        return " ".join(p for p in (self.model, self.bits) if p)


def run_point(result: dict, path: str = "") -> RunPoint:
    acc, cost = result.get("accuracy") or {}, result.get("cost") or {}
    return RunPoint(bits_label(result), str(result.get("model", "?")), str(result.get("method", "?")),
                    acc.get("quantized"), cost.get("flash_bytes"), cost.get("ram_bytes"), cost.get("ebops"),
                    bool(result.get("feasible", True)), path)


MARKERS = "osD^vP*Xph"


def runs_scatter(points: list[RunPoint], highlight: str | None = None):
    """Quantized accuracy against FLASH, peak RAM and EBOPs; marker per method, colour per model,
    hollow markers for infeasible runs, a ring around ``highlight`` (a point's path)."""
    import matplotlib
    from matplotlib.lines import Line2D

    points = [p for p in points if p.accuracy is not None]
    if not points:
        return None
    panels = [(k, t) for k, t in (("flash_bytes", "FLASH"), ("ram_bytes", "peak RAM"), ("ebops", "EBOPs"))
              if any(getattr(p, k) is not None for p in points)]
    if not panels:
        return None
    methods = sorted({p.method for p in points})
    models = sorted({p.model for p in points})
    palette = matplotlib.colormaps["tab10"]
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    colour = {m: palette(i % 10) for i, m in enumerate(models)}
    fig = _figure(3.9 * len(panels), 4.3)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    # with one model its name is in the legend; the labels then only need the widths
    text = (lambda p: p.bits or p.label) if len(models) == 1 else (lambda p: p.label)  # noqa: E731
    labels = [_scatter_panel(ax, points, key, title, marker, colour, highlight, text)
              for ax, (key, title) in zip(axes, panels)]
    axes[0].set_ylabel("quantized test accuracy (%)")
    handles = ([Line2D([], [], ls="", marker=marker[m], color="#333333", label=f"method: {m}") for m in methods]
               + [Line2D([], [], ls="", marker="s", color=colour[m], label=f"model: {m}") for m in models]
               + [Line2D([], [], ls="", marker="o", mfc="none", color="#333333", label="infeasible (hollow)")])
    if highlight:
        handles.append(Line2D([], [], ls="", marker="o", ms=13, mfc="none", color=BUDGET, label="this run"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(f"Accuracy against cost, {len(points)} runs", fontsize=12)
    fig.draw_without_rendering()  # fixes the layout, so that labels can be placed in pixels
    for ax, panel_labels in zip(axes, labels):
        place_labels(ax, panel_labels)
    return fig


def _scatter_panel(ax, points, key, title, marker, colour, highlight, text) -> list[tuple]:
    """Draw one panel; return ``(x, y, label)`` of the points to label (all, or the Pareto front)."""
    pts = [p for p in points if getattr(p, key) is not None]
    values = [getattr(p, key) for p in pts]
    is_bytes = key.endswith("bytes")
    unit, scale = _byte_scale(values) if is_bytes else ("", 1.0)
    xy = [(getattr(p, key) / scale, 100 * p.accuracy) for p in pts]
    for p, (x, y) in zip(pts, xy):
        c = colour[p.model]
        ax.scatter(x, y, marker=marker[p.method], s=55, facecolors=c if p.feasible else "none",
                   edgecolors=c, linewidths=1.6, zorder=3)
        if highlight and p.path == highlight:
            ax.scatter(x, y, s=260, facecolors="none", edgecolors=BUDGET, linewidths=1.5, zorder=4)
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > 30 * min(positive):
        ax.set_xscale("log")  # runs spanning decades of cost
    if not is_bytes:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, not 150000
    ax.set_xlabel(f"{title} ({unit})" if is_bytes else title)
    ax.set_title(f"accuracy vs {title}")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    front = pareto(xy) if len(pts) > MAX_LABELS else set(range(len(pts)))
    return [(x, y, text(p)) for i, (p, (x, y)) in enumerate(zip(pts, xy))
            if i in front or (highlight and p.path == highlight)]


MAX_LABELS = 20  # beyond this many runs only the Pareto front is labelled
LABEL_SIZE = 8
# candidate label offsets in points from the marker: (dx, dy, ha, va), tried in order
OFFSETS = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
           (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
           (6, 14, "left", "bottom"), (-6, 14, "right", "bottom"), (6, -14, "left", "top"),
           (-6, -14, "right", "top")]


def pareto(xy: list[tuple[float, float]]) -> set[int]:
    """Indices of points no other point beats (lower or equal cost x, higher or equal accuracy y)."""
    return {i for i, (x, y) in enumerate(xy)
            if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in xy)}


def place_labels(ax, labels: list[tuple], size: float = LABEL_SIZE) -> None:
    """Label points where the text stays inside the axes and off the labels placed before it.

    Greedy over ``OFFSETS`` with text boxes estimated from the character count; call it once the
    layout is fixed (after ``draw_without_rendering``) so that data-to-pixel transforms are final.
    """
    box = ax.get_window_extent()
    px = ax.figure.dpi / 72.0
    placed: list[tuple[float, float, float, float]] = []
    markers = [tuple(ax.transData.transform((x, y))) for x, y, _ in labels]
    for (x, y, text), (mx, my) in zip(labels, markers):
        w, h = 0.6 * size * len(text) * px, 1.25 * size * px
        best, best_cost = OFFSETS[0], float("inf")
        for dx, dy, ha, va in OFFSETS:
            x0 = mx + dx * px - (w if ha == "right" else w / 2 if ha == "center" else 0)
            y0 = my + dy * px - (h if va == "top" else 0)
            rect = (x0, y0, x0 + w, y0 + h)
            cost = (sum(_overlap(rect, r) for r in placed)
                    + sum(_overlap(rect, (ox - 4 * px, oy - 4 * px, ox + 4 * px, oy + 4 * px)) for ox, oy in markers)
                    + 10 * (w * h - _overlap(rect, (box.x0, box.y0, box.x1, box.y1))))
            if cost < best_cost:
                best, best_cost, best_rect = (dx, dy, ha, va), cost, rect
            if cost == 0:
                break
        placed.append(best_rect)
        dx, dy, ha, va = best
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=size,
                    color="#333333", zorder=5)


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
