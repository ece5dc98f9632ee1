"""The RL search loop: episodes proposed in batches, made to fit, evaluated (by any executor, in
parallel), fed back to the agent in episode order, and saved after every episode.

Every draw of episode ``e`` comes from generators seeded with ``(seed, e)``, so the course of the
search depends only on the seed and the results, not on where or when it ran: a search killed at
any point and resumed from its checkpoint ends with the result an uninterrupted one gives, and
every executor gives the same result when its evaluators train alike (same threads per worker).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...cost.tables import CostTables
from ...train import CheckpointError, load_checkpoint, save_checkpoint
from .ddpg import Agent, AgentConfig
from .env import STATE_SIZE, Episode, action_position, fit_to_budget

log = logging.getLogger(__name__)

REWARD_SCALE = 10.0  # HAQ's 0.1 per percentage point, on accuracies given as fractions


@dataclass(frozen=True)
class Schedule:
    episodes: int
    warmup: int  # episodes of random actions before the agent acts and learns
    batch: int  # episodes proposed together (evaluated in parallel)
    sigma: float  # exploration: sigma * sigma_decay ** (episode - warmup)
    sigma_decay: float
    seed: int


@dataclass
class Proposal:
    """One episode's policy: states and actions as the agent took them, the widths after the walk."""

    episode: int
    states: list  # per step, the state the agent saw
    actions: list  # per step, in [0, 1]
    positions: tuple  # per step, the position among its choices after the feasibility walk
    costs: dict  # the exact totals of the fitted policy
    lowered: int  # widths the walk lowered

    @property
    def key(self) -> str:
        return ",".join(map(str, self.positions))

    def as_dict(self) -> dict:
        return {"episode": self.episode, "states": self.states, "actions": self.actions,
                "positions": list(self.positions), "costs": self.costs, "lowered": self.lowered}

    @classmethod
    def from_dict(cls, d: dict) -> "Proposal":
        return cls(int(d["episode"]), d["states"], d["actions"], tuple(int(p) for p in d["positions"]),
                   dict(d["costs"]), int(d["lowered"]))


@dataclass
class SearchState:
    """What a checkpoint holds besides the agent."""

    log: list = field(default_factory=list)  # one dict per finished episode
    scores: dict = field(default_factory=dict)  # policy key -> validation accuracy (each policy evaluated once)
    pending: list = field(default_factory=list)  # the proposals of the batch under way


class RLSearch:
    def __init__(self, episode: Episode, tables: CostTables, limits: dict, schedule: Schedule, float_accuracy: float,
                 checkpoint: Path | None = None, agent_config: AgentConfig = AgentConfig()):
        self.episode, self.tables, self.limits, self.schedule = episode, tables, limits, schedule
        self.float_accuracy = float_accuracy
        self.checkpoint = checkpoint
        self.agent = Agent(STATE_SIZE, agent_config, schedule.seed)
        self.state = SearchState()
        self.signature = [f"{s.kind}:{s.name}:{len(s.choices)}" for s in episode.steps]
        if checkpoint is not None and checkpoint.exists():
            self._load()

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, evaluate, on_episode=None) -> dict:
        """Search until ``schedule.episodes`` episodes are done; ``evaluate(candidates)`` scores a list
        of candidates (``CandidateEvaluator.evaluate``'s, in bits) in order. Returns the best entry
        of the episode log."""
        s = self.schedule
        while len(self.state.log) < s.episodes:
            if not self.state.pending:
                first = len(self.state.log)
                self.state.pending = [self.propose(e) for e in range(first, min(first + s.batch, s.episodes))]
                self._save()
            self._score(self.state.pending, evaluate)
            while self.state.pending:
                proposal = self.state.pending.pop(0)
                entry = self.feed(proposal)
                self._save()
                if on_episode:
                    on_episode(entry)
        return self.best()

    def propose(self, e: int) -> Proposal:
        s = self.schedule
        rng = np.random.default_rng([s.seed, e])
        sigma = s.sigma * s.sigma_decay ** max(e - s.warmup, 0)
        states, actions, previous = [], [], 0.0
        for i, step in enumerate(self.episode.steps):
            state = self.episode.state(i, previous)
            a = float(rng.uniform()) if e < s.warmup else self.agent.explore(self.agent.act(state), sigma, rng)
            states.append(state.tolist())
            actions.append(a)
            previous = a
        wanted = [action_position(a, len(step.choices)) for a, step in zip(actions, self.episode.steps)]
        positions, costs, lowered = fit_to_budget(self.episode, self.tables, wanted, self.limits)
        return Proposal(e, states, actions, positions, {k: float(v) for k, v in costs.items()}, lowered)

    def _score(self, proposals: list, evaluate) -> None:
        todo, keys = [], []
        for p in proposals:
            if p.key not in self.state.scores and p.key not in keys:
                keys.append(p.key)
                todo.append(self.candidate(p.positions))
        if not todo:
            return
        start = time.perf_counter()
        results = evaluate(todo)
        for key, result in zip(keys, results):
            self.state.scores[key] = float(result.accuracy)
        log.info("RL: %d candidate(s) scored in %.1f s", len(todo), time.perf_counter() - start)
        self._save()

    def feed(self, p: Proposal) -> dict:
        """Give the agent episode ``p``'s reward and, after the warm-up, one update per step.

        The reward is HAQ's: 0.1 x (accuracy - the float model's accuracy) in percentage points. The
        transitions carry the actions of the policy that was evaluated: where the walk lowered a
        width, the action moves to the middle of that width's share, so the critic learns the value
        of what was scored."""
        accuracy = self.state.scores[p.key]
        reward = REWARD_SCALE * (accuracy - self.float_accuracy)
        taken = [a if action_position(a, len(s.choices)) == at else (at + 0.5) / len(s.choices)
                 for a, at, s in zip(p.actions, p.positions, self.episode.steps)]
        self.agent.observe([np.asarray(x) for x in p.states], taken, reward)
        if p.episode >= self.schedule.warmup:
            rng = np.random.default_rng([self.schedule.seed, p.episode, 1])
            for _ in range(len(p.states)):
                self.agent.update(rng)
        wbits, abits = self._bits(*self.episode.choice(p.positions))
        entry = {"episode": p.episode, "accuracy": accuracy, "reward": reward, "positions": list(p.positions),
                 "weight_bits": wbits, "act_bits": abits, "lowered": p.lowered,
                 "repeat": any(e["positions"] == list(p.positions) for e in self.state.log), **p.costs}
        self.state.log.append(entry)
        log.info("RL episode %d: %.2f%% validation, reward %+.4f, %s%s", p.episode, 100 * accuracy, reward,
                 ", ".join(f"{k} {p.costs[k]:,.0f}" for k in self.limits),
                 f", {p.lowered} width(s) lowered to fit" if p.lowered else "")
        return entry

    def best(self) -> dict:
        """The most accurate policy seen (the earliest among equals)."""
        return max(self.state.log, key=lambda e: (e["accuracy"], -e["episode"]))

    # -- widths in bits -------------------------------------------------------------------------------
    def candidate(self, positions) -> dict:
        """A policy as ``CandidateEvaluator`` takes it: widths in bits."""
        wbits, abits = self._bits(*self.episode.choice(positions))
        return {"weights": wbits, "acts": abits}

    def _bits(self, kw: dict, ka: dict) -> tuple[dict, dict]:
        t = self.tables
        return ({n: [float(w) for w in t.layers[n].widths[np.asarray(k)]] for n, k in kw.items()},
                {q: float(t.acts[q].widths[k]) for q, k in ka.items()})

    # -- checkpoint -----------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.checkpoint is None:
            return
        save_checkpoint(self.checkpoint, {
            "signature": self.signature, "agent": self.agent.state_dict(), "log": self.state.log,
            "scores": self.state.scores, "pending": [p.as_dict() for p in self.state.pending]})

    def _load(self) -> None:
        saved = load_checkpoint(self.checkpoint)
        if saved.get("signature") != self.signature:
            raise CheckpointError(f"{self.checkpoint} holds an RL search over other tensors or widths; remove it to "
                                  f"start again")
        self.agent.load_state_dict(saved["agent"])
        self.state = SearchState(list(saved["log"]), dict(saved["scores"]),
                                 [Proposal.from_dict(p) for p in saved["pending"]])
        log.info("RL search resumed at episode %d of %d", len(self.state.log), self.schedule.episodes)
