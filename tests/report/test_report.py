"""HTML reports on real (short) runs: self-contained, every plot embedded and valid, folder mode,
robust to old results, and rendered by a real browser."""
import base64
import copy
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mixprec.cli import app
from mixprec.report import ScreenshotError, find_chromium, screenshot, write_report
from mixprec.report.data import BitRow, bit_row, bits_label, find_runs, phases
from mixprec.report.html import run_page
from mixprec.report.plots import training_curves
from mixprec.search.config import RunConfig
from mixprec.search.run import run_search

FAST = dict(model="digits-cnn", data="digits", target="cortex-m4", qat_epochs=1)
DATA_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_float):
    """A folder with two real runs, 4- and 8-bit weights, from one float model."""
    folder = tmp_path_factory.mktemp("runs")
    run_search(RunConfig(bits=4, budget={"flash": "12KiB"}, float_from=str(digits_float), **FAST), folder / "w4")
    run_search(RunConfig(bits=8, float_from=str(digits_float), **FAST), folder / "w8")
    return folder


@pytest.fixture(scope="module")
def run_report(runs):
    return write_report(runs / "w4")


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_PNG.findall(html)]


def assert_self_contained(html: str) -> None:
    lowered = html.lower()
    for bad in ('src="http', "src='http", "<link", "<script", "url(", "@import", "<iframe", "<object"):
        assert bad not in lowered, bad
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_run_report_is_self_contained_and_embeds_every_plot(runs, run_report):
    assert run_report == runs / "w4" / "report.html"
    html = run_report.read_text(encoding="utf-8")
    assert_self_contained(html)
    files = sorted((runs / "w4" / "plots").glob("*.png"))
    assert {f.stem for f in files} == {"bits", "memory", "training", "runs"}  # runs: the w8 sibling
    assert sorted(embedded_pngs(html)) == sorted(f.read_bytes() for f in files)


def test_plots_are_valid_pngs_of_sane_size(runs, run_report):
    for f in (runs / "w4" / "plots").glob("*.png"):
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 500 <= w <= 2500 and 300 <= h <= 4000, (f.name, im.size)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 50, f.name  # not a blank canvas


def test_run_report_shows_header_summary_and_layers(runs, run_report):
    html = run_report.read_text(encoding="utf-8")
    result = json.loads((runs / "w4" / "result.json").read_text())
    for text in ("digits-cnn", "digits", "cortex-m4", "uniform", "feasible", "bit-exact vs reference",
                 "integer-exact", "12.0 KiB", "1.0 MiB", "EBOPs", "latency", "µJ"):
        assert text in html, text
    for layer in result["layers"]:
        assert f"<td class=\"l\">{layer['name']}</td>" in html
    assert f"{100 * result['accuracy']['quantized']:.2f} %" in html
    assert html.count('class="badge ok">ok<') >= 3  # FLASH budget, FLASH and RAM device capacity


def test_folder_report_plots_every_run_and_links_their_reports(runs):
    out = write_report(runs)
    assert out == runs / "report.html"
    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert 'href="w4/report.html"' in html and 'href="w8/report.html"' in html
    assert (runs / "w4" / "report.html").is_file() and (runs / "w8" / "report.html").is_file()
    assert embedded_pngs(html) == [(runs / "plots" / "runs.png").read_bytes()]
    assert "w4a8" in html and "w8a8" in html  # a FLASH-only budget keeps 8-bit activations


def test_folder_search_goes_two_levels_down_and_skips_run_internals(runs, tmp_path):
    nested = tmp_path / "sweep" / "group"
    shutil.copytree(runs / "w4", nested / "a", ignore=shutil.ignore_patterns("checkpoints", "plots"))
    (tmp_path / "sweep" / "b").mkdir()
    shutil.copy(runs / "w8" / "result.json", tmp_path / "sweep" / "b" / "result.json")
    assert find_runs(tmp_path / "sweep") == [tmp_path / "sweep" / "b", nested / "a"]
    assert find_runs(tmp_path) == [tmp_path / "sweep" / "b"]


def test_old_result_without_optional_keys_still_reports(runs, tmp_path):
    result = json.loads((runs / "w4" / "result.json").read_text())
    old = {k: result[k] for k in ("model", "data", "target", "method", "accuracy", "cost", "layers")}
    old["target"] = "no-such-target.yaml"  # a custom target file that moved away
    old["history"] = {"float": [], "qat": []}
    for layer in old["layers"]:
        layer.pop("weight_bits_mean", None)
        layer.pop("params", None)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps(old))
    html = write_report(tmp_path / "old").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert "feasibility unknown" in html
    assert {f.stem for f in (tmp_path / "old" / "plots").glob("*.png")} == {"bits", "memory"}


def test_training_plot_adds_a_cost_panel_when_history_has_costs_and_skips_empty_phases(runs):
    history = json.loads((runs / "w4" / "result.json").read_text())["history"]
    assert len(training_curves(phases(history)).axes) == 2  # loss, accuracy
    with_cost = copy.deepcopy(history)
    for i, entry in enumerate(with_cost["qat"]):
        entry.update(lr=1e-3, cost={"flash_bytes": 9000 - 100 * i, "ebops": 1e5 - i})
    with_cost["search"] = []
    assert [p.name for p in phases(with_cost)] == ["float", "qat"]
    assert len(training_curves(phases(with_cost)).axes) == 3
    assert training_curves(phases({"float": []})) is None


def test_text_is_escaped():
    result = {"model": "<script>alert(1)</script>", "data": "a&b", "target": "t", "method": "m",
              "layers": [{"name": "<img src=x>", "op": "conv", "act_bits": 8, "weight_bits": 4.0}]}
    html = run_page(result, [], {})
    assert "<script>" not in html and "<img src=x>" not in html
    assert "&lt;script&gt;" in html and "a&amp;b" in html


def test_bit_rows_spread_slices_and_average_elements_per_channel():
    slices = bit_row({"weight_bits": [2.0, 8.0], "params": 36}, channels=4)
    assert slices.kind == "per-slice" and slices.values.tolist() == [2, 2, 8, 8]
    elements = bit_row({"weight_bits": [2.0] * 9 + [4.0] * 9 + [8.0] * 18, "params": 36}, channels=4)
    assert elements.kind == "per-element" and elements.values.tolist() == [2, 4, 8, 8]
    assert bit_row({"weight_bits": 4.0}, channels=4).values.tolist() == [4]
    assert bit_row({"weight_bits": [4.0] * 36, "params": 36}, channels=None).values.tolist() == [4]
    none = bit_row({"name": "in", "op": "input", "act_bits": 8.0}, channels=None)
    assert isinstance(none, BitRow) and none.kind == "none" and none.act_bits == 8.0


def test_bits_label_names_uniform_and_mixed_widths():
    uniform = {"layers": [{"weight_bits": [4.0, 4.0], "act_bits": 8.0, "params": 2}]}
    mixed = {"layers": [{"weight_bits": [2.0, 8.0], "act_bits": 8.0, "params": 10},
                        {"weight_bits": 4.0, "act_bits": 4.0, "params": 10}]}
    assert bits_label(uniform) == "w4a8"
    assert bits_label(mixed) == "w~4.5a4-8"


def test_cli_report_writes_the_report(runs):
    res = CliRunner().invoke(app, ["report", str(runs / "w8")])
    assert res.exit_code == 0, res.output
    assert (runs / "w8" / "report.html").is_file()
    res = CliRunner().invoke(app, ["report", str(runs / "w8" / "checkpoints")])
    assert res.exit_code == 2 and "neither a run directory" in " ".join(res.output.split())


def test_chromium_renders_the_report(runs, run_report, tmp_path):
    if find_chromium() is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome) on PATH; "
                    "set MIXPREC_CHROMIUM or `apt-get install chromium` to run this test")
    try:
        png = screenshot(run_report, tmp_path / "shot.png", width=1280, height=4000, timeout=90)
    except ScreenshotError as exc:  # a present but broken browser is a failure, not a skip
        pytest.fail(str(exc))
    with Image.open(png) as im:
        assert im.size == (1280, 4000)
        page = im.convert("RGB")
    assert len(page.getcolors(maxcolors=1 << 24)) > 500  # text, tables and plots were drawn
    # the plots lie below the tables: the lower part of the page must not be a uniform fill
    lower = page.crop((100, 1200, 1180, 3600))
    assert np.asarray(lower).std() > 20 and len(lower.getcolors(maxcolors=1 << 24)) > 200
