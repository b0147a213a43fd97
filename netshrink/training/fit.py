"""Training and fine-tuning, with optional knowledge distillation.

Compression lives in ``torch.nn.utils.parametrize`` transforms and forward pre-hooks, so a plain
training loop fine-tunes a compressed model with the compression kept in place: masks keep zeros
at zero, fake quantization passes gradients straight through.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetshrinkError, check_flag, check_number, preserved
from . import distributed
from .batches import (Data, Forward, Progress, _in_memory, _length, batch_length, batches, check_data,
                      check_model_fits, default_forward, eval_mode)


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
        check_number("distillation temperature", self.temperature, positive=True)
        check_number("distillation alpha", self.alpha)
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
        checks: int = 10, shard: bool | None = None) -> dict:
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

    Under several processes (``torchrun``, Ray Train), each takes its share of every batch. By
    default each holds the whole model, its gradients and Adam's moments (DDP); ``shard=True``
    splits them over the processes (FSDP), for a model whose training does not fit one process's
    memory (default: as ``distributed.shard_training`` set it, False unless ``--shard``). Sharded
    training runs on a copy, whose values come back at the end, so it refuses ``on_step`` and
    ``penalty``, which read the model's own weights every step.
    """

    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    check_number("epochs", epochs, positive=True)
    check_number("lr", lr, positive=True)
    check_number("batch_size", batch_size, positive=True, integer=True)
    check_number("augment", augment, integer=True)
    check_number("seed", seed, integer=True)
    check_flag("progress", progress)
    shard = distributed.sharding() if shard is None else shard
    check_flag("shard", shard)
    if shard and distributed.active() and (on_step is not None or penalty is not None):
        raise NetshrinkError("sharded training (shard=True, --shard) trains a copy of the model: it cannot follow a step "
                             "callback or penalty that reads the model's own weights (gradual pruning, variational "
                             "dropout, rate-aware training); train that step without sharding")
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
        check_number("checks", checks, positive=True, integer=True)
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
                      augment, progress, desc, forward, loss, penalty, objective, checks, shard)



def _objective(output: torch.Tensor, teacher_output: torch.Tensor | None, labels: torch.Tensor | None,
               distill: Distill | None, loss_function) -> torch.Tensor:
    """What ``fit`` minimises on one batch, without the penalty: the distillation loss when there
    is a teacher's output, else ``loss_function``, else cross-entropy on the labels."""
    if labels is not None and labels.device != output.device:  # labels read on the CPU, a model on a GPU
        labels = labels.to(output.device)
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
                size = batch_length(x)
                total, count = total + float(value) * size, count + size
        return total / count


def _train(model, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay, augment,
           progress, desc, forward, loss_function, penalty, objective=None, checks=10, shard=False) -> dict:
    # Several processes: each runs its share of every batch, and the gradients are averaged: by
    # DistributedDataParallel over whole copies, or by FSDP over a copy split between them. A share's
    # loss is weighted by its size, so the average is the batch's.
    sharded = shard and distributed.active()
    runner = model if not distributed.active() else distributed.sharded_copy(model) if sharded else \
        torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    trained = runner if sharded else model  # the modules that run: the sharded copy's, or the model's
    with distributed.batch_norm_over_processes(trained):
        return _steps(model, runner, trained, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay,
                      augment, progress, desc, forward, loss_function, penalty, objective, checks, sharded)


def _steps(model, runner, trained, data, total, lr, batch_size, generator, teacher, distill, on_step, lr_decay,
           augment, progress, desc, forward, loss_function, penalty, objective, checks, sharded) -> dict:
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
                 if lr_decay and total else None)
    step, started, running = 0, time.perf_counter(), float("nan")
    bar = Progress(total, desc, enabled=progress and distributed.is_main())
    history, best, kept_step = [], None, 0
    check_at = {round(total * i / checks) for i in range(1, checks + 1)} if total else set()

    def check() -> None:
        nonlocal best, kept_step
        if sharded:
            distributed.gather_into(runner, model)
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
                x = random_shift(x, augment, generator)  # the whole batch, as one process would: then shared
            size = batch_length(x)
            if size < distributed.world_size():  # a last batch too small to share: every process skips it
                continue
            x, y = distributed.share(x), (distributed.share(y) if y is not None else None)
            weight = batch_length(x) * distributed.world_size() / size  # 1 in one process: x * 1.0 is exact
            output, teacher_output = forward(runner, x), None
            if teacher is not None:
                with torch.no_grad():
                    teacher_output = forward(teacher, x)
            loss = _objective(output, teacher_output, y, distill, loss_function) * weight
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = distributed.all_sum_number(loss.item()) / distributed.world_size()  # the batch's loss
            if not math.isfinite(value):
                raise NetshrinkError(f"training diverged at step {step + 1} (loss {value}): lower the "
                                     "learning rate; the model was left as it was before training")
            running = value if running != running else 0.95 * running + 0.05 * value
            step += 1
            if objective is not None and step in check_at:
                check()
            bar.update(step, f"loss {running:.4f}" + (f", held out {history[-1][1]:.4f}" if history else ""))
        if total is None:
            break
    bar.close()
    if step == 0:
        raise NetshrinkError("the training data yielded no batches")
    if sharded:
        distributed.gather_into(runner, model)
    result = {"steps": step, "seconds": time.perf_counter() - started, "loss": running}
    if objective is not None:
        if history[-1][0] != step:  # data of unknown length: the end is a check too
            check()
        model.load_state_dict(best[1])
        result.update(validation=history, kept_step=kept_step)
    return result


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached copy to use as a distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
