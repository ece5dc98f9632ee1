import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def digits():
    from mixprec.data import load_dataset

    return load_dataset("digits")


#: The float settings of every end-to-end test on digits (the RunConfig defaults otherwise)
DIGITS_FLOAT_EPOCHS = 3


@pytest.fixture(scope="session")
def digits_float(tmp_path_factory):
    """One float digits-cnn for every end-to-end test: a run stopped after its float stage, which
    their runs take with ``float_from`` instead of training a float model each."""
    from mixprec.search import RunConfig, run_search

    out = tmp_path_factory.mktemp("digits-float") / "run"
    run_search(RunConfig(float_epochs=DIGITS_FLOAT_EPOCHS), out, until="float")
    return out
