"""Wanda (Sun et al. 2024, "pruning by weights and activations"): remove the weights with the
smallest ``|w_ij| * ||x_j||`` (the weight's magnitude times its input's root sum of squares on
calibration data), compared within each output row. No weights are updated, so it is the
quickest data-aware pruning: one pass collecting input norms per layer.

Exactly ``round(keep * size)`` weights are kept per layer (rows' counts differ by at most one),
or ``n`` of every ``m`` inputs (groups as in :class:`~netshrink.compress.methods.sparsegpt.SparseGPT`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import LayerInputs
from .sparsegpt import DataAwarePruning, share


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
class Wanda(DataAwarePruning):
    """Prune to ``keep`` (per layer, or a per-layer map) or ``n`` of every ``m`` inputs, scoring
    each weight by ``|w| * ||x||`` on calibration data."""

    name: ClassVar[str] = "wanda"
    needs: ClassVar[frozenset] = frozenset({"sumsq"})

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        w, order, allowed, keep = self.problem(name, layer)
        chosen = wanda_mask(w, inputs.sumsq.sqrt()[order], keep=keep, n=self.n, m=self.m, allowed=allowed)
        return self.commit_mask(layer, chosen, order, "Wanda")
