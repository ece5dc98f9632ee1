"""``mixprec verify``: every exported artifact of a run against the NumPy reference, input by input,
and its memory sections against the run's budget."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..execute import reference
from .base import Artifact, ExportError, get_exporter
from .sections import artifact_memory, over_budget

log = logging.getLogger(__name__)


@dataclass
class VerifyRow:
    format: str
    inputs: int
    mismatches: int  # inputs whose output differs anywhere
    first_diverging_layer: str | None  # in graph order, where the artifact exposes its layers
    notes: list[str]
    over_budget: list[str] = field(default_factory=list)  # memory sections over the run's budget or device

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and not self.over_budget


def artifacts_of(run_dir: Path) -> list[Artifact]:
    return [Artifact.load(p.parent) for p in sorted((Path(run_dir) / "export").glob("*/artifact.json"))]


def first_divergence(graph, ref_env: dict, env: dict) -> str | None:
    for node in graph.nodes:
        if node.name in env and node.name in ref_env and not np.array_equal(np.asarray(env[node.name]), ref_env[node.name]):
            return node.name
    return None


CHUNK = 128  # inputs per pass: the reference keeps int64 intermediates, so memory grows with it


def reference_outputs(graph, x: np.ndarray) -> np.ndarray:
    return np.concatenate([reference(graph, x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])


def verify_artifact(artifact: Artifact, graph, x: np.ndarray, expected: np.ndarray | None = None) -> VerifyRow:
    """``expected``: the reference outputs of ``x`` when already computed (it is the slow part).
    The first diverging layer is looked for on a few of the mismatching inputs only."""
    exporter = get_exporter(artifact.format)
    expected = reference_outputs(graph, x) if expected is None else expected
    out = np.concatenate([np.asarray(exporter.run(artifact, x[i:i + CHUNK])) for i in range(0, len(x), CHUNK)])
    out = out.reshape(expected.shape)
    differs = (out != expected).reshape(len(x), -1).any(axis=1)
    first = None
    if differs.any():
        bad = x[differs][:8]
        _, env = exporter.run(artifact, bad, keep=True)
        _, ref_env = reference(graph, bad, keep=True)
        first = first_divergence(graph, ref_env, env or {}) or \
            f"{graph.output} (output; the artifact exposes no intermediate layers)"
    return VerifyRow(artifact.format, len(x), int(differs.sum()), first, list(artifact.notes))


def verify_run(run_dir: str | Path, n_inputs: int | None = 256, formats: list[str] | None = None) -> list[VerifyRow]:
    """Run each exported artifact on ``n_inputs`` test inputs (None: the whole test set); writes
    ``verify.json``. Raises :class:`ExportError` when the run has nothing exported."""
    from . import load_export_input

    run_dir = Path(run_dir)
    found = [a for a in artifacts_of(run_dir) if formats is None or a.format in formats]
    if not found:
        raise ExportError(f"{run_dir} has no exported artifacts{f' in {formats}' if formats else ''}; "
                          f"run `mixprec export {run_dir} --format c|qonnx|hls4ml` first")
    inp = load_export_input(run_dir, n_sample=n_inputs if n_inputs is not None else 10**9)
    rows, expected = [], reference_outputs(inp.graph, inp.x_sample)
    for artifact in found:
        row = verify_artifact(artifact, inp.graph, inp.x_sample, expected)
        memory = artifact_memory(artifact)
        row.over_budget = over_budget(memory, inp.result) if memory is not None else []
        rows.append(row)
        # Artifacts that also run on an (emulated) device check the inputs embedded at export.
        device_runs = getattr(get_exporter(artifact.format), "device_runs", None)
        for run in device_runs(artifact) if device_runs else []:
            rows.append(VerifyRow(run["format"], run["inputs"], run["mismatches"],
                                  None if not run["mismatches"] else inp.graph.output, run["notes"]))
    for row in rows:
        log.info("%s: %d inputs, %d mismatches", row.format, row.inputs, row.mismatches)
        for line in row.over_budget:
            log.error("%s: %s", row.format, line)
    (run_dir / "verify.json").write_text(json.dumps(
        {"ok": all(r.ok for r in rows), "rows": [asdict(r) for r in rows]}, indent=2))
    return rows
