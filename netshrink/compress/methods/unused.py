"""Weights that feed nothing: after unstructured pruning, some units (neurons, channels) are read
by no later layer, because every weight of every consumer that reads them was pruned. Their
incoming weights, biases and BatchNorm parameters still cost bytes in the file but cannot change
any output. This step zeroes them (and keeps them zero through fine-tuning), which is exact: the
model computes the same outputs, in a smaller file.

Per-layer magnitude pruning decides each layer on its own, so this is common at high sparsity: on
LeNet-5 pruned to conv1 50%, conv2 10%, fc1 1.2%, fc2 10%, 185 of fc1's 500 units are read by no
weight of fc2, and 743 of the model's 8,050 kept weights feed them
(``investigations/results/unused_units.md``).

Which layers read a unit comes from the same channel spaces structured pruning uses
(``methods.structured``: residual adds couple layers; BatchNorm, activations, pooling and depthwise
convolutions pass channels on; a flatten makes a channel several columns). A unit of a space that
reaches the model's output, a concatenation or anything else not understood is never touched.
Zeroing a layer's units can leave the units before it unread in turn; the step repeats until
nothing changes.

Units whose incoming weights are all zero are left alone: their output is a constant that a
following layer's bias could absorb, but not exactly where a convolution pads its input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import NetshrinkError
from .base import LINEAR_CONV, Method, Report, add_transform, transforms, weight_of
from .prune import Mask
from .share import Codebook
from .structured import channel_spaces, selected_spaces


@dataclass(frozen=True, kw_only=True)
class PruneUnused(Method):
    """Zero the weights, biases and BatchNorm parameters of units no later layer reads (exact:
    outputs do not change). Calibration data (one batch) gives flattens' shapes. Units of a group
    are zeroed only when all of the group's layers are selected. A model ``torch.fx`` cannot trace,
    or one whose inputs are not one tensor (Hugging Face transformers), is left as it is, and the
    report says why."""

    name: ClassVar[str] = "unused"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV

    def run(self, model: nn.Module, calibration=None, **_: Any) -> Report:
        layers, unmatched = self._select(model)
        report = self.new_report(unmatched)
        try:  # every check before any change
            spaces = channel_spaces(model, calibration)[3]
        except NetshrinkError as exc:  # an optional saving: a graph it cannot read is left as it is
            report.skipped += [(n, f"left as it is: {exc}") for n in layers]
            return report
        groups = [(space, reason) for space, _, reason in selected_spaces(spaces, layers)]
        report.skipped += [(p, reason) for space, reason in groups if reason is not None for p in space.producers]
        open_spaces = [space for space, reason in groups if reason is None]
        zeroed: dict[str, int] = {}
        changed = True
        while changed:  # zeroing a layer's rows can leave the units before it unread
            changed = False
            for space in open_spaces:
                unread = _unread(space, model)
                fresh = unread & _still_used(space, model)
                if fresh.any():
                    changed = True
                    for name in space.producers + space.depthwise:
                        _zero_rows(model.get_submodule(name), unread)
                        zeroed[name] = int(unread.sum())
                    for name in space.norms:
                        norm = model.get_submodule(name)
                        with torch.no_grad():
                            for p in (norm.weight, norm.bias):
                                if p is not None:
                                    p[unread] = 0
        for name in layers:
            if name in zeroed:
                units = model.get_submodule(name).weight.shape[0]
                report.changed.append((name, f"{zeroed[name]} of {units} units read by no later layer: zeroed"))
        done = {n for n, _ in report.changed} | {n for n, _ in report.skipped}
        report.skipped += [(n, "every unit is read") for n in layers if n not in done]
        return report


def _unread(space, model: nn.Module) -> torch.Tensor:
    """Boolean per unit of ``space``: no weight of any consumer reads it."""
    units = model.get_submodule(space.producers[0]).weight.shape[0]
    read = torch.zeros(units, dtype=torch.bool)
    for name, _ in space.consumers:
        w = weight_of(model.get_submodule(name))
        read |= (w.reshape(w.shape[0], units, -1) != 0).any(2).any(0)
    return ~read


def _still_used(space, model: nn.Module) -> torch.Tensor:
    """Boolean per unit: some producer still has a non-zero weight or bias there."""
    used = None
    for name in space.producers + space.depthwise:
        layer = model.get_submodule(name)
        w = weight_of(layer)
        here = (w.reshape(w.shape[0], -1) != 0).any(1)
        if layer.bias is not None:
            here = here | (layer.bias.detach() != 0)
        used = here if used is None else used | here
    return used


def _zero_rows(layer: nn.Module, rows: torch.Tensor) -> None:
    """Zero ``rows`` of the layer's weight so that they stay zero: the mask of a pruned layer (and
    the codebook's non-zero flags after it, which do not read its input) is tightened; a layer
    without a mask gets one on top of its transforms."""
    keep = ~rows.view(-1, *([1] * (layer.weight.dim() - 1))).expand_as(layer.weight)
    stack = transforms(layer)
    masks = [t for t in stack if isinstance(t, Mask)]
    if masks:
        for mask in masks:
            mask.mask &= keep
            mask.release()
        for codebook in (t for t in stack if isinstance(t, Codebook)):
            codebook.nonzero *= keep
    else:
        add_transform(layer, Mask(keep.clone(), label="unused"))
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias[rows] = 0
