"""Compression methods. Each is one file: a config dataclass (what) whose ``prepare`` builds the
weight transforms, applied by :func:`netshrink.methods.base.apply`. Adding a method = one file
plus one line here."""
from .activations import QuantizeActivations
from .base import Method, Report, apply, bake
from .clip import ClipWeights
from .prune import NMSparsity, Prune
from .quantize import QuantizeWeights
from .share import ShareWeights
from .structured import RemoveUnits

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (
    Prune, NMSparsity, ClipWeights, QuantizeWeights, QuantizeActivations, ShareWeights, RemoveUnits)}

__all__ = ["REGISTRY", "Method", "Report", "apply", "bake", "Prune", "NMSparsity", "ClipWeights",
           "QuantizeWeights", "QuantizeActivations", "ShareWeights", "RemoveUnits"]
