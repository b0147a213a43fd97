"""The model zoo: the founding MLP, LeNet-300-100, LeNet-5 (Caffe's layout), and ``resmobile``, a
small ResNet/MobileNet-style CNN (BatchNorm, a residual block with a 1x1 projection shortcut, an
inverted-residual block with a depthwise convolution, a depthwise-separable block, global pooling).

Layers carry names (``fc1``, ``conv1``...) so that per-layer settings and reports read well.
A model is rebuilt from a small JSON-able spec, ``{"name", "in_shape", "classes"}``, which is what
checkpoints and compressed files store instead of pickled code.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterator

import torch
from torch import nn

from ..errors import NetshrinkError, first_line

from . import MODELS

MAX_SPEC_INPUT = 1 << 16  # values in a zoo model's input that loading rebuilds it for (a 256x256 image)


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)),
                                      ("bn", nn.BatchNorm2d(cout))]))


class ResMobile(nn.Module):
    """28x28 -> 14x14 -> 7x7; 54,898 parameters (10 classes). Every structure structured pruning must
    handle: residual adds (one through a 1x1 projection), depthwise convolutions inside an
    inverted residual, BatchNorm everywhere, a mean over the spatial dimensions."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(channels, 24)
        self.block1 = _conv_bn(24, 48, stride=2)  # residual block with a projection shortcut
        self.block1b = _conv_bn(48, 48)
        self.shortcut = _conv_bn(24, 48, kernel=1, stride=2)
        self.expand = _conv_bn(48, 144, kernel=1)  # inverted residual: expand, depthwise, project, add
        self.depthwise = _conv_bn(144, 144, groups=144)
        self.project = _conv_bn(144, 48, kernel=1)
        self.separable_dw = _conv_bn(48, 48, stride=2, groups=48)  # depthwise-separable block
        self.separable_pw = _conv_bn(48, 96, kernel=1)
        self.head = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block1b(torch.relu(self.block1(x))) + self.shortcut(x))
        x = x + self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))
        x = torch.relu(self.separable_pw(torch.relu(self.separable_dw(x))))
        return self.head(x.mean(dim=(2, 3)))


def build_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10,
                seed: int | None = 0) -> nn.Module:
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
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise NetshrinkError(f"seed must be an integer >= 0 or None. Received: seed={seed!r}")
    in_shape = tuple(int(d) for d in in_shape)
    features = math.prod(in_shape)
    if name == "mlp":  # the founding text's model
        layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(features, 128)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(128, classes))]
    elif name == "lenet-300-100":
        layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(features, 300)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(100, classes))]
    elif name == "resmobile":
        if len(in_shape) != 3:
            raise NetshrinkError(f"resmobile needs images (C, H, W); got in_shape={in_shape}")
        model = ResMobile(in_shape[0], classes)
        layers = list(model.named_modules())[1:]
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
    if name != "resmobile":
        model = nn.Sequential(OrderedDict(layers))
    model.spec = {"name": name, "in_shape": list(in_shape), "classes": classes}  # type: ignore[assignment]
    return model


def spec_of(model: nn.Module) -> dict | None:
    """What a file records to rebuild ``model`` without being handed it: a zoo model's spec, or a
    Hugging Face transformers model's class name and config; None for other models."""
    spec = getattr(model, "spec", None)
    if spec:
        return spec
    config = getattr(model, "config", None)
    if type(model).__module__.startswith("transformers.") and hasattr(config, "to_json_string"):
        import json

        return {"transformers": type(model).__name__, "config": json.loads(config.to_json_string(use_diff=False))}
    return None


# Config fields that name code or a repository to fetch it from: a file may not carry them.
CODE_FIELDS = frozenset({"auto_map", "trust_remote_code", "quantization_config", "kernel_config", "use_kernels",
                         "custom_pipelines", "adapter_config"})
# The attention (and experts) implementations a rebuilt model may use: PyTorch's own. Any other
# value (a Hub kernel repository such as "org/repo", flash attention) makes transformers fetch code.
BUILT_IN_IMPLEMENTATIONS = (None, "eager", "sdpa")
MAX_ENTRIES = 1 << 16  # labels in a label map, items in a list: far beyond any real config


def _counts_modules(key: str) -> bool:
    """A config field that sets how many modules are built (layers, experts, blocks), each of
    which stores at least one tensor; not an index or a limit (``max_window_layers``)."""
    return any(word in key for word in ("layer", "expert", "block")) and not key.startswith(("max_", "first_", "last_")) \
        and not key.endswith(("_index", "_idx", "_per_tok", "_size"))


def check_config(config: dict, largest_dim: int, tensor_count: int, where: str = "config") -> None:
    """Refuse, before anything is built, a recorded transformers config that names code or a
    repository, or whose sizes cannot be those of the stored tensors: counts of modules (layers,
    experts, blocks) beyond the number of stored tensors, label maps longer than the largest stored
    dimension, numbers beyond what netshrink rebuilds. The sizes that shape weights are compared
    with the stored tensors once the model exists on the meta device (``artifact``)."""
    def refuse(what: str) -> NetshrinkError:
        return NetshrinkError(f"bad model spec: {where}.{what}")

    for key, value in config.items():
        if not isinstance(key, str):
            raise refuse(f"{key!r} is not a field name")
        if key in CODE_FIELDS:
            raise refuse(f"{key} names code to load; a netshrink file never rebuilds a model with it")
        if key.endswith(("_implementation", "_implementation_internal")):
            chosen = value.values() if isinstance(value, dict) else [value]
            if not all(v in BUILT_IN_IMPLEMENTATIONS for v in chosen):
                raise refuse(f"{key}={str(value)[:60]!r} is not one of PyTorch's own (eager, sdpa)")
        if key in ("id2label", "label2id"):
            if not isinstance(value, dict) or len(value) > min(MAX_ENTRIES, max(largest_dim, 1)):
                raise refuse(f"{key} has {len(value) if isinstance(value, dict) else 'no'} labels; "
                             f"the stored tensors have at most {largest_dim} rows")
        elif isinstance(value, dict):
            check_config(value, largest_dim, tensor_count, f"{where}.{key}")
        elif isinstance(value, list):
            if len(value) > MAX_ENTRIES:
                raise refuse(f"{key} has {len(value)} entries")
            for item in value:
                if isinstance(item, dict):
                    check_config(item, largest_dim, tensor_count, f"{where}.{key}")
        elif isinstance(value, int) and not isinstance(value, bool):
            limit = tensor_count if _counts_modules(key) else 1 << 24  # sizes: compared with the stored shapes
            if not -1 <= value <= limit:
                raise refuse(f"{key}={value} is beyond what netshrink rebuilds from this file ({limit})")


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Hugging Face's offline mode for the length of a rebuild (so no code path inside it reaches
    the network, whatever a config says), restored afterwards."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _transformers_model(spec: dict, largest_dim: int, tensor_count: int) -> nn.Module:
    """Rebuild a Hugging Face model from its recorded class and config: only classes of the
    installed transformers library (never remote code, never a Hub kernel, no network), and only
    PreTrainedModel subclasses, with the config checked first (:func:`check_config`)."""
    try:
        import transformers
    except ImportError:
        raise NetshrinkError(f"this file holds a transformers {str(spec.get('transformers'))[:80]!r} model: pip install "
                             "transformers, or pass model=<an instance>") from None
    name, config = spec.get("transformers"), spec.get("config")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and isinstance(config, dict)):
        raise NetshrinkError(f"bad model spec: {str(name)[:80]!r} is not a transformers model class")
    check_config(config, largest_dim, tensor_count)
    config = {key: value for key, value in config.items() if key != "_name_or_path"}  # where it came from: not needed
    try:
        with _offline_hub():
            return cls(cls.config_class.from_dict(config))
    except Exception as exc:  # noqa: BLE001 - the library's own complaint, in one line
        raise NetshrinkError(f"cannot rebuild {cls.__name__} from the recorded config: {first_line(exc)}") from None


def model_from_spec(spec: dict, largest_dim: int = 1 << 24, tensor_count: int = 1 << 10) -> nn.Module:
    """Rebuild a model from the spec a file stores; every field is checked first (files are
    input from strangers: a spec must not be able to ask for a huge model). ``largest_dim`` and
    ``tensor_count`` describe the file's stored tensors, which bound a transformers config's
    label maps and module counts. Build on PyTorch's ``meta`` device to allocate nothing."""
    if isinstance(spec, dict) and set(spec) == {"transformers", "config"}:
        return _transformers_model(spec, largest_dim, tensor_count)
    if not isinstance(spec, dict) or set(spec) != {"name", "in_shape", "classes"}:
        raise NetshrinkError(f"bad model spec {str(spec)[:200]}")
    name, in_shape, classes = spec["name"], spec["in_shape"], spec["classes"]
    ok_shape = (isinstance(in_shape, list) and 1 <= len(in_shape) <= 3
                and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 4096 for d in in_shape))
    if name not in MODELS or not ok_shape or not (isinstance(classes, int) and 1 <= classes <= 100_000):
        raise NetshrinkError(f"bad model spec {str(spec)[:200]}")
    # A loaded zoo model runs once on an input of this shape (artifact._check_runs), and a
    # convolutional one has no weight that fixes its image size: the size is bounded instead.
    if math.prod(in_shape) > MAX_SPEC_INPUT:
        raise NetshrinkError(f"a zoo model's recorded input {in_shape} has more than {MAX_SPEC_INPUT:,} values, more than "
                             "netshrink rebuilds by itself: pass model=<an instance of the same architecture>")
    return build_model(name, tuple(in_shape), classes)
