"""GPTQ (Frantar et al. 2023; the Optimal Brain Quantizer of Frantar & Alistarh 2022 made fast):
post-training weight quantization that minimises each layer's output error on calibration data.

For a layer ``y = W x`` with input second moments ``H = E[x x^T]``, the error of a quantized
``Q`` is ``tr((W - Q) H (W - Q)^T)``. Columns (inputs) are rounded one at a time; the rounding
error of column ``i`` is spread over the columns not yet rounded in proportion to
``H^-1[i, j] / H^-1[i, i]``, the change that best cancels it (Optimal Brain Surgeon). Using the
Cholesky factor of ``H^-1`` and blocks of 128 columns, this costs about one ``[in, in]``
factorisation and ``out * in^2`` multiply-adds per layer.

Scales are chosen before the solve, per output channel or per group of ``group_size`` inputs
(static groups, so ``act_order``, which rounds the inputs with the largest ``H[i, i]`` first,
keeps groups contiguous in the file). With ``search="mse"`` each group's range is the one with the
lowest rounding error weighted by ``H[i, i]``. Pruned weights (a mask applied earlier) stay zero
and their rounding error is compensated like any other: sparsity survives quantization.

As a safety net the solution is compared with plain rounding on the same grid under the same
error measure, and the better one is kept (on real layers GPTQ wins by a wide margin; damping
of a near-singular ``H`` could in principle make it lose).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import LayerInputs
from ...errors import NetshrinkError
from .base import (COMPRESSIBLE, add_transform, check_choice, check_range, keep_mask, per_layer, replace_weight, weight_of)
from ...errors import check_flag
from .calibrated import Calibrated
from .grid import SCHEMES, FixedGrid, applicable_group, choose_grid, describe, expand, fixed_grid, round_to

BLOCK = 128


def inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64. Inputs that never
    varied (zero diagonal) get a unit diagonal, so their columns are simply rounded. The damping
    grows tenfold while the matrix is not positive definite."""
    h = hessian.double().clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    level = float(diagonal.mean())
    for attempt in range(6):
        damped = h + torch.eye(len(h), dtype=h.dtype) * (damp * level * 10 ** attempt)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise NetshrinkError("the layer's input Hessian is not positive definite even with strong damping")


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the mean squared change of the layer's outputs (summed over them)."""
    d = (w - q).double()
    return float(((d @ hessian.double()) * d).sum())


def gptq(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
         scheme: str, *, damp: float = 0.01, act_order: bool = False, keep: torch.Tensor | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` ``[out, in]`` on the per-element grid (``scale``, ``zero``, both ``[out, in]``)
    minimising the output error under ``hessian`` ``[in, in]``; entries where ``keep`` is False
    become zero. Returns the quantized ``[out, in]`` and the values GPTQ rounded to it (each
    column after the earlier columns' errors were spread onto it): rounding those on the grid
    gives the quantized weight, and block reconstruction learns which of them to round the
    other way."""
    w = w.double().clone()
    scale, zero = scale.double(), zero.double()
    keep = keep if keep is not None else torch.ones_like(w, dtype=torch.bool)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    w, scale, zero, keep = w[:, order], scale[:, order], zero[:, order], keep[:, order]
    u = inverse_factor(hessian[order][:, order], damp)
    q = torch.zeros_like(w)
    latent = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            rounded = round_to(column, scale[:, start + i], zero[:, start + i], bits, scheme)
            rounded = torch.where(keep[:, start + i], rounded, torch.zeros_like(rounded))
            q[:, start + i] = rounded
            latent[:, start + i] = torch.where(keep[:, start + i], column, torch.zeros_like(column))
            error = (column - rounded) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    restored, unrounded = torch.empty_like(q), torch.empty_like(latent)
    restored[:, order], unrounded[:, order] = q, latent
    return restored.float(), unrounded.float()


@dataclass(frozen=True, kw_only=True)
class GPTQ(Calibrated):
    """Quantize weights to ``bits`` (2..8, or a per-layer map) with GPTQ on calibration data.

    ``group_size``: one scale per this many consecutive inputs of each output channel (32, 64,
    128; None: per channel). ``scheme``: ``symmetric`` or ``affine`` (a zero point per group, one
    more level). ``search``: ``mse`` (clip ranges chosen for the lowest weighted rounding error) or
    ``minmax``. ``act_order``: round inputs in order of decreasing activation energy. ``damp``:
    fraction of the mean Hessian diagonal added to it (numerical stability).
    """

    name: ClassVar[str] = "gptq"
    layer_kinds: ClassVar[tuple] = COMPRESSIBLE
    bits: int | Mapping[str, int] = 4
    group_size: int | None = 128
    scheme: str = "symmetric"
    search: str = "mse"
    act_order: bool = True
    damp: float = 0.01

    def check(self) -> None:
        super().check()
        check_range("bits", self.bits, 2, 8, integer=True)
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, 1 << 20, integer=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("search", self.search, ("mse", "minmax"))
        check_flag("act_order", self.act_order)
        check_range("damp", self.damp, 0.0, 1.0, low_open=True)

    def fallback(self, name: str, layer: nn.Module) -> str:
        """Embeddings, depthwise convolutions and tied weights are rounded on a grid chosen for
        the lowest rounding error: the whole model ends up at ``bits``."""
        bits = int(per_layer(self.bits, name, "bits"))
        current = weight_of(layer)
        group_size = applicable_group(current, self.group_size)
        add_transform(layer, fixed_grid(current, bits, self.scheme, group_size, self.search, label="rounded"))
        return f"{describe(bits, self.scheme, group_size)}, rounded ({self.search} range)"

    def solves_depthwise(self) -> bool:
        return True

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        bits = int(per_layer(self.bits, name, "bits"))
        current = weight_of(layer)
        w = current.reshape(current.shape[0], -1).float()
        group_size = applicable_group(w, self.group_size)
        keep = keep_mask(layer)
        keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.reshape(w.shape)
        # A depthwise convolution has one small Hessian per channel ([C, k*k, k*k]): each channel
        # is its own one-row problem. A matrix layer is one problem over all rows.
        per_channel = inputs.hessian.dim() == 3
        hessians = list(inputs.hessian) if per_channel else [inputs.hessian]
        rows = [slice(c, c + 1) for c in range(len(w))] if per_channel else [slice(None)]
        importance = None if per_channel else inputs.hessian.diagonal()
        scale, zero = choose_grid(w, bits, self.scheme, group_size, self.search, importance=importance)
        full_scale, full_zero = expand(scale, w, group_size), expand(zero, w, group_size)
        parts = [gptq(w[r], h, full_scale[r], full_zero[r], bits, self.scheme, damp=self.damp,
                      act_order=self.act_order, keep=keep[r]) for r, h in zip(rows, hessians)]
        solved, unrounded = torch.cat([q for q, _ in parts]), torch.cat([u for _, u in parts])
        rounded = round_to(w, full_scale, full_zero, bits, self.scheme) * keep
        solved_error = sum(output_error(w[r], solved[r], h) for r, h in zip(rows, hessians))
        rounded_error = sum(output_error(w[r], rounded[r], h) for r, h in zip(rows, hessians))
        # The weight under the grid is what was rounded (the grid computes the codes from it): the
        # model computes the same, and block reconstruction can still move each value either way.
        replace_weight(layer, unrounded if solved_error <= rounded_error else w * keep)
        add_transform(layer, FixedGrid(scale, zero, bits, self.scheme, group_size, label="gptq"))
        ratio = solved_error / rounded_error if rounded_error > 0 else 1.0
        how = f"output error {ratio:.2f}x rounding's" if solved_error <= rounded_error else \
            "rounding kept (GPTQ did not lower the error)"
        return f"{describe(bits, self.scheme, group_size)}, GPTQ: {how}"

