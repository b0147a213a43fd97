"""Names of the built-in models, data sets and one-call method choices, in a module that imports nothing heavy, so the
command line can offer them in ``--help`` without importing PyTorch."""

MODELS = ("mlp", "lenet-300-100", "lenet-5", "resmobile")
DATASETS = ("mnist", "fashion-mnist", "digits")
QUANTIZERS = ("round", "round+blocks", "gptq", "gptq+blocks", "adaround")  # netshrink.quantize(method=...)
PRUNERS = ("magnitude", "sparsegpt", "sparsegpt+blocks", "wanda", "wanda+blocks")  # netshrink.prune(method=...)
