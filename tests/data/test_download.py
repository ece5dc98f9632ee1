import hashlib
import logging

import pytest

from mixprec.data import DatasetError
from mixprec.data.download import (download, find_file, find_or_download, read_checksums, sha256_of,
                                   verify_file)


def test_shared_sha256sums_all_match(shared_datasets):
    sums = read_checksums(shared_datasets / "SHA256SUMS")
    assert len(sums) == 5
    for rel, digest in sums.items():
        assert verify_file(shared_datasets / rel, shared_datasets) == "sha256"
        assert sha256_of(shared_datasets / rel) == digest


def test_sha256sums_mismatch_names_file_and_both_sums(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "a.bin"
    f.write_bytes(b"hello")
    wrong = "0" * 64
    (tmp_path / "SHA256SUMS").write_text(f"{wrong}  sub/a.bin\n")
    with pytest.raises(DatasetError) as e:
        verify_file(f, tmp_path)
    msg = str(e.value)
    assert "a.bin" in msg and wrong in msg and hashlib.sha256(b"hello").hexdigest() in msg


def test_official_md5_mismatch_only_warns(tmp_path, caplog):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    with caplog.at_level(logging.WARNING):
        assert verify_file(f, tmp_path, md5="0" * 32) == "md5-mismatch"
    assert "a.bin" in caplog.text and "0" * 32 in caplog.text
    assert verify_file(f, tmp_path, md5=hashlib.md5(b"hello").hexdigest()) == "md5"
    assert verify_file(f, tmp_path) == "none"


def test_find_file_error_names_file_places_and_url(tmp_path):
    with pytest.raises(DatasetError) as e:
        find_file(tmp_path, ["x/file.gz", "file.gz"], "demo", "https://example.org/file.gz")
    msg = str(e.value)
    assert "file.gz not found" in msg
    assert str(tmp_path / "x" / "file.gz") in msg and str(tmp_path / "file.gz") in msg
    assert "https://example.org/file.gz" in msg and "download=True" in msg
    (tmp_path / "file.gz").write_bytes(b"")
    assert find_file(tmp_path, ["x/file.gz", "file.gz"], "demo", "u") == tmp_path / "file.gz"


def test_download_checks_sums_and_leaves_no_partial_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    url = src.as_uri()  # urllib serves file:// like http://, so no network is needed
    dest = tmp_path / "out" / "dest.bin"
    with pytest.raises(DatasetError, match="MD5"):
        download(url, dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    download(url, dest, md5=hashlib.md5(src.read_bytes()).hexdigest(),
             sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(DatasetError, match="failed"):
        download((tmp_path / "missing").as_uri(), tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()


def test_find_or_download_fetches_only_when_asked(tmp_path):
    src = tmp_path / "mirror" / "f.gz"
    src.parent.mkdir()
    src.write_bytes(b"abc")
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="f.gz not found"):
        find_or_download(root, ["ds/f.gz"], "ds", [src.as_uri()])
    bad_mirror = (tmp_path / "nowhere" / "f.gz").as_uri()
    path = find_or_download(root, ["ds/f.gz"], "ds", [bad_mirror, src.as_uri()],
                            md5=hashlib.md5(b"abc").hexdigest(), download_missing=True)
    assert path == root / "ds" / "f.gz" and path.read_bytes() == b"abc"
