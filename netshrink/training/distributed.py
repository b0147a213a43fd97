"""Data parallelism on ``torch.distributed``: several processes (on one machine or many, launched by
``torchrun`` or Ray Train) each take a share of every batch, and their results are combined so that
the outcome equals one process seeing the whole batch.

netshrink does not start processes or choose a backend: the launcher does (``torchrun`` sets the
environment, :func:`start` reads it). Everything here is a no-op in a single process, so the same
code runs either way.

* ``fit`` wraps the model in PyTorch's ``DistributedDataParallel`` (gradients averaged across
  processes), gives each process its share of each global batch, and weights each share's loss by
  its size, so uneven shares average exactly as one batch would.
* Calibration (GPTQ and SparseGPT Hessians, Wanda's input norms, bias correction's means) gives
  each process a share of the examples and sums the statistics across processes.
* ``save`` writes from the first process only; the others wait until the file is in place.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import NetshrinkError
from .batches import Inputs, batch_length, batch_slice


def active() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes files and reports progress."""
    return rank() == 0


def share(inputs: Inputs) -> Inputs:
    """This process's share of one global batch (a tensor, a tuple or list of tensors, or a dict of them),
    split along the first dimension into ``world_size()`` nearly equal parts; unchanged in one process."""
    if not active():
        return inputs
    count = batch_length(inputs)
    return batch_slice(inputs, count * rank() // world_size(), count * (rank() + 1) // world_size())


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process, in place (equal to one process's sum up to the order of float additions)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _device() -> torch.device:
    """Where the backend's collectives take tensors: the GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum_number(value: float | int) -> float | int:
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return type(value)(total.item())


def broadcast_number(value: float | int) -> float | int:
    """The first process's ``value``, on every process."""
    if not active():
        return value
    carried = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.broadcast(carried, src=0)
    return type(value)(carried.item())


def start() -> bool:
    """Join the process group a launcher described in the environment (``torchrun``: ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with NCCL on GPUs and gloo on CPUs. Returns
    whether this call started it (the caller then ends it with :func:`stop`)."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise NetshrinkError("this PyTorch build has no torch.distributed: run one process")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend)
    return True


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
