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
  statistics across processes; block reconstruction sums each block's error and gradients.
* BatchNorm normalises by the statistics of the whole global batch (:func:`batch_norm_over_processes`).
* ``fit(shard=True)`` splits the parameters, gradients and optimizer state over the processes (FSDP).
* ``save`` and ``export`` write from the first process only; the others wait until the file is in place.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
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


_sharded_training = False  # how several processes train: False, DDP (all of everything everywhere); True, FSDP


def shard_training(on: bool) -> None:
    """Whether ``fit`` under several processes shards the model (FSDP) instead of copying it whole to
    each process (DDP); ``fit(shard=...)`` decides for one call. The command line's ``--shard``."""
    global _sharded_training
    _sharded_training = bool(on)


def sharding() -> bool:
    return _sharded_training


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters, and so their gradients and the optimizer's state, are
    split over the processes (PyTorch's FSDP, ``fully_shard``): every module that owns parameters is
    one unit, gathered whole only for its own forward and backward. The copy, not ``model``, is
    sharded because FSDP changes the modules it wraps for good; :func:`gather_into` brings the
    trained values back."""
    import copy

    from torch.distributed.fsdp import fully_shard

    work = copy.deepcopy(model)
    for module in reversed(list(work.modules())):  # innermost first: each unit holds only its own
        if module is not work and next(module.parameters(recurse=False), None) is not None:
            fully_shard(module)
    fully_shard(work)
    return work


def gather_into(work: torch.nn.Module, model: torch.nn.Module) -> None:
    """The sharded copy's values, whole, into ``model`` on every process; buffers (BatchNorm's
    running statistics, which each process updated on its own share) are the first process's, as
    DDP keeps them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.load_state_dict(get_model_state_dict(work, options=StateDictOptions(full_state_dict=True)))
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


@contextlib.contextmanager
def batch_norm_over_processes(model: torch.nn.Module) -> Iterator[None]:
    """While several processes train ``model``: each BatchNorm in training mode normalises with the
    mean and variance of the whole global batch, summed over the processes (differentiably, so the
    gradients are one process's too), and keeps running statistics of the whole batch, as one process
    would. Without this each process would normalise by its own share's statistics and the model
    would differ. PyTorch's SyncBatchNorm does the same on GPUs only. Enter it after wrapping the
    model in DDP: a DDP built while the statistics' own group exists averaged nothing, here."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if active() else []
    if not norms:
        yield
        return
    # Their own group: sums issued inside backward must not pair up with DDP's gradient sums, which
    # it issues as they become ready.
    group = dist.new_group(backend=dist.get_backend())
    for norm in norms:  # this instance only, until the end
        norm.forward = functools.partial(_batch_norm_over_processes, norm, group)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward
        dist.destroy_process_group(group)


class _SumOverProcesses(torch.autograd.Function):
    """A sum over the processes that gradients pass through: each process's share of the sum
    receives the sum of every process's gradient. (``torch.distributed.nn`` had this, deprecated
    for private functional collectives.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        total = gradient.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _batch_norm_over_processes(norm, group, x: torch.Tensor) -> torch.Tensor:
    if not norm.training:
        return type(norm).forward(norm, x)
    channels, dims = x.shape[1], [0, *range(2, x.dim())]
    wide = x.double()  # sums of squares over a whole batch: float64 keeps E[x^2] - E[x]^2 exact enough
    local = torch.cat([wide.sum(dims), wide.square().sum(dims), wide.new_tensor([x.numel() // channels])])
    total = _SumOverProcesses.apply(local, group)
    count = total[-1]
    mean = total[:channels] / count
    variance = (total[channels:2 * channels] / count - mean.square()).clamp(min=0)
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(variance.to(x.dtype).view(shape) + norm.eps)
    if norm.affine:
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
            norm.running_mean.mul_(1 - momentum).add_(mean.to(x.dtype), alpha=momentum)
            unbiased = variance * count / (count - 1).clamp(min=1)
            norm.running_var.mul_(1 - momentum).add_(unbiased.to(x.dtype), alpha=momentum)
    return y


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
