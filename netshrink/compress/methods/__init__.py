"""Compression methods. Each is one file: a config dataclass (what) whose ``prepare`` builds the
weight transforms, applied by :func:`netshrink.compress.methods.base.apply`. Adding a method = one file
plus one line here."""
from .activations import QuantizeActivations
from .adaround import AdaRound
from .base import Method, Report, apply, bake
from .bias import QuantizeBiases
from .clip import Clip, ClipWeights
from .depth import RemoveLayers
from .gptq import GPTQ
from .grid import FixedGrid
from .heads import RemoveHeads
from .prune import Mask, NMSparsity, Prune
from .rate import RateAware
from .quantize import FakeQuantize, LearnedStepQuantize, QuantizeWeights
from .share import Codebook, ShareWeights
from .sparsegpt import SparseGPT
from .structured import RemoveUnits
from .unused import PruneUnused
from .wanda import Wanda

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (
    Prune, NMSparsity, ClipWeights, QuantizeWeights, QuantizeActivations, ShareWeights, RemoveUnits, RemoveHeads,
    RemoveLayers, GPTQ, AdaRound, SparseGPT, Wanda, QuantizeBiases, PruneUnused, RateAware)}

# Weight transforms a file can record and rebuild on load: record()["kind"] -> class.
TRANSFORMS = {"mask": Mask, "clip": Clip, "quantize": FakeQuantize, "learned-step": LearnedStepQuantize,
              "codebook": Codebook, "fixed-grid": FixedGrid}

__all__ = ["REGISTRY", "TRANSFORMS", "Method", "Report", "apply", "bake", "Prune", "NMSparsity", "ClipWeights",
           "QuantizeWeights", "QuantizeActivations", "ShareWeights", "RemoveUnits", "RemoveHeads", "RemoveLayers", "GPTQ", "AdaRound",
           "SparseGPT", "Wanda", "QuantizeBiases", "PruneUnused", "RateAware"]
