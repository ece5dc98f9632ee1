"""Errors raised inside the user's own code (their model's ``forward`` or builder): said as theirs,
with their file, line and source, instead of as a mixprec bug with a traceback."""
from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path

import torch

#: Code that is not the user's: this package, torch, and Python's own library
_NOT_USERS = tuple(str(Path(p).resolve()) for p in (Path(__file__).parent, Path(torch.__file__).parent,
                                                      sysconfig.get_paths()["stdlib"]))


class UserCodeError(ValueError):
    """An exception raised in the user's own code; ``where`` is ``file:line in function: `source```."""

    def __init__(self, exc: BaseException, where: str):
        super().__init__(f"your code raised {type(exc).__name__} at {where}: {exc}")
        self.where = where


def user_frame(exc: BaseException) -> str | None:
    """Where in the user's code ``exc`` was raised (the innermost frame of its traceback outside
    mixprec, torch and the standard library), or None when it never passed through their code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_NOT_USERS) and not f.filename.startswith("<")]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def as_user_error(exc: BaseException) -> BaseException:
    """``exc`` as a :class:`UserCodeError` where it came from the user's code, else ``exc`` itself."""
    if isinstance(exc, ValueError) and not type(exc).__module__.startswith(("builtins", "torch")):
        return exc  # mixprec's own errors already name the cause
    where = user_frame(exc)
    return UserCodeError(exc, where) if where else exc


