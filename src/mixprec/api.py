"""The small public API the CLI is a thin layer over. It only re-exports: every function lives in
the core module named below, and core modules never import this one.

>>> import torch, mixprec
>>> qm = mixprec.quantize(torch.nn.Sequential(torch.nn.Linear(4, 2)), "cortex-m4", (4,), bits=4)
>>> qm.calibrate([torch.randn(8, 4)])
>>> int(mixprec.cost_report(qm, "cortex-m4").totals["flash_bytes"])   # 2 rows x 2 B + bias/mult/shift
28
"""
from __future__ import annotations

from .convert import quantize
from .cost import Budget, BudgetError
from .cost.bits import assignment
from .cost.deployed import cost_report, cost_term
from .cost.targets import as_target
from .execute import verify_against_reference
from .lower import save_integer_model
from .search.finalize import finalize
from .search.uniform import largest_uniform_bits

# helpers that used to be defined here, still importable from here (not part of ``__all__``)
from .cost.deployed import effective_ebops  # noqa: F401
from .cost.targets import (activation_width_for, default_weight_granularity, nonzero_widths,  # noqa: F401
                           weight_granularity_for)

__all__ = ["Budget", "BudgetError", "as_target", "assignment", "cost_report", "cost_term", "finalize",
           "largest_uniform_bits", "quantize", "save_integer_model", "verify_against_reference"]
