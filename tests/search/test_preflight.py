"""Bad data, model names and folders are refused in one line before the run claims its folder, and
the corrected command then runs into the same ``--out``; a result at chance is never a success."""
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from mixprec.cli import app
from mixprec.search.result import degenerate_reason

runner = CliRunner()
FAST = ["--float-epochs", "3", "--qat-epochs", "1", "--budget-epochs", "0", "--bits", "8", "--act-bits", "8"]


def _digits():
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _npz(path, x, y):
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def _search(data, out, *extra):
    return runner.invoke(app, ["search", "--model", "digits-cnn", "--data", data, "--target", "cortex-m4",
                               "--out", str(out), "-q", *FAST, *extra])


def _bad_inputs(tmp_path):
    x, y = _digits()
    nan = x[:, None].copy()
    nan[7, 0, 3, 3] = np.nan
    return {
        "labels above the model's classes": (_npz(tmp_path / "labels.npz", x[:, None], y + 5),
                                             "y_train holds labels up to 14, but model digits-cnn outputs 10"),
        "NaN in the data": (_npz(tmp_path / "nan.npz", nan, y), "NaN or infinite value(s) (the first in sample"),
        "a shape the model was not written for": (_npz(tmp_path / "wide.npz", np.pad(x, ((0, 0), (1, 1), (1, 1)))[:, None], y),
                                                  "samples have shape (1, 10, 10), but model digits-cnn takes (1, 8, 8)"),
        "channels-last images": (_npz(tmp_path / "hwc.npz", np.repeat(x[..., None], 3, axis=-1), y),
                                 "They look channels-last"),
    }


@pytest.mark.parametrize("case", ["labels above the model's classes", "NaN in the data",
                                  "a shape the model was not written for", "channels-last images"])
def test_bad_data_is_one_line_before_the_folder_is_claimed_then_the_fix_runs_there(tmp_path, case):
    data, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "run"
    res = _search(data, out)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not out.exists()
    x, y = _digits()
    res = _search(_npz(tmp_path / "good.npz", x[:, None], y), out)  # no --resume: the folder is free
    assert res.exit_code == 0, res.output
    assert json.loads((out / "result.json").read_text())["accuracy"]["quantized"] > 0.8


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1)])
def test_a_missing_or_trailing_unit_channel_axis_is_taken_as_the_model_s(tmp_path, shape, caplog):
    x, y = _digits()
    data = _npz(tmp_path / "d.npz", x.reshape(len(x), *shape), y)
    with caplog.at_level("INFO", logger="mixprec.search.preflight"):
        res = _search(data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert f"samples of shape {shape} taken as the model's (1, 8, 8)" in caplog.text


def test_unknown_model_is_refused_before_the_data_is_read(tmp_path):
    res = runner.invoke(app, ["search", "--model", "resnet-1000", "--data", "npz:/nowhere/x.npz", "--out",
                              str(tmp_path / "r")])
    assert res.exit_code == 2 and "Unknown model 'resnet-1000'" in res.output  # not the missing file


def test_resume_into_a_folder_that_holds_no_run_is_an_error(tmp_path):
    out = tmp_path / "typo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _search("digits", out, "--resume")
    assert res.exit_code == 2 and "holds no run (no config.yaml) but is not empty" in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_model_at_chance_exits_non_zero_and_is_kept_marked_degenerate(tmp_path):
    x, y = _digits()
    shuffled = np.random.default_rng(0).permutation(y)  # labels unrelated to the images
    out = tmp_path / "run"
    res = _search(_npz(tmp_path / "noise.npz", x[:, None], shuffled), out)
    assert res.exit_code == 1, res.output
    assert "not a usable model" in res.output and "did not learn" in " ".join(res.output.split())
    result = json.loads((out / "result.json").read_text())
    assert result["degenerate"] is True and "chance" in result["degenerate_reason"]
    assert "degenerate" in (out / "report.md").read_text()


def test_degenerate_reasons():
    assert degenerate_reason(0.95, 0.94, 0.1) is None
    assert "collapsed" in degenerate_reason(0.95, 0.135, 0.1)  # QAT destroyed it
    assert "far below" in degenerate_reason(0.775, 0.40, 0.083)
    assert "did not learn" in degenerate_reason(0.12, 0.12, 0.1)
    assert degenerate_reason(0.775, 0.575, 0.083) is None  # 29% of the margin lost: poor, not degenerate


def test_a_search_that_ends_far_over_budget_says_so(caplog):
    from mixprec.cost import Budget
    from mixprec.search.result import search_gap

    step = {"applied": True, "before": {"flash_bytes": 29_100.0, "ram_bytes": 900.0}}
    with caplog.at_level("WARNING"):
        gap = search_gap(step, Budget(flash_bytes=14_336, ram_bytes=1_000))
    assert gap == {"flash_bytes": {"searched": 29_100.0, "limit": 14_336}}
    assert "103% over the budget" in caplog.text and "budget step cut the rest" in caplog.text
    assert search_gap({"applied": True, "before": {"flash_bytes": 15_000.0}}, Budget(flash_bytes=14_336)) == {}
    assert search_gap({"applied": False}, Budget(flash_bytes=14_336)) == {}
