"""Data parallelism with torch.distributed: 2 CPU processes (gloo) started by torchrun."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_two_processes_train_like_one(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, env=_env(), timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(ddp)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(single / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert one["world"] == 1 and r0["world"] == r1["world"] == 2
    for k in one["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # replicas stay identical
        # the gradient of each global batch is the single-process one, up to float summation order
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-4, atol=1e-5)
    assert [h["val_accuracy"] for h in r0["history"]] == pytest.approx([h["val_accuracy"] for h in one["history"]], abs=0.01)
    assert all(h["samples_per_second"] > 0 for h in r0["history"])
