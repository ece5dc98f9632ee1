"""Every example in a docstring of the package runs and shows what it says: the modules are found
by walking the package, so a new module's examples are checked without listing it here."""
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import mixprec


def _modules_with_examples() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(mixprec.__path__, "mixprec."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and ">>> " in Path(spec.origin).read_text():
            found.append(info.name)
    return found


MODULES = _modules_with_examples()


def test_the_walk_finds_the_modules_with_examples():
    assert {"mixprec.numerics", "mixprec.cost.budget", "mixprec.export.checks", "mixprec.api"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has '>>> ' in its source but no example doctest runs"
    assert result.failed == 0
