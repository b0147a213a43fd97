"""Compression: what each method does (``methods/``, one file each), how calibration data reaches
the data-aware ones (``calibration``), the one-call API (``api``: ``prune``, ``quantize``, ...)
and recipes of ordered steps (``recipe``, built-in ones in ``recipes/``).

This file names the one-call method choices without importing PyTorch, so the command line can
offer them in ``--help``."""

QUANTIZERS = ("round", "round+blocks", "gptq", "gptq+blocks", "adaround")  # netshrink.quantize(method=...)
PRUNERS = ("magnitude", "sparsegpt", "sparsegpt+blocks", "wanda", "wanda+blocks")  # netshrink.prune(method=...)
