"""Training, fine-tuning (with optional knowledge distillation) and evaluation.

Compression lives in ``torch.nn.utils.parametrize`` transforms and forward pre-hooks, so a plain
training loop fine-tunes a compressed model with the compression kept in place: masks keep zeros
at zero, fake quantization passes gradients straight through.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .errors import NetshrinkError

Data = TensorDataset | tuple[torch.Tensor, torch.Tensor] | Iterable
Inputs = torch.Tensor | tuple | list | Mapping  # one batch's model inputs
Forward = Callable[[nn.Module, Inputs], torch.Tensor]  # how to get the output tensor for a batch
LABEL_KEYS = ("labels", "label")


def call(model: nn.Module, inputs: Inputs):
    """Run ``model`` on one batch's inputs: a tensor, a tuple or list (positional arguments), or a
    dict (keyword arguments, e.g. a tokenizer's ``input_ids`` and ``attention_mask``; or the dict
    itself, for a model whose forward takes one, as a ``SentenceTransformer``'s does)."""
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


@dataclass(frozen=True, kw_only=True)
class Distill:
    """Knowledge distillation. ``objective="kl"`` (Hinton et al. 2015, for class scores):
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, with soft targets at
    temperature T over the last dimension. ``objective="mse"`` (for embeddings and hidden states):
    the mean squared difference of the outputs, plus (1 - alpha) * cross-entropy where labels exist.
    On unlabeled data the loss is the distillation term alone."""

    temperature: float = 4.0
    alpha: float = 0.7
    objective: str = "kl"

    def __post_init__(self) -> None:
        _check_number("distillation temperature", self.temperature, positive=True)
        _check_number("distillation alpha", self.alpha)
        if self.alpha > 1:
            raise NetshrinkError(f"distillation alpha must be in [0, 1]. Received: alpha={self.alpha}")
        if self.objective not in ("kl", "mse"):
            raise NetshrinkError(f"distillation objective must be 'kl' or 'mse'. Received: objective={self.objective!r}")

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.objective == "mse":
            soft = F.mse_loss(student, teacher)
        else:
            t = self.temperature
            soft = F.kl_div(F.log_softmax(student / t, dim=-1).flatten(0, -2),
                            F.log_softmax(teacher / t, dim=-1).flatten(0, -2),
                            reduction="batchmean", log_target=True) * t * t
        if y is None:
            return soft
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student, y)


StepCallback = Callable[[int, int], None]  # (step, total_steps) -> None; called before each step


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y (zero fill): the classic MNIST
    augmentation. [N, C, H, W] -> same shape."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy, dx = (torch.randint(0, 2 * pixels + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pixels)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return shifted.gather(3, cols)


def fit(model: nn.Module, data: Data, *, epochs: float = 1, lr: float = 1e-3, batch_size: int = 128,
        seed: int = 0, teacher: nn.Module | None = None, distill: Distill | None = None,
        on_step: StepCallback | None = None, lr_decay: bool = True, augment: int = 0,
        progress: bool = True, desc: str = "train", forward: Forward | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
        penalty: Callable[[], torch.Tensor] | None = None, validation: Data | None = None,
        checks: int = 10) -> dict:
    """Train ``model`` in place with Adam; returns ``{"steps", "seconds", "loss"}``.

    ``epochs`` may be fractional. Batches may be labeled or not, and inputs a tensor, a tuple or a
    dict (see :func:`batches`). With ``teacher`` (or ``distill``), the loss distils from the
    teacher (a frozen copy of the model as it was is a good default teacher), on unlabeled data
    too. ``forward(model, inputs) -> tensor`` says how to get the output (default: the model's
    output tensor, ``.logits`` or ``.last_hidden_state``); ``loss(output, labels) -> scalar``
    replaces cross-entropy; ``penalty() -> scalar`` is added to every step's loss (a regularizer,
    such as variational dropout's KL term). ``lr_decay`` anneals the learning rate to zero along a cosine.
    ``augment`` > 0 shifts training images by up to that many pixels. Seeded: the same seed gives
    the same weights. On any failure the model is restored as it was.

    ``validation`` (held-out batches, in the form of ``data``) guards against training that makes
    the model worse: the objective (the distillation loss with a teacher, else the task loss; no
    ``penalty``) is measured on it before training and at ``checks`` evenly spaced steps, and the
    model ends with the weights that scored best, the starting ones included. Distilling a
    lightly pruned model on text unlike the user's can lower its fidelity; this returns it as it
    was instead. The result adds ``"validation"``: ``[(step, loss), ...]``, and ``"kept_step"``.
    """
    from .methods.base import check_flag, preserved

    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    _check_number("epochs", epochs, positive=True)
    _check_number("lr", lr, positive=True)
    _check_number("batch_size", batch_size, positive=True, integer=True)
    _check_number("augment", augment, integer=True)
    _check_number("seed", seed, integer=True)
    check_flag("progress", progress)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise NetshrinkError(f"teacher must be a torch.nn.Module. Received: {type(teacher).__name__}")
    if distill is not None and not isinstance(distill, Distill):
        raise NetshrinkError(f"distill must be a netshrink.Distill. Received: {distill!r}")
    if distill is not None and teacher is None:
        raise NetshrinkError("distillation needs a teacher model")
    for what, function in (("forward", forward), ("loss", loss), ("penalty", penalty)):
        if function is not None and not callable(function):
            raise NetshrinkError(f"{what} must be a function. Received: {function!r}")
    check_data(data, "training data")
    if validation is not None:
        check_data(validation, "validation data")
        _check_number("checks", checks, positive=True, integer=True)
    forward = forward or default_forward
    check_model_fits(model, data, forward)
    if validation is not None:
        check_model_fits(model, validation, forward)
    distill = distill or (Distill() if teacher is not None else None)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per_epoch = _length(data, batch_size)
    total = int(round(epochs * per_epoch)) if per_epoch else None
    if total == 0:
        raise NetshrinkError(f"epochs={epochs} of {per_epoch} batches is less than one training step")
    if augment and _in_memory(data) is not None and _in_memory(data)[0].dim() != 4:
        raise NetshrinkError(f"augment shifts images: it needs [N, C, H, W] inputs. Received: augment={augment}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NetshrinkError("the model has no trainable parameters")
    with preserved(model, values=True), eval_mode(model), \
            (eval_mode(teacher) if teacher is not None else contextlib.nullcontext()):
        model.train()
        objective = None if validation is None else _Objective(validation, batch_size, forward, teacher, distill, loss)
        return _train(model, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay,
                      augment, progress, desc, forward, loss, penalty, objective, checks)


def _check_number(what: str, value, *, positive: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and (value > 0 if positive else value >= 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise NetshrinkError(f"{what} must be {kind} {'> 0' if positive else '>= 0'}. Received: {what}={value!r}")


def _objective(output: torch.Tensor, teacher_output: torch.Tensor | None, labels: torch.Tensor | None,
               distill: Distill | None, loss_function) -> torch.Tensor:
    """What ``fit`` minimises on one batch, without the penalty: the distillation loss when there
    is a teacher's output, else ``loss_function``, else cross-entropy on the labels."""
    if teacher_output is not None:
        return distill.loss(output, teacher_output, labels)
    if loss_function is not None:
        return loss_function(output, labels)
    if labels is None:
        raise NetshrinkError("unlabeled data: pass a teacher (distillation) or a loss function")
    return F.cross_entropy(output, labels)


class _Objective:
    """:func:`_objective` on held-out batches (mean per example), for ``fit``'s
    ``validation``. The teacher is frozen, so its outputs are computed once."""

    def __init__(self, data: Data, batch_size: int, forward: Forward, teacher, distill, loss_function) -> None:
        self.batches = list(batches(data, batch_size, checked=True))
        if not self.batches:
            raise NetshrinkError("the validation data yielded no batches")
        if teacher is None and loss_function is None and any(y is None for _, y in self.batches):
            raise NetshrinkError("validation data without labels needs a teacher (distillation) or a loss function")
        self.forward, self.distill, self.loss_function = forward, distill, loss_function
        self.targets = None
        if teacher is not None:
            with torch.no_grad():
                self.targets = [forward(teacher, x) for x, _ in self.batches]

    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad(), eval_mode(model):
            for i, (x, y) in enumerate(self.batches):
                target = self.targets[i] if self.targets is not None else None
                value = _objective(self.forward(model, x), target, y, self.distill, self.loss_function)
                size = len(_tensors_in(x)[0])
                total, count = total + float(value) * size, count + size
        return total / count


def _train(model, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay, augment,
           progress, desc, forward, loss_function, penalty, objective=None, checks=10) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
                 if lr_decay and total else None)
    step, started, running = 0, time.perf_counter(), float("nan")
    bar = Progress(total, desc, enabled=progress)
    history, best, kept_step = [], None, 0
    check_at = {round(total * i / checks) for i in range(1, checks + 1)} if total else set()

    def check() -> None:
        nonlocal best, kept_step
        history.append((step, objective(model)))
        if best is None or history[-1][1] < best[0]:  # keep a copy of the best weights seen
            best, kept_step = (history[-1][1], copy.deepcopy(model.state_dict())), step

    if objective is not None:
        check()
    while total is None or step < total:
        for x, y in batches(data, batch_size, shuffle=True, generator=generator, checked=True):
            if total is not None and step >= total:
                break
            if on_step is not None:
                on_step(step, total or 0)
            if augment:
                if not (torch.is_tensor(x) and x.dim() == 4):
                    raise NetshrinkError(f"augment shifts images: it needs [N, C, H, W] inputs. Received: augment={augment}")
                x = random_shift(x, augment, generator)
            output, teacher_output = forward(model, x), None
            if teacher is not None:
                with torch.no_grad():
                    teacher_output = forward(teacher, x)
            loss = _objective(output, teacher_output, y, distill, loss_function)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if not math.isfinite(loss.item()):
                raise NetshrinkError(f"training diverged at step {step + 1} (loss {loss.item()}): lower the "
                                     "learning rate; the model was left as it was before training")
            running = loss.item() if running != running else 0.95 * running + 0.05 * loss.item()
            step += 1
            if objective is not None and step in check_at:
                check()
            bar.update(step, f"loss {running:.4f}" + (f", held out {history[-1][1]:.4f}" if history else ""))
        if total is None:
            break
    bar.close()
    if step == 0:
        raise NetshrinkError("the training data yielded no batches")
    result = {"steps": step, "seconds": time.perf_counter() - started, "loss": running}
    if objective is not None:
        if history[-1][0] != step:  # data of unknown length: the end is a check too
            check()
        model.load_state_dict(best[1])
        result.update(validation=history, kept_step=kept_step)
    return result


class Progress:
    """Progress of long work, suited to where it is shown: a live bar on a terminal (tqdm), and
    on a log file or pipe a plain line at every tenth of the way, with no carriage returns."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "step") -> None:
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
    _check_number("batch_size", batch_size, positive=True, integer=True)
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
    labels = torch.cat(labels)
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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached copy to use as a distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
