"""Write one section of docs/benchmarks.md, replacing the previous version of that section."""
from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery table is written by a script in `benchmarks/`; the command under each reproduces it.\n"


def write_section(title: str, description: str, command: str, rows: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    body = (f"## {title}\n\n{description}\n\nReproduce: `{command}` ({date.today()}, {platform.machine()}, "
            f"{platform.python_version()})\n\n" + "\n".join(rows) + "\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
