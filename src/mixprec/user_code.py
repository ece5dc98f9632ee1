"""Errors raised inside the user's own model code (their model's ``forward`` or builder): said as
theirs, with their file, line and source, instead of as a mixprec bug with a traceback. Only the
model's files count: an exception from a callback the caller passes (an epoch hook) stays as it is."""
from __future__ import annotations

import importlib.util
import inspect
import traceback
from pathlib import Path

from torch import nn

class UserCodeError(ValueError):
    """An exception raised in the user's own code; ``where`` is ``file:line in function: `source```."""

    def __init__(self, exc: BaseException, where: str):
        super().__init__(f"your code raised {type(exc).__name__} at {where}: {exc}")
        self.where = where


def model_files(model_name: str, model: nn.Module | None = None) -> set[str]:
    """The source files of a user's model: the module ``mypkg.nets:Net`` names, and the files of the
    classes of every submodule of ``model`` (outside torch and mixprec)."""
    files = set()
    module = model_name.partition("[")[0].partition(":")[0] if ":" in model_name else None
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):  # not importable: the error that matters is the model's own
        spec = None
    if spec is not None and spec.origin:
        files.add(str(Path(spec.origin).resolve()))
    for m in model.modules() if model is not None else ():
        source = inspect.getsourcefile(type(m)) if not type(m).__module__.startswith(("torch", "mixprec")) else None
        if source:
            files.add(str(Path(source).resolve()))
    return files


def user_frame(exc: BaseException, files: set[str]) -> str | None:
    """Where in ``files`` (the user's model code) ``exc`` was raised: the innermost frame of its
    traceback in them, or None when it never passed through them."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(Path(f.filename).resolve()) in files]
    if not frames:
        return None
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def as_user_error(exc: BaseException, files: set[str]) -> BaseException:
    """``exc`` as a :class:`UserCodeError` where it was raised in ``files``, else ``exc`` itself."""
    if isinstance(exc, ValueError) and not type(exc).__module__.startswith(("builtins", "torch")):
        return exc  # mixprec's own errors already name the cause
    where = user_frame(exc, files)
    return UserCodeError(exc, where) if where else exc
