"""Automatic compression under a latency budget: which units each group keeps, measured on ONNX Runtime.

``auto(model, data, max_latency=...)`` makes a model faster where it runs by doing less work:
structured pruning (:class:`~netshrink.compress.methods.structured.RemoveUnits`) removes whole neurons and
channels, which any runtime turns into speed. Masks, grids and codebooks make files small, not
ONNX Runtime's float kernels fast, so they are not choices here. The search has the shape of the
byte budget's (``autotune``), with latency for bytes:

1. **Groups.** Units that must go together (layers coupled by residual adds, depthwise
   convolutions and BatchNorms follow their producer) form a group (``unit_groups``).
2. **Sensitivity and latency.** Each group alone keeps each fraction of its units while the rest
   of the model stays dense: the validation loss increase is the choice's damage, and the model's
   latency on ONNX Runtime (fp32 or int8 export, the batch and threads asked for, every candidate timed
   in the same interleaved rounds) is its cost. Measured, not predicted from MACs: runtimes
   compute channels in blocks, so removing units can cost nothing, or even slow a layer down.
3. **Solve.** A policy's latency is predicted as the dense latency plus each group's change
   (additive, as damages are); the least damage under the budget is the same multiple-choice
   knapsack as for bytes (:func:`netshrink.compress.knapsack.solve`).
4. **Run and verify.** The policy runs as a recipe (remove units, then fine-tune with
   distillation from the dense model); the result is exported and timed on ONNX Runtime again
   beside the dense model. Over budget, the overshoot comes off the next solve's target.

Latency is measured on this machine: the budget holds here, and on machines like it.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import NetshrinkError
from .found import trial_tuning
from ..training.batches import Data, batches

UNIT_KEEPS = (1.0, 0.75, 0.5, 0.35, 0.25)
TIMING_REPEATS = 100


@dataclass(frozen=True)
class UnitChoice:
    """One group's share of units kept, with what it was measured to cost."""

    keep: float
    units: int  # units the group keeps
    latency: float  # seconds per batch of the whole model with only this group shrunk
    damage: float  # validation loss increase with only this group shrunk, before fine-tuning

    def describe(self) -> str:
        return "dense" if self.keep >= 1 else f"keep {self.units} units ({self.keep:g})"


def example_batch(data: Data, size: int) -> torch.Tensor:
    """``size`` inputs from ``data`` (repeated when it has fewer): the batch latency is timed on."""
    inputs = next(iter(batches(data, size, checked=True)))[0]
    if not torch.is_tensor(inputs):
        raise NetshrinkError("max_latency times models on one input tensor (structured pruning traces the graph "
                             "with it); this data's inputs are not a tensor")
    return inputs[torch.arange(size) % len(inputs)]


def ort_latencies(models: list[nn.Module], example: torch.Tensor, threads: int, repeats: int = TIMING_REPEATS,
                  calibration: Data | None = None) -> list:
    """Each model exported to ONNX (fp32, or int8 QDQ with activation ranges calibrated on
    ``calibration`` inputs when given) and run by ONNX Runtime on ``example`` with ``threads``
    threads; their :class:`~netshrink.deploy.bench.Timing` (median seconds, spread between rounds), all
    timed in the same interleaved rounds so that drift hits every model alike."""
    from ..deploy.bench import _interleaved, ort_session
    from ..deploy.to_onnx import export

    with tempfile.TemporaryDirectory() as folder:
        runs = []
        for i, model in enumerate(models):
            path = Path(folder) / f"{i}.onnx"
            export(model, path, example_inputs=example, int8=calibration is not None, calibration=calibration)
            session = ort_session(path, threads)
            feed = {session.get_inputs()[0].name: example.numpy()}
            runs.append(lambda session=session, feed=feed: session.run(None, feed))
        return _interleaved(runs, repeats)


def shrunk(model: nn.Module, keep: dict[str, float], example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with each group in ``keep`` (by its first layer) keeping that share of
    its units, every other group whole."""
    from ..compress.methods.structured import remove_units

    return remove_units(model, keep={**keep, "*": 1.0}, example_input=example[:2])[0]


def measure(model: nn.Module, groups: dict[str, dict], keeps: tuple, scorer, example: torch.Tensor, threads: int,
            calibration: Data | None = None, progress: bool = True):
    """Each group's choices: every group alone shrunk to every keep, scored on the validation split
    and timed on ONNX Runtime in one interleaved measurement (keep 1 is the dense model)."""
    from ..training.batches import Progress

    base = scorer.loss(model)
    candidates, entries = [model], []
    bar = Progress(len(groups) * len(keeps), "sensitivity", enabled=progress, unit="choice")
    try:
        for group, info in groups.items():
            for keep in keeps:
                small = model if keep >= 1 else shrunk(model, {group: keep}, example)
                units = small.get_submodule(group).weight.shape[0]
                entries.append((group, keep, units, max(0.0, scorer.loss(small) - base), len(candidates)))
                if keep < 1:
                    candidates.append(small)
                bar.update(len(entries), group)
    finally:
        bar.close()
    timings = ort_latencies(candidates, example, threads, calibration=calibration)
    table: dict[str, list[UnitChoice]] = {group: [] for group in groups}
    for group, keep, units, damage, index in entries:  # keep 1: the dense model, timed once
        table[group].append(UnitChoice(keep, units, timings[index if keep < 1 else 0].median, damage))
    return table


def unit_steps(policy: dict[str, UnitChoice], epochs: float, lr: float, augment: int = 0,
               labeled: bool = True) -> list[dict]:
    """The recipe for a policy: remove the units, then fine-tune distilling from the dense model."""
    keep = {group: c.keep for group, c in policy.items() if c.keep < 1}
    if not keep:
        return []
    tune = trial_tuning(labeled, augment)
    return [{"structured": {"keep": {**keep, "*": 1.0}}}, {"finetune": {"epochs": epochs, "lr": lr, **tune}}]


def search(model: nn.Module, train: Data, scorer, *, max_latency: float, batch: int, threads: int, runtime: str,
           keeps: tuple, epochs: float, lr: float, trials: int, augment: int, seed: int, progress: bool,
           targets: tuple, ignore: tuple, on_trial=None, sensitivity=None):
    """``auto``'s search under ``max_latency`` seconds per batch of ``batch`` (see the module doc)."""
    from ..store.artifact import to_bytes
    from .found import AutoResult
    from ..compress.knapsack import solve
    from ..compress.methods.structured import unit_groups
    from ..compress.recipe import Recipe

    example = example_batch(scorer.data, batch)
    # int8: every candidate exported as netshrink.export(int8=True) would, ranges from training inputs
    calibration = TensorDataset(example_batch(train, 256)) if runtime == "int8" else None
    groups = unit_groups(model, example[:2], targets=tuple(targets), ignore=tuple(ignore))
    if not groups:
        raise NetshrinkError("max_latency removes units, and this model has no group of units that can be removed "
                             "(netshrink.remove_units(model, example_input=x)[1] says why)")
    keeps = tuple(sorted({1.0, *keeps}, reverse=True))  # every group may stay whole: the dense model's time
    table = measure(model, groups, keeps, scorer, example, threads, calibration, progress) if sensitivity is None \
        else _reused(sensitivity, groups, keeps)
    dense = next(c.latency for c in next(iter(table.values())) if c.keep >= 1)
    fastest = min(c.latency for choices in table.values() for c in choices)

    def cost(choice: UnitChoice) -> int:  # nanoseconds above the fastest choice of all: never negative
        return round(1e9 * (choice.latency - fastest))

    def plan(target: float):
        # predicted = dense + sum(latency - dense) <= target, in costs: sum(cost) <= target - dense + G (dense - fastest)
        allowed = round(1e9 * (target - dense + len(table) * (dense - fastest)))
        return solve(table, allowed, cost_of=cost)

    floor = dense + sum(min(c.latency for c in choices) - dense for choices in table.values())
    feasible = plan(max_latency) is not None
    if feasible and max_latency < fastest:
        # Below every model measured, the additive prediction extrapolates: savings that overlap can
        # add up to more than the dense time (a negative prediction). Time the smallest model itself.
        smallest = shrunk(model, {group: min(keeps) for group in table}, example)
        floor = ort_latencies([smallest], example, threads, calibration=calibration)[0].median
    if not feasible or max_latency < floor:
        raise NetshrinkError(f"max_latency={1e3 * max_latency:.3f} ms cannot be met by removing units: the dense model "
                             f"takes {1e3 * dense:.3f} ms and the fewest units of every group about "
                             f"{1e3 * floor:.3f} ms (batch {batch}, {threads} threads, {runtime}); allow more, or "
                             "pass smaller keeps")
    runs, best, target = [], None, max_latency
    for _ in range(trials):
        policy = plan(target)
        if policy is None:
            break
        steps = unit_steps(policy, epochs, lr, augment, scorer.labeled)
        candidate = copy.deepcopy(model)
        if steps:
            Recipe.from_steps(copy.deepcopy(steps), "auto").run(candidate, train, seed=seed, progress=progress)
        reference, measured = ort_latencies([model, candidate], example, threads, calibration=calibration)
        loss, accuracy = scorer.scores(candidate)
        predicted = dense + sum(c.latency - dense for c in policy.values())
        trial = {"trial": len(runs) + 1, "target_latency": target, "predicted_latency": predicted,
                 "latency": measured.median, "dense_latency": reference.median,
                 "spread": max(reference.spread, measured.spread),
                 "file_bytes": len(to_bytes(candidate, recipe=steps)), "accuracy": accuracy, "loss": loss,
                 "policy": {group: c.describe() for group, c in policy.items()}}
        runs.append({"trial": trial, "model": candidate, "policy": policy, "steps": steps})
        if on_trial is not None:
            on_trial(trial)
        if measured.median <= max_latency:
            best = runs[-1]
            break
        # The overshoot (and 2% of the budget more) comes off the target, so the next solve
        # chooses a faster policy; measured latency is not exactly additive.
        target = predicted - (measured.median - max_latency) - 0.02 * max_latency
    met = best is not None
    best = best or min(runs, key=lambda r: r["trial"]["latency"])  # none met: the fastest, reported as over
    trial = best["trial"]
    return AutoResult(model=best["model"], policy=best["policy"], steps=best["steps"],
                      budget={"max_latency": max_latency, "batch": batch, "threads": threads, "runtime": runtime}, met=met,
                      file_bytes=trial["file_bytes"], dense_bytes=4 * sum(
                          p.numel() for p in model.state_dict().values() if p.is_floating_point()),
                      dense_accuracy=scorer.scores(model)[1], accuracy=trial["accuracy"],
                      trials=[r["trial"] for r in runs], sensitivity=table,
                      latency=trial["latency"], dense_latency=trial["dense_latency"])


def _reused(table, groups: dict, keeps: tuple) -> dict[str, list[UnitChoice]]:
    """An earlier latency search's table (``AutoResult.sensitivity``), checked against this one's
    groups and keeps."""
    if not isinstance(table, dict) or set(table) != set(groups):
        raise NetshrinkError("sensitivity is not a latency table for this model's groups: pass AutoResult.sensitivity "
                             "of an earlier max_latency search of the same model")
    for group, choices in table.items():
        if not all(isinstance(c, UnitChoice) and c.keep in keeps for c in choices) \
                or not any(c.keep >= 1 for c in choices):
            raise NetshrinkError(f"sensitivity for group {group!r} has choices outside keeps={list(keeps)}: search "
                                 "with the keeps it was measured with")
    return {group: list(table[group]) for group in groups}
