"""What a run directory stores and how it comes back: the float model (``checkpoints/float.pt``,
or the one ``float_from`` names) and the quantized model (``checkpoints/quantized.pt``: tensors
only, so it loads with ``weights_only``), rebuilt by the run, ``load_run`` and the candidate
evaluator alike."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..convert import quantize
from ..nn.model import LayerNamesError, QuantModel
from ..train import CheckpointError, load_checkpoint
from .config import RunConfig

FLOAT_CHECKPOINT = Path("checkpoints") / "float.pt"
QUANTIZED_CHECKPOINT = Path("checkpoints") / "quantized.pt"


def float_source(cfg: RunConfig) -> Path | None:
    """The float checkpoint ``float_from`` names (a run directory or a ``float.pt``), checked to exist."""
    if not cfg.float_from:
        return None
    path = Path(cfg.float_from)
    if path.is_dir():
        path = path / FLOAT_CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--float-from {cfg.float_from}: no float model at {path} (a run directory that "
                                f"finished its float phase, or its checkpoints/float.pt)")
    return path


def load_float(model: nn.Module, path: Path, model_name: str) -> list[dict]:
    """Load the float checkpoint ``path`` into ``model``; returns its training history."""
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{path} does not hold a float {model_name} model: {exc}") from exc
    return state.get("history", [])


def quantized_state(qm: QuantModel) -> dict:
    """Everything needed to rebuild a quantized model: tensors only (loads with weights_only)."""
    return {"state_dict": qm.state_dict(), "weight_bits": qm.weight_bits(), "act_bits": qm.act_bits()}


def rebuild_quantized(model: nn.Module, target, input_shape, state: dict, path: Path,
                      weight_granularity: str | None = None) -> QuantModel:
    """The quantized model ``quantized_state`` saved (from checkpoint ``path``, named in errors),
    on a fresh float ``model`` of the same architecture."""
    qm = quantize(model, target, input_shape, bits=state["weight_bits"], act_bits=state["act_bits"],
                  weight_granularity=weight_granularity)
    try:
        qm.load_state_dict(state["state_dict"])
    except LayerNamesError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return qm


def load_run(run_dir: str | Path):
    """Rebuild ``(config, quantized model in eval mode, result)`` from a run directory."""
    from ..data import load_dataset
    from ..models import get_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = RunConfig.load(run_dir / "config.yaml")
    path = run_dir / QUANTIZED_CHECKPOINT
    state = load_checkpoint(path)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    input_shape = tuple(result.get("input_shape") or load_dataset(cfg.data, cfg.data_dir, cfg.seed).input_shape)
    qm = rebuild_quantized(get_model(cfg.model), cfg.target, input_shape, state, path)
    qm.eval()
    return cfg, qm, result
