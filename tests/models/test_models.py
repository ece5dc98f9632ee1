"""Reference models: published parameter counts, shapes, fx-traceability, the registry."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from mixprec.models import MODELS, get_model, get_spec, input_shape, list_models

# name -> (PyTorch parameters == Keras "Trainable params", Keras "Total params" or None).
# Keras counts BatchNorm moving mean/variance as parameters; PyTorch keeps them as buffers.
PUBLISHED_PARAMS = {
    "lenet5": (61_706, None),  # classic LeNet-5 with 10 outputs
    "resnet8": (78_186, 78_666),  # mlcommons/tiny image_classification resnet_v1_eembc
    "dscnn": (23_756, 24_908),  # mlcommons/tiny KWS; NXP eIQ model zoo lists 23,756
    "mobilenetv1-0.25": (216_322, 221_794),  # mlcommons/tiny VWW; NXP eIQ model zoo: 221,794
    "fc-autoencoder": (267_928, 269_992),  # mlcommons/tiny anomaly detection (ToyCar)
    "jet-mlp": (4_389, None),  # 16-64-32-32-5
    "mnist-mlp": (52_650, None),  # 784-64-32-10 (HGQ2's MNIST MLP)
    "digits-mlp": (3_466, None),  # 64-32-32-10
    "mobilenetv2": (3_504_872, None),  # torchvision mobilenet_v2
    "efficientnet-lite0": (4_652_008, None),  # timm efficientnet_lite0
}

ALLOWED_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten,
)
ALLOWED_FUNCTIONS = (operator.add, torch.flatten)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_keras_total(model: nn.Module) -> int:
    stats = sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
    )
    return count_params(model) + stats


def test_list_models():
    assert list_models() == [
        "digits-cnn", "lenet5", "resnet8", "dscnn", "mobilenetv1-0.25",
        "fc-autoencoder", "jet-mlp", "mnist-mlp", "digits-mlp", "mobilenetv2", "efficientnet-lite0",
    ]


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name):
    model = get_model(name)
    trainable, keras_total = PUBLISHED_PARAMS[name]
    assert count_params(model) == trainable
    if keras_total is not None:
        assert count_keras_total(model) == keras_total


def test_digits_cnn_is_small():
    assert 5_000 <= count_params(get_model("digits-cnn")) <= 15_000


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shape(name):
    spec = get_spec(name)
    model = get_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_shape(name)))
    expected = (spec.num_classes,) if spec.num_classes is not None else spec.input_shape
    assert tuple(out.shape) == (2, *expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_graph_uses_only_supported_ops(name):
    model = get_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            assert isinstance(module, ALLOWED_MODULES), f"{node.target}: {type(module).__name__}"
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                # Foldable: the BatchNorm reads the output of a conv/linear directly.
                producer = node.args[0]
                assert producer.op == "call_module"
                assert isinstance(modules[producer.target], (nn.Conv1d, nn.Conv2d, nn.Linear))
            if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
                assert module.output_size in (1, (1, 1))
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, f"{node.name}: {node.target}"
        else:
            assert node.op in ("placeholder", "output"), f"{node.name}: {node.op} {node.target}"
    x = torch.randn(1, *input_shape(name))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_residual_models_trace_to_adds():
    for name, adds in (("resnet8", 3), ("mobilenetv2", 10), ("efficientnet-lite0", 9)):
        graph = torch.fx.symbolic_trace(get_model(name)).graph
        assert sum(n.target is operator.add for n in graph.nodes) == adds, name


def test_builder_kwargs_are_passed():
    model = get_model("resnet8", num_classes=3).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    half = get_model("mobilenetv2", width_mult=0.5, num_classes=10)
    assert count_params(half) < count_params(get_model("mobilenetv2", num_classes=10))


def test_builder_arguments_in_the_name():
    assert count_params(get_model("lenet5[width=0.5]")) == count_params(get_model("lenet5", width=0.5)) < 20_000
    assert count_params(get_model("resnet8[width=8]")) < count_params(get_model("resnet8"))
    assert get_spec("resnet8[width=8]").name == "resnet8"
    with pytest.raises(ValueError, match="key=value"):
        get_model("lenet5[0.5]")
    with pytest.raises(ValueError, match="lenet5\\[depth=3\\]"):
        get_model("lenet5[depth=3]")


def test_unknown_name_lists_models_and_explains_import_form():
    with pytest.raises(ValueError) as err:
        get_model("resnet9")
    message = str(err.value)
    assert "resnet8" in message and "efficientnet-lite0" in message
    assert "package.module:function" in message
    with pytest.raises(ValueError):
        input_shape("resnet9")


# A user model, imported back through the "package.module:function" form.
def user_model(num_classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))


user_model.input_shape = (3, 4)


def user_model_without_shape() -> nn.Module:
    return nn.Linear(2, 2)


def not_a_model() -> str:
    return "nope"


def test_import_user_model():
    reference = f"{__name__}:user_model"
    model = get_model(reference, num_classes=7)
    assert input_shape(reference) == (3, 4)
    assert model(torch.randn(2, *input_shape(reference))).shape == (2, 7)


def test_user_model_without_shape_must_be_given_one():
    reference = f"{__name__}:user_model_without_shape"
    assert isinstance(get_model(reference), nn.Linear)
    with pytest.raises(ValueError, match="input_shape"):
        input_shape(reference)


def test_bad_user_references():
    with pytest.raises(ValueError, match="Cannot import"):
        get_model("mixprec_no_such_module:net")
    with pytest.raises(ValueError, match="Cannot import"):
        get_model(f"{__name__}:no_such_function")
    with pytest.raises(ValueError, match="package.module:function"):
        get_model(":net")
    with pytest.raises(TypeError, match="nn.Module"):
        get_model(f"{__name__}:not_a_model")
