"""Training, fine-tuning (with optional knowledge distillation) and evaluation.

Compression lives in ``torch.nn.utils.parametrize`` transforms and forward pre-hooks, so a plain
training loop fine-tunes a compressed model with the compression kept in place: masks keep zeros
at zero, fake quantization passes gradients straight through.
"""
from __future__ import annotations

import copy
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


def batches(data: Data, batch_size: int = 256, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a TensorDataset, an ``(x, y)`` pair, or any iterable of batches
    (a ``DataLoader``). In-memory tensors are sliced directly: much faster than a DataLoader."""
    tensors = data.tensors if isinstance(data, TensorDataset) else data
    if isinstance(tensors, tuple) and len(tensors) == 2 and all(torch.is_tensor(t) for t in tensors):
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
            yield batch[0], batch[1]


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
        if not self.temperature > 0:
            raise NetshrinkError(f"distillation temperature must be > 0. Received: temperature={self.temperature}")
        if not 0 <= self.alpha <= 1:
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
    if not epochs > 0:
        raise NetshrinkError(f"epochs must be > 0. Received: epochs={epochs}")
    if not lr > 0:
        raise NetshrinkError(f"learning rate must be > 0. Received: lr={lr}")
    if distill is not None and teacher is None:
        raise NetshrinkError("distillation needs a teacher model")
    distill = distill or (Distill() if teacher is not None else None)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per_epoch = _length(data, batch_size)
    total = int(round(epochs * per_epoch)) if per_epoch else None
    if teacher is not None:
        teacher.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NetshrinkError("the model has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
                 if lr_decay and total else None)
    model.train()
    step, started, running = 0, time.perf_counter(), float("nan")
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
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
            running = loss.item() if running != running else 0.95 * running + 0.05 * loss.item()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
        if total is None:
            break
    bar.close()
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - started, "loss": running}


@torch.no_grad()
def predict(model: nn.Module, data: Data, batch_size: int = 1000) -> torch.Tensor:
    """Logits for all of ``data``, in order."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x) for x, _ in batches(data, batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, data: Data, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a fraction in [0, 1])."""
    labels = torch.cat([y for _, y in batches(data, batch_size)])
    return (predict(model, data, batch_size).argmax(1) == labels).float().mean().item()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached copy to use as a distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
