"""The converter's corpus (``user_models``): each model converts as written, its integer evaluation
equals the NumPy reference exactly, and at 8 bits it stays close to the float model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mixprec
from mixprec import execute

from .user_models import CORPUS


def _randomized(builder):
    torch.manual_seed(0)
    model = builder()
    for m in model.modules():  # trained-looking BatchNorm statistics, so folding matters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", CORPUS)
def test_the_model_converts_and_its_integer_evaluation_is_exact(name):
    builder, shape = CORPUS[name]
    model = _randomized(builder)
    qm = mixprec.quantize(model, "generic", shape, bits=8)
    x = torch.rand(256, *shape) * 2 - 1
    qm.calibrate([x])
    qm.eval()
    ig = qm.lower()
    with torch.no_grad():
        got = qm(x[:64])
    want = np.asarray(execute.reference(ig, x[:64].numpy())) * ig.output_scale
    assert np.array_equal(got.numpy(), want.astype(np.float32))
    with torch.no_grad():
        reference = model(x[:64])
    if qm.graph.output_transform == "softmax":
        reference = torch.log(reference)
    if qm.graph.output_transform:  # the deployed model returns logits: compare log-probabilities
        got = torch.log_softmax(got, 1)
        reference = torch.log_softmax(reference, 1)
    error = float((got - reference).norm() / reference.norm())
    assert error < 0.05, f"8-bit output {error:.1%} away from the float model's"


def test_a_tutorial_model_runs_end_to_end_as_written(tmp_path):
    """Float training hands the model tensors of ordinary memory layout (the digits split's one channel
    once carried channels-last strides, and ``view`` after a conv failed); the result says the
    deployed model returns logits."""
    from mixprec.search import RunConfig, run_search

    cfg = RunConfig(model="tests.graph.user_models:DigitsTutorialNet", float_epochs=2, qat_epochs=1, budget_epochs=0)
    result = run_search(cfg, tmp_path / "run")
    assert result["reference_mismatches"] == 0 and result["accuracy"]["quantized"] > 0.5
    assert "log_softmax at the output is left out" in result["deployed_output"]


def test_batches_have_the_strides_of_a_fresh_tensor():
    from mixprec.train.loop import batches, row_major

    x = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 8, 8, 1).permute(0, 3, 1, 2)  # one channel, NHWC strides
    assert x.is_contiguous() and x.stride() == (64, 1, 8, 1)
    fresh = row_major(x)
    assert fresh.stride() == (64, 64, 8, 1) and fresh.data_ptr() == x.data_ptr() and torch.equal(fresh, x)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    for xb, _ in batches(x, torch.zeros(4), 2):
        conv(xb).view(len(xb), -1)  # channels-last memory would refuse this view
    assert not conv(x).is_contiguous()  # what the user's model got before


@pytest.mark.parametrize("name", ["DenseBlock", "SiLUConvNet", "MobileNetV3SE", "SEResNet", "ShuffleUnit"])
def test_a_quick_search_per_family(tmp_path, name):
    """Concatenation, lookup-table activations, squeeze-and-excitation products and channel slices
    train, quantize and deploy on digits from the model code as written: integer-exact, above chance,
    near the float model."""
    from mixprec.search import RunConfig, run_search

    cfg = RunConfig(model=f"tests.graph.user_models:{name}", data="digits", target="cortex-m4", float_epochs=8,
                    qat_epochs=1, budget_epochs=0)
    result = run_search(cfg, tmp_path / "run")
    acc = result["accuracy"]
    assert result["reference_mismatches"] == 0 and not result["degenerate"]
    assert acc["quantized"] > 3 * acc["chance"] and acc["quantized"] > acc["float"] - 0.05
