"""Layer names come from the user's model: the module path ``model.named_modules()`` gives (a conv
or linear keeps it with its folded BatchNorm and fused activation), or for a function call the
calling module's path plus the operation. They are unique, stable, and reach every output: state
dict keys (escaped), cost rows, result.json, report.md, C symbols (escaped, never colliding)."""
from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.api import quantize
from mixprec.export.c.generate import c_symbols
from mixprec.export.names import escape, identifiers
from mixprec.graph.convert import trace
from mixprec.nn.model import LayerNamesError, module_key, node_name


class Block(nn.Module):
    """A residual block as people write them: its own conv1/bn1/conv2 and a functional sum."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class UserNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.layer1 = nn.Sequential(Block(8))
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(torch.add(x, self.features(x)))
        x = self.pool(self.layer1(x))
        return self.classifier(torch.flatten(x, 1))


def user_net() -> nn.Module:
    return UserNet()


user_net.input_shape = (1, 8, 8)

NAMES = ["input", "conv1", "features.0", "features.2", "add", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.add",
         "pool", "flatten", "classifier"]


def test_nodes_take_the_module_paths_of_the_users_model():
    graph, params = trace(UserNet(), (1, 8, 8))
    assert [n.name for n in graph] == NAMES
    modules = dict(UserNet().named_modules())
    assert all(n.name in modules for n in graph.weighted())  # exactly named_modules()'s paths
    assert graph["conv1"].attrs["activation"] == "relu"  # bn1 folded and F.relu fused into conv1
    assert graph["add"].attrs["activation"] == "relu" and graph["add"].inputs == ["conv1", "features.2"]
    assert graph["layer1.0.add"].inputs == ["add", "layer1.0.conv2"]
    assert sorted(params) == ["classifier", "conv1", "features.0", "features.2", "layer1.0.conv1", "layer1.0.conv2"]
    assert [n.name for n in trace(UserNet(), (1, 8, 8))[0]] == NAMES  # stable


class Clashes(nn.Module):
    """A module called twice, a module named like a function call, one named ``input``."""

    def __init__(self):
        super().__init__()
        self.input = nn.Conv2d(2, 2, 1)
        self.pool = nn.MaxPool2d(1)
        self.pool_1 = nn.MaxPool2d(1)
        self.add = nn.ReLU6()

    def forward(self, x):
        y = self.pool(self.input(x))
        z = self.pool_1(self.pool(y))
        return self.add(z) + y


def test_names_are_unique_with_a_suffix_only_where_needed():
    graph, _ = trace(Clashes(), (2, 3, 3))
    assert [n.name for n in graph] == ["input", "input_1", "pool", "pool_2", "pool_1", "add", "add_1"]
    assert graph["add_1"].op == "add" and graph["add"].op == "act"  # the module keeps its own name


def test_functional_calls_inside_a_block_are_named_after_it():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = nn.Sequential(Block(2), Block(2))

        def forward(self, x):
            return torch.flatten(self.stage(x), 1)

    graph, _ = trace(Outer(), (2, 3, 3))
    assert [n.name for n in graph if n.op in ("add", "flatten")] == ["stage.0.add", "stage.1.add", "flatten"]


def test_checkpoint_keys_escape_the_dots_and_layer_names_stay_dotted():
    qm = quantize(UserNet(), "cortex-m4", (1, 8, 8), bits=8)
    assert list(qm.layers) == ["conv1", "features.0", "features.2", "layer1.0.conv1", "layer1.0.conv2", "classifier"]
    assert "features.0" in qm.layers and "features/0" not in qm.layers
    assert set(qm.weight_bits()) == set(qm.layers.keys()) and "layer1.0.add" in qm.act_bits()
    state = qm.state_dict()
    assert "layers.features/0.weight" in state and "act_quantizers.layer1/0/add.bits_param" in state
    qm.calibrate([torch.randn(8, 1, 8, 8)])
    again = quantize(UserNet(), "cortex-m4", (1, 8, 8), bits=8)
    again.load_state_dict(qm.state_dict())
    assert torch.equal(again.layers["layer1.0.conv2"].weight, qm.layers["layer1.0.conv2"].weight)


@pytest.mark.parametrize("name", ["features.3", "a/b", "a%2Fb", "100%", "layer1.0.conv2", "input"])
def test_module_key_is_reversible_and_dot_free(name):
    assert "." not in module_key(name) and node_name(module_key(name)) == name


def test_a_state_dict_with_torch_fx_names_says_why_it_does_not_load():
    qm = quantize(UserNet(), "cortex-m4", (1, 8, 8), bits=8)
    old = {re.sub(r"^(layers|act_quantizers)\.([^.]+)", lambda m: f"{m[1]}.{m[2].replace('/', '_')}", k): v
           for k, v in qm.state_dict().items()}  # what mixprec wrote before: fx names (features_0)
    with pytest.raises(LayerNamesError, match=r"features_0.*before layers took the names of the model's modules"):
        qm.load_state_dict(old)
    qm.load_state_dict(old, strict=False)  # non-strict loading stays torch's


def test_c_symbols_are_c_safe_and_never_collide():
    class Near(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 1))
            self.features_0 = nn.Conv2d(2, 2, 1)
            self.add_module("0", nn.Conv2d(2, 2, 1))

        def forward(self, x):
            return getattr(self, "0")(self.features_0(self.features(x)))

    graph, _ = trace(Near(), (1, 2, 2))
    sym = c_symbols(graph)
    assert sym == {"input": "input", "features.0": "features_0_2", "features_0": "features_0", "0": "n0"}
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", s) for s in sym.values())
    assert escape("layer1.0.conv2") == "layer1_0_conv2"
    assert identifiers(["a.b", "a_b", "a-b"], reserved={"a_b_2"}) == {"a.b": "a_b_3", "a_b": "a_b", "a-b": "a_b_4"}


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    from mixprec.search import RunConfig, run_search

    module = types.ModuleType("mixprec_user_models")
    module.user_net = user_net
    sys.modules[module.__name__] = module  # `--model mixprec_user_models:user_net`
    out = tmp_path_factory.mktemp("user-run") / "run"
    try:
        run_search(RunConfig(model="mixprec_user_models:user_net", data="digits", target="cortex-m4", bits=8,
                             float_epochs=1, qat_epochs=1), out)
        yield out
    finally:
        sys.modules.pop(module.__name__, None)


def test_result_report_and_c_export_use_the_model_names(user_run):
    from mixprec.export import export_run

    result = json.loads((user_run / "result.json").read_text())
    assert [r["name"] for r in result["layers"]] == [n for n in NAMES if n not in ("pool", "flatten")]
    assert "| layer1.0.conv2 | conv |" in (user_run / "report.md").read_text()
    npz = json.loads((user_run / "integer_model.json").read_text())
    assert [n["name"] for n in npz["nodes"]] == NAMES

    artifact = export_run(user_run, "c")
    source = (artifact.path / "model.c").read_text()
    for name in ("conv1", "features_0", "layer1_0_conv1", "layer1_0_add", "classifier"):
        assert f"mixprec_n_{name} = " in source, name
    assert "/* layer1.0.conv2: conv" in source
    details = json.loads((artifact.path / "artifact.json").read_text())["details"]
    assert [(r["name"], r["symbol"]) for r in details["layers"]][:2] == [("conv1", "mixprec_n_conv1"),
                                                                          ("features.0", "mixprec_n_features_0")]
    assert details.get("host_build"), artifact.notes  # the library compiles (no symbol defined twice)


def test_a_run_saved_with_torch_fx_names_is_refused_naming_the_cause(user_run, tmp_path):
    import shutil

    import mixprec
    from mixprec.train import load_checkpoint, save_checkpoint

    old = tmp_path / "old-run"
    shutil.copytree(user_run, old)
    ckpt = old / "checkpoints" / "quantized.pt"
    state = load_checkpoint(ckpt)
    fx = lambda k: re.sub(r"^(layers|act_quantizers)\.([^.]+)", lambda m: f"{m[1]}.{m[2].replace('/', '_')}", k)  # noqa: E731
    state["state_dict"] = {fx(k): v for k, v in state["state_dict"].items()}
    save_checkpoint(ckpt, state)
    with pytest.raises(mixprec.RunError, match=r"quantized\.pt: .*torch\.fx names such as '_0_0'"):
        mixprec.load_run(old)
