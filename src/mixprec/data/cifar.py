"""CIFAR-10 from the official python batches or from a class-folder image layout.

Sources, in the order they are looked for under ``data_dir/cifar10/`` then ``data_dir/``:

* ``cifar-10-batches-py/``: the folder inside the official archive. Its ``data_batch_1..5`` and
  ``test_batch`` are Python pickles; they are read with an unpickler that allows only numpy's
  array reconstruction, so a tampered file cannot run code.
* ``cifar-10-python.tar.gz``: the official archive, read without extracting it.
* a class-folder layout ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (PNG too), as a
  folder or a ``.tar``/``.tar.gz`` archive (``cifar10-jpg.tar.gz`` and similar names, or any
  archive there whose first members have that layout).

Images from an archive or folder are decoded once and cached as uint8 arrays in an ``.npz``
under ``MIXPREC_CACHE`` (default ``~/.cache/mixprec``), keyed by the source's path, size and
modification time; later loads read only the cache.
"""
from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import pickle
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from .augment import random_crop_flip
from .base import DatasetError, Preprocessing, Splits, register, stratified_split, tensor
from .download import cache_dir, download as fetch, find_file, resolve_data_dir, verify_file

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# normalise() computes it in float32 (a 180 MB array); the record's float64 differs in the last bits
PREPROCESSING = Preprocessing(255.0, MEAN, STD, raw="uint8 RGB pixels 0..255, channels-first (3, 32, 32)")
SIZE = 32
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
# Official MD5s of the files inside the archive (as in torchvision's CIFAR10).
BATCH_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
FOLDERS = ("cifar10", "cifar-10", "")
CLASS_ARCHIVES = ("cifar10-jpg.tar.gz", "cifar10-jpg.tar", "cifar10-png.tar.gz", "cifar10.tar.gz", "cifar10.tar")
IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "bmp"}
_FORMATS = ("JPEG", "PNG", "BMP")  # named, so PIL does not probe every format it knows
_CACHE_VERSION = 1
_CHUNK = 2048  # images per decoding task: big enough to amortise the inter-process copy


@dataclass
class Raw:
    """Decoded images, uint8 (N, 3, 32, 32), and int64 labels in CIFAR class order."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --- official pickle batches ---------------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    # Everything an official batch (a dict of bytes keys, lists and one ndarray) refers to.
    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy" and name in self._ALLOWED) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes": the official batches were written by Python 2 (keys are b"data", ...).
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DatasetError(f"{where}: not a readable CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{where}: a CIFAR batch needs keys b'data' and b'labels'; it has {keys}")
    x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * SIZE * SIZE or y.shape != (len(x),):
        raise DatasetError(f"{where}: data {x.dtype}{x.shape} / labels {y.shape}, expected uint8 (N, 3072) / (N,)")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise DatasetError(f"{where}: labels outside 0..9")
    # Rows are the 1024 red, then green, then blue pixels of a 32x32 image: already (3, 32, 32).
    return x.reshape(-1, 3, SIZE, SIZE), y


def _check_md5(name: str, data: bytes, where: str) -> None:
    if name in BATCH_MD5 and hashlib.md5(data).hexdigest() != BATCH_MD5[name]:
        log.warning("%s: MD5 differs from the official CIFAR-10 %s; loading it anyway", where, name)


def _join(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: str) -> Raw:
    missing = [n for n in (*TRAIN_BATCHES, "test_batch") if n not in batches]
    if missing:
        raise DatasetError(f"{where}: missing CIFAR batches {missing}")
    x_train = np.concatenate([batches[n][0] for n in TRAIN_BATCHES])
    y_train = np.concatenate([batches[n][1] for n in TRAIN_BATCHES])
    return Raw(x_train, y_train, *batches["test_batch"])


def read_batches_dir(folder: Path) -> Raw:
    batches = {}
    for name in (*TRAIN_BATCHES, "test_batch"):
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{folder}: missing CIFAR batch {name}")
        data = path.read_bytes()
        _check_md5(name, data, str(path))
        batches[name] = _parse_batch(data, str(path))
    return _join(batches, str(folder))


def read_batches_archive(archive: Path) -> Raw:
    batches = {}
    for name, data in _tar_members(archive, lambda n: PurePosixPath(n).name in BATCH_MD5):
        where = f"{archive} member {name}"
        _check_md5(PurePosixPath(name).name, data, where)
        batches[PurePosixPath(name).name] = _parse_batch(data, where)
    return _join(batches, str(archive))


# --- class-folder images -------------------------------------------------------------------

def _image_key(name: str) -> tuple[str, str] | None:
    """(split, class folder) of an image path ``.../<train|test>/<class>/<file>``, else None."""
    # Plain string splitting: this runs for each of 60k members, where pathlib costs seconds.
    parts = name.rsplit("/", 3)
    if len(parts) < 3 or parts[-3] not in ("train", "test") or parts[-1].startswith("."):
        return None  # also skips macOS "._name" resource forks
    if parts[-1].rpartition(".")[2].lower() not in IMAGE_SUFFIXES:
        return None
    return parts[-3], parts[-2]


def _tar_members(archive: Path, wanted) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive's regular files whose names pass ``wanted``, read as a stream."""
    current = "(archive header)"
    try:
        # "r|*": one sequential pass over a possibly gzipped stream, no seeking back.
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                current = member.name
                if member.isfile() and wanted(member.name):
                    yield member.name, tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{archive}: truncated or corrupt archive at member {current!r} "
                           f"({type(e).__name__}: {e}); copy or download it again") from e


def _folder_members(folder: Path) -> Iterator[tuple[str, bytes]]:
    for split in ("train", "test"):
        for path in sorted((folder / split).glob("*/*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and _image_key(name):
                yield name, path.read_bytes()


def _decode_chunk(items: list[tuple[str, bytes]]) -> tuple[np.ndarray | None, str | None, str | None]:
    """Decode RGB 32x32 images: (array (N, 32, 32, 3), None, None) or (None, bad name, reason)."""
    from PIL import Image

    out = np.empty((len(items), SIZE, SIZE, 3), np.uint8)
    for i, (name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
                if im.size != (SIZE, SIZE):
                    return None, name, f"image is {im.size[0]}x{im.size[1]}, expected {SIZE}x{SIZE}"
                out[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except Exception as e:  # corrupt bytes make PIL raise OSError, SyntaxError, ValueError, ...
            return None, name, f"{type(e).__name__}: {e}"
    return out, None, None


def _chunks(members: Iterable[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk = []
    for item in members:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_all(chunks: Iterable[list[tuple[str, bytes]]],
                workers: int) -> Iterator[tuple[list[str], np.ndarray | None, str | None, str | None]]:
    """Decode chunks, in order, in ``workers`` forked processes while the caller keeps reading."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield [n for n, _ in chunk], *_decode_chunk(chunk)
        return
    # fork: the workers need nothing re-imported, so they start in milliseconds.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = [([n for n, _ in chunk], pool.apply_async(_decode_chunk, (chunk,))) for chunk in chunks]
        for names, result in pending:
            yield names, *result.get()


def read_class_folders(members: Iterable[tuple[str, bytes]], source: Path, workers: int) -> Raw:
    """Images named ``.../<train|test>/<class>/<file>``, sorted by class then name per split."""
    def images() -> Iterator[tuple[str, bytes]]:
        for name, data in members:
            key = _image_key(name)
            if key is None:
                continue
            if key[1] not in CLASSES:
                raise DatasetError(f"{source}: member {name!r} is in class folder {key[1]!r}, "
                                   f"not one of the CIFAR-10 classes {', '.join(CLASSES)}")
            yield name, data

    names, arrays = [], []
    for chunk_names, array, bad, reason in _decode_all(_chunks(images(), _CHUNK), workers):
        if array is None:
            raise DatasetError(f"{source}: member {bad!r} is not a readable {SIZE}x{SIZE} image ({reason})")
        names += chunk_names
        arrays.append(array)
    x = np.concatenate(arrays) if arrays else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    keys = [_image_key(n) for n in names]
    splits = {}
    for split in ("train", "test"):
        idx = [i for i, k in enumerate(keys) if k[0] == split]
        # Archives list members in any order; sort so arrays are the same for every copy.
        idx.sort(key=lambda i: (CLASSES.index(keys[i][1]), names[i]))
        if not idx:
            raise DatasetError(f"{source}: no images under {split}/<class>/")
        splits[split] = (np.ascontiguousarray(x[idx].transpose(0, 3, 1, 2)),
                         np.array([CLASSES.index(keys[i][1]) for i in idx], dtype=np.int64))
    return Raw(*splits["train"], *splits["test"])


def _is_class_archive(path: Path, peek: int = 64) -> bool:
    """Whether one of the archive's first ``peek`` members is ``<train|test>/<cifar class>/<image>``."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for i, member in enumerate(tf):
                key = _image_key(member.name)
                if key and key[1] in CLASSES:
                    return True
                if i >= peek:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        pass  # not ours to judge here; it is simply not picked
    return False


# --- finding the source and caching --------------------------------------------------------

@dataclass(frozen=True)
class Source:
    kind: str  # "batches", "batches-archive", "folders" or "folders-archive"
    path: Path


def _classify(path: Path) -> Source:
    if path.is_dir():
        return Source("batches" if path.name == BATCHES_DIR else "folders", path)
    return Source("batches-archive" if path.name == "cifar-10-python.tar.gz" else "folders-archive", path)


def find_source(data_dir, download: bool = False) -> Source:
    root = resolve_data_dir(data_dir)
    candidates = []
    for folder in FOLDERS:
        base = f"{folder}/" if folder else ""
        candidates += [f"{base}{BATCHES_DIR}", f"{base}cifar-10-python.tar.gz", *(base + a for a in CLASS_ARCHIVES),
                       f"{base}cifar10-jpg"]
    try:
        return _classify(find_file(root, candidates, "cifar10", ARCHIVE_URL))
    except DatasetError as missing:
        for folder in FOLDERS:
            base = root / folder
            if (base / "train").is_dir() and (base / "test").is_dir():
                return Source("folders", base)
            archives = sorted({*base.glob("*.tar"), *base.glob("*.tar.gz"), *base.glob("*.tgz")})
            for archive in archives:
                if _is_class_archive(archive):
                    return Source("folders-archive", archive)
        if not download:
            raise DatasetError(f"{missing}\nAlso looked for train/ and test/ class folders, and .tar/.tar.gz "
                               f"archives holding them, in {', '.join(str(root / f) for f in FOLDERS)}.") from None
    path = fetch(ARCHIVE_URL, root / "cifar10" / "cifar-10-python.tar.gz", md5=ARCHIVE_MD5)
    return Source("batches-archive", path)


def _cache_path(source: Source) -> Path:
    st = source.path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if source.path.is_dir():
        # A folder's own mtime misses edits to files inside it; hash the image listing instead.
        listing = sorted((p.relative_to(source.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                         for split in ("train", "test") for p in (source.path / split).glob("*/*"))
        stamp = hashlib.sha256(repr(listing).encode()).hexdigest()
    key = hashlib.sha256(f"{_CACHE_VERSION}|{source.kind}|{source.path.resolve()}|{stamp}".encode()).hexdigest()
    return cache_dir() / f"cifar10-{key[:24]}.npz"


def _read_cache(path: Path) -> Raw | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = Raw(z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s: %s)", path, type(e).__name__, e)
        return None
    ok = raw.x_train.shape[1:] == raw.x_test.shape[1:] == (3, SIZE, SIZE) and raw.x_train.dtype == np.uint8
    return raw if ok and len(raw.x_train) == len(raw.y_train) and len(raw.x_test) == len(raw.y_test) else None


def _write_cache(path: Path, raw: Raw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            # Uncompressed: loading 180 MB of raw bytes beats inflating it.
            np.savez(f, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
        os.replace(tmp, path)  # readers see the old cache or the whole new one, never half of it
    finally:
        tmp.unlink(missing_ok=True)


def read_source(source: Source, workers: int) -> Raw:
    if source.kind == "batches":
        return read_batches_dir(source.path)
    if source.kind == "batches-archive":
        return read_batches_archive(source.path)
    if source.kind == "folders":
        return read_class_folders(_folder_members(source.path), source.path, workers)
    return read_class_folders(_tar_members(source.path, lambda n: _image_key(n) is not None), source.path, workers)


def load_raw(data_dir=None, download: bool = False, workers: int | None = None, use_cache: bool = True) -> Raw:
    """The uint8 images of the first CIFAR-10 source found (see the module docstring)."""
    source = find_source(data_dir, download)
    if source.path.is_file():
        verify_file(source.path, resolve_data_dir(data_dir),
                    ARCHIVE_MD5 if source.kind == "batches-archive" else None)
    # The pickle folder loads in a fraction of a second; everything else is worth caching.
    cache = _cache_path(source) if use_cache and source.kind != "batches" else None
    if cache is not None:
        raw = _read_cache(cache)
        if raw is not None:
            log.info("cifar10: %s from cache %s", source.path, cache)
            return raw
    start = time.perf_counter()
    raw = read_source(source, min(2, os.cpu_count() or 1) if workers is None else workers)
    log.info("cifar10: read %d + %d images from %s in %.1fs", len(raw.y_train), len(raw.y_test), source.path,
             time.perf_counter() - start)
    if cache is not None:
        _write_cache(cache, raw)
    return raw


def normalise(x: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) to float32 standardised per channel with the CIFAR-10 mean and std."""
    scale = (1.0 / (255.0 * np.array(STD))).astype(np.float32).reshape(1, 3, 1, 1)
    shift = (-np.array(MEAN) / np.array(STD)).astype(np.float32).reshape(1, 3, 1, 1)
    out = np.multiply(x, scale, dtype=np.float32)  # two vectorised passes; no float64 temporary
    out += shift
    return out


@register("cifar10")
def load_cifar10(data_dir=None, seed: int = 0, download: bool = False, val_size: int = 5000,
                 workers: int | None = None, use_cache: bool = True) -> Splits:
    """CIFAR-10, standardised per channel, (3, 32, 32); validation is a stratified hold-out of
    ``val_size`` training images (seeded); random crop + flip augmentation for training."""
    raw = load_raw(data_dir, download, workers, use_cache)
    train, val = stratified_split(raw.y_train, val_size, seed)
    return Splits("cifar10", tensor(normalise(raw.x_train[train])), tensor(raw.y_train[train]),
                  tensor(normalise(raw.x_train[val])), tensor(raw.y_train[val]),
                  tensor(normalise(raw.x_test)), tensor(raw.y_test), len(CLASSES), CLASSES, random_crop_flip(4),
                  preprocessing=PREPROCESSING)
