"""SparseGPT (Frantar & Alistarh 2023): post-training pruning that removes weights and adjusts
the remaining ones to keep each layer's outputs on calibration data.

The same machinery as GPTQ (``netshrink.compress.methods.gptq``): columns are visited in order, and the
error of zeroing weights in column ``i`` is spread over the columns not yet visited through the
Cholesky factor ``U`` of the damped inverse Hessian. Which weights to zero is decided per block
of 128 columns by the Optimal Brain Surgeon saliency ``w^2 / U[i, i]^2``, with the block's share
of the layer's budget, so the layer keeps exactly ``round(keep * size)`` weights (fewer only
where an earlier mask had already removed more). ``n`` of every ``m`` consecutive inputs (2:4)
are kept instead when ``n``/``m`` are given; in a convolution the ``m`` inputs of a group are
``m`` consecutive input channels at one kernel tap, as in :class:`~netshrink.compress.methods.prune.NMSparsity`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import LayerInputs
from ...errors import NetshrinkError
from .base import add_transform, check_range, keep_mask, per_layer, replace_weight, weight_of
from .calibrated import Calibrated
from .gptq import BLOCK, inverse_factor, output_error
from .prune import Mask


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` nearly equal integers that sum to it exactly."""
    return round(total * (index + 1) / parts) - round(total * index / parts)


def tap_major(layer: nn.Module) -> torch.Tensor:
    """A column order of the layer's ``[out, in * taps]`` weight in which each kernel tap's input
    channels are consecutive (identity for a Linear): N:M groups are m channels at one tap."""
    weight = weight_of(layer)
    channels, taps = weight.shape[1], weight[0, 0].numel()
    return torch.arange(channels * taps).reshape(channels, taps).T.reshape(-1)


def check_sparsity(method) -> None:
    """``keep`` in (0, 1], or an ``n``:``m`` pattern with 1 <= n <= m."""
    check_range("keep", method.keep, 0.0, 1.0, low_open=True)
    if (method.n is None) != (method.m is None):
        raise NetshrinkError(f"give both n and m for n:m sparsity. Received: n={method.n!r}, m={method.m!r}")
    if method.m is not None:
        check_range("m", method.m, 1, 1024, integer=True)
        check_range("n", method.n, 1, method.m, integer=True)


def nm_groups_fit(method, name: str, layer: nn.Module) -> str | None:
    if method.m is not None and weight_of(layer).shape[1] % method.m:
        return f"{weight_of(layer).shape[1]} inputs are not a multiple of m={method.m}"
    return None


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, *, keep: float | None = None, n: int | None = None,
              m: int | None = None, damp: float = 0.01, keep_only: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` ``[out, in]`` under ``hessian``: returns ``(new weight, kept mask)``. Entries
    where ``keep_only`` is False are pruned whatever their saliency."""
    w = w.double().clone()
    rows, columns = w.shape
    u = inverse_factor(hessian, damp)
    mask = torch.ones_like(w, dtype=torch.bool)
    allowed = keep_only if keep_only is not None else torch.ones_like(mask)
    pruned_total = w.numel() - int(round(keep * w.numel())) if keep is not None else 0
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        if m is None:
            saliency = block.square() / u_block.diagonal().square().unsqueeze(0)
            saliency[~allowed[:, start:end]] = -1.0  # already removed: first to go
            count = round(pruned_total * end / columns) - round(pruned_total * start / columns)
            drop = torch.zeros(saliency.numel(), dtype=torch.bool)
            if count > 0:
                drop[torch.topk(saliency.flatten(), count, largest=False, sorted=False).indices] = True
            mask[:, start:end] = ~drop.view_as(saliency) & allowed[:, start:end]
        for i in range(end - start):
            if m is not None and i % m == 0:
                group = block[:, i:i + m].square() / u_block.diagonal()[i:i + m].square().unsqueeze(0)
                group[~allowed[:, start + i:start + i + m]] = -1.0
                chosen = torch.zeros_like(group, dtype=torch.bool)
                chosen.scatter_(1, torch.topk(group, n, dim=1).indices, True)
                mask[:, start + i:start + i + m] = chosen & allowed[:, start + i:start + i + m]
            column = block[:, i]
            pruned = torch.where(mask[:, start + i], column, torch.zeros_like(column))
            error = (column - pruned) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = pruned
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return (w * mask).float(), mask


@dataclass(frozen=True, kw_only=True)
class DataAwarePruning(Calibrated):
    """What SparseGPT and Wanda share: ``keep`` (per layer, or a per-layer map) or ``n`` of every
    ``m`` inputs, a layer's weight as ``[out, inputs]`` in tap-major column order, and the mask."""

    keep: float | Mapping[str, float] = 0.5
    n: int | None = None
    m: int | None = None

    def check(self) -> None:
        super().check()
        check_sparsity(self)

    def quantizes(self) -> bool:
        return False

    def unsupported(self, name: str, layer: nn.Module) -> str | None:
        return super().unsupported(name, layer) or nm_groups_fit(self, name, layer)

    def problem(self, name: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
        """``(weight [out, inputs] in tap-major order, that order, the entries an earlier mask still
        allows or None, the keep fraction or None for n:m)``."""
        current = weight_of(layer)
        w = current.reshape(current.shape[0], -1).float()
        order = tap_major(layer)
        allowed = keep_mask(layer)
        allowed = None if allowed is None else allowed.reshape(w.shape)[:, order]
        keep = None if self.m is not None else float(per_layer(self.keep, name, "keep"))
        return w[:, order], order, allowed, keep

    def commit_mask(self, layer: nn.Module, chosen: torch.Tensor, order: torch.Tensor, how: str) -> str:
        """Attach the mask ``chosen`` (tap-major order) and describe it."""
        kept = torch.empty_like(chosen)
        kept[:, order] = chosen
        label = f"{self.n}:{self.m}" if self.m is not None else self.name
        add_transform(layer, Mask(kept.reshape(weight_of(layer).shape), label=label))
        count = int(kept.sum())
        what = f"{self.n}:{self.m} sparsity" if self.m is not None else "kept"
        return f"{what} {count} of {kept.numel()} weights ({100 * count / kept.numel():.1f}%), {how}"


@dataclass(frozen=True, kw_only=True)
class SparseGPT(DataAwarePruning):
    """Prune to ``keep`` (fraction of weights kept per layer, or a per-layer map) or to ``n`` of
    every ``m`` inputs with SparseGPT on calibration data; the kept weights are updated to
    compensate. ``damp``: fraction of the mean Hessian diagonal added for stability."""

    name: ClassVar[str] = "sparsegpt"
    damp: float = 0.01

    def check(self) -> None:
        super().check()
        check_range("damp", self.damp, 0.0, 1.0, low_open=True)
        if self.m is not None and BLOCK % self.m:
            raise NetshrinkError(f"SparseGPT's n:m groups must divide its {BLOCK}-column blocks. Received: m={self.m}")

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        w, order, allowed, keep = self.problem(name, layer)
        hessian = inputs.hessian[order][:, order]
        solved, mask = sparsegpt(w, hessian, keep=keep, n=self.n, m=self.m, damp=self.damp, keep_only=allowed)
        gain = output_error(w, w * mask, hessian) / max(output_error(w, solved, hessian), 1e-30)
        new = torch.empty_like(solved)
        new[:, order] = solved
        replace_weight(layer, new)  # before the mask: replace_weight keeps the transforms in place
        return self.commit_mask(layer, mask, order, f"SparseGPT: output error {gain:.1f}x lower than masking alone")
