"""Run by tests under torchrun (or alone): train a BatchNorm-free MLP on digits, save this rank's weights."""
import sys

import torch
from torch import nn

from mixprec.data import load_dataset
from mixprec.train import TrainConfig, fit, world


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val,
                  TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=1))
    torch.save({"state": model.state_dict(), "history": history, "world": world().size},
               f"{out_dir}/rank{world().rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
