"""Export a run's integer program (C for microcontrollers, QONNX, hls4ml) and verify it.

``export_run(run_dir, fmt)`` writes ``RUN_DIR/export/<fmt>/``; ``verify_run`` runs every exported
artifact against the NumPy reference.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .base import Artifact, ExportError, ExportInput, FORMATS, get_exporter

log = logging.getLogger(__name__)

__all__ = ["Artifact", "ExportError", "ExportInput", "FORMATS", "export_run", "get_exporter", "load_export_input"]


def load_export_input(run_dir: str | Path, n_sample: int = 256) -> ExportInput:
    """A finished run (``mixprec search`` output) with ``n_sample`` real test inputs."""
    from ..cost import as_target
    from ..data import Preprocessing, load_dataset
    from ..search import load_run

    run_dir = Path(run_dir)
    cfg, qm, result = load_run(run_dir)
    data = load_dataset(cfg.data, cfg.data_dir, cfg.seed)
    x = data.x_test[:n_sample].numpy().astype(np.float32)
    # the run's own record, not today's loader: the model was trained on what the run recorded
    pre = Preprocessing.from_dict(result["preprocessing"]) if result.get("preprocessing") else None
    return ExportInput(run_dir, qm.lower(), qm, as_target(cfg.target), tuple(data.input_shape), x, result, pre)


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path | None = None, n_sample: int = 256) -> Artifact:
    exporter = get_exporter(fmt)
    inp = load_export_input(run_dir, n_sample)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    artifact = exporter.export(inp, out)
    _check_sections(artifact, Path(run_dir))
    artifact.save()
    log.info("exported %s to %s", fmt, out)
    return artifact


def _check_sections(artifact: Artifact, run_dir: Path) -> None:
    """Measure the artifact's memory sections against the run's budget and device, and make the
    run's ``feasible`` say what the artifact holds (``result.json``: ``artifact_memory``)."""
    from .sections import artifact_memory, over_budget

    memory = artifact_memory(artifact)
    result_path = run_dir / "result.json"
    if memory is None or not result_path.exists():
        return
    result = json.loads(result_path.read_text())
    over = over_budget(memory, result)
    memory["over_budget"] = over
    artifact.details["memory"] = memory
    for line in over:
        artifact.notes.append(line)
        log.error("%s: %s", artifact.format, line)
    result.setdefault("artifact_memory", {})[artifact.format] = memory
    result["feasible"] = bool(result.get("feasible")) and not over
    result_path.write_text(json.dumps(result, indent=2))
