"""The RL search's environment: the tensors an episode sets one after another, the state the agent
sees at each, how an action becomes a width, and the walk that makes every policy fit its budget.

An episode walks the model's weighted layers in execution order: one step for a layer's weights,
then one for the activation tensor it produces (and one for each residual add's output). The input
(the data, 8 bits) and the network's output (the logits) are never steps; with ``ends_bits`` the
first and the last layer's weights are held at that width too, as the paper does (the first layer's
output is searched: it is often the largest buffer, which the RAM limit needs narrower).

The state of a step (Rusci et al., after HAQ): is-depthwise, input channels, output channels,
stride, kernel size, weight count, input positions (H x W), layer index, the previous action and
whether the step sets weights (1) or activations (0); each column but the previous action is
min-max normalised over the episode's steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from ...cost import BudgetError
from ...cost.keys import ACT_COSTS, BY_KEY, WEIGHT_COSTS
from ...cost.tables import CostTables
from ...graph.ir import Graph, Node

WEIGHTS, ACTS = "weights", "acts"
STATE_SIZE = 10
_PREVIOUS = 8  # the column of the previous action


@dataclass(frozen=True)
class Step:
    """One tensor an episode sets: ``kind`` weights or acts, ``name`` the layer or the activation
    quantizer (the user's names), ``choices`` the table indices of the widths it may take
    (ascending, never 0 bits: the RL search does not prune)."""

    kind: str
    name: str
    choices: tuple
    groups: int  # the weight groups it sets alike (its layer's channels where widths are per channel)
    features: tuple  # the state, raw (previous action 0)


@dataclass(frozen=True)
class Episode:
    """The steps of one episode, their normalised static states, and the widths of what no step sets."""

    steps: tuple
    states: np.ndarray  # (steps, STATE_SIZE), the previous-action column 0
    fixed_weights: dict  # layer -> table index, for every layer no step sets
    fixed_acts: dict  # quantizer -> table index

    def state(self, i: int, previous: float) -> np.ndarray:
        s = self.states[i].copy()
        s[_PREVIOUS] = previous
        return s

    def choice(self, positions) -> tuple[dict, dict]:
        """Table indices ``(weights, acts)`` of a policy given as one position per step in its
        ``choices`` (0 = the narrowest width it may take)."""
        kw = dict(self.fixed_weights)
        ka = dict(self.fixed_acts)
        for step, at in zip(self.steps, positions):
            if step.kind == WEIGHTS:
                kw[step.name] = np.full(step.groups, step.choices[int(at)])
            else:
                ka[step.name] = step.choices[int(at)]
        return kw, ka

    def positions(self, kw: dict, ka: dict) -> tuple:
        """The inverse of ``choice``: each step's position among its choices."""
        return tuple(step.choices.index(int(np.max(kw[step.name] if step.kind == WEIGHTS else ka[step.name])))
                     for step in self.steps)


def action_position(action: float, count: int) -> int:
    """A continuous action in [0, 1] as one of ``count`` widths, narrowest first (equal shares)."""
    return min(int(float(action) * count), count - 1)


def build_episode(graph: Graph, tables: CostTables, start: tuple[dict, dict], ends_bits: int = 8) -> Episode:
    """The episode over ``graph``: its steps and the fixed widths (``start``'s table indices, or
    ``ends_bits`` for the held ends)."""
    weighted = graph.weighted()
    head = graph.grid_source(graph.output)
    held = set()
    if ends_bits:
        first, last = weighted[0].name, weighted[-1].name
        held = {(WEIGHTS, first), (WEIGHTS, last)}
    fixed_w = {n: np.asarray(v).copy() for n, v in start[0].items()}
    fixed_a = dict(start[1])
    steps = []
    for index, node in enumerate(graph):
        for kind, name in _tensors_of(node, tables, head):
            table = tables.layers[name] if kind == WEIGHTS else tables.acts[name]
            widths = table.widths
            if (kind, name) in held:
                _hold(kind, name, widths, ends_bits, fixed_w, fixed_a)
                continue
            choices = tuple(int(i) for i in np.flatnonzero(widths > 0))
            groups = table.groups if kind == WEIGHTS else 1
            steps.append(Step(kind, name, choices, groups, _features(node, kind, index)))
    if not steps:
        raise ValueError("the RL search has nothing to choose: every tensor is held (-o ends_bits=0 searches the "
                         "first and last layers too)")
    for step in steps:  # set by the policy, not fixed
        (fixed_w if step.kind == WEIGHTS else fixed_a).pop(step.name)
    return Episode(tuple(steps), _normalised(np.array([s.features for s in steps], dtype=np.float64)),
                   fixed_w, fixed_a)


def _tensors_of(node: Node, tables: CostTables, head: str):
    if node.has_weights and node.name in tables.layers:
        yield WEIGHTS, node.name
    if node.op != "input" and node.name != head and node.name in tables.acts:
        yield ACTS, node.name


def _hold(kind: str, name: str, widths: np.ndarray, bits: int, fixed_w: dict, fixed_a: dict) -> None:
    hit = np.flatnonzero(np.isclose(widths, bits))
    if not len(hit):
        raise ValueError(f"-o ends_bits={bits}: {name} cannot take {bits} bits on this target "
                         f"({', '.join(f'{w:g}' for w in widths if w > 0)}); give one of those, or 0 to search it")
    if kind == WEIGHTS:
        fixed_w[name] = np.full_like(fixed_w[name], int(hit[0]))
    else:
        fixed_a[name] = int(hit[0])


def _features(node: Node, kind: str, index: int) -> tuple:
    in_shape = node.in_shapes[0] if node.in_shapes else node.out_shape
    groups = node.attrs.get("groups", 1)
    depthwise = float(node.op == "conv" and groups > 1 and groups == in_shape[0])
    stride = node.attrs.get("stride") or (1,)
    kernel = prod(node.attrs.get("kernel_size") or (1,)) if node.has_weights else 0
    weights = prod(node.weight_shape) if node.weight_shape else 0
    return (depthwise, in_shape[0], node.out_shape[0], stride[0], kernel, weights, prod(in_shape[1:]) or 1, index,
            0.0, float(kind == WEIGHTS))


def _normalised(raw: np.ndarray) -> np.ndarray:
    lo, hi = raw.min(0), raw.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (raw - lo) / span
    out[:, _PREVIOUS] = 0.0
    out[:, 9] = raw[:, 9]
    return out


# -- the feasibility walk ---------------------------------------------------------------------------
def over_budget(costs: dict, limits: dict) -> set:
    """The totals of ``costs`` above their limit."""
    return {key for key, limit in limits.items() if costs[key] > limit}


def fit_to_budget(episode: Episode, tables: CostTables, positions, limits: dict) -> tuple[tuple, dict, int]:
    """``positions`` lowered until the policy meets ``limits``: while a limit is exceeded, walk the
    steps from the last layer to the first (a layer's activations before its weights) and lower each
    tensor whose widths the exceeded costs depend on by one width. Returns the positions, their
    exact totals (``CostTables.totals``) and how many widths were lowered."""
    at = list(positions)
    costs = tables.totals(*episode.choice(at))
    over = over_budget(costs, limits)
    lowered = 0
    while over:
        progressed = False
        for i in reversed(range(len(episode.steps))):
            step = episode.steps[i]
            if at[i] == 0 or not over & set(WEIGHT_COSTS if step.kind == WEIGHTS else ACT_COSTS):
                continue
            at[i] -= 1
            lowered += 1
            progressed = True
            costs = tables.totals(*episode.choice(at))
            over = over_budget(costs, limits)
            if not over:
                break
        if not progressed:
            raise BudgetError(_unreachable(costs, limits, over))
    return tuple(at), costs, lowered


def _unreachable(costs: dict, limits: dict, over: set) -> str:
    parts = [f"{BY_KEY[k].label} {costs[k]:,.0f} > {limits[k]:,.0f}" for k in sorted(over)]
    return ("every searched tensor is at its narrowest width and the budget is still exceeded (" + "; ".join(parts)
            + "); the held first and last layers cost the rest: -o ends_bits=0 searches them too, or raise the budget")
