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
    widths: str  # the widths it depends on: "weights", "acts", "both" or "" (neither: MACs)
    flag: str = ""  # the search command's budget flag, where it is not --NAME

    @property
    def cli_flag(self) -> str:
        """``mixprec search``'s flag for this budget (``--flash``, ``--ram-in-out``, ``--energy-uj``)."""
        return self.flag or "--" + self.name.replace("_", "-")


#: In report order
COSTS = (
    CostKey("flash_bytes", "flash", "FLASH", "B", True, "weights"),
    CostKey("ram_bytes", "ram", "RAM", "B", True, "acts"),
    # the MCU paper's RAM constraint: the largest (input buffers + output buffer) of one layer
    CostKey("ram_mcu_in_out", "ram_in_out", "in+out RAM (largest input+output buffers of one layer)", "B", True,
            "acts"),
    CostKey("macs", "macs", "MACs", "", False, ""),
    CostKey("bops", "bops", "BOPs", "", True, "both"),
    CostKey("ebops", "ebops", "EBOPs", "", True, "both"),
    CostKey("latency_cycles", "latency", "latency", "cycles", True, "both", "--latency-cycles"),
    CostKey("energy_uj", "energy", "energy", "uJ", True, "both", "--energy-uj"),
)
BY_KEY = {c.key: c for c in COSTS}
BY_NAME = {c.name: c for c in COSTS}
BUDGET_KEYS = tuple(c.key for c in COSTS if c.budget)
BUDGET_NAMES = tuple(c.name for c in COSTS if c.budget)
#: The costs the weights' widths change, and those the activations' widths change
WEIGHT_COSTS = tuple(c.key for c in COSTS if c.widths in ("weights", "both"))
ACT_COSTS = tuple(c.key for c in COSTS if c.widths in ("acts", "both"))


def cost_key(name: str) -> str:
    """The report total a user's cost name means (``flash`` -> ``flash_bytes``; totals pass)."""
    if name in BY_KEY:
        return name
    if name not in BY_NAME:
        raise ValueError(f"unknown cost {name!r}; choose one of {', '.join(BY_NAME)}")
    return BY_NAME[name].key
