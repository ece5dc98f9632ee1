"""The uniform baseline keeps the network's output (the logits) at 8 bits or more."""
import json

import pytest

from mixprec.api import quantize
from mixprec.cost import load_target
from mixprec.models import get_model
from mixprec.search import RunConfig, run_search
from mixprec.search.uniform import uniform_act_bits


@pytest.mark.parametrize("target", ["fpga-hls4ml", "cortex-m4"])
def test_only_the_output_layer_is_widened(target):
    t = load_target(target)
    graph = quantize(get_model("lenet5"), t, (1, 28, 28), bits=2, act_bits=2).graph
    bits = uniform_act_bits(graph, 2, t)
    assert bits.pop(graph.grid_source(graph.output)) == 8
    assert set(bits.values()) == {2} and len(bits) == len(graph) - 1
    assert uniform_act_bits(graph, 8, t) == 8  # nothing to widen


def test_two_bit_activations_on_the_fpga_still_classify(tmp_path, digits_float):
    # 2-bit hidden activations: with 2-bit logits too this run scored 16% (80% with 8-bit logits)
    cfg = RunConfig(model="digits-cnn", data="digits", target="fpga-hls4ml", bits=4, act_bits=2,
                    qat_epochs=2, budget_epochs=0, float_from=str(digits_float))
    run_search(cfg, tmp_path / "r")
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    acts = {r["name"]: r["act_bits"] for r in result["layers"]}
    last = result["layers"][-1]["name"]
    assert acts.pop(last) == 8 and set(acts.values()) == {2}
    assert {r["weight_bits_mean"] for r in result["layers"] if "weight_bits" in r} == {4.0}
    assert result["accuracy"]["quantized"] > 0.5 and result["reference_mismatches"] == 0
