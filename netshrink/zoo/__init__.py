"""The small zoo: data sets (MNIST, Fashion-MNIST, digits) and the founding models (the seed MLP,
LeNet-300-100, LeNet-5, a ResNet/MobileNet-style CNN). This file names them without importing
PyTorch, so the command line can offer them in ``--help``."""

MODELS = ("mlp", "lenet-300-100", "lenet-5", "resmobile")
DATASETS = ("mnist", "fashion-mnist", "digits")
HELD_OUT = 0.1  # the share of a training split `netshrink train` (and `compress --model`) never trains on
