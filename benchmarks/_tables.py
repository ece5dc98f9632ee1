"""Write one section of docs/benchmarks.md, replacing the previous version of that section."""
from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table is written by a script in `benchmarks/`; the command under each reproduces it.\n"


def _section_pattern(title: str) -> re.Pattern:
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)


def write_section(title: str, description: str, command: str, rows: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    body = (f"## {title}\n\n{description}\n\nReproduce: `{command}` ({date.today()}, {platform.machine()}, "
            f"{platform.python_version()})\n\n" + "\n".join(rows) + "\n")
    pattern = _section_pattern(title)
    text = pattern.sub(body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def row_cells(row: str) -> list[str]:
    """The cells of a markdown table row, stripped."""
    return [c.strip() for c in row.strip().strip("|").split("|")]


def table_rows(title: str) -> list[str]:
    """The data rows (below the header and its rule) of the section's table, as written."""
    match = _section_pattern(title).search(DOC.read_text()) if DOC.exists() else None
    lines = [line for line in (match.group(0).splitlines() if match else []) if line.startswith("|")]
    return lines[2:]


def merge_rows(title: str, rows: list[str], key_cells: int, order: list[tuple]) -> list[str]:
    """``rows`` measured now, plus the section's earlier rows whose key (first ``key_cells`` cells)
    none of them has: a table keeps rows whose runs live on another machine (their command
    reproduces them). Sorted by ``order`` (a list of keys), unknown keys last in written order."""
    def key(row: str) -> tuple:
        return tuple(row_cells(row)[:key_cells])

    merged = {key(r): r for r in table_rows(title)}
    merged.update({key(r): r for r in rows})
    rank = {k: i for i, k in enumerate(order)}
    return sorted(merged.values(), key=lambda r: rank.get(key(r), len(rank)))


COLLAPSED = " (DEGENERATE: collapsed, not a result)"


def collapse_mark(result: dict) -> str:
    """What a row adds to its accuracy when the run reports a collapse (``degenerate``): no result."""
    return COLLAPSED if result.get("degenerate") else ""
