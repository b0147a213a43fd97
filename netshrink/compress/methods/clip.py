"""Weight clipping: weights with |w| > T become t (by default sign(w) * T, i.e. a clamp)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import NetshrinkError
from .base import Method, check_range, per_layer, weight_of

LARGEST = float(torch.finfo(torch.float32).max)  # a weight holds float32: a larger value would be inf


class Clip(nn.Module):
    """Weight transform: |w| > threshold -> sign(w) * value (value defaults to the threshold).

    With the default value this is a clamp, whose gradient is zero outside the range and one inside.
    """

    def __init__(self, threshold: float, value: float | None = None) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.value = None if value is None else float(value)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return w.clamp(-self.threshold, self.threshold)
        return torch.where(w.abs() > self.threshold, torch.sign(w) * self.value, w)

    def record(self) -> dict:
        return {"kind": "clip", "threshold": self.threshold, "value": self.value}

    @classmethod
    def from_record(cls, record: dict, w: torch.Tensor) -> "Clip":
        check_range("clip threshold", record.get("threshold"), 0.0, LARGEST)
        if record.get("value") is not None:
            check_range("clip value", record["value"], 0.0, LARGEST)
        return cls(record["threshold"], record.get("value"))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}" + ("" if self.value is None else f", value={self.value:.4g}")


@dataclass(frozen=True, kw_only=True)
class ClipWeights(Method):
    """Clip weights at ``threshold`` (absolute) or at the ``percentile`` of each layer's |w|.

    ``value`` (>= 0) replaces clipped magnitudes; ``None`` clips to the threshold itself.
    """

    name: ClassVar[str] = "clip"
    threshold: float | Mapping[str, float] | None = None
    percentile: float | None = None
    value: float | None = None

    def check(self) -> None:
        super().check()
        if (self.threshold is None) == (self.percentile is None):
            raise NetshrinkError("clip needs exactly one of threshold or percentile. "
                                 f"Received: threshold={self.threshold}, percentile={self.percentile}")
        if self.threshold is not None:
            check_range("threshold", self.threshold, 0.0, LARGEST)
        if self.percentile is not None:
            check_range("percentile", self.percentile, 0.0, 100.0, low_open=True)
        if self.value is not None:
            check_range("value", self.value, 0.0, LARGEST)

    def prepare(self, layers: dict[str, nn.Module], **_: Any) -> list:
        plan = []
        for name, layer in layers.items():
            magnitude = weight_of(layer).abs().flatten()
            if self.percentile is not None:
                threshold = float(torch.quantile(_sample(magnitude), self.percentile / 100.0))
            else:
                threshold = float(per_layer(self.threshold, name, "threshold"))
            clipped = int((magnitude > threshold).sum())
            plan.append((name, Clip(threshold, self.value),
                         f"|w| > {threshold:.4g} clipped: {clipped} of {magnitude.numel()} weights"))
        return plan


def _sample(x: torch.Tensor, limit: int = 1 << 24) -> torch.Tensor:
    """torch.quantile refuses inputs over 2^24 elements; a strided sample is exact enough."""
    return x if x.numel() <= limit else x[:: -(-x.numel() // limit)]
