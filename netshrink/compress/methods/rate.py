"""Rate-aware training: the loss carries the bytes the file will spend on each layer's weights.

Pruning, then sharing, then coding decides each stage on its own: pruning removes what is small,
not what is expensive to code. Rate-aware training (after Oktay et al.'s entropy-penalized
reparameterization, 2019) trains the network and its code together. Each layer's weights become
integer codes ``k = round(w / step)`` with a learned step; a probability model over the codes
(one per layer: a mixture of zero-centred logistic distributions, zero included, so the positions
of zeros are priced too) says what each code costs, ``-log2 p(k)`` bits; and the loss adds
``tradeoff`` times the layers' coded kilobytes. Training then moves weights to where they are
cheap to code: to zero, and to the few codes the layer uses most. A recipe step::

    - rate: {tradeoff: 0.05}
      gradual: {epochs: 20, lr: 0.001, distill: true}

While it trains, the forward pass fades rounding in and the price of bits rises with it
(``anneal``: the fraction of training until both are whole; gradients pass straight through the
rounding), so the network gives up weights gradually, as gradual pruning does, rather than all
at once to a price set against the dense model's kilobytes. The cost of a weight is the model's
mass on ``[x - 1/2, x + 1/2]`` around it: exact at a code, smooth between codes. The model is
fitted by the same loss (the mixture that minimises the bits is the maximum-likelihood fit to the
codes, which is what an adaptive arithmetic coder learns as it codes the layer), so the priced
bits track what the coder spends, within its learning cost and less what its contexts save. A
smooth model rather than the codes' raw frequencies: a histogram gives a weight no reason to leave
a common code for a rarer one nearer zero, and training stalls in the first local minimum. When
training ends every layer keeps its codes times its step as a codebook whose values no longer
train (:class:`~netshrink.compress.methods.share.Codebook`), which files store exactly as
integer codes and one scale; ``unused`` then zeroes units no weight reads, and ``bias`` codes
the biases.

Written here: torchao, NNCF and compressed-tensors train quantized weights but none prices them
by an entropy model; CompressAI's entropy bottleneck prices activations of an autoencoder, not a
network's weights, and would have to be reshaped for that. The method is a weight transform and a
loss term.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import NetshrinkError, preserved
from .base import LINEAR_CONV, Method, add_transform, apply, check_range, per_layer, transforms
from .quantize import straight_through
from .share import Codebook

COMPONENTS = 4  # logistic distributions in each layer's probability model
# The step and the model's parameters are stored divided by GAIN: fit's one Adam learning rate (1e-3)
# then moves them by up to GAIN * 0.001 a step, fast enough to settle within an epoch of MNIST.
GAIN = 10.0
BITS_PER_KILOBYTE = 8 * 1024


class RateCoding(nn.Module):
    """Weight transform while rate-aware training runs: ``step * round(w / step)``, codes within
    ``+-largest``, with rounding faded in by ``rounding`` (0: none, 1: full) while training, full
    otherwise. Learns the step and the codes' probability model (see :meth:`bits`); both are
    stored as logs divided by ``GAIN``."""

    def __init__(self, w: torch.Tensor, largest: int) -> None:
        super().__init__()
        self.largest = int(largest)
        w = w.detach().float()
        top = float(w.abs().max()) if w.numel() else 0.0
        step = top / self.largest if top > 0 else 1.0
        self.log_step = nn.Parameter(torch.tensor(math.log(step) / GAIN))
        # mixture of zero-centred logistics on the code scale, from a spike (0.2 codes) to the
        # weights' own spread, equally weighted to start
        spread = max(float((w / step).std()) if w.numel() > 1 else 1.0, 1.0)
        scales = torch.logspace(math.log10(0.2), math.log10(2 * spread), COMPONENTS)
        self.log_scales = nn.Parameter(scales.log() / GAIN)
        self.mixture = nn.Parameter(torch.zeros(COMPONENTS))
        self.rounding = 0.0
        self.latest: torch.Tensor | None = None  # w / step of the last training forward, for the rate

    def step(self) -> torch.Tensor:
        return (self.log_step * GAIN).exp()

    def scaled(self, w: torch.Tensor) -> torch.Tensor:
        return (w / self.step()).clamp(-self.largest, self.largest)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        step = self.step()
        scaled = self.scaled(w)
        if not (self.training and torch.is_grad_enabled()):
            self.latest = None
            return torch.round(scaled) * step
        self.latest = scaled
        partly = scaled + (torch.round(scaled) - scaled).detach() * self.rounding
        return straight_through(partly.detach(), partly) * step

    def bits(self, scaled: torch.Tensor) -> torch.Tensor:
        """Code length in bits of values on the code scale: ``-log2 P(x)`` where ``P(x)`` is the
        probability model's mass on ``[x - 1/2, x + 1/2]``, the probability of code ``x`` at a code
        and smooth between codes. The model is a mixture of zero-centred logistic distributions:
        unimodal, so its pull on every weight is towards zero, stronger the rarer the weight's code,
        and flexible enough for a spike of zeros beside a wide slab; fitted by the same bits (the
        mixture that minimises them is the maximum-likelihood fit to the codes)."""
        x = scaled.flatten()[:, None]
        scales = (self.log_scales * GAIN).exp()
        weights = torch.softmax(self.mixture * GAIN, 0)
        mass = (torch.sigmoid((x + 0.5) / scales) - torch.sigmoid((x - 0.5) / scales)) @ weights
        return -torch.log2(mass.clamp(min=1e-12)).sum()

    def training_bits(self) -> torch.Tensor:
        """The rate of the weights the last training forward used (zero before the first)."""
        return self.bits(self.latest) if self.latest is not None else self.log_step.new_zeros(())

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return torch.round(self.scaled(w)).long()

    def extra_repr(self) -> str:
        return f"largest={self.largest}, step={self.step().item():.3g}, rounding={self.rounding:.2f}"


def _coding(layer: nn.Module) -> tuple[int, RateCoding] | None:
    """The layer's rate-aware training transform and its place in the stack, if it has one."""
    for i, transform in enumerate(transforms(layer)):
        if isinstance(transform, RateCoding):
            return i, transform
    return None


@torch.no_grad()
def _coding_input(layer: nn.Module, position: int) -> torch.Tensor:
    """The weight as it enters the transform at ``position`` of the layer's stack."""
    stack = layer.parametrizations.weight
    w = stack.original
    for transform in list(stack)[:position]:
        w = transform(w)
    return w.detach()


def estimated_bytes(model: nn.Module) -> dict[str, float]:
    """Per layer under rate-aware training: the bytes its codes cost now under their frequencies
    (what the penalty prices, at the codes)."""
    found = {}
    for name, layer in model.named_modules():
        located = _coding(layer)
        if located is not None:
            position, coding = located
            with torch.no_grad():
                found[name] = float(coding.bits(coding.codes(_coding_input(layer, position)).float())) / 8
    return found


@dataclass(frozen=True, kw_only=True)
class RateAware(Method):
    """Train weights and their code together: the loss adds ``tradeoff`` (loss per kilobyte; a
    number or a per-layer map) times each layer's coded size under its probability model.
    Codes lie within ``+-(2^(bits-1) - 1)`` steps (``bits``, 2-8: a number or a per-layer map);
    ``anneal`` is the fraction of training over which rounding fades in and the price of bits
    rises. Needs a training schedule (a recipe step's ``gradual``; in Python, ``schedule(model)``
    gives ``fit`` its ``on_step`` and ``penalty``, both needed)."""

    name: ClassVar[str] = "rate"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    tradeoff: float | Mapping[str, float] = 0.05
    bits: int | Mapping[str, int] = 8
    anneal: float = 0.5

    def check(self) -> None:
        super().check()
        check_range("tradeoff", self.tradeoff, 0.0, 1e6)
        check_range("bits", self.bits, 2, 8, integer=True)
        check_range("anneal", self.anneal, 0.0, 1.0)

    def needs_schedule(self) -> bool:
        return True

    def schedule(self, model: nn.Module, *, every: int = 50):
        return rate_schedule(model, self)

    def prepare(self, layers: dict[str, nn.Module], start: bool = False, **_: Any) -> list:
        plan = []
        for name, layer in layers.items():
            largest = 2 ** (int(per_layer(self.bits, name, "bits")) - 1) - 1
            located = _coding(layer)
            if start:
                w = layer.weight.detach() if located is None else _coding_input(layer, located[0])
                coding = RateCoding(w, largest)
                plan.append((name, coding, f"codes within +-{largest} steps of {coding.step().item():.3g}"))
                continue
            if located is None:
                raise NetshrinkError("rate-aware coding is learned while fine-tuning: give the rate step a gradual "
                                     "schedule (a recipe step with 'gradual')")
            position, coding = located
            w = _coding_input(layer, position)
            codes = coding.codes(w)
            step = coding.step().detach()
            nonzero = codes != 0
            values = codes.float() * step
            centroids = torch.unique(values[nonzero])
            assignment = torch.zeros(codes.shape, dtype=torch.long)
            assignment[nonzero] = torch.searchsorted(centroids, values[nonzero])
            kilobytes = float(coding.bits(codes.float()).detach()) / BITS_PER_KILOBYTE
            codebook = Codebook(centroids, assignment, nonzero)
            codebook.centroids.requires_grad_(False)  # values stay codes times one step: one scale in the file
            plan.append((name, codebook,
                         f"{int(nonzero.sum())} of {codes.numel()} weights non-zero, {centroids.numel()} values "
                         f"(step {step.item():.3g}); {kilobytes * 1024:,.0f} B by its probability model"))
        return plan

    def commit(self, layer: nn.Module, transform: nn.Module) -> None:
        """The final codebook takes the training transform's place in the layer's stack."""
        located = _coding(layer)
        if isinstance(transform, Codebook) and located is not None:
            layer.parametrizations.weight[located[0]] = transform
        else:
            add_transform(layer, transform)


@contextlib.contextmanager
def rate_schedule(model: nn.Module, method: RateAware) -> Iterator[tuple]:
    """``(on_step, penalty)`` for ``fit``: the layers train under :class:`RateCoding`, rounding
    fades in over ``method.anneal`` of training, and the penalty is the tradeoff-weighted coded
    kilobytes, its weight rising with the rounding. When the block ends the layers keep their codes as codebooks; if it fails, the model
    is put back as it was."""
    with preserved(model):
        apply(model, method, start=True)
        located = {name: _coding(layer) for name, layer in model.named_modules()}
        codings = {name: found[1] for name, found in located.items() if found is not None}
        weights = {name: float(per_layer(method.tradeoff, name, "tradeoff")) for name in codings}

        progress = [0.0]  # how far the fade has come: rounding and the price of bits rise together

        def on_step(step: int, total: int) -> None:
            fade = method.anneal * total
            progress[0] = 1.0 if fade <= 0 else min(1.0, step / fade)
            for coding in codings.values():
                coding.rounding = progress[0]

        def penalty() -> torch.Tensor:
            # a tied weight's coding serves several layers: price it once
            distinct = {id(c): (name, c) for name, c in codings.items()}.values()
            bits = sum(weights[name] * coding.training_bits() for name, coding in distinct)
            return progress[0] * bits / BITS_PER_KILOBYTE

        yield on_step, penalty
        for coding in codings.values():
            coding.latest = None
        apply(model, method)
