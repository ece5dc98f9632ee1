"""The uniform baseline: one bit-width everywhere, quantization-aware training from the float model."""
from __future__ import annotations

import logging

from ..api import quantize
from ..train import fit
from .context import SearchContext

log = logging.getLogger(__name__)


def search_uniform(ctx: SearchContext):
    cfg, data = ctx.config, ctx.data
    qm = quantize(ctx.float_model, ctx.target, data.input_shape, bits=ctx.weight_bits, act_bits=ctx.act_bits,
                  weight_granularity=cfg.weight_granularity)
    ctx.calibrate(qm)
    log.info("QAT at %d-bit weights, %d-bit activations for %d epochs", ctx.weight_bits, ctx.act_bits, cfg.qat_epochs)
    history = fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("qat"),
                  **ctx.fit_options("qat"))
    ctx.history["qat"] = history  # all epochs, also those before a resume
    return qm, history
