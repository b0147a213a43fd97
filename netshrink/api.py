"""The one-call forms of the methods: ``netshrink.prune(model, keep=0.1)`` and friends.

Each builds a method config and applies it; every setting is checked before the model changes.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import NetshrinkError
from .methods import (ClipWeights, Prune, QuantizeActivations, QuantizeWeights, RemoveHeads, Report, ShareWeights,
                      apply)
from .methods.base import apply_all


def prune(model: nn.Module, keep: float | Mapping[str, float], *, scope: str = "layer",
          targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Keep the ``keep`` fraction of weights with the largest magnitude (per layer, or
    ``scope="global"``); the others are masked to zero and stay zero through fine-tuning."""
    return apply(model, Prune(keep=keep, scope=scope, targets=targets, ignore=ignore))


def quantize(model: nn.Module, weight_bits: int | Mapping[str, int] | None = 8, *,
             activation_bits: int | None = None, calibration=None, scheme: str = "symmetric",
             granularity: str = "channel", observer: str = "minmax", learned_step: bool = False,
             targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> list[Report]:
    """Quantize weights to ``weight_bits`` and, with ``calibration`` data, input activations to
    ``activation_bits``. Everything is checked, and the calibration data read, before the model
    changes; if anything fails the model is left as it was."""
    select = {"targets": targets, "ignore": ignore}
    steps: list = []
    if weight_bits is not None:
        steps.append(QuantizeWeights(bits=weight_bits, scheme=scheme, granularity=granularity,
                                     learned_step=learned_step, **select))
    if activation_bits is not None:
        if calibration is None:
            raise NetshrinkError(f"activation_bits={activation_bits} needs calibration data")
        steps.append(QuantizeActivations(bits=activation_bits, observer=observer, **select))
    elif calibration is not None:
        raise NetshrinkError("calibration data is only used with activation_bits; give activation_bits or drop it")
    if not steps:
        raise NetshrinkError("nothing to do: give weight_bits and/or activation_bits")
    return apply_all(model, steps, calibration=calibration)


def clip(model: nn.Module, threshold: float | Mapping[str, float] | None = None, *,
         percentile: float | None = None, value: float | None = None,
         targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Clip weights with |w| > T to sign(w) * ``value`` (default: T). Give T as ``threshold``
    or as a ``percentile`` of each layer's |w|."""
    return apply(model, ClipWeights(threshold=threshold, percentile=percentile, value=value,
                                    targets=targets, ignore=ignore))


def share(model: nn.Module, bits: int | Mapping[str, int] = 5, *, init: str = "linear",
          targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Weight sharing: k-means with 2^``bits`` centroids per layer over the non-zero weights."""
    return apply(model, ShareWeights(bits=bits, init=init, targets=targets, ignore=ignore))


def remove_heads(model: nn.Module, heads: float | Mapping[str, float] = 0.7,
                 neurons: float | Mapping[str, float] = 0.7) -> Report:
    """Physically remove attention heads and feed-forward neurons of a transformer (BERT family),
    keeping the fraction ``heads`` / ``neurons`` of each block, in place (see
    :mod:`netshrink.methods.heads`). Distil afterwards: ``fit(model, data, teacher=dense)``."""
    return apply(model, RemoveHeads(heads=heads, neurons=neurons))
