"""torch.fx conversion: BatchNorm folding, activation fusion, dropped layers, flatten idioms,
recorded shapes, and the error every unsupported construct raises.

Conversion is checked numerically by a small float interpreter of the graph (below): running the
graph with its (folded) float parameters must reproduce the float model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.graph.convert import SUPPORTED, UnsupportedLayerError, fold_batchnorm, trace
from mixprec.graph.ir import ALL_OPS


def run_float(graph, params, x: torch.Tensor, keep: bool = False):
    """Float execution of a mixprec graph: an independent check of what conversion recorded."""
    env = {}
    for n in graph:
        a = n.attrs
        args = [env[i] for i in n.inputs]
        if n.op == "input":
            y = x
        elif n.op == "conv":
            fn = F.conv1d if a["dims"] == 1 else F.conv2d
            p = params[n.name]
            before, after = a["padding"], a.get("padding_after", a["padding"])
            sides = [q for dim in reversed(range(len(before))) for q in (before[dim], after[dim])]
            y = fn(F.pad(args[0], sides), p.weight, p.bias, a["stride"], 0, a["dilation"], a["groups"])
        elif n.op == "linear":
            y = F.linear(args[0], params[n.name].weight, params[n.name].bias)
        elif n.op == "add":
            y = args[0] + args[1]
        elif n.op == "act":
            y = args[0]
        elif n.op == "maxpool":
            fn = F.max_pool1d if a["dims"] == 1 else F.max_pool2d
            y = fn(args[0], a["kernel_size"], a["stride"], a["padding"])
        elif n.op == "avgpool":
            fn = F.avg_pool1d if a["dims"] == 1 else F.avg_pool2d
            y = fn(args[0], a["kernel_size"], a["stride"], a["padding"])
        elif n.op == "flatten":
            y = torch.flatten(args[0], 1)
        elif n.op == "zeropad":
            sides = [q for dim in reversed(range(a["dims"])) for q in (a["padding"][dim], a["padding_after"][dim])]
            y = F.pad(args[0], sides)
        else:
            raise AssertionError(f"unknown op {n.op}")
        if "activation" in a:  # every fused/standalone activation is a clamp to its bounds
            y = torch.clamp(y, a["act_min"], a["act_max"])
        env[n.name] = y
    return (env[graph.output], env) if keep else env[graph.output]


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_()
    return model


def ops(graph) -> list[str]:
    return [n.op for n in graph]


def check_float(model: nn.Module, input_shape, batch: int = 3):
    """Trace, run the graph in float and compare to the model; return the graph."""
    graph, params = trace(model, input_shape)
    x = torch.randn((batch,) + tuple(input_shape))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got, env = run_float(graph, params, x, keep=True)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    for n in graph:  # shapes exclude the batch dimension
        assert tuple(env[n.name].shape) == (batch,) + n.out_shape
        assert n.in_shapes == [graph[i].out_shape for i in n.inputs]
        assert n.op in ALL_OPS
    return graph


# --- BatchNorm folding ----------------------------------------------------------------------------

def test_fold_batchnorm_matches_module():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)).eval()
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(F.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
    assert not w.requires_grad and not b.requires_grad


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_folded_model_equals_float_model(affine):
    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=affine), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU6(), nn.Linear(6, 3)))
    graph = check_float(model, (2, 6, 6))
    assert ops(graph) == ["input", "conv", "conv", "maxpool", "flatten", "linear", "linear"]
    assert [n.name for n in graph] == ["input", "0", "3", "5", "6", "7", "10"]  # module paths
    assert graph["0"].attrs["activation"] == "relu"
    assert graph["7"].attrs["activation"] == "relu6"


def test_conv1d_batchnorm1d_folded():
    torch.manual_seed(2)
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 5, 3, stride=2), nn.BatchNorm1d(5), nn.Hardtanh(-0.5, 2.0)))
    graph = check_float(model, (3, 11))
    assert ops(graph) == ["input", "conv"]
    assert graph["0"].attrs["dims"] == 1


def test_trace_folds_running_statistics_even_in_train_mode():
    torch.manual_seed(3)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph, params = trace(model, (1, 3, 3))
    assert model.training  # mode restored
    # and the float model untouched: shape propagation once ran a zero batch through the train-mode
    # BatchNorm, which moved its running statistics (and so the folded weights) towards it
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    x = torch.randn(4, 1, 3, 3)
    with torch.no_grad():
        assert torch.allclose(run_float(graph, params, x), model(x), atol=1e-5)


# --- activation fusion ----------------------------------------------------------------------------

class ConvAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("act, kind, bounds", [
    (nn.ReLU(), "relu", (0.0, float("inf"))),
    (nn.ReLU(inplace=True), "relu", (0.0, float("inf"))),
    (nn.ReLU6(), "relu6", (0.0, 6.0)),
    (nn.Hardtanh(), "hardtanh", (-1.0, 1.0)),
    (nn.Hardtanh(-0.25, 0.5), "hardtanh", (-0.25, 0.5)),
    (F.relu, "relu", (0.0, float("inf"))),
    (torch.relu, "relu", (0.0, float("inf"))),
    (lambda y: y.relu(), "relu", (0.0, float("inf"))),
    (F.relu6, "relu6", (0.0, 6.0)),
    (lambda y: F.hardtanh(y, -0.5, 0.25), "hardtanh", (-0.5, 0.25)),
    (lambda y: F.hardtanh(y, min_val=-2.0, max_val=0.5), "hardtanh", (-2.0, 0.5)),
    (nn.Identity(), "identity", (float("-inf"), float("inf"))),
], ids=lambda v: v if isinstance(v, str) else None)
def test_activation_fused_into_conv(act, kind, bounds):
    torch.manual_seed(4)
    graph = check_float(ConvAct(act), (2, 4, 4))
    assert ops(graph) == ["input", "conv"]
    conv = graph["conv"]
    assert conv.attrs["activation"] == kind
    assert (conv.attrs["act_min"], conv.attrs["act_max"]) == bounds


@pytest.mark.parametrize("act, kind", [(nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Hardtanh(-3.0, 3.0), "hardtanh")])
def test_activation_fused_into_linear(act, kind):
    torch.manual_seed(5)
    graph = check_float(nn.Sequential(nn.Linear(4, 5), act), (4,))
    assert ops(graph) == ["input", "linear"]
    assert graph["0"].attrs["activation"] == kind


class AddAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1), act

    def forward(self, x):
        return self.act(self.a(x) + self.b(x))


@pytest.mark.parametrize("act, kind", [(nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Hardtanh(-0.5, 0.5), "hardtanh")])
def test_activation_fused_into_add(act, kind):
    torch.manual_seed(6)
    graph = check_float(AddAct(act), (2, 3, 3))
    assert ops(graph) == ["input", "conv", "conv", "add"]
    assert graph["add"].attrs["activation"] == kind
    assert graph["add"].inputs == ["a", "b"]


@pytest.mark.parametrize("add", [lambda a, b: a + b, torch.add, lambda a, b: a.add(b)])
def test_add_spellings(add):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x):
            return add(self.conv(x), x)

    graph = check_float(M(), (2, 5))
    assert ops(graph) == ["input", "conv", "add"]
    assert graph[graph.output].inputs == ["conv", "input"]


@pytest.mark.parametrize("join", [lambda a, b: torch.cat([a, b], 1), lambda a, b: torch.cat((a, b), dim=-3),
                                  lambda a, b: torch.concat([a, b], 1), lambda a, b: torch.cat(tensors=[a, b], dim=1)])
def test_concatenation_along_channels(join):
    g = trace(Fn(lambda m, x: F.relu(join(m.a(x), x)), a=nn.Conv2d(2, 3, 3, padding=1)), (2, 4, 4))[0]
    node = g[g.output]
    assert (node.op, node.inputs, node.out_shape, node.attrs["activation"]) == ("concat", ["a", "input"], (5, 4, 4), "relu")
    assert node.in_shapes == [(3, 4, 4), (2, 4, 4)]


@pytest.mark.parametrize("act, function, params", [
    (nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}), (lambda y: F.leaky_relu(y, 0.05), "leaky_relu",
                                                                 {"negative_slope": 0.05}),
    (nn.Sigmoid(), "sigmoid", {}), (torch.sigmoid, "sigmoid", {}), (lambda y: y.sigmoid(), "sigmoid", {}),
    (nn.Tanh(), "tanh", {}), (torch.tanh, "tanh", {}), (nn.Hardswish(inplace=True), "hardswish", {}),
    (F.hardsigmoid, "hardsigmoid", {}), (nn.SiLU(), "silu", {}), (lambda y: F.gelu(y, approximate="tanh"), "gelu",
                                                                  {"approximate": "tanh"}),
    (nn.ELU(0.5), "elu", {"alpha": 0.5})])
def test_smooth_activations_become_lookup_tables(act, function, params):
    act_module = act if isinstance(act, nn.Module) else None
    model = Fn(lambda m, x: (m.act if act_module is not None else act)(m.c(x)), c=conv(), **(
        {"act": act_module} if act_module is not None else {}))
    g = trace(model, IMG)[0]
    node = g[g.output]
    assert (node.op, node.inputs, node.attrs["function"]) == ("table", ["c"], function)
    assert {k: node.attrs[k] for k in params} == params


@pytest.mark.parametrize("part, bounds", [
    (lambda y: y[:, 1:3], (1, 3)), (lambda y: y[:, :2, ...], (0, 2)), (lambda y: y[:, -1:, :, :], (2, 3)),
    (lambda y: y.chunk(3, dim=1)[1], (1, 2)), (lambda y: torch.split(y, [2, 1], dim=1)[0], (0, 2)),
    (lambda y: y.split(1, 1)[2], (2, 3))])
def test_channel_slices(part, bounds):
    g = trace(Fn(lambda m, x: part(m.c(x)), c=nn.Conv2d(2, 3, 1)), IMG)[0]
    node = g[g.output]
    assert (node.op, node.inputs, (node.attrs["start"], node.attrs["stop"])) == ("slice", ["c"], bounds)
    assert node.out_shape == (bounds[1] - bounds[0], 4, 4)


def test_the_parts_of_a_split_are_named_after_it():
    g = trace(Fn(lambda m, x: torch.cat([m.c(x).chunk(3, dim=1)[2], m.c(x).chunk(3, dim=1)[2]], 1),
                 c=nn.Conv2d(2, 3, 1)), IMG)[0]
    assert [n.name for n in g if n.op == "slice"] == ["chunk.2", "chunk.2_1"]  # two chunk calls: distinct names


def test_an_indexing_slice_is_named_slice_in_its_module():
    block = Fn(lambda m, x: torch.cat([x[:, :1], x[:, 1:]], 1))
    g = trace(nn.Sequential(nn.Conv2d(2, 2, 1), block), IMG)[0]
    assert [n.name for n in g if n.op == "slice"] == ["1.slice", "1.slice_1"]


def test_a_slice_of_every_channel_is_an_alias():
    g = trace(Fn(lambda m, x: m.c(x)[:, :], c=nn.Conv2d(2, 3, 1)), IMG)[0]
    assert [n.op for n in g] == ["input", "conv"]


def test_a_concatenation_of_one_tensor_is_an_alias():
    g = trace(Fn(lambda m, x: torch.cat([m.a(x)], 1), a=conv()), IMG)[0]
    assert [n.op for n in g] == ["input", "conv"] and g.output == "a"


def test_standalone_activation_after_maxpool_is_an_act_node():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.ReLU6())
    graph = check_float(model, (2, 6, 6))
    assert ops(graph) == ["input", "conv", "maxpool", "act"]
    act = graph[graph.output]
    assert act.attrs == {"activation": "relu6", "act_min": 0.0, "act_max": 6.0}
    assert graph["0"].attrs["activation"] == "identity"


def test_activation_after_fused_activation_or_shared_output_is_an_act_node():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.relu6(F.relu(x)) + F.hardtanh(y) + y  # y has two users: no fusion

    torch.manual_seed(8)
    graph = check_float(M(), (2, 3, 3))
    kinds = {n.name: (n.op, n.attrs.get("activation")) for n in graph}
    assert kinds["relu"] == ("act", "relu")  # the input has no fusable producer
    assert kinds["relu6"] == ("act", "relu6")
    assert kinds["hardtanh"] == ("act", "hardtanh")
    assert kinds["conv"] == ("conv", "identity")


# --- dropped layers and flatten idioms --------------------------------------------------------------

def test_dropout_and_identity_are_dropped():
    torch.manual_seed(9)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop, self.ident = nn.Conv2d(2, 3, 3), nn.Dropout(0.5), nn.Identity()
            self.drop2d, self.fc = nn.Dropout(0.2), nn.Linear(12, 2)

        def forward(self, x):
            y = self.ident(self.drop(self.conv(x)))
            y = F.dropout(torch.flatten(self.drop2d(y), 1), 0.3, self.training)
            return self.fc(y.contiguous())

    graph = check_float(M(), (2, 4, 4))
    assert ops(graph) == ["input", "conv", "flatten", "linear"]
    assert graph["fc"].inputs == ["flatten"]


FLATTENS = {
    "nn.Flatten": nn.Flatten(),
    "torch.flatten": lambda y: torch.flatten(y, 1),
    "method": lambda y: y.flatten(1),
    "view-size": lambda y: y.view(y.size(0), -1),
    "reshape-size": lambda y: y.reshape(y.size(0), -1),
    "reshape-minus-one": lambda y: y.reshape(-1, 12),
    "torch.reshape": lambda y: torch.reshape(y, (y.shape[0], -1)),
}


@pytest.mark.parametrize("flatten", FLATTENS.values(), ids=FLATTENS.keys())
def test_flatten_variants(flatten):
    torch.manual_seed(10)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 3, 3), nn.Linear(12, 2)
            self.flatten = flatten if isinstance(flatten, nn.Module) else None

        def forward(self, x):
            return self.fc((self.flatten or flatten)(self.conv(x)))

    graph = check_float(M(), (2, 4, 4))
    assert ops(graph) == ["input", "conv", "flatten", "linear"]
    assert graph["fc"].in_shapes == [(12,)]


def test_flatten_of_flat_tensor_is_an_alias():
    graph = check_float(nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 2)), (3,))
    assert ops(graph) == ["input", "linear", "linear"]
    assert graph["2"].inputs == ["0"]


# --- pooling ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool, shape, kernel", [
    (nn.AdaptiveAvgPool2d(1), (2, 4, 6), (4, 6)),
    (nn.AdaptiveAvgPool2d((2, 3)), (2, 4, 6), (2, 2)),
    (nn.AdaptiveAvgPool1d(2), (2, 6), (3,)),
    (nn.AvgPool2d(2), (2, 4, 6), (2, 2)),
    (nn.AvgPool1d(3, stride=1), (2, 6), (3,)),
])
def test_average_pooling(pool, shape, kernel):
    graph = check_float(nn.Sequential(pool), shape)
    assert ops(graph) == ["input", "avgpool"]
    assert graph[graph.output].attrs["kernel_size"] == kernel


@pytest.mark.parametrize("pool, shape", [(nn.MaxPool2d(3, 2, padding=1), (2, 5, 5)), (nn.MaxPool1d(2), (2, 7)),
                                         (nn.MaxPool2d((2, 1)), (1, 4, 3))])
def test_max_pooling(pool, shape):
    graph = check_float(nn.Sequential(pool), shape)
    assert ops(graph) == ["input", "maxpool"]


FUNCTIONAL_POOLS = {
    "max_pool2d": (lambda y: F.max_pool2d(y, 2), (2, 4, 6), "maxpool"),
    "max_pool2d-kw": (lambda y: F.max_pool2d(y, kernel_size=3, stride=2, padding=1), (2, 5, 5), "maxpool"),
    "max_pool1d": (lambda y: F.max_pool1d(y, 2), (2, 7), "maxpool"),
    "avg_pool2d": (lambda y: F.avg_pool2d(y, (2, 3)), (2, 4, 6), "avgpool"),
    "avg_pool1d": (lambda y: F.avg_pool1d(y, 3, 1), (2, 6), "avgpool"),
    "adaptive_avg_pool2d": (lambda y: F.adaptive_avg_pool2d(y, 1), (2, 4, 6), "avgpool"),
    "adaptive_avg_pool1d": (lambda y: F.adaptive_avg_pool1d(y, (2,)), (2, 6), "avgpool"),
}


@pytest.mark.parametrize("pool, shape, op", FUNCTIONAL_POOLS.values(), ids=FUNCTIONAL_POOLS.keys())
def test_functional_pooling(pool, shape, op):
    graph = check_float(Fn(lambda m, x: pool(x)), shape)
    assert ops(graph) == ["input", op]


GLOBAL_MEANS = {
    "mean-method": (lambda y: y.mean((2, 3)), ["avgpool", "flatten"]),
    "torch.mean-negative": (lambda y: torch.mean(y, dim=[-1, -2]), ["avgpool", "flatten"]),
    "keepdim-then-flatten": (lambda y: y.mean((2, 3), keepdim=True).flatten(1), ["avgpool", "flatten"]),
    "adaptive-then-squeeze": (lambda y: F.adaptive_avg_pool2d(y, 1).squeeze(-1).squeeze(-1), ["avgpool", "flatten"]),
}


@pytest.mark.parametrize("pool, expected", GLOBAL_MEANS.values(), ids=GLOBAL_MEANS.keys())
def test_a_mean_over_every_spatial_dim_is_global_average_pooling(pool, expected):
    torch.manual_seed(3)
    graph = check_float(Fn(lambda m, x: m.fc(pool(torch.relu(m.c(x)))), c=nn.Conv2d(2, 3, 3), fc=nn.Linear(3, 2)),
                        (2, 5, 7))
    assert ops(graph) == ["input", "conv", *expected, "linear"]
    assert graph[graph["fc"].inputs[0]].out_shape == (3,)


@pytest.mark.parametrize("padding, expected", [("same", (1, 2)), ("valid", (0, 0)), ((1, 0), (1, 0)), (2, (2, 2))])
def test_conv_padding_forms(padding, expected):
    graph = check_float(nn.Sequential(nn.Conv2d(2, 3, (3, 5), padding=padding)), (2, 6, 7))
    assert graph["0"].attrs["padding"] == expected


PADS = {
    "F.pad": (lambda m, x: m.c(F.pad(x, (1, 1, 2, 2))), (3, 2)),
    "ZeroPad2d": (lambda m, x: m.c(m.pad(x)), (2, 2)),
    "F.pad-functional-conv": (lambda m, x: F.conv2d(F.pad(x, [1, 1, 1, 1], "constant", 0.0), m.c.weight, m.c.bias,
                                                   padding=1), (2, 2)),
}


@pytest.mark.parametrize("forward, padding", PADS.values(), ids=PADS.keys())
def test_zero_padding_folds_into_the_convolution(forward, padding):
    graph = check_float(Fn(forward, c=nn.Conv2d(2, 3, 3, padding=1), pad=nn.ZeroPad2d(1)), (2, 5, 6))
    assert ops(graph) == ["input", "conv"] and graph[graph.output].attrs["padding"] == padding


@pytest.mark.parametrize("model, before, after", [
    (lambda: nn.Sequential(nn.Conv2d(2, 3, (2, 4), padding="same")), (0, 1), (1, 2)),
    (lambda: nn.Sequential(nn.Conv1d(2, 3, 4, padding="same", dilation=3)), (4,), (5,)),
    (lambda: Fn(lambda m, x: m.c(F.pad(x, (0, 1, 2, 0))), c=nn.Conv2d(2, 3, 3, padding=1)), (3, 1), (1, 2)),
    (lambda: Fn(lambda m, x: m.c(F.pad(x, (1, 0))), c=nn.Conv2d(2, 3, 3)), (0, 1), (0, 0)),
    (lambda: Fn(lambda m, x: m.c(m.pad(x)), c=nn.Conv2d(2, 3, 3), pad=nn.ZeroPad2d((0, 1, 0, 1))), (0, 0), (1, 1))])
def test_padding_one_side_more_than_the_other(model, before, after):
    """'same' with an even dilated kernel pads its extra element after, as PyTorch does; F.pad and
    ZeroPad2d may pad each side as they like (a pad of the last dim only leaves the others alone)."""
    graph = check_float(model(), (2, 6, 7) if len(before) == 2 else (2, 9))
    conv = graph[graph.output]
    assert conv.attrs["padding"] == before and conv.attrs.get("padding_after", before) == after


@pytest.mark.parametrize("model, shape, before, after", [
    (lambda: Fn(lambda m, x: F.max_pool2d(F.pad(x, (1, 0, 2, 1)), 2)), (2, 5, 6), (2, 1), (1, 0)),
    (lambda: Fn(lambda m, x: F.avg_pool1d(m.pad(x), 2), pad=nn.ConstantPad1d((0, 3), 0.0)), (2, 9), (0,), (3,)),
    (lambda: Fn(lambda m, x: (lambda p: m.c(p) + F.max_pool2d(p, 3, 1))(F.pad(x, (1, 1, 1, 1))),
                c=nn.Conv2d(2, 2, 3)), (2, 5, 6), (1, 1), (1, 1))])
def test_zero_padding_no_convolution_takes_alone_is_a_node(model, shape, before, after):
    """Zeros around the positions before a pooling, or read by a convolution and something else: a
    ``zeropad`` node (spatial sides first dim first, as the convolution's padding)."""
    graph = check_float(model(), shape)
    pad = next(n for n in graph if n.op == "zeropad")
    assert (pad.attrs["padding"], pad.attrs["padding_after"]) == (before, after)


def test_dilated_same_padding():
    graph = check_float(nn.Sequential(nn.Conv1d(2, 3, 3, padding="same", dilation=2)), (2, 9))
    assert graph["0"].attrs["padding"] == (2,)


class _Classifier(nn.Module):
    def __init__(self, last):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.last = last if isinstance(last, nn.Module) else None
        self.fn = None if isinstance(last, nn.Module) else last

    def forward(self, x):
        return self.last(self.fc(x)) if self.last is not None else self.fn(self.fc(x))


@pytest.mark.parametrize("last, kind", [(nn.LogSoftmax(dim=1), "log_softmax"), (nn.Softmax(-1), "softmax"),
                                        (lambda y: F.log_softmax(y, dim=1), "log_softmax"),
                                        (lambda y: y.softmax(-1), "softmax")])
def test_a_softmax_at_the_output_is_left_out(last, kind):
    """Monotone: the deployed graph returns the logits (same argmax), and says what it left out."""
    torch.manual_seed(4)
    model = _Classifier(last)
    graph, params = trace(model, (4,))
    assert ops(graph) == ["input", "linear"] and graph.output_transform == kind
    x = torch.randn(5, 4)
    logits = run_float(graph, params, x)
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(torch.log_softmax(logits, 1) if kind == "log_softmax" else torch.softmax(logits, 1), want,
                          atol=1e-6)
    assert trace(nn.Sequential(nn.Linear(4, 3)), (4,))[0].output_transform == ""


def test_in_place_activations():
    torch.manual_seed(5)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(self.c1(x))
            y += self.c2(y)
            return F.relu(y, inplace=True).relu_()

    graph = check_float(M(), IMG)
    assert ops(graph) == ["input", "conv", "conv", "add", "act"]


def test_an_in_place_op_whose_result_is_dropped_is_refused():
    """fx does not see ``x.relu_()`` change x: the layers after it would read x before it."""
    with pytest.raises(UnsupportedLayerError, match="x = x.relu_"):
        trace(Fn(lambda m, x: (m.c(x).relu_(), None)[1] or m.c(x), c=conv()), IMG)


class _Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2.0)


def test_errors_name_the_users_source_line_and_the_closest_supported_form():
    with pytest.raises(UnsupportedLayerError) as info:
        trace(_Upsampling(), IMG)
    msg = str(info.value)
    assert "test_convert.py:" in msg and "`return F.interpolate(self.conv(x), scale_factor=2.0)`" in msg
    assert "upsampling is not supported" in msg


# --- shapes and structure ------------------------------------------------------------------------

def test_shapes_exclude_batch_and_weights_recorded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = F.relu(self.c1(x))
            y = self.c2(y) + y
            return self.fc(torch.flatten(self.pool(y), 1))

    graph = check_float(M(), (3, 8, 8))
    assert graph.input.name == "input" and graph.input.out_shape == (3, 8, 8)
    assert graph["c1"].out_shape == (8, 4, 4) and graph["c1"].weight_shape == (8, 3, 3, 3)
    assert graph["c2"].weight_shape == (8, 1, 3, 3) and graph["c2"].attrs["groups"] == 8
    assert graph["add"].in_shapes == [(8, 4, 4), (8, 4, 4)]
    assert graph["pool"].out_shape == (8, 1, 1)
    assert graph["fc"].out_shape == (5,)
    assert graph.output == "fc"
    assert [n.name for n in graph.weighted()] == ["c1", "c2", "fc"]
    assert graph["c1"].macs == 8 * 3 * 9 * 16 and graph["fc"].macs == 40


def test_grid_and_buffer_sources():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    graph, _ = trace(model, (1, 4, 4))
    assert graph.grid_source("2") == "0"  # flatten -> maxpool -> conv
    assert graph.buffer_source("2") == "1"  # flatten is a view of the pool's buffer
    assert graph.grid_source("0") == "0"
    assert [u.name for u in graph.users("0")] == ["1"]


# --- unsupported constructs --------------------------------------------------------------------

class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        for k, v in modules.items():
            setattr(self, k, v)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x)
        return y


class Param(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(2, 4, 4))

    def forward(self, x):
        return x + self.p


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x), x


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


conv = lambda **kw: nn.Conv2d(2, 2, 3, **kw)  # noqa: E731
IMG = (2, 4, 4)

UNSUPPORTED = {
    "interpolate": (Fn(lambda m, x: F.interpolate(x, scale_factor=2.0)), IMG, "interpolate"),
    "softplus": (Fn(lambda m, x: m.act(x), act=nn.Softplus()), IMG, "act"),
    "lstm": (LSTMModel(), (5, 3), "lstm"),
    "mul-scalar": (Fn(lambda m, x: m.a(x) * 2.0, a=conv()), IMG, "mul"),
    "mul-broadcast-spatial": (Fn(lambda m, x: m.a(x) * m.a(x).mean(1, keepdim=True), a=conv()), IMG, "mean"),
    "bn-first": (nn.Sequential(nn.BatchNorm2d(2)), IMG, "0"),
    "bn-after-relu": (nn.Sequential(conv(), nn.ReLU(), nn.BatchNorm2d(2)), IMG, "2"),
    "bn-after-pool": (nn.Sequential(conv(), nn.MaxPool2d(2), nn.BatchNorm2d(2)), IMG, "2"),
    "bn-shared-conv": (Fn(lambda m, x: (lambda y: m.bn(y) + y)(m.c(x)), c=conv(), bn=nn.BatchNorm2d(2)), IMG, "bn"),
    "avgpool-divisor": (nn.Sequential(nn.AvgPool2d(3, 1, padding=1, divisor_override=2)), IMG, "0"),
    "adaptive-nondividing": (nn.Sequential(nn.AdaptiveAvgPool2d(3)), IMG, "0"),
    "adaptive-1d-nondividing": (nn.Sequential(nn.AdaptiveAvgPool1d(4)), (2, 6), "0"),
    "maxpool-ceil": (nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True)), IMG, "0"),
    "maxpool-dilated": (nn.Sequential(nn.MaxPool2d(2, dilation=2)), IMG, "0"),
    "conv-reflect": (nn.Sequential(conv(padding=1, padding_mode="reflect")), IMG, "0"),
    "pad-crop": (Fn(lambda m, x: m.c(F.pad(x, (0, -1, 0, 1))), c=conv()), IMG, "pad"),
    "pad-reflect": (Fn(lambda m, x: m.c(F.pad(x, (1, 1, 1, 1), mode="reflect")), c=conv()), IMG, "pad"),
    "conv3d": (nn.Sequential(nn.Conv3d(1, 1, 1)), (1, 2, 2, 2), "0"),
    "flatten-all": (Fn(lambda m, x: torch.flatten(x)), IMG, "flatten"),
    "flatten-start0": (nn.Sequential(nn.Flatten(0)), IMG, "0"),
    "flatten-partial": (nn.Sequential(nn.Flatten(2)), IMG, "0"),
    "view-partial": (Fn(lambda m, x: x.view(x.size(0), 2, -1)), IMG, "view"),
    "add-scalar": (Fn(lambda m, x: x + 1.0), IMG, "add"),
    "add-broadcast": (Fn(lambda m, x: m.c(x) + x, c=nn.Conv2d(2, 1, 3, padding=1)), IMG, "add"),
    "add-param": (Param(), IMG, "p"),
    "softmax-inside": (nn.Sequential(nn.Linear(3, 2), nn.Softmax(-1), nn.Linear(2, 2)), (3,), "1"),
    "mean-channels": (Fn(lambda m, x: x.mean(1)), IMG, "mean"),
    "cat-spatial": (Fn(lambda m, x: torch.cat([x, x], dim=2)), IMG, "cat"),
    "cat-batch": (Fn(lambda m, x: torch.cat([x, x])), IMG, "cat"),
    "slice-spatial": (Fn(lambda m, x: x[:, :, 1:3]), IMG, "slice"),
    "slice-step": (Fn(lambda m, x: x[:, ::2]), IMG, "slice"),
    "split-spatial": (Fn(lambda m, x: x.split(2, dim=2)[0]), IMG, "split"),
    "upsample": (nn.Sequential(nn.Conv2d(2, 2, 1), nn.Upsample(scale_factor=2)), IMG, "1"),
    "functional-maxpool-ceil": (Fn(lambda m, x: F.max_pool2d(x, 3, 2, ceil_mode=True)), IMG, "max_pool2d"),
    "tuple-output": (Pair(), IMG, "output"),
    "two-inputs": (TwoInputs(), IMG, "y"),
}


@pytest.mark.parametrize("model, shape, node", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_raises_naming_node_and_supported_set(model, shape, node):
    with pytest.raises(UnsupportedLayerError) as info:
        trace(model, shape)
    msg = str(info.value)
    assert f"'{node}'" in msg
    assert SUPPORTED in msg
    assert isinstance(info.value, ValueError)


def test_untraceable_model_raises_unsupported():
    with pytest.raises(UnsupportedLayerError, match="could not trace") as info:
        trace(Branchy(), IMG)
    assert SUPPORTED in str(info.value)
