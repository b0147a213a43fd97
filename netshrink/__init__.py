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
import importlib.abc
import importlib.util
import sys
import types
import warnings

from .errors import NetshrinkError

__version__ = "0.6.0"

_WHERE = {
    "prune": "compress.api", "quantize": "compress.api", "clip": "compress.api", "share": "compress.api",
    "remove_heads": "compress.api", "remove_layers": "compress.api", "remove_units": "compress.methods.structured",
    "apply": "compress.methods", "bake": "compress.methods", "Report": "compress.methods", "Prune": "compress.methods",
    "NMSparsity": "compress.methods", "QuantizeWeights": "compress.methods", "QuantizeActivations": "compress.methods",
    "ClipWeights": "compress.methods", "ShareWeights": "compress.methods", "RemoveUnits": "compress.methods",
    "RemoveHeads": "compress.methods", "RemoveLayers": "compress.methods", "GPTQ": "compress.methods",
    "AdaRound": "compress.methods", "SparseGPT": "compress.methods", "Wanda": "compress.methods",
    "QuantizeBiases": "compress.methods", "PruneUnused": "compress.methods", "RateAware": "compress.methods",
    "Recipe": "compress.recipe",
    "fit": "training.fit", "Distill": "training.fit", "evaluate": "training.batches",
    "save": "store.artifact", "load": "store.artifact",
    "export": "deploy", "benchmark": "deploy.bench",
    "auto": "search.auto", "summary": "reporting.summary", "report_page": "reporting.page",
    "load_dataset": "zoo.datasets", "build_model": "zoo.models",
}

# Modules of netshrink 0.6 and where their names live now: importing an old path still works (with a
# DeprecationWarning naming the new one). A name is looked up in each new module in turn.
_MOVED = {
    "api": ("compress.api",), "calibration": ("compress.calibration",), "recipe": ("compress.recipe",),
    "methods": ("compress.methods",), "train": ("training.fit", "training.batches", "errors"),
    "data": ("zoo.datasets",), "models": ("zoo.models",), "catalog": ("zoo", "compress"),
    "artifact": ("store.artifact",), "fuzz": ("store.fuzz",), "codec": ("store.codec",), "codec.grids": ("grids",),
    "bench": ("deploy.bench",), "machine": ("deploy.machine",), "onnx_export": ("deploy.to_onnx", "deploy.report"),
    "autotune": ("search.auto",), "found": ("search.found",), "knapsack": ("compress.knapsack",),
    "latency": ("search.latency",), "sweep": ("search.sweep",), "report": ("reporting.summary", "tables"),
    "html_report": ("reporting.page",),
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'netshrink' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


_MOVED_LONGEST_FIRST = sorted(_MOVED, key=len, reverse=True)  # "codec.grids" before "codec"


def _moved(fullname: str) -> list[str] | None:
    """The new modules of an old path (``netshrink.codec.weights`` -> ``[netshrink.store.codec.weights]``), or None."""
    if not fullname.startswith(__name__ + "."):
        return None
    old = fullname[len(__name__) + 1:]
    for key in _MOVED_LONGEST_FIRST:
        if old == key or old.startswith(key + "."):
            rest = old[len(key):]
            return [f"{__name__}.{target}{rest}" for target in _MOVED[key]]
    return None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``netshrink.<old module>[.<sub>]`` and gives a module that forwards to the new places."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if _moved(fullname) else None

    def create_module(self, spec):
        targets = _moved(spec.name)
        warnings.warn(f"{spec.name} is now {' and '.join(targets)}", DeprecationWarning, stacklevel=2)
        if len(targets) == 1:  # one new home: that very module (its submodules import as usual)
            return importlib.import_module(targets[0])
        module = types.ModuleType(spec.name, f"Moved to {' and '.join(targets)}.")
        homes = [importlib.import_module(t) for t in targets]

        def forward(name: str):
            for home in homes:
                if hasattr(home, name):
                    return getattr(home, name)
            raise AttributeError(f"{name} is not in {' or '.join(targets)}")

        module.__getattr__ = forward
        return module

    def exec_module(self, module) -> None:
        pass


sys.meta_path.insert(0, _OldPaths())  # first: a submodule of an old path must not load a second copy


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["NetshrinkError", "__version__", *_WHERE]
