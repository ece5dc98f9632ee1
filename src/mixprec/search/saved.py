"""What a run directory stores and how it comes back: the float model (``checkpoints/float.pt``,
or the one ``float_from`` names) and the quantized model (``checkpoints/quantized.pt``: tensors,
numbers and lists only, so it loads with ``weights_only``), rebuilt by the run, ``load_run`` and
the candidate evaluator alike. A model whose channels a method removed (``mixprec.prune``) saves
its pruning record, and comes back the same narrower model from the full-width float one."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from ..convert import quantize
from ..graph.convert import trace
from ..graph.ir import REQUANTIZING_OPS
from ..nn.model import QuantModel
from ..prune import keep_channels
from ..train import CheckpointError, load_checkpoint
from .config import RunConfig

log = logging.getLogger(__name__)

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
    """Load the float checkpoint ``path`` into ``model``; returns its training history. A
    checkpoint of the same architecture whose layers had other names (saved before a model named
    its layers) is taken by position."""
    return float_from_state(model, load_checkpoint(path), path, model_name)


def float_from_state(model: nn.Module, state: dict, path: Path, model_name: str) -> list[dict]:
    """``load_float`` of a checkpoint already read (``path`` names it in messages)."""
    try:
        saved = state["model"]
        renamed = renamed_by_position(saved, model.state_dict())
        model.load_state_dict(saved if renamed is None else renamed)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{path} does not hold a float {model_name} model: {exc}") from exc
    if renamed is not None and renamed.keys() != saved.keys():
        log.info("%s: layers taken by position (saved under earlier layer names)", path)
    return state.get("history", [])


def renamed_by_position(saved: dict, wanted: dict) -> dict | None:
    """``saved`` under the keys of ``wanted`` when the two differ at most in layer names: as many
    entries, and at every position the same entry name (``weight``, ``running_mean``, ``bits``...)
    and the same shape; None otherwise."""
    if len(saved) != len(wanted):
        return None
    out = {}
    for (old, value), (new, want) in zip(saved.items(), wanted.items()):
        same_kind = old.rsplit(".", 1)[-1] == new.rsplit(".", 1)[-1]
        if not same_kind or tuple(value.shape) != tuple(want.shape):
            return None
        out[new] = value
    return out


def quantized_state(qm: QuantModel) -> dict:
    """Everything needed to rebuild a quantized model (loads with weights_only): its state, widths
    and pruning record (``QuantModel.pruning``: None, or per layer ints and lists of ints)."""
    return {"state_dict": qm.state_dict(), "weight_bits": qm.weight_bits(), "act_bits": qm.act_bits(),
            "pruning": qm.pruning}


def rebuild_quantized(model: nn.Module, target, input_shape, state: dict, path: Path,
                      weight_granularity: str | None = None) -> QuantModel:
    """The quantized model ``quantized_state`` saved (from checkpoint ``path``, named in errors),
    on a fresh float ``model`` of the same architecture (the full-width one where the saved model
    was pruned: its channels are removed again as recorded). A checkpoint saved before the model
    named its layers (its widths are keyed by other layer names) is taken by position when every
    entry lines up (``renamed_by_position``)."""
    wbits, abits, saved = state["weight_bits"], state["act_bits"], state["state_dict"]
    pruning = state.get("pruning")
    # weighted layers are named by their module paths: a trace is needed only for other names
    renamed = not set(wbits) <= {name for name, _ in model.named_modules()}
    if renamed:
        graph, _ = trace(model, tuple(input_shape))
        wbits = _by_position(wbits, [n.name for n in graph.weighted()])
        abits = _by_position(abits, [n.name for n in graph if n.op in REQUANTIZING_OPS])
    try:
        if pruning is None:
            qm = quantize(model, target, input_shape, bits=wbits, act_bits=abits,
                          weight_granularity=weight_granularity)
        else:  # the widths fit the narrower layers: the full-width model takes each layer's widest first
            qm = quantize(model, target, input_shape, bits=_widest(wbits), act_bits=_widest(abits),
                          weight_granularity=weight_granularity)
            qm = _pruned(qm, pruning, wbits, abits)
    except ValueError as exc:  # widths or channels of another architecture
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from None
    if renamed:
        saved = renamed_by_position(saved, qm.state_dict()) or saved  # no match: the error below names both
        log.info("%s: layers taken by position (saved under earlier layer names)", path)
    try:
        qm.load_state_dict(saved)
    except RuntimeError as exc:  # other layer names (LayerNamesError) or shapes
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return qm


def _widest(bits: dict) -> dict[str, int]:
    return {name: int(b.max()) for name, b in bits.items()}


def _pruned(qm: QuantModel, pruning: dict, wbits: dict, abits: dict) -> QuantModel:
    """``qm`` with the channels ``pruning`` records removed, at the saved widths."""
    for name, record in pruning.items():
        if name not in qm.layers:
            raise ValueError(f"{name}: a pruned layer this model does not have")
        if record["channels"] != qm.graph[name].out_channels:
            raise ValueError(f"{name}: pruned from {record['channels']} output channels, this model has "
                             f"{qm.graph[name].out_channels}")
    out = keep_channels(qm, {name: record["kept"] for name, record in pruning.items()})
    for name, bits in wbits.items():
        out.layers[name].quantizer.set_bits(bits)
    for name, bits in abits.items():
        out.act_quantizers[name].set_bits(bits)
    return out


def _by_position(bits: dict, names: list[str]) -> dict:
    return dict(zip(names, bits.values())) if len(bits) == len(names) else bits


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
