"""The model zoo: the founding MLP, LeNet-300-100 and LeNet-5 (Caffe's layout).

Layers carry names (``fc1``, ``conv1``...) so that per-layer settings and reports read well.
A model is rebuilt from a small JSON-able spec, ``{"name", "in_shape", "classes"}``, which is what
checkpoints and compressed files store instead of pickled code.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .errors import NetshrinkError

from .catalog import MODELS


def build_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10,
                seed: int | None = 0) -> nn.Sequential:
    """Build a zoo model with freshly initialised weights (from ``seed``: reproducible; ``None``
    draws from the global generator).

    >>> sum(p.numel() for p in build_model("lenet-300-100").parameters())
    266610
    """
    if (isinstance(in_shape, (str, bytes)) or not isinstance(in_shape, (tuple, list)) or not 1 <= len(in_shape) <= 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in in_shape)):
        raise NetshrinkError(f"in_shape must be 1 to 3 positive integers, e.g. (1, 28, 28). Received: in_shape={in_shape!r}")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise NetshrinkError(f"classes must be a positive integer. Received: classes={classes!r}")
    in_shape = tuple(int(d) for d in in_shape)
    features = math.prod(in_shape)
    if name == "mlp":  # the founding text's model
        layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(features, 128)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(128, classes))]
    elif name == "lenet-300-100":
        layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(features, 300)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(100, classes))]
    elif name == "lenet-5":
        if len(in_shape) != 3 or in_shape[1] < 16 or in_shape[2] < 16:
            raise NetshrinkError(f"lenet-5 needs images of at least 16x16; got in_shape={in_shape}")
        # Caffe's lenet_train_test.prototxt: no ReLU after the convolutions, one after ip1.
        h, w = ((in_shape[1] - 4) // 2 - 4) // 2, ((in_shape[2] - 4) // 2 - 4) // 2
        layers = [("conv1", nn.Conv2d(in_shape[0], 20, 5)), ("pool1", nn.MaxPool2d(2)),
                  ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
                  ("fc1", nn.Linear(50 * h * w, 500)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(500, classes))]
    else:
        raise NetshrinkError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if seed is not None:  # re-initialise from the seed, leaving the global RNG state as it was
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for _, layer in layers:
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
    model = nn.Sequential(OrderedDict(layers))
    model.spec = {"name": name, "in_shape": list(in_shape), "classes": classes}  # type: ignore[assignment]
    return model


def model_from_spec(spec: dict) -> nn.Sequential:
    """Rebuild a zoo model from the spec a file stores; every field is checked first (files are
    input from strangers: a spec must not be able to ask for a huge model)."""
    if not isinstance(spec, dict) or set(spec) != {"name", "in_shape", "classes"}:
        raise NetshrinkError(f"bad model spec {str(spec)[:200]}")
    name, in_shape, classes = spec["name"], spec["in_shape"], spec["classes"]
    ok_shape = (isinstance(in_shape, list) and 1 <= len(in_shape) <= 3
                and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 4096 for d in in_shape)
                and math.prod(in_shape) <= 1 << 22)
    if name not in MODELS or not ok_shape or not (isinstance(classes, int) and 1 <= classes <= 100_000):
        raise NetshrinkError(f"bad model spec {str(spec)[:200]}")
    return build_model(name, tuple(in_shape), classes)
