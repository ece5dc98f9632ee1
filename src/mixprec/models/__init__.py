"""Reference models in plain ``torch.nn``, built only from layers the fx converter supports.

    >>> from mixprec.models import get_model, input_shape, list_models
    >>> model = get_model("resnet8", num_classes=10)
    >>> input_shape("resnet8")
    (3, 32, 32)

Names: digits-cnn, lenet5, resnet8, dscnn, mobilenetv1-0.25, fc-autoencoder, jet-mlp, mnist-mlp, digits-mlp,
mobilenetv2, efficientnet-lite0, or "package.module:function" for a model of your own
(see ``mixprec.models.registry``).
"""
from mixprec.models.imagenet import efficientnet_lite0, mobilenet_v2
from mixprec.models.registry import MODELS, ModelSpec, get_model, get_spec, input_shape, list_models
from mixprec.models.small import digits_cnn, digits_mlp, jet_mlp, lenet5, mnist_mlp
from mixprec.models.tiny import dscnn, fc_autoencoder, mobilenet_v1, mobilenetv1_025, resnet8

__all__ = [
    "MODELS",
    "ModelSpec",
    "digits_cnn",
    "digits_mlp",
    "dscnn",
    "efficientnet_lite0",
    "fc_autoencoder",
    "get_model",
    "get_spec",
    "input_shape",
    "jet_mlp",
    "lenet5",
    "mnist_mlp",
    "list_models",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenetv1_025",
    "resnet8",
]
