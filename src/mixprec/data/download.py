"""Finding, checking and (only when asked) downloading dataset files.

mixprec never downloads silently: a loader looks for the official files under the data
directory and, when they are missing, fails with a message naming the file, every place it
looked and the official URL. ``download=True`` on a loader fetches them with :func:`download`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from .base import DatasetError

log = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``MIXPREC_CACHE`` or ``~/.cache/mixprec``."""
    return Path(os.environ.get("MIXPREC_CACHE") or "~/.cache/mixprec").expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory, or ``<cache>/datasets`` (where ``download=True`` puts files) if none is given."""
    return Path(data_dir).expanduser() if data_dir else cache_dir() / "datasets"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# Hashing a 20 MB archive on every load is cheap but not free; the key changes with the file.
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_digest(p, "sha256")
    return _SHA_MEMO[key]


def md5_of(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


def read_checksums(sums_file: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-style file (``<hex>  <path>``)."""
    sums = {}
    for line in Path(sums_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        # "*name" marks binary mode in sha256sum output; the path is the same.
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _checksum_files(path: Path, data_dir: Path | None) -> Iterable[Path]:
    """SHA256SUMS files that may list ``path``: in its folder and each parent up to ``data_dir``."""
    stop = data_dir.resolve() if data_dir else None
    folder = path.resolve().parent
    while True:
        if (folder / CHECKSUM_FILE).is_file():
            yield folder / CHECKSUM_FILE
        if stop is None or folder == stop or folder == folder.parent or stop not in folder.parents:
            return
        folder = folder.parent


def verify_file(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, md5: str | None = None) -> str:
    """Check ``path`` against a SHA256SUMS listing, else against its official MD5.

    A SHA256SUMS file (in the file's folder or a parent up to ``data_dir``) that lists the file
    is authoritative: a mismatch is a :class:`DatasetError`. Without one, an official MD5
    mismatch only logs a warning, because rebuilt copies of a dataset legitimately differ; the
    loaders' structural checks are what catch truncation. Returns what was checked:
    ``"sha256"``, ``"md5"``, ``"md5-mismatch"`` or ``"none"``.
    """
    path = Path(path)
    for sums_file in _checksum_files(path, Path(data_dir) if data_dir else None):
        rel = path.resolve().relative_to(sums_file.parent.resolve()).as_posix()
        expected = read_checksums(sums_file).get(rel)
        if expected is None:
            continue
        actual = sha256_of(path)
        if actual != expected:
            raise DatasetError(
                f"{path}: SHA-256 {actual} does not match {expected} listed in {sums_file}; "
                "the file is truncated, corrupt or was replaced: copy or download it again")
        log.debug("%s matches %s", path, sums_file)
        return "sha256"
    if md5 is None:
        return "none"
    actual = md5_of(path)
    if actual != md5:
        log.warning("%s: MD5 %s differs from the official %s (a rebuilt or re-packed copy?); "
                    "loading it anyway, its structure is checked", path, actual, md5)
        return "md5-mismatch"
    return "md5"


def _download_hint(dataset: str, url: str, dest: Path) -> str:
    return (f"mixprec does not download by itself. Get the official file from {url} "
            f"(e.g. `curl -L -o {dest} {url}`), or pass download=True to the {dataset} loader on a machine "
            "with internet access; point data_dir or MIXPREC_DATA at the folder holding it.")


def find_file(data_dir: str | os.PathLike | None, candidates: Sequence[str], dataset: str, url: str) -> Path:
    """The first of ``data_dir/<candidate>`` that exists (file or folder), else a DatasetError
    naming the file, every place looked and where to get it."""
    root = resolve_data_dir(data_dir)
    looked = [root / c for c in candidates]
    for p in looked:
        if p.exists():
            return p
    where = "\n  ".join(str(p) for p in looked)
    raise DatasetError(f"{dataset}: {Path(candidates[0]).name} not found; looked in:\n  {where}\n"
                       + _download_hint(dataset, url, looked[0]))


def download(url: str, dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``, checking the checksums; the file appears only once complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                for h in hashes.values():
                    h.update(block)
        for name, expected in (("MD5", md5), ("SHA-256", sha256)):
            actual = hashes[name.replace("-", "").lower()].hexdigest()
            if expected and actual != expected.lower():
                raise DatasetError(f"download of {url}: {name} {actual} does not match the expected {expected}; "
                                   f"nothing written to {dest}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(f"download of {url} to {dest} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def find_or_download(data_dir: str | os.PathLike | None, candidates: Sequence[str], dataset: str,
                     urls: Sequence[str], md5: str | None = None, download_missing: bool = False) -> Path:
    """:func:`find_file`, or with ``download_missing`` fetch ``candidates[0]`` from the first
    mirror that works, then verify it (SHA256SUMS, or the official MD5 if it has the official name)."""
    try:
        path = find_file(data_dir, candidates, dataset, urls[0])
    except DatasetError:
        if not download_missing:
            raise
        dest = resolve_data_dir(data_dir) / candidates[0]
        errors = []
        for url in urls:
            try:
                path = download(url, dest, md5=md5)
                break
            except DatasetError as e:
                errors.append(str(e))
        else:
            raise DatasetError(f"{dataset}: could not download {dest.name}:\n  " + "\n  ".join(errors)) from None
    # An extracted copy (no .gz, say) cannot match the official archive's MD5.
    verify_file(path, data_dir, md5 if path.name == Path(candidates[0]).name else None)
    return path
