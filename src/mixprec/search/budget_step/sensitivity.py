"""Sensitivities of the budget step: the loss increase of every candidate width, measured on a few
held-out batches (``_LossProbe``, ``_measure``) or the data-free noise-to-signal proxy (``_proxy``),
then made non-increasing in the width and scaled (``_finish_sensitivity``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...quantizers.base import Quantizer
from .bits import _EPS, _apply, _apply_all
from .problem import _Act, _Problem

_TIE = 1e-6  # weight of the data-free proxy that breaks ties between measured sensitivities
_UP = 1e-9  # penalty per bit of a width raised (latency / energy budgets only)


class _LossProbe:
    """Mean task loss on a few held-out batches: fake-quantized forward, observers frozen."""

    def __init__(self, qm, x, y, max_samples: int = 512, batch_size: int = 256):
        self.qm, self.batch_size = qm, batch_size
        self.x, self.y = x[:max_samples].cpu(), y[:max_samples].cpu()

    @torch.no_grad()
    def __call__(self) -> float:
        observing = [(m, m.observing) for m in self.qm.modules() if isinstance(m, Quantizer)]
        was_training = self.qm.training
        try:
            for m, _ in observing:
                m.set_observing(False)
            self.qm.train(True)
            total = 0.0
            for i in range(0, len(self.x), self.batch_size):
                out = self.qm(self.x[i:i + self.batch_size])
                yb = self.y[i:i + self.batch_size]
                if yb.is_floating_point():
                    total += float(F.mse_loss(out, yb.reshape(out.shape), reduction="sum")) / max(out[0].numel(), 1)
                else:
                    total += float(F.cross_entropy(out, yb, reduction="sum"))
            return total / max(len(self.x), 1)
        finally:
            for m, on in observing:
                m.set_observing(on)
            self.qm.train(was_training)


def _proxy(p: _Problem, qm) -> None:
    """Data-free sensitivities: the noise-to-signal ratio each choice adds (see the module docstring)."""
    for layer in p.layers:
        power = float((qm.layers[layer.name].weight.detach().double() ** 2).sum()) or 1.0
        base = layer.err[np.arange(layer.groups), layer.cur][:, None]
        layer.sens = np.maximum(layer.err - base, 0.0) / power
    for a in p.acts.values():
        flat = a.bits.flatten().double()
        a.sens = np.array([float((4.0 ** -torch.minimum(flat, torch.tensor(w, dtype=flat.dtype)) - 4.0 ** -flat).mean())
                           for w in a.widths])
        a.sens = np.maximum(a.sens, 0.0)


def act_loss_changes(qm, a: _Act, probe: _LossProbe, base_loss: float, measured) -> np.ndarray:
    """The loss change with activation quantizer ``a`` set to each of its widths ``w`` for which
    ``measured(w)`` holds (0 for the others); the quantizer is left as it was."""
    quant = qm.act_quantizers[a.name]
    changes = np.zeros(len(a.widths))
    try:
        for i, w in enumerate(a.widths):
            if measured(w):
                quant.set_bits(_apply_all(a.bits, w).reshape(a.shape))
                changes[i] = probe() - base_loss
    finally:
        quant.set_bits(a.bits.reshape(a.shape))
    return changes


def _measure(p: _Problem, qm, probe: _LossProbe) -> None:
    """Measured sensitivities: per-layer loss increase, shared by the squared-error increase."""
    _proxy(p, qm)  # tie-breaker and the sharing weights
    base_loss = probe()
    for layer in p.layers:
        quant = qm.layers[layer.name].quantizer
        proxy = layer.sens.copy()
        share = proxy / np.maximum(proxy.sum(0, keepdims=True), 1e-300)
        measured = np.zeros_like(proxy)
        top = layer.bits.reshape(layer.groups, -1).amax(1).numpy()
        try:
            for k, w in enumerate(layer.widths):
                if not (layer.allowed[:, k] & (w < top - _EPS)).any():
                    continue
                widths = torch.as_tensor(np.minimum(top, w), dtype=torch.float32)  # groups narrower than w: unchanged
                quant.set_bits(_apply(layer.bits, widths).reshape(layer.shape))
                measured[:, k] = max(probe() - base_loss, 0.0) * share[:, k]
        finally:
            quant.set_bits(layer.bits.reshape(layer.shape))
        layer.sens = measured + _TIE * proxy
    for a in p.acts.values():
        top = float(a.bits.max())
        measured = np.maximum(act_loss_changes(qm, a, probe, base_loss, lambda w: w < top - _EPS), 0.0)
        a.sens = measured + _TIE * a.sens


def _finish_sensitivity(p: _Problem) -> None:
    """Non-increasing in the width below the start, a tiny penalty for raised widths, scaled to max 1."""
    for layer in p.layers:
        s = layer.sens
        for g in range(layer.groups):
            c = layer.cur[g]
            for k in range(c - 1, -1, -1):
                s[g, k] = max(s[g, k], s[g, k + 1])
            s[g, c] = 0.0
            top = layer.widths[c]
            up = layer.widths > top
            s[g, up] = _UP * (layer.widths[up] - top)
    for a in p.acts.values():
        for i in range(a.cur - 1, -1, -1):
            a.sens[i] = max(a.sens[i], a.sens[i + 1])
        a.sens[a.cur] = 0.0
        up = a.widths > a.widths[a.cur]
        a.sens[up] = _UP * (a.widths[up] - a.widths[a.cur])
    scale = max([float(layer.sens.max()) for layer in p.layers] + [float(a.sens.max()) for a in p.acts.values()] + [0.0])
    if scale > 0:
        for layer in p.layers:
            layer.sens = layer.sens / scale
        for a in p.acts.values():
            a.sens = a.sens / scale
