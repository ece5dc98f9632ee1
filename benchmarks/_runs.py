"""Running a benchmark's trials: each run's folder gets the command that reproduces it beside it
(``NAME.command``: a folder must hold a run or nothing, to be resumed into), and a finished run is
not run again."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mixprec.search import run_search
from mixprec.search.plan import command_line

ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> Path:
    """``path`` relative to the repository when inside it, as the tables print it."""
    full = Path(path).resolve()
    return full.relative_to(ROOT) if full.is_relative_to(ROOT) else Path(path)


def command_file(out: Path) -> Path:
    return out.parent / f"{out.name}.command"


def command_for(cfg, out: Path) -> str:
    """The ``mixprec search`` line that reproduces the run ``cfg`` into ``out``."""
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
