"""One registry of methods: a method registered from user code is validated, parsed, run and
listed like the built-in ones; unknown names list what exists."""
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from mixprec.cli import app
from mixprec.search import Method, RunConfig, get_method, methods, register, run_search
from mixprec.search.uniform import search_uniform


@dataclass
class HalfOptions:
    bits: int = 4


def search_half(ctx):
    """The uniform method at the width its option names (a user's method in a few lines)."""
    from mixprec.search.learned import parse_options

    ctx.weight_bits = parse_options(HalfOptions, ctx.config.options, "half").bits
    return search_uniform(ctx)


@pytest.fixture
def half(monkeypatch):
    monkeypatch.setitem(methods(), "half", Method("half", search_half, HalfOptions, "uniform at a chosen width"))
    yield get_method("half")


def test_a_registered_method_is_validated_parsed_and_run(half, tmp_path, digits_float):
    assert list(methods())[:5] == ["uniform", "hgq", "dq", "dnas", "rl"] and "half" in methods()
    cfg = RunConfig(method="half", options={"bits": "2"}, qat_epochs=1, budget_epochs=0,
                    float_from=str(digits_float))
    result = run_search(cfg, tmp_path / "run")
    assert result["method"] == "half" and {r["weight_bits_mean"] for r in result["layers"] if "weight_bits" in r} == {2.0}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\] for --method half; known: bits"):
        run_search(RunConfig(method="half", options={"width": "2"}), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_unknown_method_lists_the_registered_ones(half):
    with pytest.raises(ValueError, match="unknown method 'haq'; available: uniform, hgq, dq, dnas, rl, half"):
        RunConfig(method="haq")


def test_methods_command_lists_every_method_and_its_options(half):
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for text in ("uniform:", "hgq:", "dq:", "dnas:", "half: uniform at a chosen width", "-o bits=4", "-o target_ratio=0.95",
                 "-o t_start=5.0"):
        assert text in res.output


def test_register_replaces_by_name():
    original = get_method("uniform")
    try:
        register(Method("uniform", search_half, HalfOptions, "replaced"))
        assert get_method("uniform").summary == "replaced"
    finally:
        register(original)
