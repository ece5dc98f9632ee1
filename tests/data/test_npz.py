import numpy as np
import pytest
import torch

from mixprec.data import DatasetError, load_dataset


def kws_like(n=200, seed=0):
    """Keyword-spotting-shaped features: MFCCs (N, 1, 49, 10), 12 classes."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 49, 10)).astype(np.float32), np.arange(n) % 12


def test_x_y_only_gives_a_stratified_seeded_80_10_10_split(tmp_path):
    x, y = kws_like()
    np.savez(tmp_path / "kws.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'kws.npz'}", seed=0)
    assert ds.sizes() == {"train": 160, "val": 20, "test": 20}
    assert ds.input_shape == (1, 49, 10) and ds.num_classes == 12 and ds.name == "kws"
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    for labels in (ds.y_val, ds.y_test):
        assert set(labels.tolist()) == set(range(12))
    # The three splits partition the file's rows.
    firsts = torch.cat([ds.x_train, ds.x_val, ds.x_test])[:, 0, 0, 0]
    assert sorted(firsts.tolist()) == sorted(x[:, 0, 0, 0].tolist())
    again, other = (load_dataset(f"npz:{tmp_path / 'kws.npz'}", seed=s) for s in (0, 1))
    assert torch.equal(again.x_test, ds.x_test) and not torch.equal(other.x_test, ds.x_test)


def test_explicit_splits_are_used_as_given(tmp_path):
    x, y = kws_like(60)
    np.savez(tmp_path / "s.npz", x_train=x[:40], y_train=y[:40], x_val=x[40:50], y_val=y[40:50],
             x_test=x[50:], y_test=y[50:], classes=np.array([f"word{i}" for i in range(12)]))
    ds = load_dataset("npz:s.npz", tmp_path)  # a relative path is also looked up in the data directory
    assert torch.equal(ds.x_val, torch.from_numpy(x[40:50])) and ds.y_test.tolist() == y[50:].tolist()
    assert ds.classes[3] == "word3" and ds.num_classes == 12


def test_train_and_test_only_holds_validation_out_of_train(tmp_path):
    x, y = kws_like(120)
    np.savez(tmp_path / "t.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    ds = load_dataset(f"npz:{tmp_path / 't.npz'}")
    assert ds.sizes() == {"train": 90, "val": 10, "test": 20}


def test_missing_keys_name_the_file_and_the_keys_present(tmp_path):
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 3)), labels=np.zeros(4))
    with pytest.raises(DatasetError, match=r"bad.npz: needs arrays x, y .* it holds features, labels"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_bad_labels_missing_and_corrupt_files(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((10, 3)), y=np.arange(10) - 1)
    with pytest.raises(DatasetError, match="not non-negative integers"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")
    np.savez(tmp_path / "len.npz", x=np.zeros((10, 3)), y=np.zeros(9, dtype=int))
    with pytest.raises(DatasetError, match="x has 10 samples but y has 9"):
        load_dataset(f"npz:{tmp_path / 'len.npz'}")
    with pytest.raises(DatasetError, match="nope.npz not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "len.npz").read_bytes()[:100])
    with pytest.raises(DatasetError, match="cut.npz: not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'cut.npz'}")


def test_mean_and_std_in_the_file_normalise_x_and_are_recorded(tmp_path):
    x, y = kws_like(60)
    x = x.repeat(2, axis=1) * 40 + 3  # 2 channels, raw-like scale
    mean, std = np.array([3.0, 5.0]).reshape(2, 1, 1), np.float32(40.0)
    np.savez(tmp_path / "n.npz", x=x, y=y, mean=mean, std=std)
    ds = load_dataset(f"npz:{tmp_path / 'n.npz'}")
    pre = ds.preprocessing
    assert (pre.raw_divisor, pre.mean, pre.std) == (1.0, (3.0, 5.0), (40.0,))
    every = torch.cat([ds.x_train, ds.x_val, ds.x_test]).numpy()
    want = ((x.astype(np.float64) - mean) / 40.0).astype(np.float32)
    assert sorted(every[:, :, 0, 0].tolist()) == sorted(want[:, :, 0, 0].tolist())
    assert abs(float(every[:, 0].mean())) < 0.2 and abs(float(every[:, 1].mean()) + 0.05) < 0.2
    # only a std: the mean is 0; neither: the identity
    np.savez(tmp_path / "s.npz", x=x, y=y, std=np.array(2.0))
    assert load_dataset(f"npz:{tmp_path / 's.npz'}").preprocessing.mean == (0.0,)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    plain = load_dataset(f"npz:{tmp_path / 'plain.npz'}")
    assert plain.preprocessing.is_identity and float(plain.x_train.abs().max()) > 50


def test_bad_mean_or_std_names_the_file(tmp_path):
    x, y = kws_like(40)
    np.savez(tmp_path / "m.npz", x=x, y=y, mean=np.zeros(3))
    with pytest.raises(DatasetError, match=r"m.npz: mean is float64\(3,\); .* one per channel \(1: axis 1 of x\)"):
        load_dataset(f"npz:{tmp_path / 'm.npz'}")
    np.savez(tmp_path / "z.npz", x=x, y=y, std=np.zeros(1))
    with pytest.raises(DatasetError, match="z.npz: .*positive std"):
        load_dataset(f"npz:{tmp_path / 'z.npz'}")


def test_readme_npz_conversion_example_runs(tmp_path, monkeypatch):
    """The README's CSV-to-npz example, run on a small CSV: the file loads, normalised by its own
    mean and std."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"### The npz format\n.*?```python\n(.*?)```", readme, re.S).group(1)
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.normal(50, 10, (90, 6)), np.arange(90) % 3])
    np.savetxt(tmp_path / "features.csv", rows, delimiter=",", header="a,b,c,d,e,f,label", comments="")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README", "exec"), {})
    ds = load_dataset("npz:features.npz")
    assert ds.input_shape == (6,) and ds.num_classes == 3 and ds.classes == ("idle", "walk", "run")
    assert abs(float(ds.x_train.mean())) < 0.3 and ds.preprocessing.channels == 6
