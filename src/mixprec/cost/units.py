"""Parse and format memory sizes and plain numbers for budgets and target files.

Units are case-sensitive and unambiguous: ``B``; decimal ``kB`` (1000), ``MB``, ``GB``; binary
``KiB`` (1024), ``MiB``, ``GiB``. ``KB`` is refused because datasheets use it for both 1000 and
1024. A bare number means bytes. Fractions are fine when the result is a whole number of bytes.

>>> parse_size("32KiB"), parse_size("1.5 kB"), parse_size("512")
(32768, 1500, 512)
>>> format_size(3481)
'3.4 KiB'
>>> parse_number("1e6")
1000000.0
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

UNITS = {"B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_AMBIGUOUS = {"KB": "kB (1000) or KiB (1024)", "kb": "kB", "Kb": "kB", "mb": "MB", "Mb": "MB", "b": "B"}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_ACCEPTED = "a number of bytes optionally followed by one of " + ", ".join(UNITS)


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"32KiB"``, ``"2 MB"``, ``"1.5KiB"`` or ``"4096"``.

    >>> parse_size("2MiB")
    2097152
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"size must be a string or an int, got {text!r}; expected {_ACCEPTED}")
    if isinstance(text, int):
        return _non_negative(text, text)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot parse size {text!r}; expected {_ACCEPTED}")
    number, unit = match.groups()
    return _non_negative(_to_bytes(text, number, unit or "B"), text)


def _to_bytes(text: str, number: str, unit: str) -> int:
    if unit in _AMBIGUOUS:
        raise ValueError(f"unit {unit!r} in size {text!r} is ambiguous; use {_AMBIGUOUS[unit]}")
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r} in size {text!r}; expected {_ACCEPTED}")
    try:
        value = Decimal(number) * UNITS[unit]
    except InvalidOperation as err:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"cannot parse size {text!r}; expected {_ACCEPTED}") from err
    if value != value.to_integral_value():
        raise ValueError(f"size {text!r} is not a whole number of bytes ({value} B)")
    return int(value)


def _non_negative(value: int, text) -> int:
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return value


def parse_number(text: str | int | float) -> float:
    """A finite number from ``"1e6"``, ``"2500"``, ``"0.5"`` (or an int/float passed through).

    >>> parse_number("2.5e3")
    2500.0
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a number, got {text!r}")
    try:
        value = float(text.strip()) if isinstance(text, str) else float(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot parse number {text!r}; expected e.g. 1000, 1e6 or 2.5") from err
    if not math.isfinite(value):
        raise ValueError(f"number {text!r} is not finite")
    return value


def format_size(nbytes: float, unit: str | None = None) -> str:
    """A size in the largest binary unit that keeps it >= 1 (or in ``unit``), one decimal.

    >>> format_size(512), format_size(2048), format_size(2048, unit="B")
    ('512 B', '2.0 KiB', '2048 B')
    """
    unit = unit or size_unit(nbytes)
    if unit == "B":
        return f"{nbytes:.0f} B"
    return f"{nbytes / UNITS[unit]:.1f} {unit}"


def size_unit(nbytes: float) -> str:
    """The binary unit ``format_size`` picks for ``nbytes``."""
    for unit in ("GiB", "MiB", "KiB"):
        if abs(nbytes) >= UNITS[unit]:
            return unit
    return "B"
