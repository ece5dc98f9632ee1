"""MNIST and Fashion-MNIST from the four official idx files (gzipped or not).

The files are parsed strictly: a gzip error, a wrong magic number or dimension, or a payload of
the wrong length is a :class:`DatasetError` naming the file, so a truncated copy never trains.
"""
from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DatasetError, Preprocessing, Splits, register, stratified_split, tensor
from .download import find_or_download, resolve_data_dir

log = logging.getLogger(__name__)

IMAGES, LABELS = 3, 1  # idx dimensions of an image file and a label file
_SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}


@dataclass(frozen=True)
class IdxDataset:
    name: str
    folders: tuple[str, ...]  # searched in order under the data directory; "" is the directory itself
    mirrors: tuple[str, ...]  # base URLs, tried in order by download=True
    md5: dict[str, str]  # of the official .gz files
    mean: float  # of the training pixels scaled to [0, 1]
    std: float
    classes: tuple[str, ...]


MNIST = IdxDataset(
    "mnist", ("mnist", "MNIST/raw", ""),
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    # Official MD5s (as in torchvision's MNIST.resources); the same bytes on both mirrors.
    {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
     "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
     "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
     "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    0.1307, 0.3081, tuple(str(d) for d in range(10)))

FASHION_MNIST = IdxDataset(
    # Not the bare data directory: MNIST files there have the same names.
    "fashion-mnist", ("fashion-mnist", "FashionMNIST/raw"),
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    # Official MD5s (zalandoresearch/fashion-mnist README; torchvision's FashionMNIST.resources).
    {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
     "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
     "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    0.2860, 0.3530,
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile (CRC, header) is an OSError
        raise DatasetError(f"{path}: truncated or corrupt gzip file ({type(e).__name__}: {e}); "
                           "copy or download it again") from e


def read_idx(path: str | Path, ndim: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An idx file of unsigned bytes with ``ndim`` dimensions (``shape`` checked when given)."""
    path = Path(path)
    raw = _read_bytes(path)
    magic = 0x0800 + ndim  # two zero bytes, type 0x08 (unsigned byte), number of dimensions
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        got = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DatasetError(f"{path}: not an idx file of {ndim}-d unsigned bytes (magic {got}, expected 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: idx header truncated ({len(raw)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if shape is not None and dims != shape:
        raise DatasetError(f"{path}: idx dimensions {dims}, expected {shape}")
    payload, needed = len(raw) - header, int(np.prod(dims, dtype=np.int64))
    if payload != needed:
        raise DatasetError(f"{path}: idx payload is {payload} bytes but dimensions {dims} need {needed} "
                           "(truncated or padded file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _locate(ds: IdxDataset, data_dir, stem: str, download: bool) -> Path:
    gz = f"{stem}.gz"
    # The .gz first (the official, checksummed file), then an extracted copy as torchvision leaves it.
    candidates = [f"{folder}/{name}".lstrip("/") for folder in ds.folders for name in (gz, stem)]
    return find_or_download(data_dir, candidates, ds.name, [m + gz for m in ds.mirrors], ds.md5[gz], download)


def _read_split(ds: IdxDataset, data_dir, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem, n = _SPLIT_FILES[split]
    x = read_idx(_locate(ds, data_dir, image_stem, download), IMAGES, (n, 28, 28))
    label_path = _locate(ds, data_dir, label_stem, download)
    y = read_idx(label_path, LABELS, (n,))
    if y.max() >= len(ds.classes):
        raise DatasetError(f"{label_path}: label {int(y.max())} out of range for {len(ds.classes)} classes")
    return x, y.astype(np.int64)


def _normalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    # A 256-entry lookup table: one gather instead of three float passes over the array.
    lut = ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)
    return lut[x][:, None]


SCALES = ("standard", "unit")


def preprocessing(ds: IdxDataset, scale: str = "standard") -> Preprocessing:
    """What :func:`_normalise` does, as a record: pixels / 255, standardised unless ``scale="unit"``."""
    mean, std = ((ds.mean,), (ds.std,)) if scale == "standard" else ((0.0,), (1.0,))
    return Preprocessing(255.0, mean, std, raw="uint8 pixels 0..255 (28x28, one channel)")


def load_idx_dataset(ds: IdxDataset, data_dir=None, seed: int = 0, download: bool = False,
                     val_size: int = 5000, scale: str = "standard") -> Splits:
    """Pixels scaled to [0, 1] then standardised (``scale="unit"``: left in [0, 1], as HGQ2 feeds
    them; non-negative inputs quantize unsigned, and constant background pixels are exact zeros),
    shape (1, 28, 28); validation is a stratified hold-out of ``val_size`` training images (seeded);
    the official test set is untouched."""
    if scale not in SCALES:
        raise DatasetError(f"{ds.name}: scale={scale!r}; choose one of {', '.join(SCALES)} "
                           f"(standard: (pixel / 255 - mean) / std; unit: pixel / 255)")
    data_dir = resolve_data_dir(data_dir)
    x_train, y_train = _read_split(ds, data_dir, "train", download)
    x_test, y_test = _read_split(ds, data_dir, "test", download)
    train, val = stratified_split(y_train, val_size, seed)
    pre = preprocessing(ds, scale)
    norm = lambda a: tensor(_normalise(a, pre.mean[0], pre.std[0]))  # noqa: E731
    log.info("%s: %d train, %d val, %d test from %s", ds.name, len(train), len(val), len(y_test), data_dir)
    return Splits(ds.name, norm(x_train[train]), tensor(y_train[train]), norm(x_train[val]), tensor(y_train[val]),
                  norm(x_test), tensor(y_test), len(ds.classes), ds.classes,
                  preprocessing=pre)


@register("mnist")
def load_mnist(data_dir=None, seed: int = 0, download: bool = False, val_size: int = 5000,
               scale: str = "standard") -> Splits:
    """MNIST from ``data_dir`` (``mnist/``, ``MNIST/raw/`` or the directory itself); ``mnist[scale=unit]``
    keeps pixels in [0, 1]."""
    return load_idx_dataset(MNIST, data_dir, seed, download, val_size, scale)


@register("fashion-mnist")
def load_fashion_mnist(data_dir=None, seed: int = 0, download: bool = False, val_size: int = 5000,
                       scale: str = "standard") -> Splits:
    """Fashion-MNIST from ``data_dir`` (``fashion-mnist/`` or ``FashionMNIST/raw/``); ``[scale=unit]``
    keeps pixels in [0, 1]."""
    return load_idx_dataset(FASHION_MNIST, data_dir, seed, download, val_size, scale)
