"""Wanda (Sun et al. 2024, "pruning by weights and activations"): remove the weights with the
smallest ``|w_ij| * ||x_j||`` (the weight's magnitude times its input's root sum of squares on
calibration data), compared within each output row. No weights are updated, so it is the
quickest data-aware pruning: one pass collecting input norms per layer.

Exactly ``round(keep * size)`` weights are kept per layer (rows' counts differ by at most one),
or ``n`` of every ``m`` inputs (groups as in :class:`~netshrink.methods.sparsegpt.SparseGPT`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import LayerInputs
from .base import add_transform, per_layer, weight_of
from .calibrated import Calibrated, keep_mask
from .prune import Mask
from .sparsegpt import check_sparsity, nm_groups_fit, share, tap_major


def wanda_mask(w: torch.Tensor, norms: torch.Tensor, *, keep: float | None = None, n: int | None = None,
               m: int | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The kept mask of ``w`` ``[out, in]`` given each input's norm ``[in]``."""
    score = w.abs() * norms.unsqueeze(0)
    if allowed is not None:
        score = torch.where(allowed, score, torch.full_like(score, -1.0))
    kept = torch.zeros_like(w, dtype=torch.bool)
    if m is not None:
        groups = score.reshape(w.shape[0], -1, m)
        chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        kept = chosen.reshape(w.shape)
    else:
        pruned_total = w.numel() - int(round(keep * w.numel()))
        ranks = score.argsort(dim=1)  # ascending: the first ones of each row go
        for row in range(w.shape[0]):
            kept[row, ranks[row, share(pruned_total, w.shape[0], row):]] = True
    return kept if allowed is None else kept & allowed


@dataclass(frozen=True, kw_only=True)
class Wanda(Calibrated):
    """Prune to ``keep`` (per layer, or a per-layer map) or ``n`` of every ``m`` inputs, scoring
    each weight by ``|w| * ||x||`` on calibration data."""

    name: ClassVar[str] = "wanda"
    needs: ClassVar[frozenset] = frozenset({"sumsq"})
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

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        current = weight_of(layer)
        w = current.reshape(current.shape[0], -1)
        order = tap_major(layer)
        allowed = keep_mask(layer)
        allowed = None if allowed is None else allowed.reshape(w.shape)[:, order]
        keep = None if self.m is not None else float(per_layer(self.keep, name, "keep"))
        chosen = wanda_mask(w[:, order], inputs.sumsq.sqrt()[order], keep=keep, n=self.n, m=self.m, allowed=allowed)
        kept = torch.empty_like(chosen)
        kept[:, order] = chosen
        label = f"{self.n}:{self.m}" if self.m is not None else "wanda"
        add_transform(layer, Mask(kept.reshape(current.shape), label=label))
        count = int(kept.sum())
        what = f"{self.n}:{self.m} sparsity" if self.m is not None else "kept"
        return f"{what} {count} of {kept.numel()} weights ({100 * count / kept.numel():.1f}%), Wanda"
