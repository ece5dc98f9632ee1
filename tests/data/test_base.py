import numpy as np
import pytest

from mixprec.data import DatasetError, Preprocessing, Splits, list_datasets, load_dataset, stratified_split


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


def test_preprocessing_applies_per_channel_blocks_and_round_trips():
    pre = Preprocessing(255.0, (0.5, 0.25), (0.5,), raw="pixels")
    assert pre.channels == 2 and pre.per_channel() == ((0.5, 0.25), (0.5, 0.5)) and not pre.is_identity
    raw = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)  # (N, C, W)
    want = (raw / 255.0 - np.array([0.5, 0.25])[:, None]) / 0.5
    assert np.array_equal(pre.apply(raw), want)
    # axes of size 1 do not move the channel blocks
    assert np.array_equal(pre.apply(raw.reshape(2, 1, 2, 3)), want.reshape(2, 1, 2, 3))
    assert Preprocessing.from_dict({**pre.to_dict(), "input_scale": 0.1}) == pre
    assert Preprocessing().is_identity and Preprocessing.from_dict({}) == Preprocessing()
    with pytest.raises(ValueError, match="do not split into 2 channels"):
        pre.apply(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="one per channel"):
        Preprocessing(1.0, (0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive std"):
        Preprocessing(1.0, 0.0, 0.0)
