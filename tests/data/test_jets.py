import gzip

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from mixprec.data import DatasetError, load_dataset
from mixprec.data.jets import CLASSES, FEATURES, read_table


def synthetic(n=500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=np.arange(16) * 10, scale=np.arange(1, 17), size=(n, 16))
    x[:, -1] = rng.integers(5, 80, n)  # multiplicity is a count
    labels = np.array(CLASSES)[rng.permutation(np.arange(n) % 5)]
    return x, labels


def write_arff(path, x, labels, quote=False):
    """The layout OpenML serves for hls4ml_lhc_jets_hlf: numeric features, then a nominal class."""
    lines = ["% hls4ml jets, synthetic", "@RELATION hls4ml_lhc_jets_hlf", ""]
    lines += [f"@ATTRIBUTE {name} NUMERIC" for name in FEATURES]
    lines += ["@ATTRIBUTE class {'g','q','t','w','z'}" if quote else "@ATTRIBUTE class {g,q,t,w,z}", "", "@DATA"]
    q = "'" if quote else ""
    lines += [",".join(f"{v:.6g}" for v in row) + f",{q}{c}{q}" for row, c in zip(x, labels)]
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def write_csv(path, x, labels):
    rows = [",".join([*FEATURES, "class"])]
    rows += [",".join(f"{v:.6g}" for v in row) + f",{c}" for row, c in zip(x, labels)]
    path.write_text("\n".join(rows) + "\n")


def tutorial_recipe(x, labels):
    """The hls4ml tutorial: LabelEncoder, train_test_split(0.2, 42), StandardScaler on the 80%."""
    y = np.searchsorted(np.array(sorted(set(labels))), labels)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=42)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def test_arff_loads_with_the_tutorial_split_and_scaling(tmp_path):
    x, labels = synthetic()
    (tmp_path / "jets").mkdir()
    write_arff(tmp_path / "jets" / "hls4ml_lhc_jets_hlf.arff", x, labels)
    ds = load_dataset("jets", tmp_path, seed=0)
    assert ds.sizes() == {"train": 360, "val": 40, "test": 100}
    assert ds.input_shape == (16,) and ds.num_classes == 5 and ds.classes == ("g", "q", "t", "w", "z")
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # Rounded to 6 significant digits on the way through the file.
    x = np.array([[float(f"{v:.6g}") for v in row] for row in x])
    tr, te, y_tr, y_te = tutorial_recipe(x, labels)
    assert np.allclose(ds.x_test.numpy(), te, atol=1e-5) and ds.y_test.tolist() == y_te.tolist()
    # Train and validation together are the tutorial's 80%, scaled to zero mean and unit variance.
    train_val = torch.cat([ds.x_train, ds.x_val]).numpy()
    assert train_val.mean(0) == pytest.approx(np.zeros(16), abs=1e-4)
    assert train_val.std(0) == pytest.approx(np.ones(16), abs=1e-4)
    assert np.allclose(train_val[np.argsort(train_val[:, 0])], tr[np.argsort(tr[:, 0])], atol=1e-5)
    assert set(ds.y_val.tolist()) == set(range(5))
    # The record is the scaler: per-feature mean and std, applied to the raw test features
    pre = ds.preprocessing
    assert pre.channels == 16 and pre.raw_divisor == 1.0 and "zlogz" in pre.raw
    _, x_test = train_test_split(x, test_size=0.2, random_state=42)
    assert np.allclose(pre.apply(x_test), ds.x_test.numpy(), atol=1e-5)


def test_quoted_gzipped_arff_and_csv_read_the_same(tmp_path):
    x, labels = synthetic(50)
    write_arff(tmp_path / "a.arff.gz", x, labels, quote=True)
    write_csv(tmp_path / "b.csv", x, labels)
    xa, ya = read_table(tmp_path / "a.arff.gz")
    xb, yb = read_table(tmp_path / "b.csv")
    assert xa.shape == (50, 16) and xa.dtype == np.float32
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert ya.tolist() == np.searchsorted(np.array(CLASSES), labels).tolist()


def test_validation_hold_out_is_seeded(tmp_path):
    x, labels = synthetic()
    write_csv(tmp_path / "hls4ml_lhc_jets_hlf.csv", x, labels)
    a, b, c = (load_dataset("jets", tmp_path, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.x_test, c.x_test)  # the test split is the tutorial's, whatever the seed


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("jets", tmp_path)
    msg = str(e.value)
    assert "hls4ml_lhc_jets_hlf.arff not found" in msg and str(tmp_path / "jets") in msg
    assert "https://api.openml.org/api/v1/json/data/42468" in msg

    x, labels = synthetic(20)
    path = tmp_path / "hls4ml_lhc_jets_hlf.arff"
    write_arff(path, x, labels)
    path.write_text(path.read_text().replace("@ATTRIBUTE mass_mmdt NUMERIC\n", ""))
    with pytest.raises(DatasetError, match=r"hls4ml_lhc_jets_hlf.arff: missing columns \['mass_mmdt'\]"):
        load_dataset("jets", tmp_path)

    write_arff(path, x, labels)
    rows = path.read_text().split("\n")
    rows[-5] = "?," + rows[-5].split(",", 1)[1]  # a missing value, as ARFF writes it
    path.write_text("\n".join(rows))
    with pytest.raises(DatasetError, match=r"hls4ml_lhc_jets_hlf.arff: .*'\?'"):
        load_dataset("jets", tmp_path)

    write_arff(path, x, np.where(labels == "t", "top", labels))
    with pytest.raises(DatasetError, match=r"unknown classes \['top'\]"):
        load_dataset("jets", tmp_path)

    path.write_text("@RELATION x\n@ATTRIBUTE a NUMERIC\n")
    with pytest.raises(DatasetError, match="no @data section"):
        load_dataset("jets", tmp_path)

    gz = tmp_path / "jets" / "hls4ml_lhc_jets_hlf.arff.gz"
    gz.parent.mkdir()
    write_arff(gz, *synthetic(100))
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(DatasetError, match="hls4ml_lhc_jets_hlf.arff.gz: truncated"):
        load_dataset("jets", tmp_path)
