"""netshrink: make trained PyTorch networks small and fast.

>>> import netshrink, torch
>>> model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
>>> report = netshrink.prune(model, keep=0.1)          # magnitude pruning, masks kept in training
>>> report = netshrink.quantize(model, weight_bits=4)  # 4-bit weights; zeros stay zero
>>> netshrink.summary(model).rows[0]["bits"] <= 4
True

Names are imported when first used (PEP 562), so ``import netshrink`` and ``netshrink --help``
do not pay for importing PyTorch. No public name is also a submodule's name: importing a
submodule can never replace a function.
"""
from __future__ import annotations

import importlib

from .errors import NetshrinkError

__version__ = "0.6.0"

_WHERE = {
    "prune": "api", "quantize": "api", "clip": "api", "share": "api", "remove_heads": "api", "remove_layers": "api",
    "export": "deploy", "remove_units": "methods.structured", "benchmark": "bench", "auto": "autotune", "report_page": "html_report",
    "apply": "methods", "bake": "methods", "Report": "methods", "Prune": "methods", "NMSparsity": "methods",
    "QuantizeWeights": "methods", "QuantizeActivations": "methods", "ClipWeights": "methods",
    "ShareWeights": "methods", "RemoveUnits": "methods", "RemoveHeads": "methods", "RemoveLayers": "methods", "GPTQ": "methods",
    "AdaRound": "methods", "SparseGPT": "methods", "Wanda": "methods", "QuantizeBiases": "methods",
    "PruneUnused": "methods",
    "save": "artifact", "load": "artifact", "load_dataset": "data", "build_model": "models",
    "Recipe": "recipe", "summary": "report", "fit": "train", "evaluate": "train", "Distill": "train",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'netshrink' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["NetshrinkError", "__version__", *_WHERE]
