"""Per-layer calibration inputs: the one place data-aware methods (GPTQ, SparseGPT, Wanda,
AdaRound, bias correction) get what they learn from.

Layers are solved one after another in the order the model runs them, each on the inputs it
receives from the layers already compressed before it (so each layer also corrects the error
the earlier ones left). For every layer (or set of layers reading the same tensor, such as an
attention block's query, key and value projections) the calibration set is run up to that layer
and stopped there, and only what the method needs is kept:

* ``hessian``: the input second-moment matrix ``X^T X / n`` (``[inputs, inputs]``; a
  convolution's inputs are its im2col patches), streamed, so memory is that of the matrix;
* ``mean`` and ``sumsq``: per-input mean and sum of squares (bias correction, Wanda);
* ``inputs``: the layer's raw inputs, kept up to a byte budget (AdaRound replays them).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import NetshrinkError, first_line
from ..training import distributed
from ..training.batches import (Data, Forward, Inputs, Progress, batch_length, batch_slice, batches, call,
                                default_forward, eval_mode)

NEEDS = ("hessian", "mean", "sumsq", "inputs")
MAX_HESSIAN_INPUTS = 16384  # a 1 GiB float32 matrix; wider layers are refused, not swapped to death


class _Reached(BaseException):
    """Raised by a hook once every layer being calibrated has seen its input: the rest of the
    forward pass is not needed. A BaseException, so a model's own ``except Exception`` cannot
    swallow it."""


def im2col_inputs(layer: nn.Module) -> int | None:
    """How many inputs one output of ``layer`` reads (the width of its rows below), or None where
    a layer's weight is not one matrix over its inputs (grouped convolutions, Conv3d)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1 and layer.padding_mode == "zeros" \
            and not isinstance(layer.padding, str):
        return layer.weight[0].numel()
    return None


def is_depthwise_2d(layer: nn.Module) -> bool:
    """A Conv2d with one filter per input channel: each output channel reads its own channel's
    ``kh * kw`` patch, so it has its own (small) input Hessian."""
    return (isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels
            == layer.out_channels and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows, so that its output at each position is a row times its weight:
    ``[positions, inputs]`` for a Linear (tokens) or a convolution (im2col patches, so its output
    is ``weight.reshape(out, -1) @ row``); ``[channels, positions, k*k]`` for a depthwise Conv2d,
    whose channels each read their own patch."""
    x = x.detach().float()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x, kernel = x.unsqueeze(-1), (*layer.kernel_size, 1)
        stride, padding, dilation = (layer.stride[0], 1), (layer.padding[0], 0), (layer.dilation[0], 1)
    else:
        kernel, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k*k, L]
    if is_depthwise_2d(layer):
        patches = patches.reshape(len(patches), layer.in_channels, -1, patches.shape[-1])  # [N, C, k*k, L]
        return patches.permute(1, 0, 3, 2).reshape(layer.in_channels, -1, patches.shape[2])
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _sums_rows(layer: nn.Module, needs: frozenset) -> bool:
    """Whether ``needs`` asks for statistics summed over the layer's input rows, and the layer has such rows."""
    return bool(needs & {"hessian", "mean", "sumsq"}) and (im2col_inputs(layer) is not None or is_depthwise_2d(layer))


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


@dataclass
class LayerInputs:
    """What one layer's calibration inputs taught: see the module docstring."""

    count: int = 0
    hessian: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    stored_bytes: int = 0
    complete: bool = True  # False when the input budget cut the stored inputs short

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def add(self, layer: nn.Module, x: torch.Tensor, needs: frozenset, budget: int) -> None:
        if "inputs" in needs:
            if self.stored_bytes + x.numel() * 4 <= budget:
                self.inputs.append(x.detach().float().clone())
                self.stored_bytes += x.numel() * 4
            else:
                self.complete = False
        if not _sums_rows(layer, needs):
            return
        rows = input_rows(layer, x)  # [..., positions, inputs]: a depthwise layer has one set per channel
        if "hessian" in needs:
            self.hessian = _accumulate(self.hessian, rows.transpose(-1, -2) @ rows)
        if "mean" in needs:
            self.sum = _accumulate(self.sum, rows.sum(dim=-2))
        if "sumsq" in needs:
            self.sumsq = _accumulate(self.sumsq, rows.square().sum(dim=-2))
        self.count += rows.shape[-2]

    def finish(self, layer: nn.Module, needs: frozenset) -> "LayerInputs":
        """The statistics complete: with several processes, each of which saw a share of the examples,
        summed over all of them first (then equal to one process's, up to the order of float sums)."""
        if distributed.active():
            self._sum_over_processes(layer, needs)
        if self.hessian is not None:
            self.hessian.div_(max(self.count, 1))
        return self

    def _sum_over_processes(self, layer: nn.Module, needs: frozenset) -> None:
        if not _sums_rows(layer, needs):
            return
        # A process whose share never reached the layer still takes part, with zeros of the right shape.
        rows = ([layer.in_channels, layer.weight[0].numel()] if is_depthwise_2d(layer) else [im2col_inputs(layer)])
        for kind, shape in (("hessian", rows + rows[-1:]), ("sum", rows), ("sumsq", rows)):
            if (kind if kind != "sum" else "mean") in needs:
                value = getattr(self, kind)
                setattr(self, kind, distributed.all_reduce(value if value is not None else torch.zeros(shape, device=layer.weight.device)))
        self.count = distributed.all_sum_number(self.count)


def real_positions(x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """``x`` without the padded positions of a batch of sequences: where the batch is a dict with a
    ``[batch, positions]`` ``attention_mask`` and ``x`` is ``[batch, positions, features]``, only the
    real tokens' rows (``[tokens, features]``); anything else unchanged. Padding is not data: its
    hidden states would otherwise be half of a calibration set of short sentences."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if torch.is_tensor(mask) and mask.dim() == 2 and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x


class OutputDamage:
    """What a change to ``model`` costs at its output: calling the instance measures the squared
    error of the model's output (or of ``forward(model, inputs)``, what the user keeps of it) on
    ``scoring`` batches against the output the model gave when the instance was made, over real
    tokens only, relative to that output's energy (0: unchanged, 1: as large as the output
    itself). Data-aware structured methods try a change, measure it, and undo it."""

    def __init__(self, model: nn.Module, scoring: list[Inputs], forward: Forward | None = None) -> None:
        self.model, self.scoring, self.forward = model, scoring, forward or default_forward
        self.reference = self._outputs(model)
        self.energy = max(sum(float(r.square().sum()) for r in self.reference), 1e-30)

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad(), eval_mode(model):
            return [real_positions(self.forward(model, b), b) for b in self.scoring]

    def __call__(self, model: nn.Module | None = None) -> float:
        """The damage of the model as it is now (or of ``model``, another model taking the same inputs)."""
        outputs = self._outputs(self.model if model is None else model)
        return sum(float((now - then).square().sum()) for now, then in zip(outputs, self.reference)) / self.energy


def take(data: Data, samples: int, batch_size: int) -> list[Inputs]:
    """The first ``samples`` examples of ``data`` as batches of ``batch_size`` (kept in memory: a
    calibration set is a few hundred examples, and it is run once per layer)."""
    kept, have = [], 0
    for inputs, _ in batches(data, batch_size):
        size = batch_length(inputs)
        if have + size > samples:
            inputs = batch_slice(inputs, 0, samples - have)
            size = samples - have
        kept.append(inputs)
        have += size
        if have >= samples:
            break
    if not kept:
        raise NetshrinkError("calibration data yielded no batches")
    return kept


def shares(kept: list[Inputs], summed: bool) -> list[Inputs]:
    """What this process runs of ``kept``: with several processes and statistics that are ``summed``
    over them afterwards, its share of each batch (possibly none: the sums then add zeros); else all."""
    if not (summed and distributed.active()):
        return kept
    parts = [distributed.share(inputs) for inputs in kept]
    return [part for part in parts if batch_length(part)]


def split(kept: list[Inputs], batch_size: int) -> list[Inputs]:
    """``kept`` with every batch larger than ``batch_size`` cut into batches of that size (a user's
    calibration set may come as one large batch; training steps want many small ones)."""
    pieces = []
    for inputs in kept:
        size = batch_length(inputs)
        pieces += [batch_slice(inputs, start, start + batch_size) for start in range(0, size, batch_size)] \
            if size > batch_size else [inputs]
    return pieces


def _run(model: nn.Module, inputs: Inputs) -> None:
    try:
        call(model, inputs)
    except _Reached:
        pass
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise NetshrinkError(f"the model does not run on the calibration data: {first_line(exc, None)}") from None


def calls_in_order(model: nn.Module, modules: dict[str, nn.Module], first: Inputs) -> list[tuple[str, object]]:
    """Every call of ``modules`` while ``model`` runs the batch ``first`` once, in order: ``(name, the
    call's first input)``. The inputs are the tensors themselves: ids of freed ones repeat."""
    calls: list[tuple[str, object]] = []
    handles = [module.register_forward_pre_hook(lambda _, args, name=name: calls.append((name, args[0] if args else None)))
               for name, module in modules.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            _run(model, first)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def execution_order(model: nn.Module, layers: dict[str, nn.Module], first: Inputs) -> tuple[list[list[str]], bool]:
    """The layers in the order ``model`` runs them on one batch, grouped where consecutive layers
    read the very same input tensor (they can be calibrated in one pass); and whether any layer
    runs more than once per forward pass (then no pass may stop early)."""
    calls = calls_in_order(model, layers, first)
    first_calls: dict[str, object] = {}
    for name, source in calls:
        first_calls.setdefault(name, source)  # a dict keeps the order of first calls
    groups: list[list[str]] = []
    previous = None
    for name, source in first_calls.items():
        if groups and source is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = source
    return groups, len(calls) > len(first_calls)


def each_layer(model: nn.Module, layers: dict[str, nn.Module], data: Data, needs: frozenset, *,
               samples: int, batch_size: int, input_budget: int = 1 << 28, desc: str = "calibrating",
               ) -> Iterator[tuple[str, LayerInputs]]:
    """Yield ``(name, statistics)`` for each of ``layers`` in execution order. The caller changes the
    layer before asking for the next one, and later layers see its changed outputs. Layers the
    calibration data never reaches are not yielded."""
    _check_needs(layers, needs)
    everything = take(data, samples, batch_size)
    groups, repeated = execution_order(model, layers, everything[0])
    kept = shares(everything, summed="inputs" not in needs)  # raw inputs are not shared out
    progress = Progress(len(groups), desc, unit="layer group")
    started = time.perf_counter()
    try:
        for done, group in enumerate(groups):
            stats = {name: LayerInputs() for name in group}
            pending: set[str] = set()
            batch: list[Inputs] = []

            def collector(name):
                def hook(module, args):
                    stats[name].add(module, real_positions(args[0], batch[0]), needs, input_budget)
                    pending.discard(name)
                    if not pending and not repeated:
                        raise _Reached
                return hook

            handles = [layers[name].register_forward_pre_hook(collector(name)) for name in group]
            try:  # cached(): each transformed weight is computed once per pass, not once per batch
                with torch.no_grad(), eval_mode(model), parametrize.cached():
                    for inputs in kept:
                        pending.update(group)
                        batch[:] = [inputs]
                        _run(model, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            for name in group:
                yield name, stats[name].finish(layers[name], needs)
            elapsed = time.perf_counter() - started
            left = elapsed / (done + 1) * (len(groups) - done - 1)
            progress.update(done + 1, f"~{left:.0f}s left")
    finally:
        progress.close()


def dense_statistics(model: nn.Module, layers: dict[str, nn.Module], data: Data, needs: frozenset, *,
                     samples: int, batch_size: int, input_budget: int = 1 << 28) -> dict[str, LayerInputs]:
    """Every one of ``layers``' statistics, as the model is now, from one pass over the data: what
    :func:`each_layer` yields when nothing changes between layers, without a pass per layer."""
    _check_needs(layers, needs)
    stats = {name: LayerInputs() for name in layers}
    batch: list[Inputs] = []

    def collector(name):
        def hook(module, args):
            stats[name].add(module, real_positions(args[0], batch[0]), needs, input_budget)
        return hook

    handles = [layer.register_forward_pre_hook(collector(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model), parametrize.cached():
            for inputs in shares(take(data, samples, batch_size), summed="inputs" not in needs):
                batch[:] = [inputs]
                _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.finish(layers[name], needs) for name, s in stats.items()}


def _check_needs(layers: dict[str, nn.Module], needs: frozenset) -> None:
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    for name, layer in layers.items():
        width = im2col_inputs(layer)
        if "hessian" in needs and width is not None and width > MAX_HESSIAN_INPUTS:
            raise NetshrinkError(f"layer {name!r} has {width} inputs: its input Hessian would need "
                                 f"{width * width * 4 / 2**30:.1f} GiB (limit: {MAX_HESSIAN_INPUTS} inputs); "
                                 "leave it out with ignore=[...]")
