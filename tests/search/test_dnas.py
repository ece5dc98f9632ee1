"""``--method dnas``: the supernet, its expected cost, and runs end to end on digits."""
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mixprec.cost import Budget, load_target
from mixprec.execute import reference
from mixprec.models import get_model
from mixprec.quantizers import ActQuantizer, DNASActQuantizer
from mixprec.search.dnas import (DnasOptions, SupernetCost, act_choices, choices, cost_terms, freeze_argmax, searches_acts,
                                 supernet, supernet_quantizers, temperature)
from mixprec.search.learned import parse_options


class Residual(torch.nn.Module):
    """a 2->4 (1x1), b 4->4 (3x3), c 4->4 (1x1), relu(a + c), maxpool 2, flatten, fc -> 3."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.a, self.b, self.c = conv(2, 4, 1), conv(4, 4, 3, padding=1), conv(4, 4, 1)
        self.act, self.pool, self.flat, self.fc = torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), \
            torch.nn.Linear(64, 3)

    def forward(self, x):
        x = self.act(self.a(x))
        return self.fc(self.flat(self.pool(self.act(x + self.c(self.act(self.b(x)))))))


class Separable(torch.nn.Module):
    """pre 2->6, dw 6->6 (3x3, depthwise), pw 6->5 (1x1), avgpool 2, flatten, fc -> 3."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.pre, self.dw, self.pw = conv(2, 6, 1), conv(6, 6, 3, padding=1, groups=6), conv(6, 5, 1)
        self.act, self.pool, self.flat, self.fc = torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(), \
            torch.nn.Linear(80, 3)

    def forward(self, x):
        x = self.act(self.dw(self.act(self.pre(x))))
        return self.fc(self.flat(self.pool(self.act(self.pw(x)))))

MODELS = {"residual": (Residual, (2, 8, 8)), "separable": (Separable, (2, 8, 8)),
          "digits-cnn": (lambda: get_model("digits-cnn"), (1, 8, 8))}


def _ctx(target: str, model, shape, act_bits: int = 8, given_act_bits: int | None = None, **budget):
    return SimpleNamespace(target=load_target(target), act_bits=act_bits, float_model=model,
                           data=SimpleNamespace(input_shape=shape), budget=Budget.from_strings(**budget),
                           config=SimpleNamespace(act_bits=given_act_bits))


def _supernet(name: str, target: str = "mpic", granularity: str = "per-channel", seed: int = 0, **options):
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    qm = supernet(_ctx(target, build(), shape), DnasOptions(**options), granularity)
    x = torch.rand((64,) + shape, generator=torch.Generator().manual_seed(seed))
    qm.calibrate([x])
    return qm, x


def _random_logits(qm, seed: int = 1, scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in choices(qm):
            q.alpha.copy_(torch.randn(q.alpha.shape, generator=g) * scale)


@pytest.mark.parametrize("target", ["mpic", "cortex-m4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_candidates_are_the_targets_widths_and_prune_only_where_allowed(name, target):
    qm, _ = _supernet(name, target)
    t = load_target(target)
    for layer, q in supernet_quantizers(qm).items():
        node = qm.graph[layer]
        assert set(q.widths) - {0} == set(t.value_weight_bits) and set(q.widths) <= set(t.weight_bits) | {0}
        output = layer == qm.graph.weighted()[-1].name  # every model here ends in its classifier
        depthwise = node.attrs.get("groups", 1) > 1
        assert (0 in q.widths) == (not output and not depthwise), layer  # structural: on every target
    per_layer, _ = _supernet(name, target, "per-tensor")
    assert all(0 not in q.widths and q.alpha.shape[0] == 1 for q in supernet_quantizers(per_layer).values())
    unpruned, _ = _supernet(name, target, prune=False)
    assert all(0 not in q.widths for q in supernet_quantizers(unpruned).values())


def test_the_0_bit_logit_starts_prune_prior_below_the_others():
    for prior in (0.0, 2.0):
        qm, _ = _supernet("residual", prune_prior=prior)
        for q in supernet_quantizers(qm).values():
            start = torch.zeros(q.alpha.shape)
            if q.prunes:
                start[:, 0] = -prior
            assert torch.equal(q.alpha.detach(), start)
            assert bool((q.bits() == max(q.widths)).all())  # the search starts from the widest model


def test_with_a_prior_the_cost_alone_takes_the_narrowest_width_before_pruning():
    """Adam moves every logit at one pace whatever its gradient's size: from equal logits the first
    step already prunes wherever the narrowest width costs more than the expectation (small layers,
    their bias included); with the prior the search starts unpruned, and pruning still comes once
    the cost keeps pushing."""
    qm, _ = _supernet("residual", prune_prior=2.0)
    costs = SupernetCost(qm, load_target("mpic"))
    opt = torch.optim.Adam([q.alpha for q in choices(qm)], lr=0.05)
    pruned_by_step = []
    for _ in range(200):
        costs.clear()
        opt.zero_grad()
        costs.expected()["flash_bytes"].backward()
        opt.step()
        pruned_by_step.append(sum(int(q.pruned().sum()) for q in supernet_quantizers(qm).values() if q.prunes))
    assert pruned_by_step[:5] == [0] * 5 and pruned_by_step[-1] > 0


@pytest.mark.parametrize("acts", ["fixed", "search"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_of_the_supernet_is_its_frozen_argmax_model(name, acts):
    qm, x = _supernet(name, acts=acts)
    _random_logits(qm)
    if acts == "search":  # the argmax takes narrower activations than 8 bits somewhere
        assert {int(q.bits().reshape(-1)[0]) for q in act_choices(qm).values()} - {8}
    pruned = {n: q.pruned() for n, q in supernet_quantizers(qm).items() if q.prunes}
    assert any(bool(p.any()) for p in pruned.values())  # the check covers pruned channels
    assert all(not bool(p.all()) for p in pruned.values())  # never a whole layer
    qm.eval()
    frozen = freeze_argmax(qm)
    frozen.eval()
    y = qm(x)
    assert np.array_equal(y.numpy(), frozen(x).numpy())
    ig = frozen.lower()
    assert np.array_equal(y.numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))
    for n, p in pruned.items():
        kept = frozen.layers[n].bias[~p]
        assert bool((frozen.layers[n].bias[p] == 0).all()) and torch.equal(kept, qm.layers[n].bias[~p].detach())
        assert bool((frozen.layers[n].quantizer.bits().reshape(-1)[p] == 0).all())
    # the training forward gates the bias softly: 1 - P(0 bits)
    qm.train()
    q = supernet_quantizers(qm)[next(iter(pruned))]
    q(qm.layers[next(iter(pruned))].weight)
    assert torch.allclose(q.output_gate(), 1 - q.probabilities()[:, 0])


def _as_double(qm) -> list[torch.nn.Parameter]:
    for q in choices(qm):
        q.alpha.data = q.alpha.data.double()
    return [q.alpha for q in choices(qm)]


@pytest.mark.parametrize("key", ["flash_bytes", "energy_uj", "bops", "ram_bytes"])
@pytest.mark.parametrize("name", ["residual", "separable", "digits-cnn"])
def test_expected_cost_gradient_matches_finite_differences(name, key):
    qm, _ = _supernet(name, acts="search")
    _random_logits(qm, scale=1.0)
    costs = SupernetCost(qm, load_target("mpic"))
    alphas = _as_double(qm)
    cost = costs.expected()[key]
    grads = [torch.zeros_like(a) if g is None else g  # an activation no cost of this key reads
             for a, g in zip(alphas, torch.autograd.grad(cost, alphas, allow_unused=True))]
    picks = [(i, g, k) for i, a in enumerate(alphas) for g, k in [(0, 0), (a.shape[0] - 1, a.shape[1] - 1)]]
    eps = 1e-5
    checked = 0
    for i, g, k in picks:
        values = []
        for step in (eps, -eps):
            with torch.no_grad():
                alphas[i][g, k] += step
            costs.clear()
            values.append(float(costs.expected()[key].detach()))
            with torch.no_grad():
                alphas[i][g, k] -= step
        fd = (values[0] - values[1]) / (2 * eps)
        assert float(grads[i][g, k]) == pytest.approx(fd, rel=1e-4, abs=1e-9 * max(abs(float(cost.detach())), 1.0))
        checked += abs(fd) > 0
    assert checked >= 2  # not all gradients vanish
    if key in ("energy_uj", "bops", "ram_bytes"):  # the activations' widths move these
        assert any(float(g.abs().sum()) > 0 for g in grads[len(supernet_quantizers(qm)):])


@pytest.mark.parametrize("name", ["residual", "separable", "digits-cnn"])
def test_one_hot_expected_cost_is_the_exact_cost_of_the_argmax(name):
    qm, _ = _supernet(name, acts="search")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # one-hot after the softmax, some channels of each prunable layer at 0 bits
        for q in choices(qm):
            pick = torch.randint(0, len(q.widths), (q.alpha.shape[0],), generator=g)
            pick[0] = len(q.widths) - 1
            q.alpha.fill_(-1e4)
            q.alpha[torch.arange(len(pick)), pick] = 0.0
    assert any(bool(q.pruned().any()) for q in supernet_quantizers(qm).values())
    costs = SupernetCost(qm, load_target("mpic"))
    expected, exact = costs.expected(), costs.argmax()
    for key in ("flash_bytes", "bops", "latency_cycles", "energy_uj", "ebops"):
        assert float(expected[key].detach()) == pytest.approx(exact[key], rel=1e-9), key
    assert exact["flash_bytes"] < SupernetCost(_supernet(name)[0], load_target("mpic")).argmax()["flash_bytes"]


def test_activation_widths_are_searched_where_the_budget_depends_on_them():
    def searched(options=None, given=None, target="mpic", **budget):
        return searches_acts(_ctx(target, None, None, given_act_bits=given, **budget), DnasOptions(**(options or {})))

    assert not searched(flash="4KiB") and searched(energy="1") and searched(ram="2KiB") and searched(flash="4KiB", bops="1e6")
    assert not searched(energy="1", given=8)  # --act-bits fixes them
    assert searched({"acts": "search"}, flash="4KiB") and not searched({"acts": "fixed"}, energy="1")
    qm, _ = _supernet("residual", acts="search")
    searched_acts = act_choices(qm)
    head = qm.graph.grid_source(qm.graph.output)
    assert set(searched_acts) == set(qm.act_quantizers) - {"input", head}  # the input and the logits stay fixed
    assert all(isinstance(qm.act_quantizers[n], ActQuantizer) and int(qm.act_quantizers[n].bits()) == 8
               for n in ("input", head))
    assert all(isinstance(q, DNASActQuantizer) and q.widths == (2, 4, 8) for q in searched_acts.values())


def test_temperature_falls_as_a_run_of_t_epochs_would():
    opts = DnasOptions()
    assert temperature(opts, 0, 3) == 5.0
    assert temperature(opts, 10, 50) == pytest.approx(5.0 * math.exp(-0.45))
    assert temperature(opts, 1, 5) == pytest.approx(temperature(opts, 10, 50))  # a 5-epoch run decays 10x faster
    assert temperature(DnasOptions(t_epochs=0), 3, 5) == pytest.approx(5.0 * math.exp(-0.135))


def test_each_cost_gets_a_controller_where_budgeted_else_its_lam():
    qm, _ = _supernet("residual")
    t = load_target("mpic")
    ctx = SimpleNamespace(target=t, budget=Budget.from_strings(flash="200"))
    costs = SupernetCost(qm, t)
    terms = cost_terms(ctx, DnasOptions(cost="flash,energy", lam="0.2,0.5"), costs, total_steps=10)
    flash, energy = terms.penalties
    assert (flash.key, flash.schedule, flash.reference, flash.target) == ("flash_bytes", "controller", 200, 190)
    assert (energy.key, energy.schedule, energy.current_beta()) == ("energy_uj", "constant", 0.5)
    assert energy.reference == pytest.approx(costs.argmax()["energy_uj"])  # the widest model's
    loss = terms.extra_loss(qm)
    assert flash.current_beta() > 0.2  # over budget: the controller raised lam
    loss.backward()
    assert all(q.alpha.grad is not None for q in supernet_quantizers(qm).values())
    assert [p.key for p in cost_terms(ctx, DnasOptions(), costs, 10).penalties] == ["flash_bytes"]


def test_options_are_checked():
    assert parse_options(DnasOptions, {"cost": "flash,energy", "lam": "0.1,1", "gumbel": "true"}, "dnas").gumbel
    for bad in ({"cost": "ram_in_out"}, {"cost": "flash", "lam": "1,2"}, {"lam": "-1"}, {"search_split": "1"},
                {"t_start": "0"}, {"range_rule": "pow2"}, {"beta": "1"}, {"acts": "pact"},
                {"weights_on": "sample"}, {"prune_prior": "-1"}, {"logits_on": "sample"}):
        with pytest.raises(ValueError):
            parse_options(DnasOptions, bad, "dnas")


# ----------------------------------------------------------------------------- end to end on digits

FAST = dict(model="digits-cnn", data="digits", target="mpic", qat_epochs=3, budget_epochs=1)
TIGHT = {"flash": "4KiB"}  # below uniform 2 bits (about 4.7 KiB): only pruning meets it


def _config(float_run, **kw):
    from mixprec.search import RunConfig

    return RunConfig(method="dnas", float_from=str(float_run), **{**FAST, "budget": dict(TIGHT), **kw})


@pytest.fixture(scope="module")
def dnas_run(tmp_path_factory, digits_float):
    from mixprec.search import run_search

    out = tmp_path_factory.mktemp("dnas")
    return out, run_search(_config(digits_float), out)


def test_run_under_a_tight_flash_budget_prunes_and_is_feasible(dnas_run, digits):
    out, result = dnas_run
    assert result["feasible"] is True and not result["degenerate"]
    assert result["reference_mismatches"] == 0
    assert result["accuracy"]["quantized"] > 0.5
    assert result["budget_step"]["applied"] and "fill" in result["budget_step"]  # dnas fills by default
    t = load_target("mpic")
    for row in result["layers"]:
        if "weight_bits" in row:
            assert set(np.atleast_1d(row["weight_bits"]).tolist()) <= set(t.weight_bits)
    history = result["history"]["dnas"]
    assert len(history) == 3 and history[-1]["temperature"] < history[0]["temperature"]
    assert history[-1]["cost"]["flash_bytes"] < history[0]["cost"]["flash_bytes"]
    assert history[-1]["pruned_share"] > 0
    from mixprec.search import load_run

    _, qm, _ = load_run(out)  # the narrower model comes back bit-exactly
    x = digits.x_test[:32]
    ig = qm.lower()
    assert np.array_equal(qm(x).numpy(), (reference(ig, x.numpy()) * ig.output_scale).astype(np.float32))
    full = dict(get_model("digits-cnn").named_modules())
    narrower = [n for n, layer in qm.layers.items() if layer.weight.shape[0] < full[n].weight.shape[0]]
    assert narrower and "fc" not in narrower  # the pruned channels are gone


def test_per_layer_runs_from_the_run_granularity_and_per_layer_spelled_so_is_refused_first(digits_float, tmp_path):
    from mixprec.search import run_search

    result = run_search(_config(digits_float, weight_granularity="per-tensor", qat_epochs=2), tmp_path / "layer")
    assert result["feasible"] is True
    rows = [r for r in result["layers"] if "weight_bits" in r]
    assert all(np.atleast_1d(r["weight_bits"]).size == 1 for r in rows)  # one width per layer
    assert len(result["history"]["dnas"]) == 2 and result["history"]["dnas"][-1]["pruned_share"] == 0
    with pytest.raises(ValueError, match="does not support per-layer weights"):
        run_search(_config(digits_float, weight_granularity="per-layer"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # a granularity the target has but dnas does not search: refused before the folder is claimed
    with pytest.raises(ValueError, match="dnas searches per-channel or per-layer"):
        run_search(_config(digits_float, target="cortex-m4", weight_granularity="per-slice"), tmp_path / "slice")
    assert not (tmp_path / "slice").exists()


def test_the_fill_raises_widths_into_the_room_the_search_left_and_stays_within(digits_float, tmp_path):
    from mixprec.search import run_search

    config = _config(digits_float, weight_granularity="per-tensor", qat_epochs=2, budget={"flash": "9KiB"})
    kept = run_search(replace(config, budget_fill=False), tmp_path / "kept")
    filled = run_search(config, tmp_path / "filled")
    assert kept["budget_step"] == {"applied": False, "fine_tune_epochs": 1}
    step = filled["budget_step"]
    assert step["before"]["flash_bytes"] == kept["cost"]["flash_bytes"]  # the same search
    assert step["sensitivity"] == "measured" and step["fill"] in ("milp", "greedy", "none")
    assert bool(step["changes"]) == (step["fill"] != "none")
    assert all(c["bits_mean_after"] > c["bits_mean_before"] for c in step["changes"])  # raises only
    assert kept["cost"]["flash_bytes"] <= filled["cost"]["flash_bytes"] <= 9 * 1024 and filled["feasible"]


def test_a_run_under_an_energy_budget_searches_activation_widths(digits_float, tmp_path):
    from mixprec.search import run_search

    result = run_search(_config(digits_float, budget={"energy": "3"}, qat_epochs=2), tmp_path / "energy")
    assert result["feasible"] is True and result["cost"]["energy_uj"] <= 3.0  # uniform 8/8: 4.7 uJ
    assert result["reference_mismatches"] == 0 and result["accuracy"]["quantized"] > 0.5
    searched = result["history"]["dnas"][-1]["act_bits"]
    assert searched and set(searched.values()) <= {2, 4, 8}  # every activation but the input and the logits
    head = [r for r in result["layers"] if r["name"] == "fc"][0]
    assert head["act_bits"] >= 8 and [r for r in result["layers"] if r["name"] == "input"][0]["act_bits"] == 8


class _Stop(Exception):
    pass


def _timeless(history: list[dict]) -> list[dict]:
    """The history without wall-clock figures (a pass's own stats nest under ``logits``)."""
    def strip(e):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in e.items()
                if k not in ("seconds", "samples_per_second")}
    return [strip(e) for e in history]


def test_a_run_killed_mid_search_resumes_to_the_same_result(dnas_run, digits_float, tmp_path):
    from mixprec.search import run_search

    def stop(phase, epoch, stats):
        if phase == "dnas" and epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_search(_config(digits_float), tmp_path / "cut", epoch_hook=stop)
    resumed = run_search(_config(digits_float), tmp_path / "cut", resume=True)
    whole = dnas_run[1]
    assert _timeless(resumed["history"]["dnas"]) == _timeless(whole["history"]["dnas"])
    assert resumed["accuracy"] == whole["accuracy"] and resumed["cost"] == whole["cost"]
    a = torch.load(dnas_run[0] / "checkpoints" / "quantized.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "quantized.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["feasible"] is True
