"""The RL search loop on digits with real candidate evaluators: every evaluated policy fits, each
policy is evaluated once, a seed gives the same search twice, an interrupted search resumes to the
same result, and worker processes and Ray actors give what one local evaluator gives."""
import pytest
import torch

from mixprec.search import RunConfig
from mixprec.search.evaluator import CandidateEvaluator, EvaluatorSpec
from mixprec.search.rl.env import build_episode
from mixprec.search.rl.executors import make_executor
from mixprec.search.rl.search import RLSearch, Schedule

CFG = RunConfig(model="digits-cnn", data="digits", target="cortex-m7", batch_size=32, qat_lr=1e-3, seed=0)
LIMITS = {"flash_bytes": 8 * 1024, "ram_bytes": 2 * 1024}
SCHEDULE = Schedule(episodes=10, warmup=4, batch=4, sigma=0.5, sigma_decay=0.99, seed=0)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def spec(digits_float):
    threads = torch.get_num_threads()
    yield EvaluatorSpec(CFG, str(digits_float), steps=8, train_samples=320, val_samples=200, threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local(spec):
    return make_executor("local", spec, 1)


def _search(local, checkpoint=None) -> RLSearch:
    ev = local._evaluator or CandidateEvaluator(local.spec)
    local._evaluator = ev
    episode = build_episode(ev.qm.graph, ev.tables, ev.start_choice(), ends_bits=8)
    return RLSearch(episode, ev.tables, LIMITS, SCHEDULE, float_accuracy=0.95, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def straight(local):
    calls = []

    def counted(candidates):
        calls.append(len(candidates))
        return local.evaluate(candidates)

    search = _search(local)
    best = search.run(counted)
    return search, best, calls


def test_every_policy_fits_and_each_is_evaluated_once(straight):
    search, best, calls = straight
    log = search.state.log
    assert [e["episode"] for e in log] == list(range(SCHEDULE.episodes))
    assert all(e["flash_bytes"] <= LIMITS["flash_bytes"] and e["ram_bytes"] <= LIMITS["ram_bytes"] for e in log)
    assert sum(calls) == len({tuple(e["positions"]) for e in log}) == len(search.state.scores)
    assert best["accuracy"] == max(e["accuracy"] for e in log)
    assert any(e["lowered"] for e in log)  # the random policies did not all fit by themselves


def test_a_seed_gives_the_same_search_twice(straight, local):
    again = _search(local)
    again.run(local.evaluate)
    assert _timeless(again.state.log) == _timeless(straight[0].state.log)


def test_an_interrupted_search_resumes_to_the_same_result(straight, local, tmp_path):
    def stop(entry):
        if entry["episode"] == 5:  # mid-batch: episodes 4-7 were proposed together
            raise _Stop

    with pytest.raises(_Stop):
        _search(local, tmp_path / "rl.pt").run(local.evaluate, on_episode=stop)
    resumed = _search(local, tmp_path / "rl.pt")
    assert len(resumed.state.log) == 6 and len(resumed.state.pending) == 2
    best = resumed.run(local.evaluate)
    assert _timeless(resumed.state.log) == _timeless(straight[0].state.log)
    assert best == straight[1]


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_parallel_workers_give_the_local_result(straight, local, spec, executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is the optional extra mixprec[ray]")
    pool = make_executor(executor, spec, 2)
    try:
        search = _search(local)
        search.run(pool.evaluate)
    finally:
        pool.close()
    assert _timeless(search.state.log) == _timeless(straight[0].state.log)


def _timeless(log: list) -> list:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in log]
