"""How any data reaches any model: batches of a tensor, a tuple or a dict of inputs, labeled or not;
the model's output tensor; evaluation; progress of long work.

Every stage uses these: calibration reads its examples through them, training and evaluation
their batches, the searches and the bench their inputs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..errors import NetshrinkError, check_number


Data = TensorDataset | tuple[torch.Tensor, torch.Tensor] | Iterable
Inputs = torch.Tensor | tuple | list | Mapping  # one batch's model inputs
Forward = Callable[[nn.Module, Inputs], torch.Tensor]  # how to get the output tensor for a batch
LABEL_KEYS = ("labels", "label")


def on_device_of(model: nn.Module, inputs: Inputs) -> Inputs:
    """``inputs`` (a tensor, a tuple or list, or a dict of them) on the device of ``model``'s
    parameters: data read on the CPU reaches a model a user put on a GPU. Unchanged when already there."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return inputs
    device = parameter.device

    def moved(value):
        return value.to(device) if torch.is_tensor(value) and value.device != device else value

    if isinstance(inputs, Mapping):
        return {key: moved(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(moved(value) for value in inputs)
    return moved(inputs)


def call(model: nn.Module, inputs: Inputs):
    """Run ``model`` on one batch's inputs: a tensor, a tuple or list (positional arguments), or a
    dict (keyword arguments, e.g. a tokenizer's ``input_ids`` and ``attention_mask``; or the dict
    itself, for a model whose forward takes one, as a ``SentenceTransformer``'s does), moved to the
    model's device first."""
    inputs = on_device_of(model, inputs)
    if isinstance(inputs, Mapping):
        return model(dict(inputs)) if takes_one_dict(type(model)) else model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@functools.lru_cache(maxsize=256)
def takes_one_dict(kind: type) -> bool:
    """Whether a module class's forward takes its inputs as one dict (``forward(self, features)``,
    sentence-transformers' way) rather than as keyword arguments."""
    try:
        parameters = list(inspect.signature(kind.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    annotation = str(required[0].annotation) if len(required) == 1 else ""
    return len(required) == 1 and ("dict" in annotation.lower() or required[0].name in ("input", "features"))


def output_tensor(output) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``.sentence_embedding`` (sentence-transformers),
    ``.logits``, ``.last_hidden_state``, or the first element of a tuple (Hugging Face models return
    such objects)."""
    if torch.is_tensor(output):
        return output
    for key in ("sentence_embedding", "logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if torch.is_tensor(value):
            return value
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise NetshrinkError(f"cannot find the output tensor in a {type(output).__name__}: pass forward=<a function "
                         "(model, inputs) -> tensor>")


def default_forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return output_tensor(call(model, inputs))


def _tensors_in(inputs: Inputs) -> list[torch.Tensor]:
    if torch.is_tensor(inputs):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else None
    if values is None or not values or not all(torch.is_tensor(v) for v in values):
        raise NetshrinkError(f"model inputs must be a tensor, or a tuple or dict of tensors. Received: "
                             f"{type(inputs).__name__}")
    return list(values)


def batch_length(inputs: Inputs) -> int:
    """How many examples one batch's inputs hold (a tensor, a tuple or list, or a dict of tensors)."""
    first = _tensors_in(inputs)[0]
    return len(first) if first.dim() else 1


def batch_slice(inputs: Inputs, start: int, end: int) -> Inputs:
    """Examples ``start`` to ``end`` of one batch's inputs, in the same form."""
    if torch.is_tensor(inputs):
        return inputs[start:end]
    if isinstance(inputs, Mapping):
        return {k: v[start:end] for k, v in inputs.items()}
    return type(inputs)(v[start:end] for v in inputs)


def _check_batch(inputs: Inputs, labels) -> None:
    tensors = _tensors_in(inputs)
    if labels is not None and not torch.is_tensor(labels):
        raise NetshrinkError(f"labels must be a tensor. Received: {type(labels).__name__}")
    sizes = {len(t) for t in tensors if t.dim() > 0} | ({len(labels)} if labels is not None else set())
    if len(sizes) > 1:
        raise NetshrinkError(f"a batch's inputs and labels have different lengths: {sorted(sizes)}")
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
        raise NetshrinkError("the data contains NaN or infinite inputs")


def _in_memory(data: Data) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(inputs, labels or None) for in-memory data: a TensorDataset of one or two tensors or a pair."""
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if isinstance(tensors, tuple) and len(tensors) in (1, 2) and all(torch.is_tensor(t) for t in tensors) \
            and (len(tensors) == 2 or isinstance(data, TensorDataset)):
        return tensors[0], tensors[1] if len(tensors) == 2 else None
    return None


def hold_out(data: Data, share: float, seed: int) -> tuple[Data, Data]:
    """(the rest, a held-out part): ``share`` of in-memory examples, drawn at random from ``seed``
    (the same share and seed hold out the same examples, so a file can record which they were)."""
    tensors = _in_memory(data)
    if tensors is None:
        raise NetshrinkError("a validation part is split off in-memory data only; for other data pass "
                             "validation=<held-out batches>")
    x, y = tensors
    count = int(round(share * len(x)))
    if count < 1 or count >= len(x):
        raise NetshrinkError(f"validation share {share} of {len(x)} examples leaves no validation or no training data")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count], order[count:]
    pick = (lambda index: (x[index], y[index])) if y is not None else (lambda index: (x[index],))
    return TensorDataset(*pick(kept)), TensorDataset(*pick(held))


def _split(batch) -> tuple[Inputs, torch.Tensor | None]:
    """One batch from an iterable -> (inputs, labels or None): an (inputs, labels) pair, a dict
    (labels under 'labels' or 'label', if any), or bare inputs (a tensor)."""
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if torch.is_tensor(batch):
        return batch, None
    raise NetshrinkError(f"a batch must be (inputs, labels), a dict of tensors, or an input tensor. Received: "
                         f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def check_data(data: Data, what: str = "data") -> None:
    """Raise unless ``data`` is usable: a TensorDataset, an ``(inputs, labels)`` pair of tensors of
    equal length with finite inputs, or an iterable of batches (only its kind is checked here; each
    batch is checked as it is read)."""
    tensors = _in_memory(data)
    if tensors is not None:
        if len(tensors[0]) == 0:
            raise NetshrinkError(f"{what} is empty")
        _check_batch(*tensors)
    elif isinstance(data, (str, bytes, Mapping)) or torch.is_tensor(data) or not isinstance(data, Iterable):
        raise NetshrinkError(f"{what} must be a TensorDataset, an (inputs, labels) pair of tensors or an iterable of "
                             f"batches (a DataLoader). Received: {type(data).__name__}")


def batches(data: Data, batch_size: int = 256, shuffle: bool = False, generator: torch.Generator | None = None,
            checked: bool = False) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
    """Yield ``(inputs, labels or None)`` batches from a TensorDataset, an ``(x, y)`` pair, or any
    iterable of batches (a DataLoader, a list of tokenizer outputs). In-memory tensors are sliced
    directly: much faster than a DataLoader. ``checked=True``: the caller has run
    :func:`check_data` already, so in-memory data is not scanned again (``fit`` would otherwise
    scan the whole training set for NaN at every epoch)."""
    if not checked:
        check_data(data)
    tensors = _in_memory(data)
    if tensors is not None:
        x, y = tensors
        order = torch.randperm(len(x), generator=generator) if shuffle else None
        for start in range(0, len(x), batch_size):
            index = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield x[index], (y[index] if y is not None else None)
    else:
        for batch in data:
            inputs, labels = _split(batch)
            _check_batch(inputs, labels)
            yield inputs, labels


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside the block, and afterwards each back in the mode it was
    in (restoring only the top-level flag would leave a wrapped model's dropout switched on)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _length(data: Data, batch_size: int) -> int | None:
    tensors = _in_memory(data)
    if tensors is not None:
        return -(-len(tensors[0]) // batch_size)
    return len(data) if hasattr(data, "__len__") else None



class Progress:
    """Progress of long work, suited to where it is shown: a live bar on a terminal (tqdm), and
    on a log file or pipe a plain line at every tenth of the way, with no carriage returns. Of
    several processes, only the first shows it."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "step") -> None:
        # distributed.is_main(), asked of torch.distributed itself: that module builds on this one
        enabled = enabled and not (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0)
        self.total, self.desc, self.next_line, self.unit = total, desc, 0.1, unit
        self.started = time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.live and bool(total)
        self.bar = tqdm(total=total, desc=desc, leave=False, unit=unit) if self.live else None

    def update(self, done: int, status: str = "") -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done % 20 == 0 and status:
                self.bar.set_postfix_str(status)
        elif self.lines and done >= self.next_line * self.total:
            self.next_line = math.floor(10 * done / self.total) / 10 + 0.1
            print(f"{self.desc}: {done}/{self.total} {self.unit}s ({100 * done / self.total:.0f}%), "
                  f"{time.perf_counter() - self.started:.0f}s {status}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def predict(model: nn.Module, data: Data, batch_size: int = 1000, forward: Forward | None = None) -> torch.Tensor:
    """The model's outputs (``forward``'s, see :func:`fit`) for all of ``data``, in order."""
    check_number("batch_size", batch_size, positive=True, integer=True)
    check_data(data)
    forward = forward or default_forward
    check_model_fits(model, data, forward)
    with eval_mode(model), parametrize.cached():  # transformed weights computed once, not per batch
        outputs = [forward(model, x) for x, _ in batches(data, batch_size, checked=True)]
    if not outputs:
        raise NetshrinkError("the data yielded no batches")
    return torch.cat(outputs)


def evaluate(model: nn.Module, data: Data, batch_size: int = 1000, forward: Forward | None = None) -> float:
    """Top-1 accuracy of ``model`` on labeled ``data`` (a fraction in [0, 1])."""
    logits = predict(model, data, batch_size, forward)
    labels = [y for _, y in batches(data, batch_size, checked=True)]  # predict checked the data
    if any(y is None for y in labels):
        raise NetshrinkError("evaluate needs labeled data")
    labels = torch.cat(labels).to(logits.device)
    if logits.dim() != 2 or len(logits) != len(labels):
        raise NetshrinkError(f"evaluate needs class scores [N, classes] and one label per input. Received: "
                             f"outputs {tuple(logits.shape)}, {len(labels)} labels")
    return (logits.argmax(1) == labels).float().mean().item()


def check_model_fits(model: nn.Module, data: Data, forward: Forward | None = None) -> None:
    """Run one small batch through ``model`` so that a model and data set that do not fit each
    other fail at once with one line, before any long work. The data's values are checked by the
    calls that use them (``fit``, ``predict``), not here."""
    first = next(iter(batches(data, 2, checked=True)), None)
    if first is None:
        raise NetshrinkError("the data yielded no batches")
    try:
        with torch.no_grad(), eval_mode(model):
            (forward or default_forward)(model, first[0])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = [tuple(t.shape[1:]) for t in _tensors_in(first[0])]
        raise NetshrinkError(f"the model does not run on this data (inputs {', '.join(map(str, shapes))}): {message}") from None


