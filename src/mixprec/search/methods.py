"""The registry of search methods, read by everything that needs one: ``RunConfig``'s validation,
option parsing (``-o KEY=VALUE``), the run, and ``mixprec methods``.

A method is one module that defines ``METHOD = Method(name, run, options, summary)``:

- ``run(ctx: SearchContext) -> (QuantModel, history)``: start from ``ctx.float_model``, return a
  quantized model whose quantizers have ``set_bits`` (fixed-bit quantizers; learned ones freeze into
  them), so the budget step, fine-tuning and export take it;
- ``options``: the dataclass of its ``-o`` options (typed fields with defaults), or None;
- ``summary``: one line for ``mixprec methods``;
- ``fills_budget``: whether the budget step, by default, raises widths into budget the method
  leaves unused (a method whose cost penalty only pushes down: ``budget_step.fill``);
- ``removes_channels``: whether its result may be narrower than the model (``mixprec.prune``), so
  the budget check before training counts what removed channels free;
- ``check(config, target, options)``: refuses (``ValueError``) what the method cannot do with this
  configuration on this target, before the run claims its folder or trains anything;
  ``check_model(config, target, options, model, input_shape, budget)`` what it can only judge on
  the model (a budget its own constraints cannot meet), also before the folder is claimed.

Add the module to ``METHOD_MODULES`` (or call ``register`` from your own code) and
``mixprec search --method NAME`` runs it. Modules load on first use, so the command line stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

METHOD_MODULES = ("mixprec.search.uniform", "mixprec.search.hgq", "mixprec.search.dq", "mixprec.search.dnas",
                  "mixprec.search.rl")


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable  # (SearchContext) -> (QuantModel, history)
    options: type | None  # the dataclass of its -o options; None: it takes none
    summary: str
    removes_channels: bool = False  # its result may have fewer channels than the model (budgets below the full width's minimum are reachable)
    check: Callable | None = None  # (RunConfig, Target, options) -> None, raising ValueError before any training
    # (RunConfig, Target, options, model, input_shape, Budget) -> None: what needs the model (a budget its
    # constraints cannot meet), raising ValueError (BudgetError) before the run claims its folder
    check_model: Callable | None = None
    # the budget step also raises widths into budget the method left unused (``--fill`` overrides it)
    fills_budget: bool = False


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> Method:
    """Make ``method`` available by its name (a later registration of the name replaces it)."""
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name, the built-in ones first."""
    global _loaded
    if not _loaded:
        for module in METHOD_MODULES:
            register(importlib.import_module(module).METHOD)
        _loaded = True
    return _REGISTRY


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def get_method(name: str) -> Method:
    found = methods().get(name)
    if found is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods())}")
    return found
