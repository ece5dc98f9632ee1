"""The cost vocabulary: one row per cost a report totals, read by budgets (``Budget``, the run's
``budget`` keys, the ``--flash``-style flags), the learned methods' ``-o cost=NAME``, the budget
step's messages and the reports.

>>> BY_NAME["flash"].key, BY_KEY["ram_bytes"].label, [c.name for c in COSTS if c.budget]
('flash_bytes', 'RAM', ['flash', 'ram', 'ram_in_out', 'bops', 'ebops', 'latency', 'energy'])
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostKey:
    key: str  # the report total (``CostReport.totals``)
    name: str  # what users write: budget keys, CLI flags (--flash), -o cost=NAME
    label: str  # in messages and tables
    unit: str  # "B" (a size: 32KiB), "cycles", "uJ", "" (a count)
    budget: bool  # may be a budget limit (the budget step can steer it)


#: In report order
COSTS = (
    CostKey("flash_bytes", "flash", "FLASH", "B", True),
    CostKey("ram_bytes", "ram", "RAM", "B", True),
    # the MCU paper's RAM constraint: the largest (input buffers + output buffer) of one layer
    CostKey("ram_mcu_in_out", "ram_in_out", "in+out RAM (largest input+output buffers of one layer)", "B", True),
    CostKey("macs", "macs", "MACs", "", False),
    CostKey("bops", "bops", "BOPs", "", True),
    CostKey("ebops", "ebops", "EBOPs", "", True),
    CostKey("latency_cycles", "latency", "latency", "cycles", True),
    CostKey("energy_uj", "energy", "energy", "uJ", True),
)
BY_KEY = {c.key: c for c in COSTS}
BY_NAME = {c.name: c for c in COSTS}
BUDGET_KEYS = tuple(c.key for c in COSTS if c.budget)
BUDGET_NAMES = tuple(c.name for c in COSTS if c.budget)


def cost_key(name: str) -> str:
    """The report total a user's cost name means (``flash`` -> ``flash_bytes``; totals pass)."""
    if name in BY_KEY:
        return name
    if name not in BY_NAME:
        raise ValueError(f"unknown cost {name!r}; choose one of {', '.join(BY_NAME)}")
    return BY_NAME[name].key
