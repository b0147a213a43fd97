"""Biases rounded onto an integer grid, so that files store them in a few bits each.

A trained bias is one float per output; the file codes its sign and exponent and keeps the 23
mantissa bits as they are (at least 23 bits a value). Once weights are pruned and shared, biases
are a visible share of a small model's file (``netshrink report`` shows it per layer). Rounded
to ``2**(bits-1) - 1`` steps of the largest magnitude, each layer's bias is a grid that the file's
coder recognises and stores exactly as small integer codes.

Biases are rounded in place, not through a weight transform: this is a final step. Fine-tuning
afterwards would move them off the grid again (they would simply be stored as floats).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .base import LINEAR_CONV, Method, Report, check_range, per_layer


def grid_bias(bias: torch.Tensor, bits: int) -> torch.Tensor:
    """``bias`` rounded to integer multiples of one step, the step chosen so that the file's grid
    detection (``netshrink.grids.grid``: the largest magnitude over ``2**(bits-1) - 1``) finds it
    again bit for bit."""
    from ...grids import grid

    levels = 2 ** (bits - 1) - 1
    values = bias.detach().float().cpu()
    largest = values.abs().max()
    if largest == 0:
        return values
    step = (largest.double() / levels).float()
    for _ in range(4):  # float32 rounding: settle on a step the detector recomputes exactly
        rounded = torch.round(values / step).clamp(-levels, levels) * step
        rounded = rounded + 0.0  # -0.0 is off every grid
        if grid(rounded.numpy().view(np.uint32), rounded.numel()) is not None:
            break
        step = (rounded.abs().max().double() / levels).float()
    return rounded


@dataclass(frozen=True, kw_only=True)
class QuantizeBiases(Method):
    """Round each selected layer's bias to ``bits`` (2..12, or a per-layer map) on one grid per
    layer. Place it after the last fine-tuning. 8 bits keep a model's accuracy (tested); 10-12
    bits are a near-lossless file (largest change: half a step of the largest bias over 511-2047
    steps)."""

    name: ClassVar[str] = "bias"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    bits: int | Mapping[str, int] = 8

    def check(self) -> None:
        super().check()
        check_range("bits", self.bits, 2, 12, integer=True)  # the grids the file detects

    def prepare(self, layers: dict[str, nn.Module], **_: Any) -> list:
        plan = []
        for name, layer in layers.items():
            if layer.bias is None:
                continue
            bits = int(per_layer(self.bits, name, "bits"))
            rounded = grid_bias(layer.bias, bits)
            error = (rounded - layer.bias.detach().float().cpu()).abs().max().item()
            plan.append((name, rounded, f"{layer.bias.numel()} biases on a {bits}-bit grid (largest change {error:.2g})"))
        return plan

    def run(self, model: nn.Module, **context: Any) -> Report:
        layers, unmatched = self._select(model)
        planned = self.prepare(layers)  # every layer computed before any is changed
        report = self.new_report(unmatched)
        for name, rounded, detail in planned:
            with torch.no_grad():
                layers[name].bias.copy_(rounded.to(layers[name].bias))
            report.changed.append((name, detail))
        done = {name for name, _ in report.changed}
        report.skipped += [(n, "has no bias") for n in layers if n not in done]
        return report
