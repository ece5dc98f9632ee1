"""What every exporter receives and returns, and the registry of formats.

An exporter turns the lowered integer program of a run into an artifact (a folder of files) and
can run that artifact on real inputs, so ``mixprec verify`` compares every format with the NumPy
reference the same way.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..data.base import Preprocessing
from ..lower import IntGraph


class ExportError(ValueError):
    """The run cannot be exported to this format as it is; the message says what and where."""


@dataclass
class ExportInput:
    """A finished run, as exporters need it."""

    run_dir: Path
    graph: IntGraph  # the lowered integer program (what the reference executes)
    qm: object  # the QuantModel in eval mode (exporters that trace torch use it)
    target: object  # mixprec.cost.Target
    input_shape: tuple[int, ...]
    x_sample: np.ndarray  # a few real test inputs (float32, batch first), e.g. to embed in firmware
    result: dict = field(default_factory=dict)
    # what the data loader did to raw values (result.json's "preprocessing"); None: not recorded
    # (a run from before mixprec recorded it), the exporters take the identity and say so
    preprocessing: Preprocessing | None = None


@dataclass
class Artifact:
    format: str
    path: Path  # the artifact's folder
    files: list[str] = field(default_factory=list)  # relative to ``path``
    notes: list[str] = field(default_factory=list)  # what the format could not express, sizes, ...
    details: dict = field(default_factory=dict)  # format-specific figures (section sizes, ...)

    def save(self) -> None:
        (self.path / "artifact.json").write_text(json.dumps(
            {"format": self.format, "files": self.files, "notes": self.notes, "details": self.details},
            indent=2, default=float))

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        meta = json.loads((Path(path) / "artifact.json").read_text())
        return cls(meta["format"], Path(path), meta["files"], meta["notes"], meta.get("details", {}))


class Exporter(Protocol):
    def export(self, inp: ExportInput, out_dir: Path) -> Artifact:
        """Write the artifact into ``out_dir``; raise :class:`ExportError` on what cannot be expressed."""

    def run(self, artifact: Artifact, x: np.ndarray, keep: bool = False):
        """Integer outputs (the output node's grid, int64) of the artifact on real inputs ``x``;
        with ``keep``, also ``{node name: integers}`` for the nodes it can expose (or {})."""


# module:attribute, imported lazily: each format pulls in its own heavy dependencies.
FORMATS: dict[str, str] = {
    "c": "mixprec.export.c:CExporter",
    "qonnx": "mixprec.export.qonnx:QonnxExporter",
    "hls4ml": "mixprec.export.hls4ml:Hls4mlExporter",
}


def get_exporter(fmt: str) -> Exporter:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    module, attr = FORMATS[fmt].split(":")
    return getattr(importlib.import_module(module), attr)()
