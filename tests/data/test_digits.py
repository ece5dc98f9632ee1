import numpy as np
import pytest
import torch

from mixprec.data import DatasetError, load_dataset


def test_digits_splits_are_disjoint_stratified_and_scaled(digits):
    sizes = digits.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    assert digits.input_shape == (1, 8, 8)
    assert 0.0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1.0
    for y in (digits.y_train, digits.y_val, digits.y_test):
        assert set(torch.unique(y).tolist()) == set(range(10))


def test_digits_record_their_scaling(digits):
    """Pixel counts 0..16 divided by 16: the record maps the raw counts onto the loader's inputs."""
    pre = digits.preprocessing
    assert (pre.raw_divisor, pre.mean, pre.std) == (16.0, (0.0,), (1.0,))
    counts = np.round(digits.x_test.numpy() * 16)
    assert counts.min() == 0 and counts.max() == 16
    assert np.array_equal(pre.apply(counts).astype(np.float32), digits.x_test.numpy())


def test_digits_split_is_reproducible_and_seed_dependent():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, c.x_test)


def test_unknown_dataset_lists_available():
    with pytest.raises(DatasetError, match="available: .*digits"):
        load_dataset("imagenet-22k")
