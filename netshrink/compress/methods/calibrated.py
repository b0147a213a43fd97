"""What the data-aware (post-training) methods share: they need calibration data, solve layers
one after another on the inputs the compressed model so far gives them (``netshrink.compress.calibration``),
replace each layer's weight by the solution and attach a transform that keeps it (a fixed grid, a
mask), and can correct the bias for the shift in each output's mean.

A subclass says which input statistics it ``needs`` and implements ``solve``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import LayerInputs, each_layer, im2col_inputs, is_depthwise_2d
from ...errors import NetshrinkError
from .base import LINEAR_CONV, Method, Report, check_range, tied_weights, transforms, weight_of, weight_source
from ...errors import check_flag
from .blocks import with_blocks
from .grid import FixedGrid
from .quantize import FakeQuantize, LearnedStepQuantize
from .share import Codebook

FIXED_GRIDS = (FixedGrid, Codebook, LearnedStepQuantize)  # grids that would not follow a rescaled weight
QUANTIZERS = (FakeQuantize, *FIXED_GRIDS)


@dataclass(frozen=True, kw_only=True)
class Calibrated(Method):
    """Base of the data-aware methods. ``samples``: calibration examples used (a few hundred is
    typical; more, and more varied, carry better to data of another kind); ``batch_size``: examples
    per forward pass; ``bias_correction``: afterwards, shift each layer's bias so that its outputs
    keep their calibration mean; ``block_steps``: afterwards, tune each block (a transformer layer,
    a CNN stage) for this many batches so that its output matches the dense model's
    (:mod:`netshrink.compress.methods.blocks`; 0: no block reconstruction, 200 is typical);
    ``end_to_end_steps``: then tune the grids' scales (codes kept), biases and norms of the whole
    model for this many batches against the dense model's output."""

    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    needs: ClassVar[frozenset] = frozenset({"hessian"})
    samples: int = 1024
    batch_size: int = 32
    bias_correction: bool = False
    block_steps: int = 0
    end_to_end_steps: int = 0

    def check(self) -> None:
        super().check()
        check_range("samples", self.samples, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)
        check_flag("bias_correction", self.bias_correction)
        check_range("block_steps", self.block_steps, 0, 1e6, integer=True)
        check_range("end_to_end_steps", self.end_to_end_steps, 0, 1e6, integer=True)

    def quantizes(self) -> bool:
        """Whether this method puts weights on a grid (then a layer already on one is refused)."""
        return True

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = super().select(model)
        if self.quantizes():
            for name, layer in layers.items():
                if any(isinstance(t, QUANTIZERS) for t in transforms(layer)):
                    raise NetshrinkError(f"{self.name}: layer {name!r} is already quantized; {self.name} starts from "
                                         "float weights (apply it instead of, not after, another quantizer)")
        return layers

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        """Compress ``layer`` from its calibration ``inputs`` (change its weight, attach its
        transform) and describe what was done."""
        raise NotImplementedError

    def solves_depthwise(self) -> bool:
        """Whether ``solve`` takes a depthwise convolution's per-channel statistics."""
        return False

    def unsupported(self, name: str, layer: nn.Module) -> str | None:
        """Why this method leaves ``layer`` alone, or None."""
        if is_depthwise_2d(layer) and self.solves_depthwise():
            return None
        if im2col_inputs(layer) is None and self.needs & {"hessian", "mean", "sumsq"}:
            if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
                return "an embedding table: its rows are looked up, not multiplied by an input to calibrate on"
            return "grouped/depthwise or 3-D convolution: no single input matrix to calibrate"
        return None

    def budget(self) -> int:
        """Bytes of raw inputs kept per layer (for methods that need ``inputs``)."""
        return 1 << 28

    def fallback(self, name: str, layer: nn.Module) -> str | None:
        """Compress a layer this method cannot calibrate by a data-free rule, or return None to
        leave it as it is."""
        return None

    def run(self, model: nn.Module, calibration=None, **context: Any) -> Report:
        if calibration is None:
            raise NetshrinkError(f"{self.name} learns from data: pass calibration=<a few hundred examples; "
                                 "labels are not needed>")
        return with_blocks(model, lambda: self._solve_layers(model, calibration), calibration,
                           steps=self.block_steps, samples=self.samples, batch_size=self.batch_size, desc=self.name,
                           end_to_end=self.end_to_end_steps)

    def _solve_layers(self, model: nn.Module, calibration) -> Report:
        layers, unmatched = self._select(model)
        report = self.new_report(unmatched)
        tied = tied_weights(model)
        chosen = {}
        for name, layer in layers.items():
            reason = self.unsupported(name, layer)
            if reason is None and id(weight_source(layer)) in tied:
                reason = "its weight is tied to another layer's"
            if reason is None:
                chosen[name] = layer
                continue
            fallback = self.fallback(name, layer)
            if fallback:
                report.changed.append((name, f"{fallback} ({reason})"))
            else:
                report.skipped.append((name, reason))
        needs = self.needs | ({"mean"} if self.bias_correction else set())
        reached = set()
        for name, stats in each_layer(model, chosen, calibration, frozenset(needs), samples=self.samples,
                                      batch_size=self.batch_size, input_budget=self.budget(),
                                      desc=self.name):
            layer = chosen[name]
            started = time.perf_counter()
            before = weight_of(layer) if self.bias_correction else None
            detail = self.solve(name, layer, stats)
            if before is not None:
                detail += self._correct_bias(layer, before, stats)
            report.changed.append((name, f"{detail} ({time.perf_counter() - started:.1f}s)"))
            reached.add(name)
        report.skipped += [(n, "the calibration data never reached it") for n in chosen if n not in reached]
        return report

    @staticmethod
    def _correct_bias(layer: nn.Module, before: torch.Tensor, stats: LayerInputs) -> str:
        """The outputs' mean moved by ``(W_new - W_old) @ mean input``; move the bias back."""
        if layer.bias is None:
            return "; no bias to correct"
        if stats.sum is None:
            return "; bias not corrected (no single input matrix)"
        change = (weight_of(layer) - before).reshape(before.shape[0], -1)
        # a depthwise convolution's mean is per channel ([C, k*k]); a matrix layer's is per input
        shift = (change * stats.mean).sum(dim=1) if stats.mean.dim() == 2 else change @ stats.mean
        layer.bias = nn.Parameter(layer.bias.detach() - shift.to(layer.bias.dtype))
        return f"; bias corrected (mean shift {shift.abs().mean():.2g})"
