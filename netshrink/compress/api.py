"""The one-call forms of the methods: ``netshrink.prune(model, keep=0.1)`` and friends.

Each builds a method config and applies it; every setting is checked before the model changes.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from . import PRUNERS, QUANTIZERS
from ..errors import NetshrinkError
from .methods import (GPTQ, AdaRound, ClipWeights, Prune, QuantizeActivations, QuantizeWeights, RemoveHeads, RemoveLayers, Report, ShareWeights, SparseGPT, Wanda, apply)
from .methods.base import COMPRESSIBLE, apply_all, check_choice, check_range, select_layers
from ..errors import preserved
from .methods.blocks import STEPS as BLOCK_STEPS
from .methods.conv1d import as_linear
from .methods.mixed import choose_widths


def prune(model: nn.Module, keep: float | Mapping[str, float], *, scope: str = "layer", method: str = "magnitude",
          calibration=None, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> Report:
    """Keep the ``keep`` fraction of weights of each layer; the others are masked to zero and stay
    zero through fine-tuning.

    ``method="magnitude"`` keeps the largest weights (per layer, or ``scope="global"``); the
    data-aware methods, for models that will not be retrained, need ``calibration`` data (a few
    hundred examples, unlabeled is fine; a thousand varied ones is better): ``"wanda"`` weighs each
    weight by its input's size, ``"sparsegpt"`` also updates the kept weights to make up for the
    removed ones; ``"sparsegpt+blocks"`` / ``"wanda+blocks"`` then tune the kept weights of each
    block (transformer layer, CNN stage) together so that the block's output matches the dense
    model's (:mod:`netshrink.compress.methods.blocks`; a few minutes on a 20M-parameter transformer).
    """
    check_choice("method", method, PRUNERS)
    if method == "magnitude":
        if calibration is not None:
            raise NetshrinkError("magnitude pruning uses no data; drop calibration or choose method='sparsegpt'/'wanda'")
        return apply(model, Prune(keep=keep, scope=scope, targets=targets, ignore=ignore))
    if scope != "layer":
        raise NetshrinkError(f"method={method!r} prunes each layer by its own data; scope must be 'layer'. "
                             f"Received: scope={scope!r}")
    kind = SparseGPT if method.startswith("sparsegpt") else Wanda
    return apply(model, kind(keep=keep, targets=targets, ignore=ignore, **refined(method)),
                 calibration=_needed(calibration, method))


def quantize(model: nn.Module, weight_bits: int | Mapping[str, int] | None = 8, *,
             activation_bits: int | None = None, calibration=None, method: str = "round", group_size: int | None = None,
             scheme: str = "symmetric", granularity: str = "channel", range: str = "minmax",
             observer: str = "minmax", smooth: float | str | None = None, learned_step: bool = False,
             average_bits: float | None = None, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
             ) -> list[Report]:
    """Quantize weights to ``weight_bits`` and, with ``calibration`` data, input activations to
    ``activation_bits``. Everything is checked, and the calibration data read, before the model
    changes; if anything fails the model is left as it was.

    ``method``: ``"round"`` (to nearest; ``range="mse"`` clips each grid where rounding loses
    least), ``"gptq"`` or ``"adaround"`` (data-aware, on ``calibration``; 2-4 bits without
    retraining), ``"round+blocks"`` / ``"gptq+blocks"`` (rounding to nearest on grids with MSE
    ranges, as AutoRound, or GPTQ, then each block's rounding directions, scale gains, biases and
    norms tuned so that the block's output matches the dense model's: :mod:`netshrink.compress.methods.blocks`). ``group_size``: one scale per that many inputs of each output channel.
    ``smooth``: SmoothQuant for activations with outlier channels (alpha, or ``"auto"``).
    ``average_bits``: mixed precision; each layer's bits (2 to ``weight_bits``) are chosen from its
    measured sensitivity on ``calibration`` so that all the weights, embedding tables and grouped
    scales included, take at most this many bits on average (:mod:`netshrink.compress.methods.mixed`).
    """
    check_choice("method", method, QUANTIZERS)
    select = {"targets": targets, "ignore": ignore}
    steps: list = []
    chosen = None
    if average_bits is not None:
        if calibration is None or not isinstance(weight_bits, int) or method == "adaround":
            raise NetshrinkError("average_bits chooses each layer's bits from calibration data, up to an integer "
                                 "weight_bits, for method='round', 'gptq' or 'gptq+blocks'. Received: "
                                 f"weight_bits={weight_bits!r}, method={method!r}, calibration={'given' if calibration is not None else None}")
        check_range("weight_bits", weight_bits, 2, 8, integer=True)
        with preserved(model):  # transformers' Conv1D layers are measured as the Linear layers they become
            as_linear(model)
            layers = select_layers(model, tuple(targets), tuple(ignore), COMPRESSIBLE)
            weight_bits, chosen = choose_widths(model, layers, calibration, average_bits=average_bits,
                                                group_size=group_size, scheme=scheme, highest=weight_bits)
    if activation_bits is not None:  # first: weight solvers then see the quantized activations
        if calibration is None:
            raise NetshrinkError(f"activation_bits={activation_bits} needs calibration data")
        steps.append(QuantizeActivations(bits=activation_bits, observer=observer, smooth=smooth, **select))
    elif smooth is not None:
        raise NetshrinkError("smooth migrates activation ranges into weights: it needs activation_bits")
    if weight_bits is not None:
        if method == "round":
            steps.append(QuantizeWeights(bits=weight_bits, scheme=scheme, granularity=granularity,
                                         learned_step=learned_step, group_size=group_size, range=range, **select))
        elif method == "round+blocks":  # AutoRound: rounding learned from grids searched for the least error
            _needed(calibration, method)
            steps.append(QuantizeWeights(bits=weight_bits, scheme=scheme, granularity=granularity,
                                         learned_step=learned_step, group_size=group_size, range="mse",
                                         **select, **refined(method)))
        else:
            _needed(calibration, method)
            if granularity != "channel" or learned_step or range != "minmax" or scheme not in ("symmetric", "affine"):
                raise NetshrinkError(f"method={method!r} takes bits, group_size and scheme ('symmetric' or 'affine'); "
                                     "it chooses its own ranges per channel")
            if method.startswith("gptq"):
                steps.append(GPTQ(bits=weight_bits, group_size=group_size, scheme=scheme, **select, **refined(method)))
            else:
                if group_size is not None:
                    raise NetshrinkError("method='adaround' quantizes per channel; group_size is for 'round' and 'gptq'")
                steps.append(AdaRound(bits=weight_bits, scheme=scheme, **select))
    if calibration is not None and activation_bits is None and method == "round" and average_bits is None:
        raise NetshrinkError("calibration data is only used with activation_bits or a data-aware method "
                             "(method='gptq' or 'adaround')")
    if not steps:
        raise NetshrinkError("nothing to do: give weight_bits and/or activation_bits")
    reports = apply_all(model, steps, calibration=calibration)
    if chosen is not None:
        weights = sum(count for _, count, _, _ in chosen)
        spread = ", ".join(f"{sum(c for _, c, b, _ in chosen if b == bits) / weights:.0%} at {bits}"
                           for bits in sorted({b for _, _, b, _ in chosen}))
        reports[-1].notes.append(f"mixed precision for at most {average_bits} bits per weight (scales included): "
                                 f"weights {spread} bits")
    return reports


def refined(method: str) -> dict:
    """The settings a ``"<solver>+blocks"`` method name adds to its layer-wise solver."""
    return {"block_steps": BLOCK_STEPS} if method.endswith("+blocks") else {}


def _needed(calibration, method: str):
    if calibration is None:
        raise NetshrinkError(f"method={method!r} learns from data: pass calibration=<a few hundred examples; "
                             "labels are not needed>")
    return calibration


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
                 neurons: float | Mapping[str, float] = 0.7, *, calibration=None, samples: int = 1024,
                 allocation: str = "uniform", block_steps: int = 0) -> Report:
    """Physically remove attention heads and feed-forward neurons of a transformer (BERT,
    DistilBERT, MPNet, GPT-2; q_proj/k_proj/v_proj models such as ViT, CLIP, BART, Whisper and Llama,
    grouped-query attention included), keeping the fraction ``heads`` / ``neurons`` of each block, in place (see
    :mod:`netshrink.compress.methods.heads`). Without data, by weight magnitude: distil afterwards,
    ``fit(model, data, teacher=dense)``. With ``calibration`` (``samples`` examples of it, token
    batches as the model takes them), the units whose loss the rest can best make up for go, and
    each block's output projection is refit to reproduce the dense block: far closer to the dense
    model before any training. ``allocation="global"`` (with data) keeps the same numbers of heads
    and neurons in all but spreads them over the blocks by each block's measured damage at the
    model's output, instead of the same fraction everywhere. With data and ``block_steps`` (e.g. 200),
    each transformer layer's remaining weights, biases and norms are then tuned for that many batches
    so that the layer's output matches the dense model's (block reconstruction, as
    ``method="gptq+blocks"``; on text unlike the calibration text it gained little:
    benchmarks/results/held_out-more.md)."""
    return apply(model, RemoveHeads(heads=heads, neurons=neurons, samples=samples, allocation=allocation,
                                    block_steps=block_steps),
                 calibration=calibration)


def remove_layers(model: nn.Module, keep: int | float = 0.67, *, calibration=None, samples: int = 256,
                  forward=None) -> Report:
    """Physically remove whole blocks of a Hugging Face transformer, keeping ``keep`` of them (a
    count, or a fraction of the blocks), in place (see :mod:`netshrink.compress.methods.depth`). Blocks go
    one at a time, each the one whose removal leaves the least error at the model's output on
    ``samples`` examples of ``calibration`` (token batches as the model takes them); with
    ``forward(model, inputs) -> tensor``, the error of what it returns (e.g. the pooled sentence
    embedding a sentence model is used for) instead of the last hidden states. The model's
    config follows, so the shallower model saves, loads and exports as it is. Fewer blocks cut
    the time per token at every batch size, batch 1 included, where removing heads and neurons
    helps less; they also cost more accuracy: distil afterwards,
    ``fit(model, data, teacher=dense)``."""
    if forward is not None and not callable(forward):
        raise NetshrinkError(f"forward must be a function (model, inputs) -> tensor. Received: {forward!r}")
    return apply(model, RemoveLayers(keep=keep, samples=samples), calibration=calibration, forward=forward)

