import io
import logging
import os
import pickle
import random
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mixprec.data import DatasetError, load_dataset
from mixprec.data import cifar
from mixprec.data.augment import RandomCropFlip

CLASSES = cifar.CLASSES


def test_real_archive_decodes_once_then_loads_from_cache(shared_datasets, session_cache, monkeypatch):
    start = time.perf_counter()
    ds = load_dataset("cifar10", shared_datasets, seed=0)
    first = time.perf_counter() - start
    assert ds.sizes() == {"train": 45000, "val": 5000, "test": 10000}
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.classes == CLASSES
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.bincount(torch.cat([ds.y_train, ds.y_val]), minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.y_val, minlength=10).tolist() == [500] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    # Standardised per channel with CIFAR-10's own mean/std; JPEG re-encoding moves them a little.
    assert ds.x_train.mean((0, 2, 3)).abs().max() < 0.02
    assert (ds.x_train.std((0, 2, 3)) - 1).abs().max() < 0.02
    assert isinstance(ds.augment, RandomCropFlip) and ds.augment.padding == 4
    assert len(list(session_cache.glob("cifar10-*.npz"))) == 1
    x_val, y_test = ds.x_val[:100].clone(), ds.y_test.clone()
    del ds

    # The second load reads the cache only: decoding now would fail the test.
    monkeypatch.setattr(cifar, "_decode_chunk", lambda items: (_ for _ in ()).throw(AssertionError("decoded")))
    start = time.perf_counter()
    again = load_dataset("cifar10", shared_datasets, seed=0)
    cached = time.perf_counter() - start
    assert torch.equal(again.x_val[:100], x_val) and torch.equal(again.y_test, y_test)
    # Shown with `pytest --log-cli-level=INFO`.
    logging.getLogger(__name__).info("cifar10 from the real archive: first load %.1fs, cached load %.2fs",
                                     first, cached)
    assert cached < 10  # about 1 s on an idle 2-core machine; generous for a busy one


@pytest.fixture(scope="session")
def real_jpegs(shared_datasets):
    """Two real JPEGs per (split, class), read from the shared archive: {(split, class): [(name, bytes)]}."""
    want = {(s, c): [] for s in ("train", "test") for c in CLASSES}
    with tarfile.open(shared_datasets / "cifar10" / "cifar10-jpg.tar.gz", "r|gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and len(want.get((parts[0], parts[1]), [1, 1])) < 2:
                want[parts[0], parts[1]].append((parts[2], tf.extractfile(member).read()))
                if all(len(v) == 2 for v in want.values()):
                    break
    return want


def write_folders(root, images):
    for (split, cls), files in images.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / split / cls / name).write_bytes(data)


def write_tar(path, images, prefix="", mode="w", replace=None):
    """The images as a tar (members shuffled, as real archives are), optionally one replaced."""
    members = [(f"{prefix}{split}/{cls}/{name}", data) for (split, cls), files in images.items()
               for name, data in files]
    random.Random(0).shuffle(members)
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            if replace and name.endswith(replace[0]):
                data = replace[1]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_small_folder_tar_and_targz_give_the_same_arrays(real_jpegs, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path / "cache"))
    folder, tar, targz = tmp_path / "folder", tmp_path / "tar", tmp_path / "targz"
    write_folders(folder / "cifar10", real_jpegs)
    (tar / "cifar10").mkdir(parents=True)
    write_tar(tar / "cifar10" / "cifar10-jpg.tar", real_jpegs)
    targz.mkdir()  # an unknown name, a top-level folder inside: found by looking into the archive
    write_tar(targz / "snapshot.tar.gz", real_jpegs, prefix="cifar/", mode="w:gz")

    a = load_dataset("cifar10", folder, val_size=10, workers=1)
    b = load_dataset("cifar10", tar, val_size=10, workers=2)
    c = load_dataset("cifar10", targz, val_size=10)
    assert a.sizes() == {"train": 10, "val": 10, "test": 20}
    for other in (b, c):
        for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            assert torch.equal(getattr(a, field), getattr(other, field)), field
    # Test images come sorted by class then file name; check one against PIL directly.
    name, data = sorted(real_jpegs["test", "cat"])[1]
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    expected = (expected - np.array(cifar.MEAN)[:, None, None]) / np.array(cifar.STD)[:, None, None]
    assert a.y_test[2 * 3 + 1] == 3
    assert np.allclose(a.x_test[2 * 3 + 1].numpy(), expected, atol=1e-5)
    caches = sorted((tmp_path / "cache").glob("cifar10-*.npz"))
    assert len(caches) == 3


def test_a_damaged_cache_is_rebuilt(real_jpegs, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cifar10").mkdir()
    write_tar(tmp_path / "cifar10" / "cifar10-jpg.tar", real_jpegs)
    first = load_dataset("cifar10", tmp_path, val_size=10)
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        again = load_dataset("cifar10", tmp_path, val_size=10)
    assert "ignoring unreadable cache" in caplog.text
    assert torch.equal(first.x_test, again.x_test)
    assert cache.stat().st_size > 1000 and not list((tmp_path / "cache").glob(".*tmp"))


def test_corrupt_member_names_archive_and_member(real_jpegs, tmp_path):
    (tmp_path / "cifar10").mkdir()
    bad_name, good = real_jpegs["train", "dog"][0]
    archive = tmp_path / "cifar10" / "cifar10-jpg.tar.gz"
    write_tar(archive, real_jpegs, mode="w:gz", replace=(f"dog/{bad_name}", good[: len(good) // 3]))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path, val_size=10)
    assert "cifar10-jpg.tar.gz" in str(e.value) and f"train/dog/{bad_name}" in str(e.value)

    write_tar(archive, real_jpegs, mode="w:gz", replace=(f"dog/{bad_name}", b"not an image"))
    with pytest.raises(DatasetError, match=f"train/dog/{bad_name}"):
        load_dataset("cifar10", tmp_path, val_size=10, workers=1)


def test_truncated_archive_names_the_archive(real_jpegs, tmp_path):
    (tmp_path / "cifar10").mkdir()
    archive = tmp_path / "cifar10" / "cifar10-jpg.tar.gz"
    write_tar(archive, real_jpegs, mode="w:gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DatasetError, match=r"cifar10-jpg.tar.gz: truncated or corrupt archive at member"):
        load_dataset("cifar10", tmp_path, val_size=10)


def test_unknown_class_folder_is_an_error(real_jpegs, tmp_path):
    images = dict(real_jpegs)
    images["train", "unicorn"] = images.pop(("train", "horse"))
    write_folders(tmp_path / "cifar10", images)
    with pytest.raises(DatasetError, match="class folder 'unicorn'"):
        load_dataset("cifar10", tmp_path, val_size=10)


def official_batches(folder, n_train=8, n_test=10, seed=0):
    """Batches in the official format: pickled dicts with bytes keys, uint8 (N, 3072) rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = (data, labels)
    return batches


def test_official_pickle_batches_folder_and_archive(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path / "cache"))
    batches = official_batches(tmp_path / "plain" / "cifar-10-batches-py")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("cifar10", tmp_path / "plain", val_size=10)
    assert "MD5 differs from the official" in caplog.text  # synthetic batches, official names
    assert ds.sizes() == {"train": 30, "val": 10, "test": 10}
    data, labels = batches["test_batch"]
    assert ds.y_test.tolist() == labels
    mean, std = np.array(cifar.MEAN)[:, None, None], np.array(cifar.STD)[:, None, None]
    expected = (data.reshape(-1, 3, 32, 32) / 255 - mean) / std
    assert np.allclose(ds.x_test.numpy(), expected, atol=1e-5)
    assert (ds.preprocessing.raw_divisor, ds.preprocessing.mean, ds.preprocessing.std) == (255.0, cifar.MEAN, cifar.STD)
    assert np.allclose(ds.preprocessing.apply(data.reshape(-1, 3, 32, 32)), ds.x_test.numpy(), atol=1e-5)

    archive_dir = tmp_path / "archive" / "cifar10"
    archive_dir.mkdir(parents=True)
    with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "plain" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_archive = load_dataset("cifar10", tmp_path / "archive", val_size=10)
    assert torch.equal(from_archive.x_train, ds.x_train) and torch.equal(from_archive.y_val, ds.y_val)


def test_pickle_batches_may_not_run_code(tmp_path):
    official_batches(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(DatasetError, match=r"data_batch_3: not a readable CIFAR batch .*not allowed"):
        load_dataset("cifar10", tmp_path, val_size=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"labels": []}))
    with pytest.raises(DatasetError, match=r"data_batch_3: a CIFAR batch needs keys"):
        load_dataset("cifar10", tmp_path, val_size=10)


def test_missing_cifar_names_the_places_and_the_official_url(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert str(tmp_path / "cifar10" / "cifar10-jpg.tar.gz") in msg
    assert cifar.ARCHIVE_URL in msg and "download=True" in msg
