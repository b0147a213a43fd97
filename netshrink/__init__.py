"""netshrink: make trained PyTorch networks small and fast.

>>> import netshrink, torch
>>> model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
>>> report = netshrink.prune(model, keep=0.1)          # magnitude pruning, masks kept in training
>>> report = netshrink.quantize(model, weight_bits=4)  # 4-bit weights; zeros stay zero
>>> netshrink.summary(model).rows[0]["bits"] <= 4
True
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .artifact import load, save
from .data import load_dataset
from .errors import NetshrinkError
from .methods import (ClipWeights, NMSparsity, Prune, QuantizeActivations, QuantizeWeights, RemoveUnits,
                      Report, ShareWeights, apply, bake)
from .methods.structured import remove_units
from .models import build_model
from .recipe import Recipe
from .report import summary
from .train import Distill, evaluate, fit

__version__ = "0.1.0"


def prune(model: nn.Module, keep: float | Mapping[str, float], *, scope: str = "layer",
          targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Keep the ``keep`` fraction of weights with the largest magnitude (per layer, or
    ``scope="global"``); the others are masked to zero and stay zero through fine-tuning."""
    return apply(model, Prune(keep=keep, scope=scope, targets=tuple(targets), ignore=tuple(ignore)))


def quantize(model: nn.Module, weight_bits: int | Mapping[str, int] | None = 8, *,
             activation_bits: int | None = None, calibration=None, scheme: str = "symmetric",
             granularity: str = "channel", observer: str = "minmax", learned_step: bool = False,
             targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> list[Report]:
    """Quantize weights to ``weight_bits`` and, with ``calibration`` data, input activations to
    ``activation_bits``. Everything is checked before the model changes."""
    select = {"targets": tuple(targets), "ignore": tuple(ignore)}
    steps: list = []
    if weight_bits is not None:
        steps.append(QuantizeWeights(bits=weight_bits, scheme=scheme, granularity=granularity,
                                     learned_step=learned_step, **select))
    if activation_bits is not None:
        if calibration is None:
            raise NetshrinkError(f"activation_bits={activation_bits} needs calibration data")
        steps.append(QuantizeActivations(bits=activation_bits, observer=observer, **select))
    if not steps:
        raise NetshrinkError("nothing to do: give weight_bits and/or activation_bits")
    for step in steps:
        step.check()
    return [apply(model, step, calibration=calibration) for step in steps]


def clip(model: nn.Module, threshold: float | Mapping[str, float] | None = None, *,
         percentile: float | None = None, value: float | None = None,
         targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Clip weights with |w| > T to sign(w) * ``value`` (default: T). Give T as ``threshold``
    or as a ``percentile`` of each layer's |w|."""
    return apply(model, ClipWeights(threshold=threshold, percentile=percentile, value=value,
                                    targets=tuple(targets), ignore=tuple(ignore)))


def share(model: nn.Module, bits: int | Mapping[str, int] = 5, *, init: str = "linear",
          targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Weight sharing: k-means with 2^``bits`` centroids per layer over the non-zero weights."""
    return apply(model, ShareWeights(bits=bits, init=init, targets=tuple(targets), ignore=tuple(ignore)))


def export(model: nn.Module, path, *, int8: bool = False, calibration=None, input_shape=None):
    """Write ONNX for ONNX Runtime: fp32, or int8 QDQ (see :mod:`netshrink.export`)."""
    from .export import export as _export

    return _export(model, path, int8=int8, calibration=calibration, input_shape=input_shape)


__all__ = ["prune", "quantize", "clip", "share", "remove_units", "apply", "bake", "summary", "fit",
           "evaluate", "save", "load", "export", "Recipe", "build_model", "load_dataset", "Distill",
           "NetshrinkError", "Prune", "NMSparsity", "QuantizeWeights", "QuantizeActivations", "ClipWeights",
           "ShareWeights", "RemoveUnits"]
