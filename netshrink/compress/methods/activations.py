"""Activation quantization: ``bits``-bit affine fake quantization of the activations that flow
into each selected layer (the previous layer's output, which is what an integer kernel consumes),
with ranges calibrated on a few batches of data.

The quantizer is a submodule ``layer.input_quantizer`` (its calibrated range is part of the
state dict) called by a forward pre-hook, so it works on any model, trains (straight-through
inside the range, zero gradient outside) and exports to ONNX as QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import real_positions, shares, take
from ...errors import NetshrinkError, first_line
from ...training import distributed
from ...training.batches import Data, call, eval_mode
from .base import (LINEAR_CONV, Method, check_choice, check_range, per_layer, replace_weight, tied_weights, transforms, weight_of, weight_source)
from .calibrated import FIXED_GRIDS
from .grid import SHRINK_STEPS

OBSERVERS = ("minmax", "percentile", "mse")
AUTO_ALPHAS = (0.3, 0.5, 0.65, 0.8, 0.9)  # smooth="auto" tries these and no smoothing,
AUTO_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)  # then these fractions of the chosen range


class ActivationQuantizer(nn.Module):
    """Affine ``bits``-bit fake quantization over a calibrated range [low, high] (which holds 0).

    With ``smooth`` (one positive factor per input channel, SmoothQuant) it quantizes ``x / smooth``
    and the layer's weight columns were multiplied by ``smooth``: the product is unchanged, and
    the outlier channels of ``x`` no longer stretch the range every other channel is rounded on."""

    def __init__(self, bits: int, low: float = 0.0, high: float = 0.0, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("low", torch.tensor(float(min(low, 0.0))))
        self.register_buffer("high", torch.tensor(float(max(high, 0.0))))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())

    def grid(self) -> tuple[float, int]:
        """``(scale, zero_point)`` with zero exactly representable."""
        qmax = 2 ** self.bits - 1
        scale = float(self.high - self.low) / qmax or 1.0
        zero_point = int(round(-float(self.low) / scale))
        return scale, min(max(zero_point, 0), qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.grid()
        if self.smooth is not None:
            x = x / self.smooth
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2 ** self.bits - 1)

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.smooth is not None else ""
        return f"bits={self.bits}, range=[{float(self.low):.4g}, {float(self.high):.4g}]{smooth}"


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]),) + tuple(args[1:])


def attach(layer: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Give ``layer`` an input quantizer (replacing one already there)."""
    if not hasattr(layer, "input_quantizer"):
        layer.register_forward_pre_hook(_quantize_input)
    layer.input_quantizer = quantizer


def detach_all(model: nn.Module, fold_smoothing: bool = True) -> None:
    """Remove every input quantizer (and its hook) from ``model``. A SmoothQuant quantizer divided
    its layer's input by factors that the weight's input columns carry; with ``fold_smoothing`` they
    are divided back out of the weight, so the float model computes what the layer did (without
    it, the layer would read its input undivided against the multiplied weight)."""
    for module in model.modules():
        if hasattr(module, "input_quantizer"):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantize_input:
                    del module._forward_pre_hooks[key]
            smooth = getattr(module.input_quantizer, "smooth", None)
            if fold_smoothing and smooth is not None:
                weight = module.weight
                weight.data = weight.data / smooth.reshape(1, -1, *[1] * (weight.dim() - 2)).to(weight.dtype)
            del module.input_quantizer


def input_quantizer(layer: nn.Module) -> ActivationQuantizer | None:
    return getattr(layer, "input_quantizer", None)


def search_range(sample: torch.Tensor, low: float, high: float, bits: int) -> tuple[float, float]:
    """The range ``[low * f, high * f]`` (f from 1 down to 0.2) whose ``bits``-bit rounding of
    ``sample`` has the lowest mean squared error: clipping rare outliers buys a finer step for
    everything else."""
    best, chosen = math.inf, (low, high)
    for step in range(SHRINK_STEPS):
        factor = 1 - 0.8 * step / SHRINK_STEPS
        quantizer = ActivationQuantizer(bits, low * factor, high * factor)
        error = float((quantizer(sample) - sample).square().mean())
        if error < best:
            best, chosen = error, (low * factor, high * factor)
    return chosen


class _Observed:
    """What calibration saw at one layer's input: per-channel extremes (channel = last dimension
    for a Linear, dimension 1 for a convolution) and a bounded sample of values, kept per row for a
    Linear so that smoothing can be applied to it afterwards."""

    SAMPLE = 1 << 19  # values kept in all, spread evenly over the batches

    def __init__(self, linear: bool, batches: int) -> None:
        self.linear = linear
        self.per_batch = max(1, self.SAMPLE // batches)
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        per_channel = x.reshape(-1, x.shape[-1]) if self.linear else x.transpose(0, 1).reshape(x.shape[1], -1).T \
            if x.dim() > 1 else x.reshape(-1, 1)
        low, high = per_channel.amin(dim=0), per_channel.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        rows = per_channel if self.linear else x.reshape(-1, 1)
        stride = max(1, rows.numel() // self.per_batch)
        self.samples.append(rows[::stride].clone())

    def combine(self, channels: int) -> None:
        """With several processes, each of which observed a share of the examples: the extremes over
        all of them (then exactly one process's) and their samples together (a sample of the same
        bound, drawn from the shares)."""
        low = self.low if self.low is not None else torch.full((channels,), math.inf)
        high = self.high if self.high is not None else torch.full((channels,), -math.inf)
        self.low, self.high = distributed.all_reduce(low.clone(), "min"), distributed.all_reduce(high.clone(), "max")
        rows = torch.cat(self.samples) if self.samples else torch.empty(0, channels if self.linear else 1)
        gathered = distributed.all_gather_rows(rows)
        self.samples = [gathered] if gathered.numel() else []
        if not self.samples:  # no process reached the layer
            self.low = self.high = None

    def sample(self, smooth: torch.Tensor | None) -> torch.Tensor:
        rows = torch.cat(self.samples)
        return (rows / smooth if smooth is not None else rows).flatten()

    def extremes(self, smooth: torch.Tensor | None) -> tuple[float, float]:
        low, high = (self.low, self.high) if smooth is None else (self.low / smooth, self.high / smooth)
        return float(low.min()), float(high.max())


def smoothing(observed: _Observed, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``max|x_j|^alpha / max|w_j|^(1 - alpha)``: ``alpha``
    of each channel's activation range moves into the weights (which have no such outliers)."""
    activation = torch.maximum(observed.low.abs(), observed.high.abs())
    columns = weight.detach().abs().amax(dim=0)
    factors = activation.clamp(min=1e-5).pow(alpha) / columns.clamp(min=1e-5).pow(1 - alpha)
    usable = (activation > 0) & (columns > 0) & torch.isfinite(factors)
    return torch.where(usable, factors, torch.ones_like(factors)).clamp(1e-3, 1e3)


def output_error(seen: "_Observed", quantizer: ActivationQuantizer, weight: torch.Tensor) -> float:
    """Squared change of a Linear layer's outputs on the sampled inputs when they pass through
    ``quantizer`` (and the weight is smoothed with it)."""
    rows = torch.cat(seen.samples)
    smoothed = weight if quantizer.smooth is None else weight * quantizer.smooth
    return float((quantizer(rows) @ smoothed.T - rows @ weight.T).square().sum())


@dataclass(frozen=True, kw_only=True)
class QuantizeActivations(Method):
    """Quantize each selected layer's input activations to ``bits`` (2..8, or a per-layer map).

    Needs ``calibration`` data at apply time. ``observer='minmax'`` takes the range seen over the
    calibration batches; ``'percentile'`` clips at the ``percentile`` of the values seen (and the
    mirror one below), ignoring rare outliers; ``'mse'`` clips where the rounding error of the
    values seen is lowest. ``smooth`` (0 < alpha < 1; Linear layers) migrates that share of each
    input channel's range into the weights first (SmoothQuant), for transformers whose activations
    have outlier channels; ``smooth="auto"`` chooses, per layer, no smoothing or the alpha whose
    quantized outputs on the calibration sample are closest to the float ones. Apply it before
    quantizing weights.
    ``samples``: calibration examples observed (ranges seen on more, and more varied, examples
    clip less of another kind of data: benchmarks/results/held_out-more.md); ``batch_size``: examples
    per forward pass.
    """

    name: ClassVar[str] = "activations"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    bits: int | dict = 8
    observer: str = "minmax"
    percentile: float = 99.99
    smooth: float | str | None = None
    samples: int = 1024
    batch_size: int = 32

    def check(self) -> None:
        super().check()
        check_range("activation bits", self.bits, 2, 8, integer=True)
        check_choice("observer", self.observer, OBSERVERS)
        check_range("percentile", self.percentile, 50.0, 100.0)
        if self.smooth is not None and self.smooth != "auto":
            check_range("smooth", self.smooth, 0.0, 1.0, low_open=True)
        check_range("samples", self.samples, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = super().select(model)
        if self.smooth is not None:
            for name, layer in layers.items():
                fixed = [type(t).__name__ for t in transforms(layer) if isinstance(t, FIXED_GRIDS)]
                if isinstance(layer, nn.Linear) and fixed:
                    raise NetshrinkError(f"smooth: layer {name!r} already has fixed quantized weights ({fixed[0]}); "
                                         "smooth activations before quantizing weights")
        return layers

    def prepare(self, layers: dict[str, nn.Module], calibration: Data | None = None, model: nn.Module | None = None,
                **_: Any) -> list:
        if calibration is None or model is None:
            raise NetshrinkError("activation quantization needs calibration data "
                                 "(pass calibration=<data set, (x, y) tensors or DataLoader>)")
        # Several processes observe a share of each batch each; their ranges and samples are combined below.
        kept = shares(take(calibration, self.samples, self.batch_size), summed=True)
        observed = {name: _Observed(isinstance(layer, nn.Linear), max(1, len(kept)) * distributed.world_size())
                    for name, layer in layers.items()}

        batch: list = []

        def observer(name):
            def hook(module, args):
                observed[name].add(real_positions(args[0], batch[0]))
            return hook

        # Observe the float activations: existing input quantizers are set aside during calibration.
        previous = {name: input_quantizer(layer) for name, layer in layers.items()}
        for layer in layers.values():
            if input_quantizer(layer) is not None:
                layer.input_quantizer = nn.Identity()
        handles = [layer.register_forward_pre_hook(observer(name), prepend=True) for name, layer in layers.items()]
        try:
            with torch.no_grad(), eval_mode(model):
                for x in kept:
                    batch[:] = [x]
                    call(model, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if isinstance(exc, NetshrinkError):
                raise
            raise NetshrinkError(f"the model does not run on the calibration data: {first_line(exc, None)}") from None
        finally:
            for handle in handles:
                handle.remove()
            for name, layer in layers.items():
                if previous[name] is not None:
                    layer.input_quantizer = previous[name]
        if distributed.active():
            for name, seen in observed.items():
                seen.combine(layers[name].in_features if isinstance(layers[name], nn.Linear) else layers[name].in_channels)
        if not any(o.samples for o in observed.values()):
            raise NetshrinkError("calibration data yielded no batches")
        tied = tied_weights(model)
        plan = []
        for name, seen in observed.items():
            if not seen.samples:
                continue  # the layer never ran on this data
            layer = layers[name]
            bits = int(per_layer(self.bits, name, "activation bits"))
            smoothable = isinstance(layer, nn.Linear) and id(weight_source(layer)) not in tied
            alphas: tuple = ()
            if self.smooth == "auto" and smoothable:
                alphas = (None, *AUTO_ALPHAS)
            elif self.smooth is not None and smoothable:
                alphas = (float(self.smooth),)
            if len(alphas) > 1:
                weight = weight_of(layer)
                alpha, quantizer = min(((a, self._quantizer(seen, bits, layer, a)) for a in alphas),
                                       key=lambda c: output_error(seen, c[1], weight))
                quantizer = min((ActivationQuantizer(bits, float(quantizer.low) * f, float(quantizer.high) * f,
                                                     quantizer.smooth) for f in AUTO_CLIPS),
                                key=lambda q: output_error(seen, q, weight))
            else:
                alpha = alphas[0] if alphas else None
                quantizer = self._quantizer(seen, bits, layer, alpha)
            how = self.observer + (f", smoothed alpha={alpha:g}" if alpha is not None else "")
            plan.append((name, quantizer, f"{bits}-bit inputs over [{float(quantizer.low):.4g}, "
                                          f"{float(quantizer.high):.4g}] ({how})"))
        return plan

    def _quantizer(self, seen: "_Observed", bits: int, layer: nn.Module, alpha: float | None) -> ActivationQuantizer:
        smooth = None if alpha is None else smoothing(seen, weight_of(layer), alpha)
        low, high = seen.extremes(smooth)
        if self.observer == "percentile":
            sample = seen.sample(smooth)
            q = self.percentile / 100.0
            low, high = float(torch.quantile(sample, 1 - q)), float(torch.quantile(sample, q))
        elif self.observer == "mse":
            low, high = search_range(seen.sample(smooth), min(low, 0.0), max(high, 0.0), bits)
        return ActivationQuantizer(bits, low, high, smooth)

    def commit(self, layer: nn.Module, transform: nn.Module) -> None:
        if transform.smooth is not None:
            replace_weight(layer, weight_source(layer).detach() * transform.smooth)
        attach(layer, transform)
