"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, so that the
layer's outputs on calibration data change as little as possible.

Rounding to nearest minimises each weight's own error, not the layer's: at 4 bits and below the
errors add up through the next layer. AdaRound keeps each weight within one step of where it
is, ``w_q = s * (floor(w / s) + h(V))``, with ``h`` a rectified sigmoid of a learned ``V``, and
minimises ``||layer(x; w_q) - layer(x; w)||^2 + lambda * sum(1 - |2h(V) - 1|^beta)`` with Adam
(squared error summed over each example's outputs, lambda = 0.01, as in the paper);
the regulariser, with ``beta`` annealed from 20 to 2, pushes every ``h`` to exactly 0 or 1, and
the final weights take those values. ``x`` are the inputs the layer receives from the model
compressed so far (activation quantizers included), replayed from memory: a byte budget bounds
what is kept per layer. Works on every Linear and Conv layer, depthwise ones included.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import LayerInputs
from ...errors import NetshrinkError
from .base import add_transform, check_choice, check_range, keep_mask, per_layer, replace_weight, weight_of
from .calibrated import Calibrated
from .grid import SCHEMES, FixedGrid, choose_grid, describe, expand, levels

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper's values)


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` applied to ``x`` with ``weight`` in place of its own (bias and geometry kept)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def soft_bits(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround(layer: nn.Module, inputs: list[torch.Tensor], w: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor, bits: int, scheme: str, *, iterations: int, lr: float = 1e-2,
             regularisation: float = 0.01, batch_size: int = 32, keep: torch.Tensor | None = None,
             seed: int = 0) -> torch.Tensor:
    """Learned rounding of ``w`` (the layer's weight shape) on the per-element grid (``scale``,
    ``zero``, shaped like ``w``); returns the rounded weight."""
    qmin, qmax = levels(bits, scheme)
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(0.01, 0.99)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) == rest at the start
    keep = torch.ones_like(w) if keep is None else keep.to(w.dtype)

    def weight(bits_up: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(floor + bits_up + zero, qmin, qmax) - zero) * scale * keep

    x = torch.cat([t.reshape(-1, t.shape[-1]) if isinstance(layer, nn.Linear) else t for t in inputs])
    with torch.no_grad():
        target = torch.cat([layer_output(layer, part, w) for part in x.split(256)])

    def reconstruction(out, goal):  # squared error summed over an example's outputs, mean over examples
        return (out - goal).square().reshape(len(out), -1).sum(dim=1).mean()

    optimizer = torch.optim.Adam([v], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    warmup = iterations // 5
    for step in range(iterations):
        pick = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
        loss = reconstruction(layer_output(layer, x[pick], weight(soft_bits(v))), target[pick])
        if step >= warmup:  # the regulariser pushes every h to 0 or 1, ever harder as beta falls
            beta = 20 - (20 - 2) * (step - warmup) / max(iterations - warmup, 1)
            loss = loss + regularisation * (1 - (2 * soft_bits(v) - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = weight((v >= 0).to(w.dtype))
        nearest = weight((rest >= 0.5).to(w.dtype))  # (floor + round(rest)): rounding to nearest

        def error(candidate):
            return sum(float(reconstruction(layer_output(layer, part, candidate), goal)) * len(part)
                       for part, goal in zip(x.split(256), target.split(256)))

        # As with GPTQ, a safety net: the learned rounding is kept only if it does better.
        return learned if error(learned) <= error(nearest) else nearest


@dataclass(frozen=True, kw_only=True)
class AdaRound(Calibrated):
    """Quantize weights to ``bits`` (2..8, or a per-layer map) per output channel, learning the
    rounding direction of each weight on calibration data (``iterations`` Adam steps per layer).
    The scales come from a range search (lowest rounding error) first."""

    name: ClassVar[str] = "adaround"
    needs: ClassVar[frozenset] = frozenset({"inputs"})
    bits: int | Mapping[str, int] = 4
    scheme: str = "symmetric"
    iterations: int = 1000
    lr: float = 1e-2
    input_budget_mb: int = 256

    def check(self) -> None:
        super().check()
        check_range("bits", self.bits, 2, 8, integer=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_range("iterations", self.iterations, 1, 1e7, integer=True)
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("input_budget_mb", self.input_budget_mb, 1, 1 << 20, integer=True)

    def unsupported(self, name: str, layer: nn.Module) -> str | None:
        if isinstance(layer, nn.Conv3d):
            return "Conv3d is not supported"
        return None

    def budget(self) -> int:
        return self.input_budget_mb << 20

    def solve(self, name: str, layer: nn.Module, inputs: LayerInputs) -> str:
        if not inputs.inputs:
            raise NetshrinkError(f"adaround: layer {name!r}'s first calibration batch alone exceeds "
                                 f"input_budget_mb={self.input_budget_mb}; raise it or lower batch_size")
        bits = int(per_layer(self.bits, name, "bits"))
        w = weight_of(layer)
        scale, zero = choose_grid(w, bits, self.scheme, None, "mse")
        keep = keep_mask(layer)
        rounded = adaround(layer, inputs.inputs, w, expand(scale, w, None), expand(zero, w, None), bits,
                           self.scheme, iterations=self.iterations, lr=self.lr, batch_size=self.batch_size,
                           keep=keep)
        replace_weight(layer, rounded)
        add_transform(layer, FixedGrid(scale, zero, bits, self.scheme, None, label="adaround"))
        used = sum(len(t) for t in inputs.inputs)
        partial = "" if inputs.complete else f" (first {used} examples: input budget)"
        return f"{describe(bits, self.scheme, None)}, AdaRound {self.iterations} steps{partial}"
