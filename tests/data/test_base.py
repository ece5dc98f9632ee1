import numpy as np
import pytest

from mixprec.data import DatasetError, Splits, list_datasets, load_dataset, stratified_split


def test_every_loader_registers():
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "jets"} <= set(list_datasets())
    with pytest.raises(DatasetError, match="npz:PATH"):
        load_dataset("cifar-100")


@pytest.mark.parametrize("held", [0, 1, 7, 5000, 5999])
def test_an_int_holds_out_exactly_that_many_in_proportion(held):
    y = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    keep, out = stratified_split(y, held, seed=3)
    assert len(out) == held and len(keep) + held == len(y)
    assert not set(keep) & set(out)
    share = np.bincount(y[out], minlength=10) - np.bincount(y, minlength=10) * held / len(y)
    assert np.all(np.abs(share) < 1)


def test_a_fraction_still_rounds_per_class():
    y = np.repeat(np.arange(3), [10, 15, 25])
    _, out = stratified_split(y, 0.1, seed=0)
    assert np.bincount(y[out]).tolist() == [1, 2, 2]  # round(1.5) == 2, round(2.5) == 2


def test_splits_keep_positional_construction():
    import torch

    z = torch.zeros(1, 2)
    s = Splits("t", z, z[:, 0].long(), z, z[:, 0].long(), z, z[:, 0].long(), 2)
    assert s.classes is None and s.augment is None and s.input_shape == (2,)
