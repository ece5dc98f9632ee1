import pytest
import torch

from mixprec.train import load_checkpoint, save_checkpoint
from mixprec.train.checkpoint import CheckpointError


def test_checkpoint_round_trip_is_atomic(tmp_path):
    path = tmp_path / "ck" / "a.pt"
    save_checkpoint(path, {"w": torch.arange(3), "history": [{"epoch": 0, "loss": 1.5}]})
    assert not list(path.parent.glob("*.tmp"))
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3)) and state["history"][0]["loss"] == 1.5


def test_corrupt_and_missing_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
