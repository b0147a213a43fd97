"""Weight sharing (Han et al. 2016): k-means over each layer's surviving weights; every weight
becomes its cluster's centroid. Centroids keep training (each gets the sum of its members'
gradients) while assignments stay fixed. Zeros (pruned weights) stay zero and use no cluster.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Method, check_choice, check_range, per_layer, weight_of

INITS = ("linear", "density", "random")


def kmeans_1d(values: torch.Tensor, clusters: int, init: str = "linear", iterations: int = 30,
              seed: int = 0, fit_limit: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: returns ``(centroids [k], assignment [n])``.

    Written by hand because in one dimension the nearest centroid is found by binary search on the
    midpoints between sorted centroids: O(n log k) and no n x k distance matrix, which is what
    makes 100M-weight models practical (scikit-learn's KMeans computes the full distances).
    ``init``: ``linear`` spaces centroids evenly over [min, max] (the paper's best), ``density``
    places them at quantiles, ``random`` picks random weights. Layers above ``fit_limit`` weights
    fit the centroids on an evenly strided sample of that size (plus the extremes), then assign
    every weight: 1-D centroids converge long before that sample runs out of information.
    """
    values = values.float().flatten()
    everything = values
    if values.numel() > fit_limit:
        sample = torch.sort(values).values[:: -(-values.numel() // fit_limit)]
        values = torch.cat([sample, everything.min().view(1), everything.max().view(1)])
    unique_count = int(torch.unique(values).numel()) if values.numel() <= 1 << 22 else clusters + 1
    clusters = max(1, min(clusters, unique_count))
    if values.numel() == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if init == "linear":
        centroids = torch.linspace(float(values.min()), float(values.max()), clusters)
    elif init == "density":
        sample = values if values.numel() <= 1 << 24 else values[:: -(-values.numel() // (1 << 24))]
        centroids = torch.quantile(sample, torch.linspace(0, 1, clusters))
    else:
        generator = torch.Generator().manual_seed(seed)
        centroids = values[torch.randint(values.numel(), (clusters,), generator=generator)]
    for _ in range(iterations):
        centroids, _ = torch.sort(centroids)
        assignment = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(clusters).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=clusters).float()
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    centroids, _ = torch.sort(centroids)
    assignment = torch.bucketize(everything, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, assignment


class Codebook(nn.Module):
    """Weight transform: ``w = centroids[assignment]`` where the weight was non-zero, else 0.
    The centroids are a parameter (fine-tuned); the assignment is fixed."""

    def __init__(self, centroids: torch.Tensor, assignment: torch.Tensor, nonzero: torch.Tensor) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("assignment", assignment.to(torch.int16 if len(centroids) < 32768 else torch.int32))
        self.register_buffer("nonzero", nonzero.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.centroids.numel() == 0:
            return torch.zeros_like(w)
        return self.centroids[self.assignment.long()] * self.nonzero

    def record(self) -> dict:
        return {"kind": "codebook"}

    @classmethod
    def from_record(cls, record: dict, w: torch.Tensor) -> "Codebook":
        """The codebook is the stored weight's distinct non-zero values; zeros stay pruned."""
        nonzero = w != 0
        centroids = torch.unique(w[nonzero])
        assignment = torch.zeros(w.shape, dtype=torch.long)
        assignment[nonzero] = torch.searchsorted(centroids, w[nonzero])
        return cls(centroids, assignment, nonzero)

    def extra_repr(self) -> str:
        return f"clusters={self.centroids.numel()}"


@dataclass(frozen=True, kw_only=True)
class ShareWeights(Method):
    """Share weights through a codebook of 2^``bits`` centroids per layer (bits 1..8, or a map)."""

    name: ClassVar[str] = "share"
    bits: int | Mapping[str, int] = 5
    init: str = "linear"
    iterations: int = 30

    def check(self) -> None:
        super().check()
        check_range("bits", self.bits, 1, 8, integer=True)
        check_choice("init", self.init, INITS)
        check_range("iterations", self.iterations, 1, 10000, integer=True)

    def prepare(self, layers: dict[str, nn.Module], **_: Any) -> list:
        plan = []
        for name, layer in layers.items():
            w = weight_of(layer)
            nonzero = w != 0
            k = 2 ** int(per_layer(self.bits, name, "bits"))
            centroids, assignment_of_nonzero = kmeans_1d(w[nonzero], k, self.init, self.iterations)
            assignment = torch.zeros(w.shape, dtype=torch.long)
            assignment[nonzero] = assignment_of_nonzero
            plan.append((name, Codebook(centroids, assignment, nonzero),
                         f"{centroids.numel()} shared values for {int(nonzero.sum())} non-zero weights"))
        return plan
