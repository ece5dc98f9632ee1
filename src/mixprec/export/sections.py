"""Budgets checked on the artifact itself: the FLASH and RAM an exported C library takes, from its
linked firmware sections where the firmware was built, else from the arrays it generated.

``export`` records the figures in ``artifact.json`` and recomputes the run's ``feasible`` from them;
``verify`` fails an artifact whose sections exceed the run's budget or the device.
"""
from __future__ import annotations

from .base import Artifact

FLASH_SECTIONS = (".mixprec_weights", ".mixprec_aux")
RAM_SECTIONS = (".mixprec_arena",)


def artifact_memory(artifact: Artifact) -> dict | None:
    """``{"flash_bytes", "ram_bytes", "source"}`` of an artifact that stores the model in memory
    sections (the C library), or None for formats that do not (QONNX, hls4ml)."""
    d = artifact.details
    linked = (d.get("firmware") or {}).get("sections")
    if linked:
        return {"flash_bytes": sum(linked.get(s, 0) for s in FLASH_SECTIONS),
                "ram_bytes": sum(linked.get(s, 0) for s in RAM_SECTIONS),
                "source": "linked firmware sections " + " + ".join(FLASH_SECTIONS + RAM_SECTIONS)}
    if "weights_section_bytes" in d:
        return {"flash_bytes": d["weights_section_bytes"] + d.get("aux_section_bytes", 0),
                "ram_bytes": d["arena_bytes"], "source": "generated arrays (no firmware linked)"}
    return None


def over_budget(memory: dict, result: dict) -> list[str]:
    """Each limit of the run's budget, and of its target device, that the artifact's sections exceed."""
    from ..cost import load_target

    limits = {k: ("budget", v) for k, v in (result.get("budget") or {}).items() if k in ("flash_bytes", "ram_bytes")}
    try:
        target = load_target(result["target"]) if result.get("target") else None
    except (FileNotFoundError, ValueError):  # a custom target file that moved: the budget still applies
        target = None
    for key in ("flash_bytes", "ram_bytes"):
        capacity = getattr(target, key, None) if target is not None else None
        if capacity is not None and (key not in limits or capacity < limits[key][1]):
            limits[key] = (f"{target.name} capacity", capacity)
    label = {"flash_bytes": "FLASH", "ram_bytes": "RAM"}
    return [f"{label[k]}: {memory[k]:,} B in the artifact's sections exceed the {what} of {int(limit):,} B"
            for k, (what, limit) in limits.items() if memory[k] > limit]
