"""Trials: ids that name what decides a result (not where files lie), finished trials answered from
disk, and a float stage that runs on its own and is shared."""
import json
import shutil
import time
from dataclasses import replace

import pytest

from mixprec.search import STAGES, RunConfig, Trial, config_id, float_id, run_search

FAST = dict(float_epochs=2, qat_epochs=1, budget={"flash": "12KiB"})


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """A run stopped after its float stage."""
    out = tmp_path_factory.mktemp("trial") / "float"
    assert run_search(RunConfig(**FAST), out, until="float") is None
    return out


def test_float_stage_alone_leaves_a_float_model_and_no_result(float_run):
    assert (float_run / "checkpoints" / "float.pt").is_file()
    assert (float_run / "config.yaml").is_file()
    assert not (float_run / "result.json").exists() and not (float_run / "checkpoints" / "quantized.pt").exists()
    assert list(STAGES) == ["float", "method", "budget", "front", "final"]
    with pytest.raises(ValueError, match="unknown stage 'quant'"):
        run_search(RunConfig(**FAST), float_run, resume=True, until="quant")


def test_id_ignores_machine_local_paths_and_how_a_budget_is_written(float_run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(float_run, moved)
    a = RunConfig(**{**FAST, "budget": {"flash": "12KiB"}}, float_from=str(float_run))
    b = RunConfig(**{**FAST, "budget": {"flash": "12288"}}, float_from=str(moved / "checkpoints" / "float.pt"),
                  data_dir="/somewhere/else")
    assert config_id(a) == config_id(b)
    # a float model from a run with the same float settings is that run's float stage
    assert float_id(a) == float_id(RunConfig(**FAST)) == float_id(replace(a, qat_epochs=5, method="hgq"))


def test_id_changes_with_what_changes_the_result(float_run):
    base = RunConfig(**FAST, float_from=str(float_run))
    for changed in (replace(base, qat_lr=1e-3), replace(base, budget={"flash": "11KiB"}), replace(base, seed=1),
                    replace(base, float_from=None, float_epochs=3), replace(base, method="hgq")):
        assert config_id(changed) != config_id(base)
    assert float_id(replace(base, float_from=None, lr=1e-3)) != float_id(base)


def test_method_options_count_with_their_defaults_filled_in():
    plain = RunConfig(**FAST, method="hgq")
    assert config_id(plain) == config_id(replace(plain, options={"beta": "0.01"}))  # hgq's default, as text
    assert config_id(replace(plain, options={"beta": "0.02"})) != config_id(plain)


def test_a_float_model_from_outside_any_run_is_named_by_its_bytes(float_run, tmp_path):
    loose = tmp_path / "mine.pt"
    shutil.copy(float_run / "checkpoints" / "float.pt", loose)
    cfg = RunConfig(**FAST, float_from=str(loose))
    before = float_id(cfg)
    assert before.startswith("file-") and before != float_id(RunConfig(**FAST))
    loose.write_bytes(loose.read_bytes() + b"\0")  # other weights: another float model
    assert float_id(cfg) != before
    with pytest.raises(FileNotFoundError, match="no float model"):
        float_id(RunConfig(**FAST, float_from=str(tmp_path / "missing.pt")))


def test_trials_share_the_float_stage_and_a_finished_trial_answers_at_once(float_run, tmp_path):
    cfg = RunConfig(**FAST, float_from=str(float_run))
    out = tmp_path / "quant"
    first = run_search(cfg, out)
    assert not (out / "checkpoints" / "float.pt").exists()  # taken from the float run, not trained again
    stored = json.loads((out / "result.json").read_text())
    assert stored["trial"] == Trial(cfg, out).id == first["trial"]

    start = time.perf_counter()
    again = run_search(cfg, out, resume=True)
    assert time.perf_counter() - start < 1.0
    assert again == stored
    assert Trial(cfg, out).stored_result() == stored
    # another configuration in that folder is no finished trial of its own
    assert Trial(replace(cfg, qat_lr=1e-3), out).stored_result() is None
    with pytest.raises(ValueError, match="different configuration"):
        run_search(replace(cfg, qat_lr=1e-3), out, resume=True)
