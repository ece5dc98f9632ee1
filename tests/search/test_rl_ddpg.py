"""The DDPG agent: it learns, explores inside [0, 1], and comes back from a weights-only checkpoint
acting and learning exactly as before."""
import numpy as np
import torch

from mixprec.search.rl.ddpg import Agent, AgentConfig
from mixprec.train import load_checkpoint, save_checkpoint

STATE = np.array([0.5, 0.2, 1.0])


def _bandit_episode(agent: Agent, rng, sigma: float) -> float:
    """One step, reward highest at action 0.8."""
    a = agent.explore(agent.act(STATE), sigma, rng)
    reward = 1.0 - (a - 0.8) ** 2 * 4
    agent.observe([STATE], [a], reward)
    return a


def test_it_learns_the_action_the_reward_prefers():
    agent = Agent(3, AgentConfig(batch_size=32), seed=0)
    rng = np.random.default_rng(0)
    before = agent.act(STATE)
    for e in range(300):
        _bandit_episode(agent, rng, 0.5 * 0.99 ** e)
        if e >= 20:
            agent.update(rng)
    assert abs(before - 0.8) > 0.15
    assert abs(agent.act(STATE) - 0.8) < 0.1


def test_exploration_stays_in_the_unit_interval_around_the_action():
    rng = np.random.default_rng(0)
    draws = np.array([Agent.explore(0.9, 0.5, rng) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert abs(np.median(draws) - 0.649) < 0.03  # N(0.9, 0.5) truncated to [0, 1]: its median, not a pile at the edge
    assert np.mean(draws > 0.99) < 0.02
    assert Agent.explore(0.3, 0.0, rng) == 0.3


def test_a_saved_agent_acts_and_learns_as_the_one_it_was(tmp_path):
    agent = Agent(3, AgentConfig(batch_size=8), seed=1)
    rng = np.random.default_rng(0)
    for e in range(30):
        _bandit_episode(agent, rng, 0.3)
        agent.update(rng)
    save_checkpoint(tmp_path / "agent.pt", {"agent": agent.state_dict()})
    copy = Agent(3, AgentConfig(batch_size=8), seed=99)  # other initial weights: the checkpoint decides
    copy.load_state_dict(load_checkpoint(tmp_path / "agent.pt")["agent"])
    assert copy.act(STATE) == agent.act(STATE) and copy.baseline == agent.baseline
    losses = [a.update(np.random.default_rng(5)) for a in (agent, copy)]
    assert losses[0] == losses[1]
    for p, q in zip(agent.actor.parameters(), copy.actor.parameters()):
        assert torch.equal(p, q)


def test_the_seed_decides_the_initial_policy_without_touching_the_global_stream():
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a, b = Agent(3, AgentConfig(), seed=3), Agent(3, AgentConfig(), seed=3)
    assert torch.rand(1) == expected
    assert a.act(STATE) == b.act(STATE) != Agent(3, AgentConfig(), seed=4).act(STATE)
