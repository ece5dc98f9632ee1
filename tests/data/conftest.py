"""Fixtures for the dataset tests: the real shared copies and a session-wide cache directory."""
from pathlib import Path

import pytest

# The real datasets live beside the repository (../shared/datasets), read-only.
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED / "SHA256SUMS").is_file():
        pytest.skip(f"the real dataset copies are not at {SHARED} (../shared/datasets beside the repository)")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """Decoded-array caches go to a temporary folder, never to ~/.cache, and are shared by the session."""
    path = tmp_path_factory.mktemp("mixprec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXPREC_CACHE", str(path))
        yield path
