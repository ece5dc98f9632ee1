"""Running a benchmark's trials: each run's folder gets the command that reproduces it beside it
(``NAME.command``: a folder must hold a run or nothing, to be resumed into), and a finished run is
not run again."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from mixprec.search import get_method, run_search
from mixprec.search.plan import command_line

ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> Path:
    """``path`` relative to the repository when inside it, as the tables print it."""
    full = Path(path).resolve()
    return full.relative_to(ROOT) if full.is_relative_to(ROOT) else Path(path)


def command_file(out: Path) -> Path:
    return out.parent / f"{out.name}.command"


def made_before_the_fill(cfg, out: Path) -> bool:
    """Whether ``out`` holds a finished run, made before the budget step could fill (up to commit
    36c68f1), of a method that now fills by default: its command must say ``--no-fill``."""
    result = out / "result.json"
    if cfg.budget_fill is not None or not result.exists() or not get_method(cfg.method).fills_budget:
        return False
    return "fill" not in (json.loads(result.read_text()).get("budget_step") or {})


def command_for(cfg, out: Path) -> str:
    """The ``mixprec search`` line that reproduces the run ``cfg`` into ``out``."""
    if made_before_the_fill(cfg, out):
        cfg = replace(cfg, budget_fill=False)
    if cfg.float_from:
        cfg = replace(cfg, float_from=str(repo_relative(Path(cfg.float_from))))
    return command_line(cfg, repo_relative(out), ROOT)


def run_trial(cfg, out: Path, *, run: bool = True, device: str = "auto") -> None:
    """Write ``out``'s command file; run (or resume) it unless ``run`` is false or it has finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = command_for(cfg, out)
    command_file(out).write_text(command + "\n")
    if run and not (out / "result.json").exists():
        logging.info("%s: %s", out, command)
        if cfg.float_from:
            cfg = replace(cfg, float_from=str(repo_relative(Path(cfg.float_from))))
        run_search(cfg, out, resume=True, device=device)
