"""Export a run's integer program (C for microcontrollers, QONNX, hls4ml) and verify it.

``export_run(run_dir, fmt)`` writes ``RUN_DIR/export/<fmt>/``; ``verify_run`` runs every exported
artifact against the NumPy reference.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import Artifact, ExportError, ExportInput, FORMATS, get_exporter

log = logging.getLogger(__name__)

__all__ = ["Artifact", "ExportError", "ExportInput", "FORMATS", "export_run", "get_exporter", "load_export_input"]


def load_export_input(run_dir: str | Path, n_sample: int = 256) -> ExportInput:
    """A finished run (``mixprec search`` output) with ``n_sample`` real test inputs."""
    from ..api import as_target
    from ..data import load_dataset
    from ..search import load_run

    run_dir = Path(run_dir)
    cfg, qm, result = load_run(run_dir)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    x = data.x_test[:n_sample].numpy().astype(np.float32)
    return ExportInput(run_dir, qm.lower(), qm, as_target(cfg.target), tuple(data.input_shape), x, result)


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path | None = None, n_sample: int = 256) -> Artifact:
    exporter = get_exporter(fmt)
    inp = load_export_input(run_dir, n_sample)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    artifact = exporter.export(inp, out)
    artifact.save()
    log.info("exported %s to %s", fmt, out)
    return artifact
