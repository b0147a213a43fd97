"""Automatic compression under one budget: per-layer settings chosen for the user.

``auto`` answers "what should each layer get?" the way HAWQ-V3 and SPDY do, with netshrink's
own methods and file:

1. **Sensitivity.** On a validation split held out of the training data (never the test set),
   each layer alone gets each choice (pruning to a keep fraction, then weight sharing at a bit
   width, or neither) while every other layer stays dense; the rise of the validation loss is
   that choice's damage. Pruning ranks weights by magnitude, or by what sparse variational
   dropout learns in a first training pass (``ranking="variational"``).
2. **Size.** Each choice's bytes are the real coder's output for that layer's weight as it would
   be stored (``codec.weights.encode``), not a bits-times-count estimate: positions and values
   are context coded, so only the coder knows what a mask costs.
3. **Solve.** Per-layer damages add up (the usual first-order assumption); one choice per layer
   with the least total damage under a byte budget is a multiple-choice knapsack, solved exactly
   by dynamic programming over bytes (:func:`netshrink.compress.knapsack.solve`). A layer's bias grid (8 bits down to 4) is
   a choice too, measured the same way; its bytes and damage add to those of the weight's choice.
4. **Run and verify.** The chosen policy becomes a recipe (gradual pruning, fine-tuning with
   distillation, zeroing the weights of units no layer reads any more, sharing, fine-tuning,
   biases onto the grids chosen for them), is run, and is verified on what the user gets: the real file's
   bytes and the validation accuracy. ``max_bytes`` re-solves with the overshoot taken off until
   the file fits, and with the bytes a file leaves unspent added back (zeroed units make files
   smaller than predicted), keeping the best fitting run; ``max_drop`` searches the byte budget (bisection on log bytes) for the
   smallest file whose fine-tuned model is within the drop; ``max_error_rate`` does the same for
   an error rate on validation data (the form published records take: "1.0% test error").

The input model is not changed; the result holds the compressed model, the policy as a recipe
anyone can rerun (``netshrink compress --recipe policy.yaml``), and every number the search saw.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetshrinkError
from .found import AutoResult, Choice, trial_tuning  # what searches return and share
from ..compress.knapsack import SOLVER_UNITS, solve
from ..compress.methods.base import (COMPRESSIBLE, LINEAR_CONV, apply, check_choice, distinct_weights, select_layers, transforms)
from ..compress.methods.bias import QuantizeBiases, grid_bias
from ..compress.methods.conv1d import as_linear
from ..compress.methods.prune import RANKINGS, keep_largest
from ..compress.methods.share import kmeans_1d
from .latency import UNIT_KEEPS
from .sweep import Runner
from ..training.ray_cluster import check_address
from ..training.batches import (Data, Forward, batches, check_data, check_model_fits, default_forward, eval_mode, hold_out)
from ..errors import check_number

KEEPS = (1.0, 0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.035, 0.025, 0.018, 0.012)
BITS = (None, 8, 6, 5, 4, 3, 2)  # None: values stay float32
BIAS_BITS = (8, 6, 5, 4)  # the grids a layer's bias may end on (each choice measured, as weights are)
# A policy whose summed damage (validation loss increase before any fine-tuning) is this small is
# as good as dense: the accuracy search never needs to try a bigger one.
SAFE_DAMAGE = 0.01
# A byte-budget run whose file is more than this share under the budget leaves bytes unspent: the
# next trial is solved with them added back.
UNDERSHOOT = 0.03


def _safe_budget(table: dict[str, list[Choice]], floor: int) -> int:
    """The smallest budget (on a geometric grid) whose best policy has at most SAFE_DAMAGE."""
    ceiling = sum(max(c.bytes for c in choices) for choices in table.values())
    for budget in np.geomspace(floor, ceiling, 48).astype(int):
        policy = solve(table, int(budget))
        if policy is not None and sum(c.damage for c in policy.values()) <= SAFE_DAMAGE:
            return int(budget)
    return ceiling


def compressed_weight(w: torch.Tensor, keep: float, bits: int | None, score: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` pruned to its ``keep`` highest-scoring entries (default score: magnitude), then its
    survivors shared through ``2**bits`` k-means centroids: what the recipe's prune and share steps
    produce before fine-tuning."""
    w = w.detach().float()
    if keep < 1:
        w = w * keep_largest(w.abs() if score is None else score, int(round(keep * w.numel()))).view_as(w)
    if bits is not None:
        nonzero = w != 0
        centroids, assignment = kmeans_1d(w[nonzero], 2 ** bits)
        w = w.clone()
        w[nonzero] = centroids[assignment]
    return w


def coded_bytes(w: torch.Tensor) -> int:
    from ..store.codec import weights as codec

    # -0.0 (a pruned negative weight) is stored as +0.0, as files do: the map would see it as kept.
    return len(codec.encode(w.detach().float().cpu().numpy() + np.float32(0)))


class _Validation:
    """The held-out split and how a model is scored on it: labeled data by cross-entropy and
    accuracy; unlabeled data by the mean squared distance to the dense model's outputs."""

    def __init__(self, model: nn.Module, data: Data, forward: Forward) -> None:
        self.data, self.forward = data, forward
        self.labels = [y for _, y in batches(data, 1000, checked=True)]
        self.labeled = all(y is not None for y in self.labels)
        self.labels = torch.cat(self.labels) if self.labeled else None
        self.reference = None if self.labeled else self.outputs(model)

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> torch.Tensor:
        with eval_mode(model):
            return torch.cat([self.forward(model, x).float() for x, _ in batches(self.data, 1000, checked=True)])

    def scores(self, model: nn.Module) -> tuple[float, float | None]:
        """(loss, accuracy or None for unlabeled data) from one pass over the split."""
        out = self.outputs(model)
        if not self.labeled:
            return F.mse_loss(out, self.reference).item(), None
        return F.cross_entropy(out, self.labels).item(), (out.argmax(1) == self.labels).float().mean().item()

    def loss(self, model: nn.Module) -> float:
        return self.scores(model)[0]


def measure_sensitivity(model: nn.Module, layers: dict[str, nn.Module], validation: _Validation,
                        keeps=KEEPS, bits=BITS, progress: bool = True,
                        scores: dict[str, torch.Tensor] | None = None,
                        unpruned: dict[str, torch.Tensor] | None = None) -> dict[str, list[Choice]]:
    """Every layer's choices with their coded bytes and validation damage, one layer compressed at
    a time (its weight swapped in place and put back). ``scores``: per-layer weight rankings
    learned by variational dropout (default: magnitude). ``unpruned``: the weights a keep-1 choice
    is sized on, when they differ from the model's (a trial trains only the layers it prunes under
    variational noise, so a layer it keeps whole is shared from its dense weights, which code larger
    than the noise-shrunk ones the model holds now)."""
    from ..training.batches import Progress

    base = validation.loss(model)
    bar = Progress(len(layers) * len(keeps) * len(bits), "sensitivity", enabled=progress, unit="choice")
    table, done = {}, 0
    try:
        for name, layer in layers.items():
            original = layer.weight.detach().clone()
            choices = []
            for keep in keeps:
                for b in bits:
                    w = compressed_weight(original, keep, b, None if scores is None else scores[name])
                    with torch.no_grad():
                        layer.weight.copy_(w)
                    stored = w if keep < 1 or unpruned is None else compressed_weight(unpruned[name], keep, b)
                    choices.append(Choice(keep, b, coded_bytes(stored), max(0.0, validation.loss(model) - base),
                                          "magnitude" if scores is None else "variational"))
                    done += 1
                    bar.update(done, name)
            with torch.no_grad():
                layer.weight.copy_(original)
            table[name] = choices
    finally:
        bar.close()
    return table


def measure_bias_sensitivity(model: nn.Module, layers: dict[str, nn.Module], validation: _Validation,
                             bias_bits: tuple[int, ...]) -> dict[str, list[Choice]]:
    """Each layer's bias grids (``layers``: layers with a bias), with their coded bytes and the
    validation loss increase with only that bias rounded (the others as the model holds them)."""
    base = validation.loss(model)
    table = {}
    for name, layer in layers.items():
        original = layer.bias.detach().clone()
        choices = []
        for b in bias_bits:
            rounded = grid_bias(original, b)
            with torch.no_grad():
                layer.bias.copy_(rounded.to(original))
            choices.append(Choice(1.0, None, coded_bytes(rounded), max(0.0, validation.loss(model) - base), bias_bits=b))
        with torch.no_grad():
            layer.bias.copy_(original)
        table[name] = choices
    return table


def with_biases(table: dict[str, list[Choice]], biases: dict[str, list[Choice]]) -> dict[str, list[Choice]]:
    """Every layer's weight choices, once per bias grid of that layer (bytes and damages added)."""
    return {name: [replace(c, bytes=c.bytes + b.bytes, damage=c.damage + b.damage, bias_bits=b.bias_bits)
                   for c in choices for b in biases[name]] if name in biases else list(choices)
            for name, choices in table.items()}


def learn_ranking(model: nn.Module, layers: dict[str, nn.Module], train: Data, epochs: float, lr: float,
                  augment: int, labeled: bool, seed: int, progress: bool) -> dict[str, torch.Tensor]:
    """Train ``model`` in place under sparse variational dropout on ``layers`` (no masks),
    distilled from itself as it was, and return each layer's learned ranking (``-log alpha``).
    Sensitivity measured on this model, pruned by these scores, sees what the variational ranking
    keeps: which weights, how their positions code and how they share."""
    from ..compress.methods.prune import Prune
    from ..compress.methods.variational import variational_noise
    from ..training.fit import Distill, fit, frozen_copy

    teacher = frozen_copy(model)
    with variational_noise(layers, Prune.strength) as noise:
        fit(model, train, epochs=epochs, lr=lr, seed=seed, teacher=teacher,
            distill=Distill() if labeled else Distill(objective="mse"), augment=augment, progress=progress,
            desc="variational ranking", penalty=noise.penalty)
        return noise.scores()


def searched_layers(model: nn.Module, targets=(), ignore=()) -> dict[str, nn.Module]:
    """The layers :func:`auto` chooses settings for: the selected Linear/Conv layers, a weight
    tied to several of them once (under its first name)."""
    return distinct_weights(select_layers(model, tuple(targets), tuple(ignore)))


def _reused(table, layers: dict[str, nn.Module], keeps: tuple, bits: tuple, ranking: str) -> dict[str, list[Choice]]:
    """An earlier sensitivity table, checked against this search: the same layers, choices from
    these keeps and bits, measured with this ranking."""
    if not isinstance(table, dict) or set(table) != set(layers):
        raise NetshrinkError("sensitivity is not a table for this model's layers: pass AutoResult.sensitivity of an "
                             "earlier search of the same model")
    for name, choices in table.items():
        if not choices or not all(isinstance(c, Choice) and c.keep in keeps and c.bits in bits for c in choices):
            raise NetshrinkError(f"sensitivity for layer {name!r} has choices outside keeps={list(keeps)} and "
                                 f"bits={list(bits)}: search with the keeps and bits it was measured with")
        if any(c.ranking != ranking for c in choices):
            raise NetshrinkError(f"sensitivity was measured with the {choices[0].ranking} ranking; this search prunes "
                                 f"with ranking={ranking!r}: measure it again (sensitivity=None)")
    return {name: list(table[name]) for name in layers}


def policy_steps(policy: dict[str, Choice], epochs: float, lr: float, augment: int = 0,
                 labeled: bool = True, ranking: str = "magnitude") -> list[dict]:
    """The recipe for a policy: prune gradually while fine-tuning (half the epochs; ``ranking``
    says which weights stay), fine-tune, zero the weights of units no layer reads any more
    (``methods.unused``), share, fine-tune; every fine-tuning distils from the
    dense model (class scores by KL, other outputs such as hidden states by mean squared error).
    Last, biases go on the grids the policy chose (after fine-tuning, which would move them off)."""
    pruned = {n: c.keep for n, c in policy.items() if c.keep < 1}
    shared = {n: c.bits for n, c in policy.items() if c.bits is not None}
    tune = trial_tuning(labeled, augment)
    steps: list[dict] = []
    if pruned:
        ranked = {} if ranking == "magnitude" else {"ranking": ranking}
        steps.append({"prune": {"keep": pruned, "targets": list(pruned), **ranked},
                      "gradual": {"epochs": round(0.5 * epochs, 3), "lr": lr, "every": 50, **tune}})
        steps.append({"finetune": {"epochs": round(0.3 * epochs, 3), "lr": lr / 2, **tune}})
        steps.append({"unused": {}})  # weights of units pruning left unread: exact, and fewer bytes
    if shared:
        steps.append({"share": {"bits": shared, "targets": list(shared)}})
        steps.append({"finetune": {"epochs": round((0.2 if pruned else 0.5) * epochs, 3), "lr": lr / 5, **tune}})
    biased = {n: c.bias_bits for n, c in policy.items() if c.bias_bits is not None}
    if biased:
        grids = set(biased.values())
        steps.append({"bias": {"bits": grids.pop() if len(grids) == 1 else biased, "targets": list(biased)}})
    return steps


def _key(policy: dict[str, Choice]) -> tuple:
    return tuple((name, c.keep, c.bits) for name, c in policy.items())


def _between(low: int, high: int, t: float) -> int:
    """The budget a fraction ``t`` of the way from ``low`` to ``high`` on a log scale (t = 1/2, the
    geometric mean, as sqrt(low * high): the bisection's own rounding)."""
    return int(math.sqrt(low * high)) if t == 0.5 else int(low ** (1 - t) * high ** t)


def _run_trial(shared: tuple, steps: list[dict]) -> tuple[bytes, float, float | None, nn.Module | None]:
    """One trial, wherever it runs (``sweep.Runner``): the policy's recipe on a copy of the dense
    model; returns its file, its validation scores and, in this process, the model itself (another
    process sends the file: a model with transforms cannot be pickled, and the file is exact)."""
    from ..store.artifact import to_bytes
    from ..compress.recipe import Recipe

    model, train, scorer, seed, progress, here = shared
    candidate = copy.deepcopy(model)
    if steps:
        Recipe.from_steps(copy.deepcopy(steps), "auto").run(candidate, train, seed=seed, progress=progress)
    loss, accuracy = scorer.scores(candidate)
    return to_bytes(candidate, recipe=steps), loss, accuracy, candidate if here else None


def _unreachable(max_bytes: int, smallest: int, overhead: int) -> NetshrinkError:
    return NetshrinkError(f"max_bytes={max_bytes:,} cannot be met: the smallest choices for every layer need about "
                          f"{smallest:,} B (with {overhead:,} B of biases, header and manifest)")


def _bias_grids(bias_bits) -> tuple[int, ...]:
    """``bias_bits`` as the tuple of grids to choose from (empty: biases stay float)."""
    if bias_bits is None:
        return ()
    grids = (bias_bits,) if isinstance(bias_bits, (int, float, str)) else tuple(bias_bits)
    if not grids:
        raise NetshrinkError("bias_bits must be a number of bits, several to choose from, or None (float biases). "
                             "Received: an empty list")
    for b in grids:
        QuantizeBiases(bits=b).check()
    return grids


def _check_budget(max_bytes, max_drop, max_error_rate, max_latency) -> dict:
    given = {k: v for k, v in (("max_bytes", max_bytes), ("max_drop", max_drop), ("max_error_rate", max_error_rate),
                               ("max_latency", max_latency)) if v is not None}
    if len(given) != 1:
        raise NetshrinkError(f"auto takes exactly one budget: max_bytes, max_drop, max_error_rate or max_latency. "
                             f"Received: {given or 'none'}")
    if max_bytes is not None:
        check_number("max_bytes", max_bytes, positive=True, integer=True)
    elif max_drop is not None:
        check_number("max_drop", max_drop)
    elif max_error_rate is not None:
        check_number("max_error_rate", max_error_rate)
        if max_error_rate >= 100:
            raise NetshrinkError(f"max_error_rate is a validation error rate in percent, below 100. "
                                 f"Received: max_error_rate={max_error_rate!r}")
    else:
        check_number("max_latency", max_latency, positive=True)
    return given


def auto(model: nn.Module, data: Data, *, max_bytes: int | None = None, max_drop: float | None = None,
         max_error_rate: float | None = None, max_latency: float | None = None, latency_batch: int = 1, threads: int | None = None,
         runtime: str = "fp32",
         validation: Data | None = None, validation_share: float = 0.1, epochs: float = 10, lr: float = 1e-3,
         trials: int = 5, keeps: tuple | None = None, bits: tuple = BITS, targets: tuple = (), ignore: tuple = (),
         bias_bits: int | tuple | None = BIAS_BITS, augment: int = 0, seed: int = 0, progress: bool = True,
         forward: Forward | None = None, on_trial=None,
         sensitivity: dict[str, list[Choice]] | None = None, ranking: str = "magnitude",
         parallel: int = 1, address: str | None = None, coding: str = "share") -> AutoResult:
    """Choose per-layer pruning and sharing for ``model`` under one budget, run it, verify it.

    ``max_bytes``: the file on disk at most this many bytes, at the best validation loss the search
    finds. ``max_drop``: validation accuracy at most this many points below the dense model's, in
    the smallest file the search finds. ``max_error_rate``: validation error at most this many
    percent (``1.0``: 99% of the validation inputs classified right), in the smallest file the
    search finds. ``max_latency``: at most this many seconds per batch of
    ``latency_batch`` inputs on ONNX Runtime (``threads`` threads, default PyTorch's count; the
    model exported as ``runtime`` ``"fp32"`` or ``"int8"``, what ``export(int8=True)`` writes, with
    activation ranges from the training data), measured on this machine; the choices are then how
    many units (neurons, channels) each group keeps, removed physically (see ``netshrink/latency.py``),
    from ``keeps`` (default ``latency.UNIT_KEEPS``; for the byte and accuracy budgets ``KEEPS``).
    ``data``: training data; ``validation_share`` of it is held out for scoring (or pass ``validation``). ``epochs``: fine-tuning per trial; ``trials``: how many
    policies are run at most. ``bias_bits``: the grids (bits, 2..12) each layer's bias may end on,
    chosen per layer like the weights' settings (default ``BIAS_BITS``; one number: that grid for
    every layer; None: biases kept as floats). ``sensitivity``: the table of an earlier result (``AutoResult.sensitivity``) for the same
    model, validation data, keeps and bits, so that searching several budgets measures it once.
    ``ranking``: which weights the trials' pruning keeps, ``"magnitude"`` or ``"variational"``
    (learned while pruning: slower; see ``methods/variational.py``). With ``"variational"``, a first
    pass of ``epochs / 2`` learns the ranking on the dense model, and sensitivity is measured on
    that model pruned by it.
    ``parallel``: with ``max_drop`` or ``max_error_rate``, how many budgets each round of the search tries at once (1:
    bisection); ``address``: run each round's trials as Ray tasks on that cluster (``"auto"``,
    ``"ray://host:10001"``, or ``"local"`` for one started here) instead of one after another here:
    the same trials and the same result, sooner when the cluster has room for a round. Workers
    need netshrink installed.
    ``coding``: ``"share"`` chooses each layer's pruning and shared bits as above; ``"rate"``
    trains the whole model rate-aware instead (:class:`~netshrink.RateAware`: every layer's
    weights and their code learned together) and searches its one trade-off for the budget, a
    trial at a time (``trials``; see ``netshrink/search/tradeoff.py``), with ``max_bytes``,
    ``max_drop`` or ``max_error_rate``.
    Returns an :class:`AutoResult`; ``model`` itself is not changed.

    >>> import netshrink
    >>> from netshrink.zoo.datasets import load_dataset
    >>> model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
    >>> found = netshrink.auto(model, load_dataset("digits"), max_bytes=6000, epochs=1, progress=False)
    >>> found.file_bytes <= 6000
    True
    """
    from ..store.artifact import from_bytes, to_bytes

    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    budget = _check_budget(max_bytes, max_drop, max_error_rate, max_latency)
    check_number("epochs", epochs, positive=True)
    check_number("lr", lr, positive=True)
    check_number("trials", trials, positive=True, integer=True)
    check_number("seed", seed, integer=True)
    if not 0 < validation_share < 1:
        raise NetshrinkError(f"validation_share must be in (0, 1). Received: validation_share={validation_share!r}")
    if keeps is None:
        keeps = UNIT_KEEPS if max_latency is not None else KEEPS
    keeps, bits = tuple(keeps), tuple(bits)
    if not keeps or any(not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k <= 1 for k in keeps):
        raise NetshrinkError(f"keeps must be fractions in (0, 1]. Received: keeps={list(keeps)}")
    if not bits or any(b is not None and (not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8) for b in bits):
        raise NetshrinkError(f"bits must be None (float values) or integers 1..8. Received: bits={list(bits)}")
    grids = _bias_grids(bias_bits)
    check_choice("ranking", ranking, RANKINGS)
    check_number("parallel", parallel, positive=True, integer=True)
    check_address(address)
    check_choice("coding", coding, ("share", "rate"))
    if coding == "rate":
        from .tradeoff import check_rate_search

        check_rate_search(max_latency=(max_latency, None), keeps=(keeps, KEEPS), bits=(bits, BITS),
                          ranking=(ranking, "magnitude"), parallel=(parallel, 1), sensitivity=(sensitivity, None))
    if max_latency is not None:
        check_number("latency_batch", latency_batch, positive=True, integer=True)
        threads = torch.get_num_threads() if threads is None else threads
        check_number("threads", threads, positive=True, integer=True)
        check_choice("runtime", runtime, ("fp32", "int8"))
        if address is not None:
            raise NetshrinkError("max_latency is measured on this machine: its trials run here, not on a cluster "
                                 f"(drop address). Received: address={address!r}")
        unused = {name: given for name, given, default in (("bits", bits, BITS), ("ranking", ranking, "magnitude"),
                                                           ("parallel", parallel, 1)) if given != default}
        if unused:
            raise NetshrinkError(f"max_latency chooses how many units each group keeps; {', '.join(unused)} "
                                 f"belong to the byte and accuracy budgets. Received: {unused}")
    if any(transforms(m) for m in model.modules() if isinstance(m, COMPRESSIBLE)):
        raise NetshrinkError("auto starts from a dense model; this one already has compression transforms "
                             "(netshrink.bake(model) makes them plain weights)")
    layers = searched_layers(model, targets, ignore)
    check_data(data, "training data")
    if validation is None:
        train, validation = hold_out(data, validation_share, seed)
    else:
        check_data(validation, "validation data")
        train = data
    forward = forward or default_forward
    check_model_fits(model, train, forward)
    check_model_fits(model, validation, forward)
    if max_latency is not None:
        from .latency import search

        return search(model, train, _Validation(model, validation, forward), max_latency=max_latency,
                      batch=latency_batch, threads=threads, runtime=runtime, keeps=keeps, epochs=epochs, lr=lr, trials=trials,
                      augment=augment, seed=seed, progress=progress, targets=targets, ignore=ignore,
                      on_trial=on_trial, sensitivity=sensitivity)

    work = copy.deepcopy(model)  # sensitivity swaps weights in place: never in the caller's model
    as_linear(work)  # transformers' Conv1D layers measured as the Linear layers the trials make them
    work_layers = {n: work.get_submodule(n) for n in layers}
    biased = {n: m for n, m in work_layers.items() if isinstance(m, LINEAR_CONV) and m.bias is not None} if grids else {}
    if biased:  # as every trial will end: weight damages measured with biases on the finest grid offered
        apply(work, QuantizeBiases(bits=max(grids), targets=tuple(biased)))
    scorer = _Validation(work, validation, forward)
    if (max_drop is not None or max_error_rate is not None) and not scorer.labeled:
        raise NetshrinkError(f"{next(iter(budget))} is in accuracy points: it needs labeled data")
    dense_accuracy = scorer.scores(work)[1]
    if max_error_rate is not None:  # an error rate is a drop from this dense model's accuracy
        max_drop = 100 * dense_accuracy - (100 - max_error_rate)
        if max_drop < 0:
            raise NetshrinkError(f"max_error_rate={max_error_rate:g}% cannot be met: the dense model itself errs on "
                                 f"{100 * (1 - dense_accuracy):.2f}% of the validation data")
    dense_bytes = 4 * sum(p.numel() for p in model.state_dict().values() if p.is_floating_point())
    if coding == "rate":
        from .tradeoff import search as search_tradeoff

        with Runner(_run_trial, (model, train, scorer, seed, progress, address is None), address) as runner:
            return search_tradeoff(model, runner, scorer, layers=[n for n in layers if isinstance(model.get_submodule(n), LINEAR_CONV)],
                                   budget=budget, max_bytes=max_bytes,
                                   max_drop=max_drop, dense_accuracy=dense_accuracy, dense_bytes=dense_bytes,
                                   epochs=epochs, lr=lr, trials=trials, augment=augment,
                                   bias_bits=max(grids) if grids else None, on_trial=on_trial)
    # What the file holds besides the chosen weights and biases (other biases, BatchNorm, header,
    # manifest): taken from the dense file, then corrected by each trial's real file.
    # The recipe stored in the manifest is counted with a policy touching every layer.
    shared_bits = [b for b in bits if b is not None]
    every = {n: Choice(0.5, max(shared_bits, default=None), 0, 0.0, bias_bits=max(grids) if n in biased else None)
             for n in work_layers}
    overhead = len(to_bytes(work, recipe=policy_steps(every, epochs, lr, augment, scorer.labeled, ranking))) \
        - sum(coded_bytes(m.weight) for m in work_layers.values()) - sum(coded_bytes(m.bias) for m in biased.values())
    if max_bytes is not None:  # an impossible budget is refused before the long work
        smallest = overhead + sum(coded_bytes(compressed_weight(m.weight, min(keeps), min(shared_bits, default=None)))
                                  for m in work_layers.values()) \
            + sum(coded_bytes(grid_bias(m.bias, min(grids))) for m in biased.values())
        if smallest > max_bytes:
            raise _unreachable(max_bytes, smallest, overhead)
    if sensitivity is None:
        scores = unpruned = None
        if ranking == "variational":  # the table must see what this ranking keeps, learned first
            unpruned = {n: m.weight.detach().clone() for n, m in work_layers.items()}
            scores = learn_ranking(work, work_layers, train, 0.5 * epochs, lr, augment, scorer.labeled, seed, progress)
        table = measure_sensitivity(work, work_layers, scorer, keeps, bits, progress, scores, unpruned)
    else:
        table = _reused(sensitivity, work_layers, keeps, bits, ranking)
    options = with_biases(table, measure_bias_sensitivity(work, biased, scorer, grids))

    def plan(target: int) -> dict | None:
        policy = solve(options, target)
        if policy is None:
            return None
        return {"target": target, "policy": policy,
                "steps": policy_steps(policy, epochs, lr, augment, scorer.labeled, ranking)}

    def record(planned: dict, outcome: tuple) -> dict:
        data, loss, accuracy, candidate = outcome
        if candidate is None:  # run elsewhere: the model comes back as its file
            candidate = from_bytes(data, copy.deepcopy(model), "a trial's file")
        size, policy = len(data), planned["policy"]
        trial = {"trial": len(runs) + 1, "target_bytes": planned["target"], "predicted_bytes":
                 sum(c.bytes for c in policy.values()) + overhead, "file_bytes": size,
                 "accuracy": accuracy, "loss": loss,
                 "policy": {n: c.describe() for n, c in policy.items()}}
        runs.append({"trial": trial, "model": candidate, "policy": policy, "steps": planned["steps"]})
        if on_trial is not None:
            on_trial(trial)
        return runs[-1]

    def judge(planned: dict, outcome: tuple, passed: dict, best: dict | None) -> dict | None:
        """Record a run under an accuracy budget, mark whether it passed; the better of it and ``best``."""
        found = record(planned, outcome)
        drop = found["trial"]["drop"] = 100 * (dense_accuracy - found["trial"]["accuracy"])
        passed[_key(planned["policy"])] = drop <= max_drop
        if drop <= max_drop and (best is None or found["trial"]["file_bytes"] < best["trial"]["file_bytes"]):
            return found
        return best

    runs: list[dict] = []  # every trial run, in order
    best = None
    floor = sum(min(c.bytes for c in choices) for choices in options.values())
    with Runner(_run_trial, (model, train, scorer, seed, progress, address is None), address) as runner:
        if max_bytes is not None:
            target = max_bytes - overhead
            if target < floor:
                raise _unreachable(max_bytes, floor + overhead, overhead)
            tried = set()
            for _ in range(trials):
                planned = plan(target)
                if planned is None or _key(planned["policy"]) in tried:
                    break
                tried.add(_key(planned["policy"]))
                found = record(planned, runner.run([planned["steps"]])[0])
                size = found["trial"]["file_bytes"]
                if size <= max_bytes:
                    if best is None or found["trial"]["loss"] < best["trial"]["loss"]:
                        best = found
                    if size >= (1 - UNDERSHOOT) * max_bytes:
                        break
                # The miss comes off (an overshoot, and a little more) or goes onto (a file well under
                # the budget: zeroed unread units, codebooks that code better after fine-tuning) what
                # this policy's weights were predicted to take, and the next solve chooses again.
                target = sum(c.bytes for c in found["policy"].values()) - (size - max_bytes) - 16
        else:
            low, high, left = floor, _safe_budget(options, floor), trials
            passed: dict[tuple, bool] = {}  # every policy run so far: did it pass?
            for _ in range(4 * trials):  # a bound on rounds whose budgets give only known policies
                if left <= 0 or high - low <= 1:
                    break
                # A round: `parallel` budgets spread evenly on a log scale strictly between the
                # largest failing and the smallest passing budget (one: their geometric mean). A
                # budget whose policy ran already is judged by that run, not run again.
                count = min(parallel, left)
                targets = sorted({_between(max(low, 1), high, (i + 1) / (count + 1)) for i in range(count)})
                planned = [plan(t) for t in targets]
                fresh = {}
                for p in planned:
                    if p is not None and _key(p["policy"]) not in passed:
                        fresh.setdefault(_key(p["policy"]), p)
                left -= len(fresh)
                outcomes = dict(zip(fresh, runner.run([p["steps"] for p in fresh.values()])))
                passing, failing = [], []
                for target, p in zip(targets, planned):
                    if p is None:  # bucket rounding made this target infeasible: aim higher
                        failing.append(target)
                        continue
                    key = _key(p["policy"])
                    if key not in passed:
                        best = judge(p, outcomes[key], passed, best)
                    (passing if passed[key] else failing).append(target)
                high = min([high, *passing])
                low = max([low, *(t for t in failing if t < high)])
            if not passed:
                # Nothing between the smallest policy and the safe budget to search: the safe budget's
                # policy is still run and judged, never returned untried. The solver rounds each
                # layer's bytes up to whole buckets, so a budget at the exact sum may fit no policy:
                # one bucket per layer more always does.
                p = plan(high) or plan(high + len(options) * math.ceil(high / SOLVER_UNITS))
                best = judge(p, runner.run([p["steps"]])[0], passed, best)
    met = best is not None
    if best is None:  # report the last run honestly (over the budget); a later unsolvable target ran nothing
        best = runs[-1] if runs else None
    if best is None:
        raise NetshrinkError("auto found no policy to run")
    return AutoResult(model=best["model"], policy=best["policy"], steps=best["steps"], budget=budget, met=met,
                      file_bytes=best["trial"]["file_bytes"], dense_bytes=dense_bytes, dense_accuracy=dense_accuracy,
                      accuracy=best["trial"]["accuracy"], trials=[r["trial"] for r in runs], sensitivity=table)
