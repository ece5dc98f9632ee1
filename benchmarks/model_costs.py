"""8-bit cost of the ImageNet reference models on cortex-m7 -> "Model costs" table of docs/benchmarks.md.

    .venv/bin/python benchmarks/model_costs.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _tables import write_section  # noqa: E402

import mixprec  # noqa: E402
from mixprec.cost import evaluate  # noqa: E402
from mixprec.models import get_model, input_shape  # noqa: E402

# published parameter counts (torchvision MobileNetV2 1.0; timm efficientnet_lite0) and MACs at 224x224
PUBLISHED = {"mobilenetv2": (3_504_872, "300M"), "efficientnet-lite0": (4_652_008, "~400M")}


def main() -> None:
    target = mixprec.load_target("cortex-m7")
    rows = ["| model | params (ours) | params (published) | MACs (ours) | MACs (published) | 8-bit weight bytes | "
            "param bytes (bias, mult, shift) | FLASH bytes | peak RAM bytes (arena) | RAM lower bound | MCU in+out max |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (params, macs) in PUBLISHED.items():
        model = get_model(name)
        qm = mixprec.quantize(model, target, input_shape(name), bits=8, weight_granularity="per-channel")
        t = evaluate(qm.graph, mixprec.assignment(qm), target).totals
        rows.append(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {params:,} | {t['macs']:,} | {macs} | "
                    f"{t['weight_bytes']:,} | {t['param_bytes']:,} | {t['flash_bytes']:,} | {t['ram_bytes']:,} | "
                    f"{t['ram_lower_bound']:,} | {t['ram_mcu_in_out']:,} |")
    write_section("Model costs", "Uniform 8-bit, per-channel weights, 8-bit activations at 224x224 on `cortex-m7` "
                  "(TFLite-Micro layout: int32 bias, multiplier and shift per channel), computed from shapes by "
                  "`mixprec cost`. Weight bytes equal the conv/linear weight count (BatchNorm folded).",
                  "python benchmarks/model_costs.py", rows)


if __name__ == "__main__":
    main()
