"""The multiple-choice knapsack that per-layer choices under a budget reduce to: one choice per
layer (or block), the least total damage whose costs fit the budget. ``auto`` picks per-layer
settings with it under a byte or latency budget, ``remove_heads(allocation="global")`` unit
counts under the uniform totals.

Written here because the problem is a few lines of numpy; an ILP solver would be a heavy
dependency for a table of at most a few thousand entries.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import numpy as np

SOLVER_UNITS = 8192  # cost buckets of the dynamic program: exact when the budget is smaller


def solve(options: dict[str, list], budget: int, units: int = SOLVER_UNITS,
          cost_of: Callable[[Any], int] = attrgetter("bytes")) -> dict | None:
    """One choice per layer with the least total damage whose costs (default: bytes; any
    non-negative integer) add up to at most ``budget`` (None if no combination fits).
    Multiple-choice knapsack by dynamic programming over cost in ``ceil(budget / units)``-sized
    buckets; each choice's cost is rounded up to whole buckets, so the answer always fits, and it
    is exact when ``budget <= units``. A choice is anything with a ``damage`` attribute."""
    if budget < 0:
        return None
    step = max(1, math.ceil(budget / units))
    size = budget // step + 1
    best = np.zeros(size)  # least damage within <= b buckets, over the layers so far
    picks = []
    for name, choices in options.items():
        costs = [-(-cost_of(c) // step) for c in choices]
        table = np.full((len(choices), size), np.inf)
        for j, (cost, choice) in enumerate(zip(costs, choices)):
            if cost < size:
                table[j, cost:] = best[:size - cost] + choice.damage
        picks.append(table.argmin(0))
        best = table.min(0)
    if not np.isfinite(best[-1]):
        return None
    policy, left = {}, size - 1
    for (name, choices), pick in zip(reversed(list(options.items())), reversed(picks)):
        choice = choices[int(pick[left])]
        policy[name] = choice
        left -= -(-cost_of(choice) // step)
    return dict(reversed(list(policy.items())))
