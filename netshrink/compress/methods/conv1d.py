"""transformers' ``Conv1D`` (GPT-2, OpenAI GPT, and models built from them) compressed as a Linear.

``Conv1D`` is a Linear layer that stores its weight transposed (``[in, out]``) and is no subclass
of ``nn.Linear``, so without this every method would pass over the layers that hold nearly all of
GPT-2's weights. Rather than teach every method (per-channel scales, N:M groups, GPTQ's
columns, SmoothQuant's factors, the int8 export) a second weight layout, the first netshrink
call that compresses a model turns each ``Conv1D`` into :class:`LinearFromConv1D` in place: the
same module object, now an ``nn.Linear`` with the weight transposed, computing the same outputs
(``x @ W + b`` is ``F.linear(x, W.T, b)``). Hooks the module carries stay. Files record which
layers were converted, so :func:`netshrink.load` converts a freshly built model the same way
before it takes the stored weights.

The converted model's ``state_dict`` holds those weights as ``[out, in]``: load it into a model
whose layers are ``Conv1D`` only through :func:`netshrink.load`, or after :func:`as_linear`.
"""
from __future__ import annotations

import sys

from torch import nn


class LinearFromConv1D(nn.Linear):
    """A transformers ``Conv1D`` as an ``nn.Linear``: the same computation, the weight ``[out, in]``."""


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (checked without importing transformers: a model holding one has)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, getattr(utils, "Conv1D", ()))


def conv1d_layers(model: nn.Module) -> list[str]:
    """The names of the model's ``Conv1D`` layers."""
    return [name for name, module in model.named_modules() if is_conv1d(module)]


def as_linear(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Turn the model's ``Conv1D`` layers (or those ``names``) into :class:`LinearFromConv1D` in
    place; returns the names converted. Layers already converted are left as they are."""
    converted = []
    for name in conv1d_layers(model) if names is None else names:
        module = model.get_submodule(name)
        if isinstance(module, LinearFromConv1D):
            continue
        weight = module.weight
        module.__class__ = LinearFromConv1D
        module.in_features, module.out_features = weight.shape
        del module.nf, module.nx
        module.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        converted.append(name)
    return converted
