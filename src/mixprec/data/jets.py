"""The hls4ml LHC jet-tagging dataset: 16 high-level features, 5 classes (OpenML 42468,
``hls4ml_lhc_jets_hlf``), split and scaled as in the hls4ml tutorial.

Read from a local ARFF (as OpenML serves it) or CSV file, optionally gzipped, in
``data_dir/jets/`` or ``data_dir/``. ``download=True`` asks the OpenML API for the file's URL
and MD5 and fetches it.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import re
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from .base import DatasetError, Preprocessing, Splits, register, stratified_split, tensor
from .download import download as fetch, find_file, resolve_data_dir, verify_file

log = logging.getLogger(__name__)

FEATURES = ("zlogz", "c1_b0_mmdt", "c1_b1_mmdt", "c1_b2_mmdt", "c2_b1_mmdt", "c2_b2_mmdt", "d2_b1_mmdt",
            "d2_b2_mmdt", "d2_a1_b1_mmdt", "d2_a1_b2_mmdt", "m2_b1_mmdt", "m2_b2_mmdt", "n2_b1_mmdt",
            "n2_b2_mmdt", "mass_mmdt", "multiplicity")
LABEL = "class"
# Sorted, as scikit-learn's LabelEncoder orders them: gluon, light quark, top, W, Z.
CLASSES = ("g", "q", "t", "w", "z")
OPENML_ID = 42468
OPENML_API = f"https://api.openml.org/api/v1/json/data/{OPENML_ID}"
STEM = "hls4ml_lhc_jets_hlf"
FILE_NAMES = tuple(f"{STEM}{ext}" for ext in (".arff", ".arff.gz", ".csv", ".csv.gz"))
FOLDERS = ("jets", "")

_ATTRIBUTE = re.compile(r"""^\s*@attribute\s+('[^']*'|"[^"]*"|\S+)\s+(.+?)\s*$""", re.IGNORECASE | re.MULTILINE)
_DATA = re.compile(r"^\s*@data\s*$", re.IGNORECASE | re.MULTILINE)


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: truncated or unreadable file ({type(e).__name__}: {e})") from e


def _unquote(s: str) -> str:
    s = s.strip()
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s


def _split_table(text: str, path: Path) -> tuple[list[str], str]:
    """(column names, comma-separated data rows) of an ARFF or CSV file."""
    if ".arff" in path.suffixes:
        match = _DATA.search(text)
        if match is None:
            raise DatasetError(f"{path}: no @data section; not an ARFF file")
        names = [_unquote(name) for name, _ in _ATTRIBUTE.findall(text[:match.start()])]
        rows = text[match.end():]
    else:
        header, _, rows = text.partition("\n")
        names = [_unquote(c) for c in header.split(",")]
    # Leading blank lines make numpy's string parser warn about how it counts rows.
    return names, rows.strip()


def read_table(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 (N, 16) in :data:`FEATURES` order and class codes int64 (N,)."""
    path = Path(path)
    names, rows = _split_table(_read_text(path), path)
    missing = [c for c in (*FEATURES, LABEL) if c not in names]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing}; it has {names}")
    try:
        # Two passes of numpy's C parser beat one pass of anything in Python on 830k rows.
        x = np.loadtxt(io.StringIO(rows), delimiter=",", comments="%", ndmin=2,
                       usecols=[names.index(c) for c in FEATURES], dtype=np.float64)
        labels = np.loadtxt(io.StringIO(rows), delimiter=",", comments="%", ndmin=1,
                            usecols=names.index(LABEL), dtype=str)
    except ValueError as e:  # the message names the row and the value ("?" for a missing one)
        raise DatasetError(f"{path}: {e}") from e
    if len(x) == 0:
        raise DatasetError(f"{path}: no data rows")
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: non-finite feature values in rows {np.flatnonzero(~np.isfinite(x).all(1))[:5]}")
    labels = np.char.strip(np.char.strip(labels), "'\"")
    unknown = sorted({str(v) for v in np.unique(labels)} - set(CLASSES))
    if unknown:
        raise DatasetError(f"{path}: unknown classes {unknown}; expected {', '.join(CLASSES)}")
    return x.astype(np.float32), np.searchsorted(np.array(CLASSES), labels).astype(np.int64)


def _openml_file(dest: Path) -> Path:
    """Ask the OpenML API where the dataset's file is, then fetch it (checked against its MD5)."""
    try:
        with urllib.request.urlopen(OPENML_API, timeout=60) as r:
            meta = json.load(r)["data_set_description"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"jets: could not read the OpenML description {OPENML_API}: {e}") from e
    return fetch(meta["url"], dest, md5=meta.get("md5_checksum"))


def find_jets_file(data_dir=None, download: bool = False) -> Path:
    candidates = [f"{folder}/{name}".lstrip("/") for folder in FOLDERS for name in FILE_NAMES]
    try:
        path = find_file(data_dir, candidates, "jets", OPENML_API)
    except DatasetError as e:
        if not download:
            raise DatasetError(f"{e}\n(the OpenML API URL above answers with the ARFF file's URL; "
                               f"scikit-learn's fetch_openml(data_id={OPENML_ID}) downloads it too)") from None
        path = _openml_file(resolve_data_dir(data_dir) / candidates[0])
    verify_file(path, resolve_data_dir(data_dir))
    return path


@register("jets")
def load_jets(data_dir=None, seed: int = 0, download: bool = False, val_fraction: float = 0.1) -> Splits:
    """The hls4ml tutorial's recipe: classes label-encoded in sorted order, an 80/20
    ``train_test_split(random_state=42)``, a StandardScaler fitted on those 80% (so the test
    features match the tutorial's exactly); then a stratified, seeded ``val_fraction`` of the
    80% held out for validation. Inputs are (N, 16) float32."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    path = find_jets_file(data_dir, download)
    x, y = read_table(path)
    if len(y) < 10:
        raise DatasetError(f"{path}: {len(y)} rows are too few to split 80/20 and hold out validation")
    rest, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=42)
    scaler = StandardScaler().fit(x[rest])
    x = scaler.transform(x).astype(np.float32)
    train, val = stratified_split(y[rest], int(round(val_fraction * len(rest))), seed)
    train, val = rest[train], rest[val]
    log.info("jets: %d train, %d val, %d test from %s", len(train), len(val), len(test), path)
    return Splits("jets", tensor(x[train]), tensor(y[train]), tensor(x[val]), tensor(y[val]),
                  tensor(x[test]), tensor(y[test]), len(CLASSES), CLASSES,
                  preprocessing=Preprocessing(1.0, scaler.mean_, scaler.scale_,
                                              raw=f"the 16 jet features in this order: {', '.join(FEATURES)}"))
