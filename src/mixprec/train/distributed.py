"""Devices and data-parallel processes.

Started with ``torchrun`` (which sets ``WORLD_SIZE``/``RANK``), training shards every global batch
over the processes: gloo on CPU, NCCL on GPUs. Without it, everything is a world of one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is present; ``cuda`` without one is an error, not a silent CPU run."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        if name == "cuda" and world().size > 1:
            name = f"cuda:{world().local_rank}"
    return torch.device(name)


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The process group as torchrun describes it (a world of one without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> World:
    """Join the torchrun process group once; a no-op in a single process."""
    w = world()
    if w.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined the %s process group", w.rank, w.size, backend)
    return world()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
