"""The uniform baseline: one bit-width everywhere (:func:`largest_uniform_bits`: the widest that meets
the budget), quantization-aware training from the float model."""
from __future__ import annotations

import logging

from torch import nn

from ..convert import quantize
from ..cost import (Budget, BudgetError, Target, as_target, check_achievable, evaluate, feasible, uniform,
                    violations)
from ..cost.targets import activation_width_for, nonzero_widths, weight_granularity_for
from ..graph.ir import Graph
from ..train import fit
from .context import SearchContext
from .methods import Method

log = logging.getLogger(__name__)

LOGIT_BITS = 8


def uniform_act_bits(graph: Graph, act_bits: int, target: Target) -> int | dict[str, int]:
    """``act_bits`` for every activation but the network's output, which keeps at least 8 bits.

    The output is the classifier's logits: hls4ml gives the last layer's result a wide type and
    int8 MCU heads emit 8 bits, and no layer reads it, so its width costs no EBOPs and a few bytes
    of RAM. At 2 bits every class ties (a LeNet-5 at 2 bits scored 9.8%, the share of class 0).
    """
    head = graph.grid_source(graph.output)
    wide = max(act_bits, activation_width_for(LOGIT_BITS, target))
    if wide == act_bits:
        return act_bits
    return {n.name: (wide if n.name == head else act_bits) for n in graph}


def largest_uniform_bits(model: nn.Module, target: str | Target, input_shape, budget: Budget,
                         act_bits: int | None = None, weight_granularity: str | None = None) -> int:
    """The widest uniform weight width (activations alike unless given) that meets ``budget``,
    judged from shapes alone; raises ``BudgetError`` naming the smallest achievable cost."""
    t = as_target(target)
    graph = quantize(model, t, input_shape, bits=t.min_weight_bits, act_bits=act_bits or t.min_act_bits,
                     weight_granularity=weight_granularity).graph
    gran = weight_granularity_for(t, weight_granularity)
    try:
        check_achievable(graph, t, budget, gran)
    except BudgetError as exc:
        if not t.allows_pruning:
            raise
        try:
            check_achievable(graph, t, budget, gran, allow_pruning=True)
        except BudgetError:
            raise exc from None
        raise BudgetError(f"{exc}; pruning channels, a mixed-precision method (--method hgq or dq) can reach "
                          f"it") from None
    tried = []
    for b in nonzero_widths(t):
        report = evaluate(graph, uniform(graph, b, act_bits or activation_width_for(b, t), gran,
                                         t.act_granularities[0]), t)
        if feasible(report, budget):
            return b
        tried.append(f"{b}-bit: {violations(report, budget)}")
    raise BudgetError("no uniform width meets the budget (" + "; ".join(tried) + "), though the smallest "
                      "achievable cost does: a mixed-precision method (--method hgq or dq) can reach it")


def search_uniform(ctx: SearchContext):
    cfg, data = ctx.config, ctx.data
    qm = quantize(ctx.float_model, ctx.target, data.input_shape, bits=ctx.weight_bits, act_bits=ctx.act_bits,
                  weight_granularity=cfg.weight_granularity)
    act_bits = uniform_act_bits(qm.graph, ctx.act_bits, ctx.target)
    if act_bits != ctx.act_bits:  # only the head differs: widen its quantizer rather than trace again
        head = qm.graph.grid_source(qm.graph.output)
        log.info("the network output (logits) keeps %d bits", act_bits[head])
        qm.act_quantizers[head].set_bits(act_bits[head])
    ctx.calibrate(qm)
    log.info("QAT at %d-bit weights, %d-bit activations for %d epochs", ctx.weight_bits, ctx.act_bits, cfg.qat_epochs)
    history = fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, cfg.train_config("qat"),
                  params=qm.weight_parameters(), **ctx.fit_options("qat"))
    ctx.history["qat"] = history  # all epochs, also those before a resume
    return qm, history


METHOD = Method("uniform", search_uniform, None,
                "one bit-width everywhere (the widest the budget allows), quantization-aware training")
