"""mixprec: mixed-precision quantization for edge hardware, with budgets that hold and
integer export checked bit-exact against one reference."""
__version__ = "0.1.0"

from .api import (as_target, assignment, cost_report, cost_term, finalize, largest_uniform_bits, quantize,  # noqa: E402
                  save_integer_model, verify_against_reference)
from .cost import Budget, BudgetError, load_target, parse_size  # noqa: E402
from .execute import reference  # noqa: E402

__all__ = ["__version__", "as_target", "assignment", "cost_report", "cost_term", "finalize", "largest_uniform_bits",
           "quantize", "save_integer_model", "verify_against_reference", "Budget", "BudgetError", "load_target",
           "parse_size", "reference"]
