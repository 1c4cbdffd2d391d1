"""Data-parallel training on several GPUs (or CPU processes) with PyTorch DDP.

Launch any stage under torchrun; every process runs the same command:

    torchrun --nproc_per_node 4 -m dmgcli.cli train --dataset domainnet --target sketch --backbone resnet50

A plain `dmg train` is rank 0 of a world of 1 and never touches torch.distributed.
What each process does:
  - joins the process group (nccl on CUDA, gloo on the CPU) and uses GPU LOCAL_RANK;
  - trains on its own disjoint slice of the same epoch permutation (data.BatchStream),
    with `train.batch_size` the global batch, split evenly over the processes;
  - lets DDP average the gradients of every parameter, the DMG mask logits included;
  - evaluates its share of each split, the correct/total counts then summed over processes;
  - writes checkpoints, logs and metrics only on rank 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes of one run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints; the others only compute."""
        return self.rank == 0


def from_env() -> Dist:
    """The place torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is 0 of 1."""
    return Dist(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def current() -> Dist:
    """This process's place in the process group it has joined (0 of 1 when none)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def is_main_process() -> bool:
    return from_env().is_main


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Join torchrun's process group for the duration of a stage; yields (place, device of this process).

    A no-op in a plain process, and when the caller already joined a group (tests do).
    """
    env = from_env()
    if env.world > 1 and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if env.world == 1 or dist.is_initialized():
        yield current(), device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current(), device
    finally:
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; unchanged in a single process."""
    if current().world > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (a list of one in a single process)."""
    world = current().world
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts them at the start of each training forward, but each process then updates
    them with its own batch; evaluation must use one set, or ranks would score with different models.
    """
    if current().world > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class Objective(nn.Module):
    """A method's training loss as the forward of a module: the form DDP wraps.

    DDP all-reduces the gradients of the parameters the wrapped module owns; the method owns
    the network and, for DMG, the mask logits, so both are averaged over processes.
    """

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x, y, d):
        return self.method.objective(x, y, d)


def data_parallel(method: nn.Module, device: torch.device) -> nn.Module:
    """The method's objective under DDP (call it as objective(x, y, d) -> (loss, stats))."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(Objective(method), device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)
