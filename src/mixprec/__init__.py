"""mixprec: mixed-precision quantization for edge hardware, with budgets that hold and
integer export checked bit-exact against one reference.

The public names load on first use (PEP 562): ``import mixprec`` costs no torch import, so the
command line answers ``--help`` and usage errors at once.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    **{name: "mixprec.api" for name in ("as_target", "assignment", "cost_report", "cost_term", "finalize",
                                       "largest_uniform_bits", "quantize", "save_integer_model",
                                       "verify_against_reference")},
    **{name: "mixprec.cost" for name in ("Budget", "BudgetError", "load_target", "parse_size")},
    **{name: "mixprec.runs" for name in ("Run", "RunError", "evaluate", "load_run")},
    "reference": "mixprec.execute",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mixprec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
