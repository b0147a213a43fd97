"""Magnitude pruning: unstructured (per layer or global), N:M, and gradual schedules.

The founding text's ``(1 - r) * W`` only rescales every weight; pruning means zeroing the
smallest-magnitude weights and keeping them at zero, which a mask does.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import NetshrinkError
from .base import Method, check_choice, check_range, distinct_weights, per_layer, weight_of
from .conv1d import as_linear

RANKINGS = ("magnitude", "variational")


class Mask(nn.Module):
    """Weight transform ``w * mask``. Gradients of pruned weights are zero, so they stay zero.

    The mask is kept as booleans (a byte per weight). While training, the multiply uses a float
    copy made at the first training step (in training mode, with gradients) and dropped by ``eval()``
    or by a use without gradients (baking, saving): a float multiply costs little
    more than nothing in forward + backward, a boolean one about three times as much and
    ``torch.where`` about five (investigations/results/transform_overhead.md), and on small models that
    is a large share of the training step. A pruned model that is evaluated, saved or loaded holds
    1.25x its weights, not 2x. In training steps pruned negative weights become -0.0, equal to 0.0
    in every computation; elsewhere they come out as +0.0, so saving need not copy the weight to
    clear the sign bit.
    """

    def __init__(self, mask: torch.Tensor, label: str = "prune") -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.label = label
        self._multiplier: torch.Tensor | None = None  # the float copy, while training

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not (self.training and w.requires_grad and torch.is_grad_enabled()):  # baking, saving, evaluating
            self.release()
            return (w * self.mask).add_(0.0)  # pruned negative weights as +0.0, in place
        multiplier = self._multiplier
        if multiplier is None or multiplier.dtype != w.dtype or multiplier.device != w.device \
                or multiplier.shape != self.mask.shape:
            multiplier = self._multiplier = self.mask.to(device=w.device, dtype=w.dtype)
        return w * multiplier

    def release(self) -> None:
        """Let the float copy go (the next training step makes it again)."""
        self._multiplier = None

    def train(self, mode: bool = True) -> "Mask":
        if not mode:
            self.release()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.release()  # a new mask: the copy follows it
        super()._load_from_state_dict(*args, **kwargs)

    def record(self) -> dict:
        """What a file stores to rebuild this transform (see ``store.artifact.restore_transforms``)."""
        return {"kind": "mask", "label": self.label}

    @classmethod
    def from_record(cls, record: dict, w: torch.Tensor) -> "Mask":
        """The pruned weights are the zeros of the stored weight."""
        return cls(w != 0, label=str(record.get("label", "prune"))[:32])

    def extra_repr(self) -> str:
        return f"{self.label}, keep={self.mask.float().mean().item():.3f}"


def _current_magnitude(layer: nn.Module) -> torch.Tensor:
    """|w| of the weight as used now: already-pruned weights count as zero and are pruned first."""
    return weight_of(layer).abs()


def keep_largest(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly ``count`` largest entries (ties broken by position)."""
    flat = magnitude.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        mask[torch.topk(flat, count, sorted=False).indices] = True
    return mask.view_as(magnitude)


@dataclass(frozen=True, kw_only=True)
class Prune(Method):
    """Keep the fraction ``keep`` (0 < keep <= 1) of weights with the largest magnitude.

    ``keep`` is one number or a per-layer map (``{"fc1": 0.08, "re:conv.*": 0.5, "*": 0.2}``).
    ``scope="global"`` ranks all selected layers' weights together (one number only).
    Applied again, it tightens the existing mask: pruned weights stay pruned.

    ``ranking="variational"`` ranks weights by what sparse variational dropout learns while a
    gradual schedule fine-tunes (``methods/variational.py``), with the KL term weighted by
    ``strength``; it needs that schedule (a recipe step's ``gradual``).
    """

    name: ClassVar[str] = "prune"
    keep: float | Mapping[str, float] = 0.1
    scope: str = "layer"
    ranking: str = "magnitude"
    strength: float = 10.0

    def check(self) -> None:
        super().check()
        check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_choice("scope", self.scope, ("layer", "global"))
        check_choice("ranking", self.ranking, RANKINGS)
        check_range("strength", self.strength, 0.0, 1e6, low_open=True)
        if self.scope == "global" and isinstance(self.keep, Mapping):
            raise NetshrinkError(f"scope='global' takes one keep fraction, not a map. Received: keep={dict(self.keep)}")

    def needs_schedule(self) -> bool:
        return self.ranking == "variational"

    def schedule(self, model: nn.Module, *, every: int = 50):
        return pruning_schedule(model, self, every=every)

    def prepare(self, layers: dict[str, nn.Module], scores: dict[str, torch.Tensor] | None = None, **_: Any) -> list:
        if self.ranking == "variational" and scores is None:
            raise NetshrinkError("ranking='variational' is learned while fine-tuning: give the prune step a gradual "
                                 "schedule (a recipe step with 'gradual', or auto(..., ranking='variational'))")
        if scores is None:
            magnitudes = {name: _current_magnitude(layer) for name, layer in layers.items()}
        else:  # higher is kept first; weights pruned already stay pruned
            magnitudes = {name: scores[name].masked_fill(weight_of(layer) == 0, -float("inf"))
                          for name, layer in layers.items()}
        if self.scope == "global":
            total = sum(m.numel() for m in magnitudes.values())
            count = int(round(self.keep * total))
            everything = torch.cat([m.flatten() for m in magnitudes.values()])
            kept = keep_largest(everything, count)
            masks, offset = {}, 0
            for name, m in magnitudes.items():
                masks[name] = kept[offset:offset + m.numel()].view_as(m)
                offset += m.numel()
        else:
            masks = {name: keep_largest(m, int(round(per_layer(self.keep, name, "keep") * m.numel())))
                     for name, m in magnitudes.items()}
        plan = []
        for name, mask in masks.items():
            kept_count = int(mask.sum())
            plan.append((name, Mask(mask), f"kept {kept_count} of {mask.numel()} weights "
                                           f"({100 * kept_count / mask.numel():.1f}%)"))
        return plan


@dataclass(frozen=True, kw_only=True)
class NMSparsity(Method):
    """Keep the ``n`` largest-magnitude weights in every group of ``m`` consecutive input weights
    (2:4 is what sparse tensor cores accelerate). Layers whose input size is not a multiple of
    ``m`` are skipped and reported."""

    name: ClassVar[str] = "nm"
    n: int = 2
    m: int = 4

    def check(self) -> None:
        super().check()
        check_range("m", self.m, 1, 1024, integer=True)
        check_range("n", self.n, 1, self.m, integer=True)

    def prepare(self, layers: dict[str, nn.Module], **_: Any) -> list:
        plan = []
        for name, layer in layers.items():
            magnitude = _current_magnitude(layer)
            # Group along the input dimension: [out, in, *kernel] -> groups of m inputs per kernel tap.
            moved = magnitude.movedim(1, -1)
            if moved.shape[-1] % self.m:
                continue
            groups = moved.reshape(-1, self.m)
            mask = torch.zeros_like(groups, dtype=torch.bool)
            mask.scatter_(1, groups.topk(self.n, dim=1).indices, True)
            mask = mask.reshape(moved.shape).movedim(-1, 1)
            plan.append((name, Mask(mask, label=f"{self.n}:{self.m}"), f"{self.n}:{self.m} sparsity"))
        return plan


def polynomial_keep(final_keep: float, progress: float, power: int = 3) -> float:
    """Zhu & Gupta (2017): sparsity rises from 0 to its final value as 1 - (1 - progress)^3, fast
    at first while the network has redundancy to spare, slowly at the end."""
    progress = min(max(progress, 0.0), 1.0)
    final_sparsity = 1.0 - final_keep
    return 1.0 - final_sparsity * (1.0 - (1.0 - progress) ** power)


def gradual(model: nn.Module, method: Prune, *, every: int = 50, end: float = 0.75,
            scores: Callable[[], dict[str, torch.Tensor]] | None = None):
    """A ``fit(on_step=...)`` callback that prunes gradually to ``method.keep``: every ``every``
    steps the mask tightens along :func:`polynomial_keep`, reaching the final keep at fraction
    ``end`` of training (the rest of training recovers accuracy at full sparsity). ``scores()``
    ranks the weights (default: magnitude)."""
    from .base import apply

    method.check()
    check_range("end", end, 0.0, 1.0, low_open=True)
    check_range("every", every, 1, 1e9, integer=True)

    def on_step(step: int, total: int) -> None:
        end_step = max(1, int(end * total))
        if step > end_step or (step % every and step != end_step):
            return
        keep = method.keep
        scheduled = ({k: polynomial_keep(v, step / end_step) for k, v in keep.items()}
                     if isinstance(keep, Mapping) else polynomial_keep(keep, step / end_step))
        apply(model, Prune(keep=scheduled, scope=method.scope, ranking=method.ranking, strength=method.strength,
                           targets=method.targets, ignore=method.ignore),
              **({"scores": scores()} if scores is not None else {}))

    return on_step


@contextlib.contextmanager
def pruning_schedule(model: nn.Module, method: Prune, *, every: int = 50,
                     end: float = 0.75) -> Iterator[tuple[Callable, Callable | None]]:
    """``(on_step, penalty)`` for ``fit`` to prune gradually along ``method``: with the variational
    ranking, noise on the pruned layers for the block's duration and its KL term as the penalty,
    else magnitude and no penalty."""
    if method.ranking == "magnitude":
        yield gradual(model, method, every=every, end=end), None
        return
    from .variational import variational_noise

    as_linear(model)  # the noise goes on the layers the pruning steps will see (transformers' Conv1D as Linear)
    layers = distinct_weights(method.select(model))
    with variational_noise(layers, method.strength) as noise:
        yield gradual(model, method, every=every, end=end, scores=noise.scores), noise.penalty
