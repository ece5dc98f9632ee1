"""Cost models: FLASH and peak RAM as deployed, BOPs / EBOPs, latency and energy per target,
and budgets. Every cost is a small pure function of the graph and its bit assignment,
differentiable in the bits (``evaluate_torch``) and exact for integer bits (``evaluate``).

>>> from mixprec.cost import load_target, parse_size
>>> load_target("cortex-m7").flash_bytes == parse_size("2MiB")
True
"""
from .bits import BitAssignment, act_bits, assignment, min_assignment, uniform, weight_bits
from .budget import Budget, BudgetError, check, check_achievable, feasible, smallest_costs, violations
from .compute import bops, ebops, effective_bits, energy_uj, mac_cycles
from .memory import (MemoryPlan, act_bytes, lifetimes, param_flash_bytes, plan_arena, weight_flash_bytes)
from .report import CostReport, LayerCost, evaluate, evaluate_torch, format_table
from .rounding import snap_up
from .targets import Target, as_target, list_targets, load_target
from .units import format_size, parse_number, parse_size

__all__ = [
    "BitAssignment", "act_bits", "assignment", "min_assignment", "uniform", "weight_bits",
    "Budget", "BudgetError", "check", "check_achievable", "feasible", "smallest_costs", "violations",
    "bops", "ebops", "effective_bits", "energy_uj", "mac_cycles",
    "MemoryPlan", "act_bytes", "lifetimes", "param_flash_bytes", "plan_arena", "weight_flash_bytes",
    "CostReport", "LayerCost", "evaluate", "evaluate_torch", "format_table",
    "snap_up", "Target", "as_target", "list_targets", "load_target",
    "format_size", "parse_number", "parse_size",
]
