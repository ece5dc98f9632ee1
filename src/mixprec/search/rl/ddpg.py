"""The DDPG agent of the RL search (HAQ's, as Rusci et al. use it): an actor and a critic with two
hidden layers of 300, target copies tracked with ``tau``, a replay buffer, truncated-normal
exploration, and a moving-average reward baseline. Every transition of an episode carries the
episode's final reward. Everything it holds saves to plain tensors and numbers (``state_dict``),
so a checkpoint holding it loads with ``weights_only``; randomness comes from the generators the
caller passes, so a resumed search draws what an uninterrupted one draws."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from torch import nn


@dataclass(frozen=True)
class AgentConfig:
    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0  # HAQ's: each step's value is the rest of the episode's rewards
    batch_size: int = 64
    buffer_size: int = 2000
    baseline_alpha: float = 0.5  # the moving-average reward baseline's step


class Actor(nn.Module):
    def __init__(self, state_size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state)


class Critic(nn.Module):
    def __init__(self, state_size: int, hidden: int):
        super().__init__()
        self.state_in = nn.Linear(state_size, hidden)
        self.action_in = nn.Linear(1, hidden)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.out(self.state_in(state) + self.action_in(action))


class Replay:
    """A ring buffer of transitions ``(state, action, reward, next state, done)``."""

    def __init__(self, capacity: int, state_size: int):
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_size)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, state_size)
        self.dones = torch.zeros(capacity, 1)
        self.count = 0  # transitions ever added

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def add(self, state, action: float, reward: float, next_state, done: bool) -> None:
        i = self.count % self.capacity
        self.states[i] = torch.as_tensor(state, dtype=torch.float32)
        self.actions[i] = float(action)
        self.rewards[i] = float(reward)
        self.next_states[i] = torch.as_tensor(next_state, dtype=torch.float32)
        self.dones[i] = float(done)
        self.count += 1

    def sample(self, size: int, rng: np.random.Generator):
        idx = torch.as_tensor(rng.integers(0, len(self), size=size))
        return (self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.dones[idx])

    def state_dict(self) -> dict:
        return {"states": self.states, "actions": self.actions, "rewards": self.rewards,
                "next_states": self.next_states, "dones": self.dones, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for key in ("states", "actions", "rewards", "next_states", "dones"):
            setattr(self, key, state[key].clone())
        self.count = int(state["count"])


class Agent:
    def __init__(self, state_size: int, cfg: AgentConfig, seed: int):
        self.cfg = cfg
        with torch.random.fork_rng():  # the networks' initialisation from the seed, the caller's stream untouched
            torch.manual_seed(seed)
            self.actor, self.critic = Actor(state_size, cfg.hidden), Critic(state_size, cfg.hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.replay = Replay(cfg.buffer_size, state_size)
        self.baseline = math.nan  # no reward seen yet

    @torch.no_grad()
    def act(self, state: np.ndarray) -> float:
        return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    @staticmethod
    def explore(action: float, sigma: float, rng: np.random.Generator) -> float:
        """A draw from the normal around ``action`` truncated to [0, 1]."""
        if sigma <= 0:
            return action
        lo, hi = (0.0 - action) / sigma, (1.0 - action) / sigma
        return float(np.clip(truncnorm.rvs(lo, hi, loc=action, scale=sigma, random_state=rng), 0.0, 1.0))

    def observe(self, states: list, actions: list, reward: float) -> None:
        """One episode: every transition gets its final ``reward``; the baseline follows it."""
        for i, (state, action) in enumerate(zip(states, actions)):
            last = i == len(states) - 1
            self.replay.add(state, action, reward, states[i] if last else states[i + 1], last)
        b = self.baseline
        self.baseline = reward if math.isnan(b) else b + self.cfg.baseline_alpha * (reward - b)

    def update(self, rng: np.random.Generator) -> tuple[float, float]:
        """One gradient step of critic and actor on a replay sample; the targets follow by ``tau``."""
        s, a, r, s2, done = self.replay.sample(self.cfg.batch_size, rng)
        r = r - self.baseline
        with torch.no_grad():
            target = r + self.cfg.discount * (1 - done) * self.critic_target(s2, self.actor_target(s2))
        critic_loss = F.mse_loss(self.critic(s, a), target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, t in zip(net.parameters(), target_net.parameters()):
                    t.mul_(1 - self.cfg.tau).add_(p, alpha=self.cfg.tau)
        return critic_loss.item(), actor_loss.item()

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "replay": self.replay.state_dict(), "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        for key in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt", "replay"):
            getattr(self, key).load_state_dict(state[key])
        self.baseline = float(state["baseline"])
