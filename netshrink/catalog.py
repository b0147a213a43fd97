"""Names of the built-in models and data sets, in a module that imports nothing heavy, so the
command line can offer them in ``--help`` without importing PyTorch."""

MODELS = ("mlp", "lenet-300-100", "lenet-5", "resmobile")
DATASETS = ("mnist", "fashion-mnist", "digits")
