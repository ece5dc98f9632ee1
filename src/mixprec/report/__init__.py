"""HTML reports of search runs: ``write_report(RUN_DIR or FOLDER)`` writes a self-contained
``report.html`` (inline CSS, images as data URIs, no scripts) and ``plots/*.png``.

A run's report shows its accuracy and every cost against the budget and the device, the per-layer
bit-widths, memory, training history and, when the parent folder holds other runs, where it sits
among them. A folder's report plots accuracy against cost for all its runs and links their reports.
"""
from .browser import ScreenshotError, find_chromium, screenshot
from .build import target_info, write_folder_report, write_report, write_run_report
from .plots import bit_heatmap, memory_bars, memory_breakdown, runs_scatter, save_png, training_curves

__all__ = [
    "write_report", "write_run_report", "write_folder_report", "target_info",
    "bit_heatmap", "memory_bars", "memory_breakdown", "training_curves", "runs_scatter", "save_png",
    "screenshot", "find_chromium", "ScreenshotError",
]
