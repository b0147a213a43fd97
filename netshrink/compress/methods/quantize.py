"""Weight quantization: 1 to 8 bits, symmetric or affine, per tensor or per output channel;
binary (XNOR-Net) and ternary (TWN) weights; optional learned step size (LSQ).

The founding text's ``round(w / 2^(b-1)) * 2^(b-1)`` rounds every weight with |w| < 2^(b-2) to zero,
i.e. all of a normal network. The step must come from the tensor's own range:
``scale = max|w| / (2^(b-1) - 1)`` (symmetric) or ``(max - min) / (2^b - 1)`` (affine).

During fine-tuning the rounding passes gradients straight through (STE, Bengio et al. 2013).
Zeros stay exactly zero: the grid always contains 0, so pruned weights survive quantization.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import NetshrinkError
from .base import Method, Report, channel_view, check_choice, check_range, each_value, per_layer, weight_of
from ...errors import check_flag
from .blocks import with_blocks
from .grid import RoundToGrid, applicable_group, describe, fixed_grid

SCHEMES = ("symmetric", "affine", "ternary")
GRANULARITIES = ("channel", "tensor")


def _reduce(w: torch.Tensor, per_channel: bool, op) -> torch.Tensor:
    """Reduce |w| or w to one value per group, shaped to broadcast back against ``w``."""
    if per_channel:
        return op(channel_view(w), dim=1).view(-1, *([1] * (w.dim() - 1)))
    return op(w.reshape(1, -1), dim=1).view(*([1] * w.dim()))


def _amax(x, dim):
    return x.amax(dim=dim)


def _amin(x, dim):
    return x.amin(dim=dim)


def quantization_grid(w: torch.Tensor, bits: int, scheme: str, per_channel: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for ``w``, broadcastable against it.

    Symmetric uses the narrow range [-(2^(b-1)-1), 2^(b-1)-1] so that +-max|w| are both on the grid;
    affine stretches [min(w, 0), max(w, 0)] over [0, 2^b - 1] with an integer zero point.
    """
    w = w.detach()
    if scheme == "affine":
        qmin, qmax = 0, 2 ** bits - 1
        low = _reduce(w, per_channel, _amin).clamp(max=0)
        high = _reduce(w, per_channel, _amax).clamp(min=0)
        scale = (high - low) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-low / scale).clamp(qmin, qmax)
        return scale, zero_point, qmin, qmax
    qmax = 2 ** (bits - 1) - 1
    scale = _reduce(w.abs(), per_channel, _amax) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.zeros_like(scale), -qmax, qmax


def fake_quantize(w: torch.Tensor, bits: int, scheme: str = "symmetric", per_channel: bool = True,
                  ) -> torch.Tensor:
    """Quantize-dequantize ``w`` (no gradient trick; see :class:`FakeQuantize` for training)."""
    if bits == 1:
        return binarize(w, per_channel)
    if scheme == "ternary":
        return ternarize(w, per_channel)
    scale, zero_point, qmin, qmax = quantization_grid(w, bits, scheme, per_channel)
    q = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def binarize(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """XNOR-Net (Rastegari et al. 2016): sign(w) * mean|w| per output channel; the scale minimises
    the L2 error. Existing zeros (pruned weights) stay zero and cost no value."""
    nonzero = (w != 0).to(w.dtype)
    count = _reduce(nonzero, per_channel, lambda x, dim: x.sum(dim=dim)).clamp(min=1)
    scale = _reduce(w.abs(), per_channel, lambda x, dim: x.sum(dim=dim)) / count
    return torch.sign(w) * scale


def ternarize(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Ternary weight networks (Li & Liu 2016): |w| <= 0.7 * mean|w| -> 0, the rest -> +-alpha,
    alpha being the mean |w| of the survivors (the approximate L2-optimal rule of the paper)."""
    magnitude = w.abs()
    mean = _reduce(magnitude, per_channel, lambda x, dim: x.mean(dim=dim))
    keep = (magnitude > 0.7 * mean).to(w.dtype)
    count = _reduce(keep, per_channel, lambda x, dim: x.sum(dim=dim)).clamp(min=1)
    alpha = _reduce(magnitude * keep, per_channel, lambda x, dim: x.sum(dim=dim)) / count
    return torch.sign(w) * keep * alpha


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``source`` in the backward pass.

    Written ``value + (source - source.detach())`` because ``source - source.detach()`` is exactly
    zero, so the result is exactly ``value``; the common ``source + (value - source).detach()``
    is off by rounding and would leave weights just off their grid.
    """
    return value + (source - source.detach())


class FakeQuantize(nn.Module):
    """Weight transform: quantize-dequantize in the forward pass, identity gradient in the backward
    pass (straight-through estimator). The grid is recomputed from the current weight each call,
    so it follows the weights as they are fine-tuned."""

    def __init__(self, bits: int, scheme: str = "symmetric", per_channel: bool = True) -> None:
        super().__init__()
        self.bits, self.scheme, self.per_channel = int(bits), scheme, bool(per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1 or self.scheme == "ternary":
            return straight_through(fake_quantize(w.detach(), self.bits, self.scheme, self.per_channel), w)
        return RoundToGrid.apply(w, *quantization_grid(w, self.bits, self.scheme, self.per_channel))

    def record(self) -> dict:
        return {"kind": "quantize", "bits": self.bits, "scheme": self.scheme, "per_channel": self.per_channel}

    @classmethod
    def from_record(cls, record: dict, w: torch.Tensor) -> "FakeQuantize":
        """Quantizing a weight that is already on its grid leaves it unchanged, so the grid is
        recomputed from the stored weight."""
        check_range("quantize bits", record.get("bits"), 1, 8, integer=True)
        check_choice("quantize scheme", record.get("scheme"), SCHEMES)
        return cls(int(record["bits"]), record["scheme"], bool(record.get("per_channel", True)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {self.scheme}, per_{'channel' if self.per_channel else 'tensor'}"


class LearnedStepQuantize(nn.Module):
    """LSQ (Esser et al. 2020): symmetric fake quantization whose step size per channel is a
    trained parameter, with the paper's gradient scale 1 / sqrt(numel * qmax)."""

    def __init__(self, w: torch.Tensor, bits: int, per_channel: bool = True) -> None:
        super().__init__()
        self.bits, self.per_channel = int(bits), bool(per_channel)
        self.qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
        init = 2 * _reduce(w.detach().abs(), per_channel, lambda x, dim: x.mean(dim=dim)) / self.qmax ** 0.5
        self.step = nn.Parameter(init.clamp(min=1e-8))
        self.grad_scale = 1.0 / (w.numel() * self.qmax) ** 0.5

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        step = straight_through(self.step.detach(), self.step * self.grad_scale)
        qmin = -self.qmax if self.bits > 1 else -1
        scaled = torch.clamp(w / step, qmin, self.qmax)
        if self.bits == 1:  # two levels, +-step: round away from zero
            levels = torch.where(scaled >= 0, 1.0, -1.0) * (w != 0)
        else:
            levels = torch.round(scaled)
        return straight_through(levels.detach(), scaled) * step

    def record(self) -> dict:
        return {"kind": "learned-step", "bits": self.bits, "per_channel": self.per_channel}

    @classmethod
    def from_record(cls, record: dict, w: torch.Tensor) -> "LearnedStepQuantize":
        """The step is read back off the stored weight's grid (per channel: its smallest non-zero
        magnitude divides every value), so training resumes on the same levels."""
        check_range("learned-step bits", record.get("bits"), 1, 8, integer=True)
        transform = cls(w, int(record["bits"]), bool(record.get("per_channel", True)))
        magnitude = w.detach().abs().reshape(w.shape[0], -1) if transform.per_channel else w.detach().abs().reshape(1, -1)
        smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(dim=1)
        with torch.no_grad():
            found = torch.isfinite(smallest).view(transform.step.shape)
            transform.step.copy_(torch.where(found, smallest.view(transform.step.shape), transform.step))
        return transform

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learned step, per_{'channel' if self.per_channel else 'tensor'}"


@dataclass(frozen=True, kw_only=True)
class QuantizeWeights(Method):
    """Quantize weights to ``bits`` (1..8, or a per-layer map).

    ``scheme``: ``symmetric`` (zero on the grid, 2^b - 1 levels), ``affine`` (2^b levels over
    [min, max]) or ``ternary`` (TWN threshold rule; needs bits=2). 1 bit is always binary
    (sign * per-channel mean |w|). ``granularity``: one grid per output ``channel`` or per
    ``tensor``. ``learned_step=True`` trains the step size (LSQ, symmetric only).

    ``group_size``: one scale per this many consecutive inputs of each output channel instead of
    one per channel (finer grids for 2-4 bits). ``range="mse"``: each grid spans the clipped range
    with the lowest rounding error instead of the full range. Both fix the grid once (a
    :class:`~netshrink.compress.methods.grid.FixedGrid`, stored in files); the default grid follows the
    weights as they are fine-tuned. ``block_steps``: afterwards, tune each block's rounding
    directions, scale gains, biases and norms on ``calibration`` data for this many batches so
    that its output matches the unquantized model's (AutoRound; :mod:`netshrink.compress.methods.blocks`;
    needs a fixed grid); ``end_to_end_steps``: then tune the grids' scales (codes kept), biases and
    norms of the whole model against the unquantized model's output.
    """

    name: ClassVar[str] = "quantize"
    bits: int | Mapping[str, int] = 8
    scheme: str = "symmetric"
    granularity: str = "channel"
    learned_step: bool = False
    group_size: int | None = None
    range: str = "minmax"
    block_steps: int = 0
    end_to_end_steps: int = 0

    def check(self) -> None:
        super().check()
        check_range("bits", self.bits, 1, 8, integer=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_flag("learned_step", self.learned_step)
        if self.scheme == "ternary" and any(b != 2 for b in each_value(self.bits)):
            raise NetshrinkError(f"scheme='ternary' means 2-bit weights. Received: bits={self.bits}")
        if self.learned_step and self.scheme != "symmetric":
            raise NetshrinkError(f"learned_step works with scheme='symmetric'. Received: scheme={self.scheme!r}")
        check_choice("range", self.range, ("minmax", "mse"))
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, 1 << 20, integer=True)
        if self.fixed():
            if self.scheme == "ternary" or self.learned_step or self.granularity != "channel" \
                    or any(b < 2 for b in each_value(self.bits)):
                raise NetshrinkError("group_size and range='mse' work with 2-8 bit symmetric or affine grids per "
                                     f"channel. Received: bits={self.bits}, scheme={self.scheme!r}, "
                                     f"granularity={self.granularity!r}, learned_step={self.learned_step}")

        check_range("block_steps", self.block_steps, 0, 1e6, integer=True)
        check_range("end_to_end_steps", self.end_to_end_steps, 0, 1e6, integer=True)
        if (self.block_steps or self.end_to_end_steps) and not self.fixed():
            raise NetshrinkError("block_steps and end_to_end_steps tune fixed grids: give group_size or range='mse'. "
                                 f"Received: group_size={self.group_size}, range={self.range!r}")

    def run(self, model: nn.Module, calibration=None, **context: Any) -> Report:
        return with_blocks(model, lambda: super(QuantizeWeights, self).run(model, **context), calibration,
                           steps=self.block_steps, desc=self.name, end_to_end=self.end_to_end_steps)

    def fixed(self) -> bool:
        return self.group_size is not None or self.range != "minmax"

    def prepare(self, layers: dict[str, nn.Module], **_: Any) -> list:
        plan = []
        per_channel = self.granularity == "channel"
        for name, layer in layers.items():
            bits = int(per_layer(self.bits, name, "bits"))
            if self.fixed():
                w = weight_of(layer)
                group_size = applicable_group(w, self.group_size)
                transform = fixed_grid(w, bits, self.scheme, group_size, self.range, label=f"{self.range} range")
                plan.append((name, transform, f"{describe(bits, self.scheme, group_size)} ({self.range} range)"))
                continue
            if self.learned_step:
                transform = LearnedStepQuantize(layer.weight.detach(), bits, per_channel)
            else:
                transform = FakeQuantize(bits, self.scheme, per_channel)
            scheme = "binary" if bits == 1 else self.scheme
            plan.append((name, transform, f"{bits}-bit {scheme} weights per {self.granularity}"))
        return plan
