"""Bit-tensor helpers of the budget step: a group's width applied as a cap (or a raise), snapping
onto the supported widths, and the model-level helpers that read, set, snapshot, restore, compare
and broadcast every quantizer's bits."""
from __future__ import annotations

import torch

from ...cost import Target
from ...cost.tables import cap, cap_all

_EPS = 1e-6


def _padded(bits: torch.Tensor, rank: int) -> torch.Tensor:
    return bits.detach().cpu().reshape((1,) * (rank - bits.dim()) + tuple(bits.shape)).float()


# a group's width applied as a cap (or a raise): the cost tables' rule, so both mean the same choice
_apply, _apply_all = cap, cap_all


def _snap(bits: torch.Tensor, allowed) -> torch.Tensor:
    """Every entry onto the smallest allowed width at or above it (the widest allowed above that)."""
    s = torch.tensor(sorted(allowed), dtype=torch.float32)
    idx = torch.bucketize(bits.detach().float() - _EPS, s).clamp_max(len(s) - 1)
    return s[idx].reshape(bits.shape)


def _set_bits(quantizer, bits: torch.Tensor, shape) -> None:
    """A learned quantizer raises ``TypeError``: the method's result must be frozen into fixed
    quantizers before the budget step."""
    quantizer.set_bits(bits.reshape(shape))


def _bits_snapshot(qm) -> dict:
    return {("w", n): l.quantizer.bits().detach().clone() for n, l in qm.layers.items()} | \
           {("a", n): q.bits().detach().clone() for n, q in qm.act_quantizers.items()}


def _restore(qm, saved: dict) -> None:
    for (kind, name), bits in saved.items():
        q = qm.layers[name].quantizer if kind == "w" else qm.act_quantizers[name]
        _set_bits(q, bits, tuple(bits.shape))
    qm.invalidate()


def _snap_model(qm, t: Target) -> bool:
    changed = False
    for name, layer in qm.layers.items():
        bits = layer.quantizer.bits().detach().cpu()
        snapped = _snap(bits, t.weight_bits)
        if not torch.equal(snapped, bits.float()):
            _set_bits(layer.quantizer, snapped, tuple(bits.shape))
            changed = True
    for name, q in qm.act_quantizers.items():
        bits = q.bits().detach().cpu()
        snapped = _snap(bits, t.act_bits_of(bits.numel()))
        if not torch.equal(snapped, bits.float()):
            _set_bits(q, snapped, tuple(bits.shape))
            changed = True
    if changed:
        qm.invalidate()
    return changed


def _supported(qm, t: Target) -> bool:
    w = all(set(map(float, l.quantizer.bits().detach().flatten().tolist())) <= set(map(float, t.weight_bits))
            for l in qm.layers.values())
    a = all(set(map(float, q.bits().detach().flatten().tolist())) <= set(map(float, t.act_bits_of(q.bits().numel())))
            for q in qm.act_quantizers.values())
    return w and a


def _changes(before: dict, qm) -> list[dict]:
    out = []
    for (kind, name), old in before.items():
        q = qm.layers[name].quantizer if kind == "w" else qm.act_quantizers[name]
        new = q.bits().detach().cpu()
        if old.shape == new.shape and torch.equal(old.cpu().float(), new.float()):
            continue
        values, counts = torch.unique(new.flatten(), return_counts=True)
        same_shape = tuple(old.shape) == tuple(new.shape)
        out.append({"name": name, "kind": "weight" if kind == "w" else "activation",
                    "entries": int(new.numel()),
                    "changed_entries": int((old.cpu().float() != new.float()).sum()) if same_shape else int(new.numel()),
                    "bits_mean_before": float(old.float().mean()), "bits_mean_after": float(new.float().mean()),
                    "widths_after": {str(int(v)): int(c) for v, c in zip(values.tolist(), counts.tolist())}})
    return out


def _broadcast_bits(qm) -> None:
    """Under torchrun every process selects; make sure all hold rank 0's choice."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL moves CUDA tensors only
    for q in [layer.quantizer for layer in qm.layers.values()] + list(qm.act_quantizers.values()):
        bits = q.bits().detach().clone()
        bits = bits.cuda() if nccl else bits
        torch.distributed.broadcast(bits, 0)
        _set_bits(q, bits.cpu(), tuple(bits.shape))
    qm.invalidate()
