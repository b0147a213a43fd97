"""``auto(..., coding="rate")``: rate-aware training with its trade-off searched for the budget.

Rate-aware training (:mod:`netshrink.compress.methods.rate`) decides every layer's size itself,
from one number: the trade-off, the loss a kilobyte is worth. The file shrinks and the error rises
as the trade-off grows, so a budget is met by searching that one number, on a log scale:

* accuracy budgets (``max_drop``, ``max_error_rate``): the largest trade-off whose model stays
  within the budget on validation data, so the smallest file that does;
* ``max_bytes``: the smallest trade-off whose file fits, so the most accurate model that does.

The first trial uses ``START`` (a kilobyte worth 0.03 of loss: what the LeNets and a small
ResNet/MobileNet-style CNN took to land near their records); each next one moves by ``FACTOR``
until the answer is bracketed, then halves the bracket (geometric mean) until ``trials`` have run.
A trial is the recipe ``rate`` (gradual, ``epochs``, distilled from the dense model), ``unused``,
then the biases on their finest grid, run on a copy of the dense model and judged on its real file
and the validation split, as the per-layer search judges its own.
"""
from __future__ import annotations

import copy
import math

from torch import nn

from ..errors import NetshrinkError
from .found import AutoResult, trial_tuning

START = 0.03  # loss per kilobyte of the first trial
FACTOR = 4.0  # how far each trial moves until the budget is bracketed


def rate_steps(tradeoff: float, layers: list[str], epochs: float, lr: float, augment: int, labeled: bool,
               bias_bits: int | None) -> list[dict]:
    """One trial's recipe (what ``AutoResult.yaml()`` writes for the chosen one)."""
    tune = trial_tuning(labeled, augment)
    steps = [{"rate": {"tradeoff": float(f"{tradeoff:.4g}"), "targets": layers},
              "gradual": {"epochs": epochs, "lr": lr, **tune}},
             {"unused": {}}]
    if bias_bits is not None:
        steps.append({"bias": {"bits": bias_bits}})
    return steps


def search(model: nn.Module, runner, scorer, *, layers: list[str], budget: dict, max_bytes: int | None,
           max_drop: float | None, dense_accuracy: float | None, dense_bytes: int, epochs: float, lr: float,
           trials: int, augment: int, bias_bits: int | None, on_trial=None) -> AutoResult:
    """The trade-off search (see the module doc). ``runner`` (a ``sweep.Runner``) runs one trial's
    steps and returns (file, validation loss, validation accuracy, model or None); ``budget`` is
    the user's, as the result reports it; ``max_drop`` is an error-rate budget already turned into
    points below ``dense_accuracy``."""
    from ..store.artifact import from_bytes

    by_bytes = max_bytes is not None
    runs: list[dict] = []
    passing_side, failing_side = None, None  # the trade-offs nearest the boundary on each side

    def passes(trial: dict) -> bool:
        if by_bytes:
            return trial["file_bytes"] <= max_bytes
        return trial["drop"] <= max_drop

    tradeoff = START
    for _ in range(trials):
        steps = rate_steps(tradeoff, layers, epochs, lr, augment, scorer.labeled, bias_bits)
        data, loss, accuracy, candidate = runner.run([steps])[0]
        if candidate is None:  # run elsewhere: the model comes back as its file
            candidate = from_bytes(data, copy.deepcopy(model), "a trial's file")
        trial = {"trial": len(runs) + 1, "tradeoff": tradeoff, "file_bytes": len(data), "accuracy": accuracy,
                 "loss": loss, "policy": {"rate": f"trade-off {tradeoff:.4g} loss per KB"}}
        if accuracy is not None and dense_accuracy is not None:
            trial["drop"] = 100 * (dense_accuracy - accuracy)
        trial["passed"] = passes(trial)
        runs.append({"trial": trial, "model": candidate, "steps": steps})
        if on_trial is not None:
            on_trial(trial)
        # accuracy budgets pass at small trade-offs, byte budgets at large ones
        if trial["passed"]:
            passing_side = tradeoff if passing_side is None else (
                min(passing_side, tradeoff) if by_bytes else max(passing_side, tradeoff))
        else:
            failing_side = tradeoff if failing_side is None else (
                max(failing_side, tradeoff) if by_bytes else min(failing_side, tradeoff))
        if passing_side is not None and failing_side is not None:
            tradeoff = math.sqrt(passing_side * failing_side)
        else:
            upward = (passing_side is None) == by_bytes  # toward the side not yet seen
            tradeoff = tradeoff * FACTOR if upward else tradeoff / FACTOR
    passed = [r for r in runs if r["trial"]["passed"]]
    if by_bytes:  # the most accurate model that fits (else, reported as over the budget: the smallest file)
        best = min(passed, key=lambda r: r["trial"]["loss"]) if passed else \
            min(runs, key=lambda r: r["trial"]["file_bytes"])
    else:  # the smallest file within the drop (else: the most accurate model)
        best = min(passed, key=lambda r: r["trial"]["file_bytes"]) if passed else \
            min(runs, key=lambda r: r["trial"]["drop"])
    return AutoResult(model=best["model"], policy={}, steps=best["steps"], budget=budget, met=bool(passed),
                      file_bytes=best["trial"]["file_bytes"], dense_bytes=dense_bytes, dense_accuracy=dense_accuracy,
                      accuracy=best["trial"]["accuracy"], trials=[r["trial"] for r in runs])


def check_rate_search(**settings: tuple) -> None:
    """Settings (``name=(value, default)``) that belong to the per-layer search, refused with
    ``coding="rate"`` unless left at their defaults."""
    given = {name: value for name, (value, default) in settings.items() if value != default}
    if given:
        raise NetshrinkError(f"coding='rate' searches one trade-off for the whole model; {', '.join(given)} belong "
                             f"to the per-layer search (coding='share'). Received: {given}")
