import doctest
import importlib

import pytest

MODULES = ["bits", "budget", "compute", "deployed", "keys", "memory", "report", "rounding", "targets", "units"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(f"mixprec.cost.{name}")
    result = doctest.testmod(module)
    assert result.failed == 0
