"""Training, fine-tuning (with optional knowledge distillation) and evaluation.

Compression lives in ``torch.nn.utils.parametrize`` transforms and forward pre-hooks, so a plain
training loop fine-tunes a compressed model with the compression kept in place: masks keep zeros
at zero, fake quantization passes gradients straight through.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .errors import NetshrinkError

Data = TensorDataset | tuple[torch.Tensor, torch.Tensor] | Iterable


def _in_memory(data: Data) -> tuple[torch.Tensor, torch.Tensor] | None:
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if isinstance(tensors, tuple) and len(tensors) == 2 and all(torch.is_tensor(t) for t in tensors):
        return tensors
    return None


def _check_batch(x, y) -> None:
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise NetshrinkError(f"a batch must be (inputs, labels) tensors. Received: ({type(x).__name__}, "
                             f"{type(y).__name__})")
    if len(x) != len(y):
        raise NetshrinkError(f"a batch has {len(x)} inputs but {len(y)} labels")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise NetshrinkError("the data contains NaN or infinite inputs")


def check_data(data: Data, what: str = "data") -> None:
    """Raise unless ``data`` is usable: a TensorDataset, an ``(x, y)`` pair of tensors of equal
    length with finite inputs, or an iterable of such batches (only its kind is checked here; each
    batch is checked as it is read)."""
    tensors = _in_memory(data)
    if tensors is not None:
        if len(tensors[0]) == 0:
            raise NetshrinkError(f"{what} is empty")
        _check_batch(*tensors)
    elif isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise NetshrinkError(f"{what} must be a TensorDataset, an (inputs, labels) pair of tensors or a DataLoader. "
                             f"Received: {type(data).__name__}")


def batches(data: Data, batch_size: int = 256, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a TensorDataset, an ``(x, y)`` pair, or any iterable of batches
    (a ``DataLoader``). In-memory tensors are sliced directly: much faster than a DataLoader."""
    check_data(data)
    tensors = _in_memory(data)
    if tensors is not None:
        x, y = tensors
        order = torch.randperm(len(x), generator=generator) if shuffle else None
        for start in range(0, len(x), batch_size):
            if order is None:
                yield x[start:start + batch_size], y[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                yield x[index], y[index]
    else:
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise NetshrinkError(f"a batch must be an (inputs, labels) pair. Received: {type(batch).__name__}")
            _check_batch(batch[0], batch[1])
            yield batch[0], batch[1]


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
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if isinstance(tensors, tuple) and torch.is_tensor(tensors[0]):
        return -(-len(tensors[0]) // batch_size)
    return len(data) if hasattr(data, "__len__") else None


@dataclass(frozen=True, kw_only=True)
class Distill:
    """Knowledge distillation (Hinton et al. 2015): loss = alpha * T^2 * KL(teacher_T || student_T)
    + (1 - alpha) * cross-entropy, with soft targets at temperature T."""

    temperature: float = 4.0
    alpha: float = 0.7

    def __post_init__(self) -> None:
        _check_number("distillation temperature", self.temperature, positive=True)
        _check_number("distillation alpha", self.alpha)
        if self.alpha > 1:
            raise NetshrinkError(f"distillation alpha must be in [0, 1]. Received: alpha={self.alpha}")

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student_logits, y)


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
        progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place with Adam; returns ``{"steps", "seconds", "loss"}``.

    ``epochs`` may be fractional. With ``teacher`` (or ``distill``), the loss distils from the
    teacher (a frozen copy of the model as it was is a good default teacher). ``lr_decay`` anneals
    the learning rate to zero along a cosine. ``augment`` > 0 shifts training images by up to that
    many pixels. Seeded: the same seed gives the same weights.
    """
    from .methods.base import preserved

    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    _check_number("epochs", epochs, positive=True)
    _check_number("lr", lr, positive=True)
    _check_number("batch_size", batch_size, positive=True, integer=True)
    _check_number("augment", augment, integer=True)
    _check_number("seed", seed, integer=True)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise NetshrinkError(f"teacher must be a torch.nn.Module. Received: {type(teacher).__name__}")
    if distill is not None and not isinstance(distill, Distill):
        raise NetshrinkError(f"distill must be a netshrink.Distill. Received: {distill!r}")
    if distill is not None and teacher is None:
        raise NetshrinkError("distillation needs a teacher model")
    check_data(data, "training data")
    check_model_fits(model, data)
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
        return _train(model, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay,
                      augment, progress, desc)


def _check_number(what: str, value, *, positive: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and (value > 0 if positive else value >= 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise NetshrinkError(f"{what} must be {kind} {'> 0' if positive else '>= 0'}. Received: {what}={value!r}")


def _train(model, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay, augment,
           progress, desc) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
                 if lr_decay and total else None)
    step, started, running = 0, time.perf_counter(), float("nan")
    bar = Progress(total, desc, enabled=progress)
    while total is None or step < total:
        for x, y in batches(data, batch_size, shuffle=True, generator=generator):
            if total is not None and step >= total:
                break
            if on_step is not None:
                on_step(step, total or 0)
            if augment:
                x = random_shift(x, augment, generator)
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distill.loss(logits, teacher_logits, y)
            else:
                loss = F.cross_entropy(logits, y)
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
            bar.update(step, f"loss {running:.4f}")
        if total is None:
            break
    bar.close()
    if step == 0:
        raise NetshrinkError("the training data yielded no batches")
    return {"steps": step, "seconds": time.perf_counter() - started, "loss": running}


class Progress:
    """Progress of long work, suited to where it is shown: a live bar on a terminal (tqdm), and
    on a log file or pipe a plain line at every tenth of the way, with no carriage returns."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.next_line = total, desc, 0.1
        self.started = time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.live and bool(total)
        self.bar = tqdm(total=total, desc=desc, leave=False, unit="step") if self.live else None

    def update(self, done: int, status: str = "") -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done % 20 == 0 and status:
                self.bar.set_postfix_str(status)
        elif self.lines and done >= self.next_line * self.total:
            self.next_line = math.floor(10 * done / self.total) / 10 + 0.1
            print(f"{self.desc}: {done}/{self.total} steps ({100 * done / self.total:.0f}%), "
                  f"{time.perf_counter() - self.started:.0f}s {status}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def predict(model: nn.Module, data: Data, batch_size: int = 1000) -> torch.Tensor:
    """Logits for all of ``data``, in order."""
    _check_number("batch_size", batch_size, positive=True, integer=True)
    check_data(data)
    check_model_fits(model, data)
    with eval_mode(model):
        outputs = [model(x) for x, _ in batches(data, batch_size)]
    if not outputs:
        raise NetshrinkError("the data yielded no batches")
    return torch.cat(outputs)


def evaluate(model: nn.Module, data: Data, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a fraction in [0, 1])."""
    logits = predict(model, data, batch_size)
    labels = torch.cat([y for _, y in batches(data, batch_size)])
    if logits.dim() != 2 or len(logits) != len(labels):
        raise NetshrinkError(f"evaluate needs class scores [N, classes] and one label per input. Received: "
                             f"outputs {tuple(logits.shape)}, {len(labels)} labels")
    return (logits.argmax(1) == labels).float().mean().item()


def check_model_fits(model: nn.Module, data: Data) -> None:
    """Run one small batch through ``model`` so that a model and data set that do not fit each
    other fail at once with one line, before any long work."""
    x, _ = next(iter(batches(data, 2)))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NetshrinkError(f"the model does not run on this data (inputs {tuple(x.shape[1:])}): {first}") from None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached copy to use as a distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
