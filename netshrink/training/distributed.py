"""Data parallelism on ``torch.distributed``: several processes (on one machine or many, launched by
``torchrun`` or Ray Train) each take a share of every batch, and their results are combined so that
the outcome equals one process seeing the whole batch.

netshrink does not start processes or choose a backend: the launcher does (``torchrun`` sets the
environment, :func:`start` reads it). Everything here is a no-op in a single process, so the same
code runs either way.

* ``fit`` wraps the model in PyTorch's ``DistributedDataParallel`` (gradients averaged across
  processes), gives each process its share of each global batch, and weights each share's loss by
  its size, so uneven shares average exactly as one batch would.
* Calibration (GPTQ and SparseGPT Hessians, Wanda's input norms, bias correction's means,
  activation ranges and their samples) gives each process a share of the examples and combines the
  statistics across processes.
* ``save`` and ``export`` write from the first process only; the others wait until the file is in place.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import NetshrinkError
from .batches import Inputs, batch_length, batch_slice

T = TypeVar("T")


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


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` combined over every process (``op``: ``"sum"``, ``"min"`` or ``"max"``), in place;
    a sum equals one process's up to the order of float additions, a minimum or maximum exactly."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` (the same number of columns, any number of rows, none included),
    one after another in the order of the processes; unchanged in one process."""
    if not active():
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=_device()) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=_device()))
    counts = [int(c.item()) for c in counts]
    widest = max(counts)
    padded = torch.zeros((widest, *rows.shape[1:]), dtype=rows.dtype, device=_device())
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)  # all_gather wants equal shapes: each share padded to the largest
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(rows.device)


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


def first_process(work: Callable[[], T], what: str) -> T | None:
    """``work()`` (writing ``what``) on the first process only, its result there and None on the
    others, which wait for it and fail with it: no process goes on as if a file were written that
    was not. In one process, simply ``work()``."""
    if not active():
        return work()
    result, error = None, None
    if is_main():
        try:
            result = work()
        except BaseException as exc:  # the others must not wait for a file that will not come
            error = exc
    failed = broadcast_number(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise NetshrinkError(f"the first process could not write {what}")
    return result


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
