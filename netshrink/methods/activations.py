"""Activation quantization: ``bits``-bit affine fake quantization of the activations that flow
into each selected layer (the previous layer's output, which is what an integer kernel consumes),
with ranges calibrated on a few batches of data.

The quantizer is a submodule ``layer.input_quantizer`` (its calibrated range is part of the
state dict) called by a forward pre-hook, so it works on any model, trains (straight-through
inside the range, zero gradient outside) and exports to ONNX as QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import NetshrinkError
from ..train import Data, batches, call, eval_mode
from .base import LINEAR_CONV, Method, check_choice, check_range, per_layer

OBSERVERS = ("minmax", "percentile")


class ActivationQuantizer(nn.Module):
    """Affine ``bits``-bit fake quantization over a calibrated range [low, high] (which holds 0)."""

    def __init__(self, bits: int, low: float = 0.0, high: float = 0.0) -> None:
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("low", torch.tensor(float(min(low, 0.0))))
        self.register_buffer("high", torch.tensor(float(max(high, 0.0))))

    def grid(self) -> tuple[float, int]:
        """``(scale, zero_point)`` with zero exactly representable."""
        qmax = 2 ** self.bits - 1
        scale = float(self.high - self.low) / qmax or 1.0
        zero_point = int(round(-float(self.low) / scale))
        return scale, min(max(zero_point, 0), qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.grid()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2 ** self.bits - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{float(self.low):.4g}, {float(self.high):.4g}]"


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]),) + tuple(args[1:])


def attach(layer: nn.Module, quantizer: ActivationQuantizer) -> None:
    """Give ``layer`` an input quantizer (replacing one already there)."""
    if not hasattr(layer, "input_quantizer"):
        layer.register_forward_pre_hook(_quantize_input)
    layer.input_quantizer = quantizer


def detach_all(model: nn.Module) -> None:
    """Remove every input quantizer (and its hook) from ``model``."""
    for module in model.modules():
        if hasattr(module, "input_quantizer"):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantize_input:
                    del module._forward_pre_hooks[key]
            del module.input_quantizer


def input_quantizer(layer: nn.Module) -> ActivationQuantizer | None:
    return getattr(layer, "input_quantizer", None)


@dataclass(frozen=True, kw_only=True)
class QuantizeActivations(Method):
    """Quantize each selected layer's input activations to ``bits`` (2..8, or a per-layer map).

    Needs ``calibration`` data at apply time. ``observer='minmax'`` takes the range seen over the
    calibration batches; ``'percentile'`` averages each batch's ``percentile`` of the low and high
    tails, which ignores rare outliers. ``calibration_batches`` bounds the work.
    """

    name: ClassVar[str] = "activations"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    bits: int | dict = 8
    observer: str = "minmax"
    percentile: float = 99.99
    calibration_batches: int = 8
    batch_size: int = 256

    def check(self) -> None:
        super().check()
        check_range("activation bits", self.bits, 2, 8, integer=True)
        check_choice("observer", self.observer, OBSERVERS)
        check_range("percentile", self.percentile, 50.0, 100.0)
        check_range("calibration_batches", self.calibration_batches, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)

    def prepare(self, layers: dict[str, nn.Module], calibration: Data | None = None, model: nn.Module | None = None,
                **_: Any) -> list:
        if calibration is None or model is None:
            raise NetshrinkError("activation quantization needs calibration data "
                                 "(pass calibration=<data set, (x, y) tensors or DataLoader>)")
        observed: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
        q = self.percentile / 100.0

        def observer(name):
            def hook(module, args):
                x = args[0].detach().float().flatten()
                if self.observer == "minmax":
                    observed[name].append((float(x.min()), float(x.max())))
                else:
                    sample = x if x.numel() <= 1 << 24 else x[:: -(-x.numel() // (1 << 24))]
                    observed[name].append((float(torch.quantile(sample, 1 - q)), float(torch.quantile(sample, q))))
            return hook

        # Observe the float activations: existing input quantizers are set aside during calibration.
        previous = {name: input_quantizer(layer) for name, layer in layers.items()}
        for layer in layers.values():
            if input_quantizer(layer) is not None:
                layer.input_quantizer = nn.Identity()
        handles = [layer.register_forward_pre_hook(observer(name), prepend=True) for name, layer in layers.items()]
        try:
            with torch.no_grad(), eval_mode(model):
                for i, (x, _) in enumerate(batches(calibration, self.batch_size)):
                    if i >= self.calibration_batches:
                        break
                    call(model, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if isinstance(exc, NetshrinkError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NetshrinkError(f"the model does not run on the calibration data: {first}") from None
        finally:
            for handle in handles:
                handle.remove()
            for name, layer in layers.items():
                if previous[name] is not None:
                    layer.input_quantizer = previous[name]
        if not any(observed.values()):
            raise NetshrinkError("calibration data yielded no batches")
        plan = []
        for name, ranges in observed.items():
            if not ranges:
                continue  # the layer never ran on this data
            if self.observer == "minmax":
                low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
            else:
                low, high = (sum(r[i] for r in ranges) / len(ranges) for i in (0, 1))
            bits = int(per_layer(self.bits, name, "activation bits"))
            plan.append((name, ActivationQuantizer(bits, low, high),
                         f"{bits}-bit inputs over [{min(low, 0):.4g}, {max(high, 0):.4g}] ({self.observer})"))
        return plan

    def commit(self, layer: nn.Module, transform: nn.Module) -> None:
        attach(layer, transform)
