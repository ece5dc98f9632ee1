import gzip
import shutil

import numpy as np
import pytest
import torch

from mixprec.data import DatasetError, load_dataset
from mixprec.data.mnist import read_idx

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")
# Published digit counts of the MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def mnist(shared_datasets):
    return load_dataset("mnist", shared_datasets, seed=0)


@pytest.fixture
def mnist_copy(shared_datasets, tmp_path):
    """A writable copy of the real files, in a folder with no SHA256SUMS."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in FILES:
        shutil.copyfile(shared_datasets / "mnist" / name, folder / name)
    return folder


def test_mnist_splits_sizes_labels_and_pixel_stats(mnist):
    assert mnist.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    train_counts = torch.bincount(torch.cat([mnist.y_train, mnist.y_val]), minlength=10).tolist()
    assert train_counts == TRAIN_COUNTS
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == TEST_COUNTS
    # Stratified: every class keeps its share of the 5000 validation images (within one image).
    val_counts = torch.bincount(mnist.y_val, minlength=10).numpy()
    assert np.all(np.abs(val_counts - np.array(TRAIN_COUNTS) * 5000 / 60000) < 1)
    # Standardised with the usual MNIST mean/std: train pixels ~ N(0, 1), range [-0.4242, 2.8215].
    assert abs(float(mnist.x_train.mean())) < 0.01 and abs(float(mnist.x_train.std()) - 1) < 0.01
    assert float(mnist.x_test.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert float(mnist.x_test.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert mnist.augment is None and mnist.classes == tuple("0123456789")


def test_mnist_records_its_normalisation(mnist, shared_datasets):
    pre = mnist.preprocessing
    assert (pre.raw_divisor, pre.mean, pre.std) == (255.0, (0.1307,), (0.3081,))
    pixels = read_idx(shared_datasets / "mnist" / "t10k-images-idx3-ubyte.gz", 3)[:, None]
    assert np.array_equal(pre.apply(pixels).astype(np.float32), mnist.x_test.numpy())


def test_unit_scale_keeps_pixels_in_0_1_and_records_it(mnist, shared_datasets):
    unit = load_dataset("mnist[scale=unit, val_size=5000]", shared_datasets, seed=0)
    pre = unit.preprocessing
    assert (pre.raw_divisor, pre.mean, pre.std) == (255.0, (0.0,), (1.0,))
    assert float(unit.x_test.min()) == 0.0 and float(unit.x_test.max()) == 1.0
    pixels = read_idx(shared_datasets / "mnist" / "t10k-images-idx3-ubyte.gz", 3)[:, None]
    assert np.array_equal(pre.apply(pixels).astype(np.float32), unit.x_test.numpy())
    assert torch.equal(unit.y_val, mnist.y_val)  # the same split, only the scaling differs


@pytest.mark.parametrize("name, message", [
    ("mnist[scale=raw]", "choose one of standard, unit"),
    ("mnist[colour=red]", "no option colour; its options: val_size, scale"),
    ("mnist[val_size=many]", "val_size='many' must be an integer"),
    ("mnist[scale]", "is not KEY=VALUE"),
    ("mnist[scale=unit", "options go in brackets")])
def test_data_options_are_checked(shared_datasets, name, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[")):
        load_dataset(name, shared_datasets)


def test_mnist_split_is_seeded_and_keeps_the_official_test_set(mnist, shared_datasets):
    again = load_dataset("mnist", shared_datasets, seed=0)
    other = load_dataset("mnist", shared_datasets, seed=1)
    assert torch.equal(again.y_val, mnist.y_val) and torch.equal(again.x_val, mnist.x_val)
    assert not torch.equal(other.x_val, mnist.x_val)
    assert torch.equal(other.x_test, mnist.x_test)


def test_mnist_from_the_environment_variable(shared_datasets, monkeypatch):
    monkeypatch.setenv("MIXPREC_DATA", str(shared_datasets))
    assert load_dataset("mnist").sizes()["test"] == 10000


def test_truncated_gzip_names_the_file(mnist_copy):
    path = mnist_copy / "train-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", mnist_copy.parent)


def test_corrupt_byte_in_the_middle_names_the_file(mnist_copy):
    path = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", mnist_copy.parent)


def test_corrupt_copy_listed_in_sha256sums_fails_the_checksum(mnist_copy, shared_datasets):
    shutil.copyfile(shared_datasets / "SHA256SUMS", mnist_copy.parent / "SHA256SUMS")
    path = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: SHA-256 [0-9a-f]{64} does not match"):
        load_dataset("mnist", mnist_copy.parent)


def test_truncated_idx_payload_and_wrong_magic_are_caught(tmp_path):
    good = np.arange(12, dtype=np.uint8)
    header = bytes([0, 0, 8, 1]) + (12).to_bytes(4, "big")
    path = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:  # a valid gzip whose idx payload is one byte short
        f.write(header + good.tobytes()[:-1])
    with pytest.raises(DatasetError, match="payload is 11 bytes"):
        read_idx(path, 1)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + good.tobytes())
    with pytest.raises(DatasetError, match="magic 0x00000803, expected 0x00000801"):
        read_idx(path, 1)
    raw = tmp_path / "labels-idx1-ubyte"  # an extracted (not gzipped) file reads the same
    raw.write_bytes(header + good.tobytes())
    assert np.array_equal(read_idx(raw, 1, (12,)), good)
    with pytest.raises(DatasetError, match=r"dimensions \(12,\), expected \(10,\)"):
        read_idx(raw, 1, (10,))


def test_missing_directory_names_the_file_and_every_place_looked(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path / "nowhere")
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz not found" in msg
    for place in ("mnist/train-images-idx3-ubyte.gz", "MNIST/raw/train-images-idx3-ubyte",
                  "nowhere/train-images-idx3-ubyte.gz"):
        assert str(tmp_path / "nowhere") in msg and place in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg


def test_fashion_mnist_looks_in_its_own_folders(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert "fashion-mnist/train-images-idx3-ubyte.gz" in msg and "FashionMNIST/raw/" in msg
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com" in msg


def test_fashion_mnist_loads_idx_files_with_its_own_normalisation(mnist_copy, caplog):
    # The real MNIST bytes stand in for Fashion-MNIST's (same format); their MD5s differ from
    # Fashion-MNIST's official ones, which only warns.
    fashion = mnist_copy.rename(mnist_copy.parent / "fashion-mnist")
    ds = load_dataset("fashion-mnist", fashion.parent)
    assert ds.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert float(ds.x_test.min()) == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    assert ds.classes[0] == "T-shirt/top"
    assert "differs from the official" in caplog.text
