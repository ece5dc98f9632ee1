"""The candidate evaluator: deterministic scores, costs that are the deployed model's, the same
result after pickling (a process pool hosts it), no collective calls inside a process group."""
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.distributed as dist

import mixprec
from mixprec.models import get_model
from mixprec.search import RunConfig
from mixprec.search.evaluator import CandidateEvaluator, EvaluatorSpec
from mixprec.train import TrainConfig, fit, save_checkpoint
from mixprec.data import load_dataset

CFG = RunConfig(model="digits-cnn", data="digits", target="cortex-m4", batch_size=32, qat_lr=1e-3, seed=0)
# digits-cnn layers by their module paths (models/small.py): 0.0 / 1.0 / 3.0 the convs of conv_bn blocks 0, 1, 3
LOW = {"weights": {"conv1.0": 2, "conv3.0": [2, 4] * 16}, "acts": {"conv2.0": 4}}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    data = load_dataset("digits", None, 0)
    model = get_model("digits-cnn")
    fit(model, data.x_train, data.y_train, data.x_val, data.y_val, TrainConfig(epochs=4, lr=3e-3, batch_size=32))
    path = tmp_path_factory.mktemp("float") / "float.pt"
    save_checkpoint(path, {"model": model.state_dict()})
    return str(path)


@pytest.fixture(scope="module")
def evaluator(float_checkpoint):
    return CandidateEvaluator(EvaluatorSpec(CFG, float_checkpoint, steps=30, train_samples=640, val_samples=300))


def test_scores_are_deterministic_and_narrower_widths_cost_less(evaluator):
    start = evaluator.evaluate({})
    low = evaluator.evaluate(LOW)
    again = evaluator.evaluate(LOW)
    assert (low.accuracy, low.losses, low.costs) == (again.accuracy, again.losses, again.costs)
    assert start.accuracy > 0.8  # the 8-bit start keeps the float model's skill
    assert low.costs["flash_bytes"] < start.costs["flash_bytes"] and low.costs["ebops"] < start.costs["ebops"]
    assert low.weight_bits["conv1.0"] == [2.0] * 16 and low.weight_bits["conv3.0"] == [2.0, 4.0] * 16
    assert low.act_bits["conv2.0"] == 4.0 and low.act_bits["input"] == 8.0


def test_costs_are_what_the_model_with_those_bits_measures(evaluator):
    result = evaluator.evaluate(LOW)
    real = mixprec.cost_report(evaluator.qm, "cortex-m4").totals
    for key in ("flash_bytes", "table_bytes", "ram_bytes", "weight_bytes", "bops", "latency_cycles"):
        assert result.costs[key] == pytest.approx(real[key], rel=1e-6), key


def test_unknown_layers_and_widths_are_named(evaluator):
    with pytest.raises(KeyError, match=r"conv9.*conv1\.0, conv2\.0"):
        evaluator.evaluate({"weights": {"conv9": 4}})
    with pytest.raises(ValueError, match="width 3 is not one the target runs"):
        evaluator.evaluate({"weights": {"conv1.0": 3}})


def test_an_activation_narrowed_to_few_bits_takes_a_fitted_range(evaluator):
    """The start's ranges are calibrated at 8 bits (the max); a candidate that narrows an activation
    to 2 bits refits its range (the least-squares clip, smaller), and every other one keeps the start's."""
    start = {q: float(a.running_max) for q, a in evaluator.qm.act_quantizers.items()}
    evaluator.evaluate({"acts": {"conv2.0": 2}})
    after = {q: float(a.running_max) for q, a in evaluator.qm.act_quantizers.items()}
    assert after["conv2.0"] < start["conv2.0"]
    assert {q: v for q, v in after.items() if q != "conv2.0"} == {q: v for q, v in start.items() if q != "conv2.0"}
    wide = evaluator.evaluate({"acts": {"conv2.0": 8}})  # the next candidate starts from the start's range again
    assert float(evaluator.qm.act_quantizers["conv2.0"].running_max) == start["conv2.0"] and wide.accuracy > 0.8


def _evaluate(evaluator, candidate):
    return evaluator.evaluate(candidate)


def test_a_process_pool_hosts_it_from_its_specification(evaluator):
    local = evaluator.evaluate(LOW)
    assert pickle.loads(pickle.dumps(evaluator)).spec == evaluator.spec
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = pool.submit(_evaluate, evaluator, LOW).result(timeout=300)
    assert (remote.accuracy, remote.costs, remote.losses) == (local.accuracy, local.costs, local.losses)


def test_inside_a_process_group_it_makes_no_collective_call(evaluator, tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("the evaluator called a collective")
        for name in ("all_reduce", "broadcast", "barrier", "all_gather", "reduce"):
            monkeypatch.setattr(dist, name, refuse)
        before = evaluator.evaluate(LOW)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert before.accuracy == evaluator.evaluate(LOW).accuracy
