"""What the report shows, read from a run directory: small pure functions over ``result.json``.

Every reader tolerates missing optional keys, because older runs (and hand-edited ones) lack them.
"""
from __future__ import annotations

import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cost.keys import COSTS

log = logging.getLogger(__name__)

RESULT = "result.json"
COST_KEYS = tuple(c.key for c in COSTS)
COST_LABELS = {**{c.key: c.label for c in COSTS}, "ram_bytes": "peak RAM"}  # a table row names the figure


def load_result(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / RESULT).read_text())


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RESULT).is_file()


def find_runs(folder: str | Path, depth: int = 2) -> list[Path]:
    """Run directories under ``folder`` (itself excluded), at most ``depth`` levels down, sorted.

    A run directory is not searched further: its ``checkpoints/`` never holds runs.
    """
    found, level = [], [Path(folder)]
    for _ in range(depth):
        children = [c for d in level for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
        found += [c for c in children if is_run_dir(c)]
        level = [c for c in children if not is_run_dir(c)]
    return sorted(found)


def sibling_runs(run_dir: str | Path) -> list[Path]:
    """The runs beside ``run_dir`` in its parent folder (``run_dir`` included)."""
    parent = Path(run_dir).resolve().parent
    return find_runs(parent, depth=1)


# ----------------------------------------------------------------------------- layers and bits

def as_list(bits) -> list[float]:
    """Weight or activation bits as a flat list (a float is one per-tensor width)."""
    if bits is None:
        return []
    return [float(b) for b in np.ravel(np.asarray(bits, dtype=float))]


def mean_bits(bits) -> float | None:
    values = as_list(bits)
    return float(np.mean(values)) if values else None


def weight_layers(result: dict) -> list[dict]:
    """Layers that carry weights (those with a ``weight_bits`` entry)."""
    return [r for r in result.get("layers", []) if r.get("weight_bits") is not None]


def weight_shapes(npz_path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{layer: weight shape}`` from ``integer_model.npz``, reading only the array headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(npz_path) as z:
            for name in z.namelist():
                if not name.endswith(".weight.npy"):
                    continue
                with z.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, _ = read_header(f)
                shapes[name[: -len(".weight.npy")]] = tuple(shape)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        log.warning("cannot read weight shapes from %s: %s", npz_path, exc)
    return shapes


@dataclass(frozen=True)
class BitRow:
    """One heat-map row: weight bits per output channel (or one per tensor; empty for a layer
    without weights), how they were derived, and the layer's activation bits."""
    name: str
    op: str
    values: np.ndarray
    kind: str  # "per-tensor", "per-channel", "per-slice", "per-element" (shown as channel means), "none"
    act_bits: float | None = None


def bit_row(layer: dict, channels: int | None) -> BitRow:
    """Spread a layer's weight bits over its output channels where the channel count is known.

    Per-slice widths repeat over the channels of their slice and per-element widths average per
    channel, so every row reads the same way: one cell per output channel.
    """
    bits = np.asarray(as_list(layer.get("weight_bits")))
    name, op, act = layer.get("name", "?"), layer.get("op", "?"), mean_bits(layer.get("act_bits"))
    params = layer.get("params")
    if bits.size == 0:
        return BitRow(name, op, bits, "none", act)
    if bits.size == 1:
        return BitRow(name, op, bits, "per-tensor", act)
    if channels and bits.size == channels:
        return BitRow(name, op, bits, "per-channel", act)
    if channels and bits.size < channels and channels % bits.size == 0:
        return BitRow(name, op, np.repeat(bits, channels // bits.size), "per-slice", act)
    if channels and bits.size % channels == 0 and (params is None or bits.size == params):
        return BitRow(name, op, bits.reshape(channels, -1).mean(axis=1), "per-element", act)
    if params is not None and bits.size == params:
        # per element with no channel count: the layer mean is all that can be shown honestly
        return BitRow(name, op, np.array([bits.mean()]), "per-element", act)
    return BitRow(name, op, bits, "per-channel", act)


def bit_rows(result: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> list[BitRow]:
    """A row per layer in ``result["layers"]`` (weightless ones too, for their activation bits)."""
    shapes = shapes or {}
    return [bit_row(r, (shapes.get(r.get("name")) or (None,))[0]) for r in result.get("layers") or []]


def bits_label(result: dict) -> str:
    """A short width label such as ``w4a8`` (uniform) or ``w~4.3a8`` (mixed, parameter-weighted)."""
    layers = weight_layers(result)
    if not layers:
        return ""
    values = [as_list(r["weight_bits"]) for r in layers]
    flat = sorted({v for vs in values for v in vs})
    if len(flat) == 1:
        w = f"w{flat[0]:g}"
    else:
        sizes = [r.get("params") or len(v) for r, v in zip(layers, values)]
        w = f"w~{np.average([np.mean(v) for v in values], weights=sizes):.1f}"
    acts = sorted({round(mean_bits(r.get("act_bits")) or 0, 1) for r in result.get("layers", [])
                   if r.get("act_bits") is not None})
    a = f"a{acts[0]:g}" if len(acts) == 1 else f"a{acts[0]:g}-{acts[-1]:g}" if acts else ""
    return w + a


# ----------------------------------------------------------------------------- history

@dataclass(frozen=True)
class Phase:
    name: str
    entries: list[dict]
    start: int  # global epoch index of the first entry


def phases(history: dict | None) -> list[Phase]:
    """Non-empty history phases, in order, numbered on one global epoch axis."""
    out, start = [], 0
    for name, entries in (history or {}).items():
        entries = [e for e in (entries or []) if isinstance(e, dict)]
        if entries:
            out.append(Phase(name, entries, start))
            start += len(entries)
    return out


def series(entries: list[dict], key: str) -> np.ndarray:
    """``entries[i][key]`` as floats (NaN where absent), so gaps show as gaps."""
    return np.array([_number(e.get(key)) for e in entries], dtype=float)


def cost_series(entries: list[dict]) -> dict[str, np.ndarray]:
    """``{cost name: values}`` from the nested ``"cost"`` dicts of history entries."""
    costs = [e.get("cost") if isinstance(e.get("cost"), dict) else {} for e in entries]
    keys = list(dict.fromkeys(k for c in costs for k, v in c.items() if not math.isnan(_number(v))))
    return {k: np.array([_number(c.get(k)) for c in costs]) for k in keys}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
