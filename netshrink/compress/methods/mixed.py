"""Mixed precision without retraining: each layer's weight bits chosen from its measured
sensitivity, so that the whole model fits an average number of bits per weight.

1. **Sensitivity.** Each layer alone (embedding tables included) is rounded at each candidate
   width (on grids chosen for the lowest rounding error, one scale per ``group_size`` inputs),
   every other layer left as it is, and the damage is the relative squared error this causes at
   the model's output on calibration examples (:class:`~netshrink.compress.calibration.OutputDamage`).
2. **Cost.** A layer at ``b`` bits costs ``b`` bits per weight plus a 16-bit scale per group (and a
   ``b``-bit zero point per group for affine grids), what the runtimes' grouped formats store.
3. **Solve.** Damages add up (the usual first-order assumption, as in HAWQ); one width per layer
   with the least total damage whose bits fit ``average_bits`` times the number of weights is a
   multiple-choice knapsack (:func:`netshrink.compress.knapsack.solve`).

The widths chosen are then a per-layer ``bits`` map for GPTQ (or any quantizer), which solves
each layer on data as usual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..calibration import OutputDamage, take
from ...errors import NetshrinkError
from ..knapsack import solve
from ...training.batches import Data, Forward
from .base import add_transform, check_range, distinct_weights, weight_of, weight_source
from ...errors import trial
from .grid import applicable_group, fixed_grid

WIDTHS = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 16  # a grouped scale as deployment formats store it (fp16)


@dataclass(frozen=True)
class Width:
    """One candidate width of one layer: what it costs (bits) and what it damages."""

    bits: int
    cost: int
    damage: float


def layer_cost(weight, bits: int, group_size: int | None, scheme: str) -> int:
    """Bits a layer's weight takes at ``bits``: codes, scales (and zero points)."""
    rows, inputs = weight.shape[0], weight[0].numel() if weight.dim() > 1 else 1
    group = applicable_group(weight, group_size) or inputs
    groups = rows * math.ceil(inputs / group)
    return weight.numel() * bits + groups * (SCALE_BITS + (bits if scheme == "affine" else 0))


def choose_widths(model: nn.Module, layers: dict[str, nn.Module], calibration: Data, *, average_bits: float,
                  group_size: int | None, scheme: str = "symmetric", highest: int = 8, samples: int = 128,
                  batch_size: int = 32, forward: Forward | None = None) -> tuple[dict[str, int], list[tuple]]:
    """``({layer: bits}, rows)``: the widths (at most ``highest``) with the least summed output
    damage whose bits average at most ``average_bits`` per weight; ``rows`` are ``(layer,
    weights, bits, damage)`` for a report."""
    check_range("average_bits", average_bits, 2.0, 8.0 + SCALE_BITS)
    owners = distinct_weights(layers)
    owner_of = {id(weight_source(m)): n for n, m in owners.items()}
    tied = {n: owner_of[id(weight_source(m))] for n, m in layers.items() if n not in owners}
    layers = owners
    widths = [b for b in WIDTHS if b <= highest]
    scoring = take(calibration, samples, batch_size)
    damage = OutputDamage(model, scoring, forward)
    options: dict[str, list[Width]] = {}
    for name, layer in layers.items():
        w = weight_of(layer)
        group = applicable_group(w, group_size)
        options[name] = []
        for bits in widths:
            with trial(model):
                add_transform(layer, fixed_grid(w, bits, scheme, group, "mse", label="trial"))
                options[name].append(Width(bits, layer_cost(w, bits, group_size, scheme), damage()))
    total = sum(weight_of(layer).numel() for layer in layers.values())
    budget = int(average_bits * total)
    chosen = solve(options, budget, cost_of=lambda width: width.cost)
    if chosen is None:
        least = sum(min(w.cost for w in choices) for choices in options.values()) / total
        raise NetshrinkError(f"average_bits={average_bits} is below what the narrowest widths take: "
                             f"{least:.2f} bits per weight at {min(widths)} bits with their scales")
    rows = [(name, weight_of(layers[name]).numel(), width.bits, width.damage) for name, width in chosen.items()]
    bits = {name: width.bits for name, width in chosen.items()}
    return {**bits, **{name: bits[owner] for name, owner in tied.items()}}, rows  # a tied layer has its owner's
