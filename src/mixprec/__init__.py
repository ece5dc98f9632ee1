"""mixprec: mixed-precision quantization for edge hardware, with budgets that hold and
integer export checked bit-exact against one reference.

The public names load on first use (PEP 562): ``import mixprec`` costs no torch import, so the
command line answers ``--help`` and usage errors at once.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (``mixprec.api`` re-exports the same objects)
_PUBLIC = {
    "quantize": "mixprec.convert",
    "assignment": "mixprec.cost.bits",
    **{name: "mixprec.cost.deployed" for name in ("cost_report", "cost_term")},
    **{name: "mixprec.cost" for name in ("Budget", "BudgetError", "as_target", "load_target", "parse_size")},
    "verify_against_reference": "mixprec.execute",
    "save_integer_model": "mixprec.lower",
    "finalize": "mixprec.search.finalize",
    "largest_uniform_bits": "mixprec.search.uniform",
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
