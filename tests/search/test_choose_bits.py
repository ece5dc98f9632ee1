"""The uniform start follows what the budget constrains, never a width that holds only 0, and the
smallest achievable cost is the one of the run's granularity."""
import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixprec.api import largest_uniform_bits, nonzero_widths
from mixprec.cost import Budget, BudgetError, load_target
from mixprec.models import get_model
from mixprec.search import RunConfig
from mixprec.search.run import choose_bits


def _choose(budget, **cfg):
    t = load_target(cfg.pop("target", "cortex-m4"))
    return choose_bits(RunConfig(**cfg), get_model("digits-cnn"), t, (1, 8, 8), Budget.from_strings(**budget))


def test_a_flash_only_budget_keeps_8_bit_activations():
    assert _choose({"flash": "12KiB"}) == (4, 8)  # 4-bit weights fit; activations cost no FLASH
    assert _choose({"flash": "12KiB"}, bits=2) == (2, 8)


def test_a_ram_only_budget_keeps_8_bit_weights():
    assert _choose({"ram": "1KiB"}) == (8, 2)
    assert _choose({"ram": "64KiB"}) == (8, 8)


def test_budgets_on_both_lower_both_and_given_widths_stand():
    assert _choose({"flash": "12KiB", "ram": "1KiB"}) == (2, 2)
    assert _choose({"flash": "12KiB"}, act_bits=4) == (4, 4)


def test_one_bit_signed_weights_hold_only_zero_and_are_never_chosen():
    t = load_target("fpga-hls4ml")
    assert 1 in t.weight_bits and 1 not in nonzero_widths(t) and t.min_weight_bits == 2
    # the smallest EBOPs budget a uniform model can reach is at 2 bits, not at 1 bit (EBOPs 0)
    with pytest.raises(BudgetError, match="smallest achievable"):
        largest_uniform_bits(get_model("jet-mlp"), t, (16,), Budget(ebops=1e3))


def test_the_minimum_is_the_run_granularity_s_and_a_mixed_method_is_not_held_to_a_uniform_width():
    t = load_target("cortex-m4")
    # 2-bit digits CNN: 3,976 B per tensor, 4,664 B per channel (the default granularity)
    assert largest_uniform_bits(get_model("digits-cnn"), t, (1, 8, 8), Budget(flash_bytes=4300),
                                weight_granularity="per-tensor") == 2
    for method in ("uniform", "hgq"):
        with pytest.raises(BudgetError, match=r"smallest achievable 4.6 KiB \(all weights at 2 bits per-channel"):
            _choose({"flash": "4300B"}, method=method)
    # mpic prunes: a mixed method may reach 1.3 KiB (one channel per hidden layer kept: 1,271 B, plus the
    # width tables that a layer of pruned and kept channels needs), uniform only 4,664 B
    mid = {"flash": "3000B"}
    with pytest.raises(BudgetError, match=r"smallest achievable 4.6 KiB .*pruning channels, a mixed-precision method"):
        _choose(mid, target="mpic")
    assert _choose(mid, target="mpic", method="hgq")[0] == 2
    with pytest.raises(BudgetError, match=r"smallest achievable 1.3 KiB .*all but one group"):
        _choose({"flash": "1000B"}, target="mpic", method="dq")


_DANGLING = {"a", "an", "the", "may", "can", "to", "of", "and", "or", "with", "for", "by", "in", "is", "not", "but"}


def _message_tails(tree):
    """The last literal text of every ``raise SomeError("...")`` in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            arg = node.exc.args[0]
            parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
            if isinstance(arg, ast.BinOp):  # "..." + "; ".join(...) + "..."
                parts = [arg.right]
            last = parts[-1]
            if isinstance(last, ast.Constant) and isinstance(last.value, str):
                yield node.lineno, last.value


def test_no_error_message_is_a_sentence_cut_short():
    src = Path(__file__).resolve().parents[2] / "src" / "mixprec"
    cut = []
    for path in src.rglob("*.py"):
        for line, tail in _message_tails(ast.parse(path.read_text())):
            words = re.findall(r"[\w.]+|[,(:;]$", tail.rstrip())
            if words and (words[-1].lower() in _DANGLING or words[-1] in ",(:;"):
                cut.append(f"{path.relative_to(src)}:{line}: ...{tail[-40:]!r}")
    assert not cut, "error messages that end mid-sentence:\n" + "\n".join(cut)


def test_help_and_usage_errors_answer_within_two_seconds():
    for args in (["--help"], ["search", "--model", "x"]):
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "mixprec.cli", *args], capture_output=True, text=True)
        assert time.perf_counter() - start < 2.0, args
        assert res.returncode in (0, 2) and "Traceback" not in res.stderr


def test_hgq_per_element_accepts_a_bops_budget_only_pruning_weights_reaches():
    """HGQ2's own rule counts nominal widths (our BOPs): its smallest MNIST MLP is near 2.1k. With
    every weight at 2 bits that takes keeping under 0.2% of them; per element HGQ prunes any weight,
    so the floor is one weight per layer, not one row of 784."""
    t = load_target("fpga-hls4ml")
    cfg = RunConfig(model="mnist-mlp", target="fpga-hls4ml", method="hgq", weight_granularity="per-element")
    assert choose_bits(cfg, get_model("mnist-mlp"), t, (1, 28, 28), Budget.from_strings(bops="2100"))
    with pytest.raises(BudgetError, match=r"smallest achievable 6 \(all weights at 2 bits per-element, all but one "
                                          r"weight of every layer pruned"):
        choose_bits(cfg, get_model("mnist-mlp"), t, (1, 28, 28), Budget.from_strings(bops="5"))
