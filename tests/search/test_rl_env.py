"""The RL environment: the steps of an episode, their states, actions as widths, and the walk that
makes every policy fit FLASH and RAM (both RAM models) on the exact cost tables."""
import numpy as np
import pytest

from mixprec.convert import quantize
from mixprec.cost import BudgetError, assignment, evaluate, load_target
from mixprec.models import get_model, get_spec
from mixprec.search.evaluator import apply_choice, choice_of, widest_tables
from mixprec.search.rl.env import ACTS, STATE_SIZE, WEIGHTS, action_position, build_episode, fit_to_budget


@pytest.fixture(scope="module")
def resnet8():
    target = load_target("cortex-m7")
    qm = quantize(get_model("resnet8"), target, get_spec("resnet8").input_shape, bits=8, act_bits=8)
    tables = widest_tables(qm, target)
    return qm, tables, target


def _episode(resnet8, ends_bits=8):
    qm, tables, _ = resnet8
    return build_episode(qm.graph, tables, choice_of(tables, qm.weight_bits(), qm.act_bits()), ends_bits)


def test_steps_name_the_users_tensors_and_hold_the_ends(resnet8):
    qm, tables, _ = resnet8
    ep = _episode(resnet8)
    names = [(s.kind, s.name) for s in ep.steps]
    assert names[:3] == [(ACTS, "stem.0"), (WEIGHTS, "block1.body.0.0"), (ACTS, "block1.body.0.0")]
    assert (ACTS, "block1.add") in names  # a residual add's output is a tensor of its own
    held = {(WEIGHTS, "stem.0"), (WEIGHTS, "fc"), (ACTS, "input"), (ACTS, "fc")}
    assert not held & set(names) and (ACTS, "stem.0") in names
    assert ep.states.shape == (len(ep.steps), STATE_SIZE)
    assert ep.states.min() >= 0 and ep.states.max() <= 1
    assert set(ep.states[:, 9]) == {0.0, 1.0}  # the weight-or-activation flag
    searched = _episode(resnet8, ends_bits=0)
    assert {(WEIGHTS, "stem.0"), (WEIGHTS, "fc")} <= {(s.kind, s.name) for s in searched.steps}
    assert (ACTS, "input") not in {(s.kind, s.name) for s in searched.steps}  # the data keeps its width


def test_a_held_width_the_target_lacks_is_refused(resnet8):
    with pytest.raises(ValueError, match="ends_bits=3"):
        _episode(resnet8, ends_bits=3)


def test_actions_take_each_width_in_equal_shares():
    assert [action_position(a, 3) for a in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [0, 0, 1, 1, 2, 2]


def test_choice_and_positions_are_inverse(resnet8):
    ep = _episode(resnet8)
    rng = np.random.default_rng(0)
    positions = tuple(int(rng.integers(len(s.choices))) for s in ep.steps)
    assert ep.positions(*ep.choice(positions)) == positions


@pytest.mark.parametrize("ram_key", ["ram_bytes", "ram_mcu_in_out"])
def test_the_walk_never_leaves_a_policy_over_flash_or_ram(resnet8, ram_key):
    qm, tables, target = resnet8
    ep = _episode(resnet8)
    limits = {"flash_bytes": 32 * 1024, ram_key: 24 * 1024}
    rng = np.random.default_rng(1)
    lowered = 0
    for _ in range(60):
        wanted = [action_position(a, len(s.choices)) for a, s in zip(rng.uniform(size=len(ep.steps)), ep.steps)]
        positions, costs, n = fit_to_budget(ep, tables, wanted, limits)
        assert all(costs[k] <= v for k, v in limits.items())
        assert all(p <= w for p, w in zip(positions, wanted))  # only ever lowered
        lowered += n
    assert lowered > 0  # the limits bind


def test_the_walk_lowers_what_the_exceeded_cost_depends_on_last_layers_first(resnet8):
    qm, tables, target = resnet8
    ep = _episode(resnet8)
    top = [len(s.choices) - 1 for s in ep.steps]
    positions, costs, _ = fit_to_budget(ep, tables, top, {"flash_bytes": 60 * 1024})
    acts = [p for p, s in zip(positions, ep.steps) if s.kind == ACTS]
    weights = [p for p, s in zip(positions, ep.steps) if s.kind == WEIGHTS]
    assert all(p == 2 for p in acts)  # FLASH does not depend on activation widths
    assert weights[-1] < 2 and weights[0] == 2  # from the last layer back
    # the fitted policy costs what the model with those widths measures
    apply_choice(qm, tables, *ep.choice(positions))
    measured = evaluate(qm.graph, assignment(qm), target).totals
    assert measured["flash_bytes"] == costs["flash_bytes"] <= 60 * 1024


def test_a_budget_the_searched_tensors_cannot_meet_names_the_held_ends(resnet8):
    qm, tables, _ = resnet8
    ep = _episode(resnet8)
    with pytest.raises(BudgetError, match="ends_bits=0"):
        fit_to_budget(ep, tables, [0] * len(ep.steps), {"flash_bytes": 2 * 1024})
