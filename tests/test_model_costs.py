"""Whole-model cost figures against independent counts from the float modules."""
import pytest
from torch import nn

import mixprec
from mixprec.cost import evaluate
from mixprec.models import get_model, input_shape


def _weight_and_channel_counts(model: nn.Module) -> tuple[int, int]:
    weights = channels = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            weights += m.weight.numel()
            channels += m.weight.shape[0]
    return weights, channels


@pytest.mark.parametrize("name, params", [("mobilenetv2", 3_504_872), ("efficientnet-lite0", 4_652_008)])
def test_imagenet_models_8bit_flash_matches_an_independent_count(name, params):
    model = get_model(name)
    assert sum(p.numel() for p in model.parameters()) == params  # published figures
    weights, channels = _weight_and_channel_counts(model)
    qm = mixprec.quantize(model, "cortex-m7", input_shape(name), bits=8, weight_granularity="per-channel")
    report = evaluate(qm.graph, mixprec.assignment(qm), mixprec.load_target("cortex-m7"))
    # 8-bit weights take one byte each (every channel a whole number of bytes)
    assert report.totals["weight_bytes"] == weights
    # per output channel: int32 bias + int32 multiplier + int32 shift (TFLite-Micro arrays);
    # the residual adds add 3 multiplier/shift pairs each
    adds = sum(1 for n in qm.graph if n.op == "add")
    assert report.totals["param_bytes"] == 12 * channels + adds * 3 * 8
    # folding BatchNorm removes its 2 parameters per channel; what is left is weights + biases
    assert report.totals["weight_bytes"] < params
    assert report.totals["macs"] > 2e8


def test_mobilenetv2_peak_ram_is_the_widest_live_set():
    qm = mixprec.quantize(get_model("mobilenetv2"), "generic", (3, 224, 224), bits=8)
    report = evaluate(qm.graph, mixprec.assignment(qm), mixprec.load_target("generic"))
    # second block: its 96x112x112 expanded tensor (1,204,224 B) feeds a stride-2 depthwise conv
    # whose 96x56x56 output (301,056 B) is live at the same time; that step is the peak
    # (the expansion step before it holds 16x112x112 + 96x112x112 = 1,404,928 B)
    assert report.totals["ram_lower_bound"] == 96 * 112 * 112 + 96 * 56 * 56
    assert report.totals["ram_lower_bound"] <= report.totals["ram_bytes"]
