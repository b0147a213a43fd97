"""A layer's weight as netshrink's own integer codes: what every low-bit export writes.

A quantized layer computes with ``(codes - zero) * scale``, one scale (and zero point) per output
channel or per group of ``group_size`` consecutive inputs (the ``[out, inputs]`` view of
:mod:`netshrink.compress.methods.grid`). The codes are read back from the layer's transforms (a fixed grid,
the dynamic per-channel grid of plain quantization, a learned step) and checked: rebuilt from codes
and scales, the weight must equal what netshrink computes bit for bit, or the layer is treated as
float. Exporters then only repack these codes; none rounds a weight again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..compress.methods.base import transforms
from ..compress.methods.grid import FixedGrid, expand, levels
from ..compress.methods.quantize import FakeQuantize, LearnedStepQuantize, quantization_grid


@dataclass
class IntegerWeight:
    """``weight == (codes - zero) * scale`` (scale and zero repeated over each group), exactly."""

    codes: torch.Tensor  # int16 [out, inputs]: [0, 2^bits - 1] (affine) or +-(2^(bits-1) - 1) (symmetric)
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups], integers (0 for symmetric grids)
    bits: int
    group_size: int | None  # None: one group per output channel
    scheme: str  # "symmetric" or "affine"
    shape: tuple[int, ...]  # the layer's weight shape

    @property
    def inputs(self) -> int:
        return self.codes.shape[1]

    @property
    def group(self) -> int:
        """Inputs per group (the whole row for per-channel grids)."""
        return self.group_size or self.inputs

    @property
    def layout(self) -> str:
        """"groups of N" or "per channel", as the export reports say it."""
        return f"groups of {self.group_size}" if self.group_size else "per channel"

    def unsigned(self, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, zero points) as unsigned integers of ``bits`` (default: the grid's own width),
        value = (code - zero) * scale. A symmetric grid's codes shift by 2^(bits-1), the zero
        point every unsigned format assumes by default."""
        bits = bits or self.bits
        if self.scheme == "symmetric":
            shift = 2 ** (bits - 1)
            return (self.codes + shift).to(torch.uint8), torch.full_like(self.zero, shift).to(torch.uint8)
        return self.codes.to(torch.uint8), self.zero.to(torch.uint8)

    def values(self) -> torch.Tensor:
        """The weight the codes stand for, computed as netshrink's transforms compute it."""
        rows = torch.zeros(self.shape, dtype=torch.float32).reshape(self.shape[0], -1)
        scale, zero = expand(self.scale, rows, self.group_size), expand(self.zero, rows, self.group_size)
        return ((self.codes.float() - zero) * scale).reshape(self.shape)


def _grid_of(layer: nn.Module, weight: torch.Tensor):
    """(scale [out, groups], zero, bits, group_size, scheme) of the layer's last transform, if it
    puts the weight on an integer grid."""
    stack = transforms(layer)
    last = stack[-1] if stack else None
    rows = weight.reshape(weight.shape[0], -1)
    if isinstance(last, FixedGrid):
        return last.scale, last.zero, last.bits, last.group_size, last.scheme
    if isinstance(last, FakeQuantize) and last.bits >= 2 and last.scheme in ("symmetric", "affine"):
        scale, zero, _, _ = quantization_grid(weight, last.bits, last.scheme, last.per_channel)
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        if not last.per_channel:  # one scale for the tensor: the same scale on every row
            scale, zero = scale.expand(rows.shape[0], 1), zero.expand(rows.shape[0], 1)
        return scale, zero, last.bits, None, last.scheme
    if isinstance(last, LearnedStepQuantize) and last.bits >= 2:
        step = last.step.detach().reshape(-1, 1).expand(rows.shape[0], 1)
        return step, torch.zeros_like(step), last.bits, None, "symmetric"
    return None


def integer_weight(layer: nn.Module) -> IntegerWeight | None:
    """The layer's weight as integer codes and scales, or None when it is not on an integer grid
    (float weights, shared codebooks, 1-bit and ternary weights) or the codes do not rebuild it
    exactly."""
    with torch.no_grad():
        weight = layer.weight.detach().float()
        found = _grid_of(layer, weight)
        if found is None:
            return None
        scale, zero, bits, group_size, scheme = found
        rows = weight.reshape(weight.shape[0], -1)
        scale, zero = scale.detach().float().clone(), zero.detach().float().clone()
        qmin, qmax = levels(bits, scheme)
        codes = torch.clamp(torch.round(rows / expand(scale, rows, group_size)) + expand(zero, rows, group_size),
                            qmin, qmax).to(torch.int16)
        found = IntegerWeight(codes, scale, zero, bits, group_size, scheme, tuple(weight.shape))
        return found if torch.equal(found.values(), weight) else None


def codes_of(model: nn.Module, kinds: tuple) -> dict[str, IntegerWeight]:
    """{layer: codes} for every layer of ``kinds`` whose weight is on an integer grid."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds) and getattr(module, "weight", None) is not None:
            weight = integer_weight(module)
            if weight is not None:
                found[name] = weight
    return found


def integer_layers(model: nn.Module, kinds: tuple) -> list[str]:
    """The layers of ``kinds`` whose last transform puts their weight on a 2-8-bit integer grid,
    read off the transforms alone (no codes computed, none checked): enough to decide whether a
    low-bit export is worth making."""
    return [name for name, module in model.named_modules()
            if isinstance(module, kinds) and getattr(module, "weight", None) is not None
            and _grid_of(module, module.weight.detach()) is not None]
