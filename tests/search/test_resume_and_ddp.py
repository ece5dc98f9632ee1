"""Whole runs in their own processes: SIGKILL mid-epoch then --resume, and 2-process DDP with gloo."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mixprec.train import load_checkpoint

ARGS = ["search", "--model", "digits-cnn", "--data", "digits", "--target", "cortex-m4", "--bits", "4",
        "--float-epochs", "4", "--qat-epochs", "2", "--batch-size", "16", "--seed", "5", "--device", "cpu"]


def _cli(*args):
    return [sys.executable, "-m", "mixprec.cli", *args]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same thread count in every run: same float sums
    env.pop("WORLD_SIZE", None)
    return env


def _finished(out, extra=()):
    subprocess.run(_cli(*ARGS, "--out", str(out), "--quiet", *extra), check=True, env=_env(), capture_output=True)
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _finished(out)


def _kill_when(out, checkpoint_name, epochs_done):
    """Start a run and SIGKILL it as soon as a given per-epoch checkpoint shows ``epochs_done``."""
    proc = subprocess.Popen(_cli(*ARGS, "--out", str(out), "--quiet"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = out / "checkpoints" / checkpoint_name
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                if load_checkpoint(path)["epoch"] >= epochs_done:
                    break
            except Exception:  # being replaced this instant: look again
                pass
        time.sleep(0.005)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    return load_checkpoint(path)["epoch"]


def _same_run(a, b):
    assert a["accuracy"] == b["accuracy"]
    assert a["cost"] == b["cost"]
    for phase in ("float", "qat"):
        assert [(h["loss"], h["val_accuracy"]) for h in a["history"][phase]] == \
               [(h["loss"], h["val_accuracy"]) for h in b["history"][phase]], phase


@pytest.mark.parametrize("checkpoint_name,epochs_done", [("float_last.pt", 2), ("qat_last.pt", 1)])
def test_sigkill_then_resume_ends_with_the_uninterrupted_result(tmp_path, straight, checkpoint_name, epochs_done):
    ref_dir, ref = straight
    out = tmp_path / "run"
    killed_at = _kill_when(out, checkpoint_name, epochs_done)
    assert killed_at < (4 if checkpoint_name.startswith("float") else 2)
    refused = subprocess.run(_cli(*ARGS, "--out", str(out), "--quiet"), env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = _finished(out, ["--resume"])
    _same_run(resumed, ref)
    a = load_checkpoint(ref_dir / "checkpoints" / "quantized.pt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "quantized.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_data_parallel_run(tmp_path, straight):
    _, ref = straight
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "mixprec.cli", *ARGS, "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["reference_mismatches"] == 0
    assert "samples/s" in proc.stderr  # throughput per epoch is logged
    # BatchNorm statistics are per process (as in any DDP run without SyncBatchNorm), so the
    # losses differ a little from one process; tests/train/test_distributed.py checks the gradients.
    assert result["accuracy"]["quantized"] > 0.85
    assert len(result["history"]["float"]) == 4 and len(result["history"]["qat"]) == 2
