"""Block reconstruction: after a layer-wise solver (GPTQ, SparseGPT, Wanda, AdaRound) has
compressed every layer alone, tune each *block* of the model so that its output on calibration
data matches the uncompressed model's.

A layer-wise solver makes each layer's output close to its own dense output; the errors of the
layers of a transformer block (attention, then the feed-forward network) and of the blocks
before it add up, and nothing corrects them. BRECQ (Li et al. 2021) and AutoRound/SignRound
(Cheng et al. 2023) solve at the level of a block instead: its input is what the compressed model
so far gives it (so it also makes up for the error of the blocks before it), its target is the
dense model's output of the same block on the dense model's own inputs, and what it tunes keeps
every layer compressed:

* a quantized layer (fixed grid): a rounding offset per weight in [-0.5, 0.5] steps (which way
  each weight rounds, AutoRound's ``V``) and a gain per grid scale in [0.5, 1.5] (its clipping
  range), by signed gradient descent (AutoRound's choice: every step moves each value by the
  same small amount, so all weights move at once however small their gradient);
* a pruned layer that is not quantized: its kept weights (the mask stays exact); a layer with
  no transform at all (a projection left smaller by structured removal): its weights;
* the compressed layers' biases and the block's normalisation weights, with Adam.

Codes stay integers on their grids (the result is baked onto a :class:`FixedGrid` with the tuned
scales) and masks stay exact. A block's error on the whole calibration set is measured before and
after; if tuning did not lower it, the block is put back as it was.

Blocks are found from the model's structure: the children of the container (``nn.ModuleList`` /
``nn.Sequential``, or the model itself) that holds the most compressed layers, each child holding
at least one: a transformer's layers (attention + feed-forward), a CNN's stages. A compressed layer
outside them (a classifier, a stem convolution) is a block of its own; embedding tables are not
(they have no input to reconstruct from and keep the starting method's result). Memory: one
block's inputs and targets on the calibration set at a time.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..calibration import _Reached, _run, calls_in_order, real_positions, shares, split, take
from ...errors import NetshrinkError
from ...training import distributed
from ...training.batches import Inputs, Progress, batch_length, eval_mode
from .base import Report, keep_mask, replace_weight, tied_weights, transforms, weight_source
from .grid import FixedGrid, expand, levels

OFFSET_LIMIT = 0.5  # a weight may round to either neighbour of where it is, no further
GAIN_RANGE = (0.5, 1.5)  # how far a grid's scale may shrink (clip) or widen
FLOAT_LR = 1e-3  # Adam's step for kept weights, biases and norms
STEPS = 200  # batches per block (AutoRound's default)
SAMPLES = 1024  # calibration examples the blocks are tuned on, where the method has no setting of its own


class TunedGrid(nn.Module):
    """A :class:`FixedGrid` made trainable for block reconstruction: ``round(w / (s*g) + V)`` with
    a learned offset ``V`` per weight and a learned gain ``g`` per scale, straight-through rounding
    (gradients reach both ``V`` and ``g``, as in LSQ). ``keep`` zeroes pruned weights."""

    def __init__(self, grid: FixedGrid, weight: torch.Tensor, keep: torch.Tensor | None, rounding: bool = True) -> None:
        super().__init__()
        self.grid = grid
        if rounding:
            self.offset = nn.Parameter(torch.zeros_like(weight))
        else:  # the codes stay as they are: only the scales move
            self.register_buffer("offset", torch.zeros_like(weight))
        self.gain = nn.Parameter(torch.ones_like(grid.scale))
        self.register_buffer("keep", None if keep is None else keep.to(weight.dtype))

    def codes(self, w: torch.Tensor, scale: torch.Tensor, hard: bool) -> torch.Tensor:
        zero = expand(self.grid.zero, w, self.grid.group_size)
        x = w / scale + self.offset
        rounded = torch.round(x) if hard else x + (torch.round(x) - x).detach()  # straight through
        return torch.clamp(rounded + zero, *levels(self.grid.bits, self.grid.scheme)) - zero

    def _divisor(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """What the weight is divided by before rounding: with the codes fixed, the grid's own scale."""
        return scale if self.rounding else expand(self.grid.scale, w, self.grid.group_size)

    @property
    def rounding(self) -> bool:
        return isinstance(self.offset, nn.Parameter)

    def parameters_tuned(self) -> list[nn.Parameter]:
        return [self.offset, self.gain] if self.rounding else [self.gain]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = expand(self.grid.scale * self.gain, w, self.grid.group_size)
        out = self.codes(w, self._divisor(w, scale), hard=False) * scale
        return out if self.keep is None else out * self.keep

    def step(self, lr: float) -> None:
        """One signed-gradient step, then back inside the allowed ranges."""
        with torch.no_grad():
            if self.rounding:
                self.offset.sub_(lr * self.offset.grad.sign()).clamp_(-OFFSET_LIMIT, OFFSET_LIMIT)
            self.gain.sub_(lr * self.gain.grad.sign()).clamp_(*GAIN_RANGE)

    def baked(self, w: torch.Tensor) -> tuple[torch.Tensor, FixedGrid]:
        """The final weight (exactly on the returned grid) and that grid."""
        with torch.no_grad():
            scales = self.grid.scale * self.gain
            scale = expand(scales, w, self.grid.group_size)
            value = self.codes(w, self._divisor(w, scale), hard=True) * scale
            if self.keep is not None:
                value = value * self.keep
            grid = FixedGrid(scales, self.grid.zero, self.grid.bits, self.grid.scheme, self.grid.group_size,
                             label=self.grid.label)
        return value, grid


def find_blocks(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the blocks holding ``layers``, in no particular order (see the module
    docstring); raises :class:`NetshrinkError` where none can be found."""
    wanted = {id(layer) for layer in layers.values() if not isinstance(layer, (nn.Embedding, nn.EmbeddingBag))}
    if not wanted:
        raise NetshrinkError("no block to reconstruct: the compressed layers are all embedding tables")
    best: tuple[int, list] = (0, [])
    containers = [(p, c) for p, c in model.named_modules() if isinstance(c, (nn.ModuleList, nn.Sequential))]
    for prefix, container in containers + [("", model)]:
        held = []
        for key, child in container.named_children():
            inside = sum(id(m) in wanted for m in child.modules())
            if inside:
                held.append((f"{prefix}.{key}" if prefix else key, child, inside))
        covered = sum(inside for *_, inside in held)
        if len(held) >= 2 and covered > best[0] and not (container is model and best[1]):
            best = (covered, held)  # the model's own children only where no container holds two blocks
    blocks = [(name, child) for name, child, _ in best[1]]
    inside = {id(m) for _, child in blocks for m in child.modules()}
    blocks += [(name, layer) for name, layer in layers.items() if id(layer) in wanted and id(layer) not in inside]
    if not blocks:
        raise NetshrinkError("no block to reconstruct: the model has no container of layers (ModuleList, "
                             "Sequential or child modules) holding the compressed layers")
    return blocks


def _detached(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def first_tensor(output) -> torch.Tensor:
    """A block's main output: itself, or the first tensor of the tuple/dict a Hugging Face layer returns."""
    if torch.is_tensor(output):
        return output
    values = list(output.values()) if isinstance(output, Mapping) else list(output) if isinstance(output, (tuple, list)) else []
    for value in values:
        if torch.is_tensor(value):
            return value
    raise NetshrinkError(f"a block returned a {type(output).__name__} with no tensor in it")


def capture(model: nn.Module, block: nn.Module, batches: list[Inputs], *, what: str) -> list:
    """Run ``model`` on each batch up to ``block`` and keep, per batch, the block's call
    (``what="inputs"``: its positional and keyword arguments) or its output (``"outputs"``)."""
    kept: list = []

    def before(module, args, kwargs):
        kept.append((_detached(args), _detached(kwargs)))
        raise _Reached

    def after(module, args, kwargs, output):
        kept.append(first_tensor(output).detach())
        raise _Reached

    handle = (block.register_forward_pre_hook(before, with_kwargs=True) if what == "inputs"
              else block.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model), parametrize.cached():
            for inputs in batches:
                had = len(kept)
                _run(model, inputs)
                if len(kept) == had:
                    raise NetshrinkError("a block the calibration data does not reach cannot be reconstructed")
    finally:
        handle.remove()
    return kept


class _Tuning:
    """One block made trainable: the transforms and tensors swapped in, the parameters tuned, and
    how to bake the result or put the block back. ``rounding=False`` tunes the grids' scales with
    the integer codes kept, and no weights."""

    def __init__(self, block: nn.Module, layers: list[nn.Module], rounding: bool = True) -> None:
        self.grids: list[tuple[nn.Module, int, TunedGrid, FixedGrid]] = []
        self.weights: list[nn.Parameter] = []
        self.floats: list[nn.Parameter] = []
        self.saved: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, attribute, the tensor it had)
        for layer in layers:
            stack, keep = transforms(layer), keep_mask(layer)
            if stack and isinstance(stack[-1], FixedGrid):
                with torch.no_grad():  # the grid's input: the weight under the transforms before it
                    w = weight_source(layer).detach()
                    for t in stack[:-1]:
                        w = t(w)
                tuned = TunedGrid(stack[-1], w, keep, rounding)
                self.grids.append((layer, len(stack) - 1, tuned, stack[-1]))
                layer.parametrizations.weight[len(stack) - 1] = tuned
            elif rounding and (not stack or (keep is not None and not any(hasattr(t, "bits") for t in stack))):
                self._own(layer, "weight", self.weights)
        for module in block.modules():  # the compressed layers' biases and the norms' weights and biases
            names = ("weight", "bias") if _is_norm(module) else ("bias",) if module in layers else ()
            for name in names:
                if module._parameters.get(name) is not None and not parametrize.is_parametrized(module, name):
                    self._own(module, name, self.floats)

    def _own(self, module: nn.Module, name: str, into: list) -> None:
        """Give ``module`` a fresh copy of its tensor to train, so the model's own tensor is never
        written into (a failure elsewhere puts the old one back)."""
        if name == "weight" and parametrize.is_parametrized(module, "weight"):
            old = weight_source(module)
            replace_weight(module, old.detach())
            into.append(weight_source(module))
            self.saved.append((module.parametrizations.weight, "original", old))
            return
        old = module._parameters[name]
        setattr(module, name, nn.Parameter(old.detach().clone()))
        into.append(module._parameters[name])
        self.saved.append((module, name, old))

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, t, _ in self.grids for p in t.parameters_tuned()] + self.weights + self.floats

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.parameters(), state):
                p.copy_(value)

    def bake(self) -> None:
        for layer, index, tuned, _ in self.grids:
            stack = layer.parametrizations.weight
            with torch.no_grad():
                w = weight_source(layer).detach()
                for t in list(stack)[:index]:
                    w = t(w)
            value, grid = tuned.baked(w)
            stack[index] = grid
            replace_weight(layer, value)  # on the grid, with a mask's zeros: every transform keeps it

    def put_back(self) -> None:
        for layer, index, _, grid in self.grids:
            layer.parametrizations.weight[index] = grid
        for module, name, old in reversed(self.saved):
            if name == "original":
                module.original = old
            else:
                setattr(module, name, old)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _error(block: nn.Module, inputs: list, targets: list, batches: list[Inputs]) -> float:
    """The block's squared output error over the calibration set, relative to the targets' energy."""
    sums = torch.zeros(2, dtype=torch.float64)  # error, energy: moved to the outputs' device by the first sum
    with torch.no_grad():
        for (args, kwargs), target, batch in zip(inputs, targets, batches):
            out = real_positions(first_tensor(block(*args, **kwargs)), batch)
            goal = real_positions(target, batch)
            sums = sums.to(goal.device) + torch.stack([(out - goal).square().sum(), goal.square().sum()]).double()
    total, energy = _summed(sums).tolist()  # several processes: one exchange for the whole set
    return total / max(energy, 1e-30)


def with_blocks(model: nn.Module, solve: Callable[[], Report], calibration, *, steps: int,
                samples: int = SAMPLES, batch_size: int = 32, desc: str = "blocks",
                tuned: Mapping[str, nn.Module] | None = None, end_to_end: int = 0) -> Report:
    """``solve()`` (a layer-wise method compressing ``model``, returning its report), then, with
    ``steps`` > 0, block reconstruction of the layers it changed (or of ``tuned``, where the report
    names blocks rather than layers) against the model as it was before, on ``samples`` examples
    of ``calibration``, and with ``end_to_end`` > 0, that many batches of
    :func:`tune_end_to_end`; the report gains a row per block and one for the model."""
    if not steps and not end_to_end:
        return solve()
    if calibration is None:
        raise NetshrinkError(f"block_steps={steps} and end_to_end_steps={end_to_end} tune on data: pass "
                             "calibration=<a few hundred examples; labels are not needed>")
    reference = copy.deepcopy(model)  # the model the blocks reproduce
    report = solve()
    started = time.perf_counter()
    modules, tied = dict(model.named_modules()), tied_weights(model)
    layers = tuned if tuned is not None else {name: modules[name] for name, _ in report.changed if name in modules}
    changed = {name: layer for name, layer in layers.items()
               if id(weight_source(layer)) not in tied}  # a shared weight would have two targets
    kept = _shares(split(take(calibration, samples, batch_size), batch_size))
    if steps:
        done = reconstruct(model, reference, changed, kept, steps=steps, desc=f"{desc} blocks")
        report.changed += [(f"{name} (block)", detail) for name, detail in done]
        report.notes.append(f"block reconstruction: {len(done)} blocks, {steps} batches each, "
                            f"{time.perf_counter() - started:.0f}s")
    if end_to_end:
        started = time.perf_counter()
        report.changed.append(("(model)", tune_end_to_end(model, reference, changed, kept, steps=end_to_end)))
        report.notes.append(f"end-to-end tuning of scales, biases and norms: {end_to_end} batches, "
                            f"{time.perf_counter() - started:.0f}s")
    return report


def _shares(kept: list[Inputs]) -> list[Inputs]:
    """This process's share of each batch. Several processes each tune on a share, and the errors
    and gradients are summed over them, so every process takes the steps one process would on the
    whole batches and holds half (a third, ...) of the block's inputs. A batch too small to share is
    left out, by every process alike."""
    return shares([b for b in kept if batch_length(b) >= distributed.world_size()], summed=True)


def _summed(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes (each holding a share of the batch); as it is in one."""
    return distributed.all_reduce(value.detach().clone()) if distributed.active() else value


def reconstruct(model: nn.Module, reference: nn.Module, layers: Mapping[str, nn.Module], batches: list[Inputs],
                *, steps: int, lr: float | None = None, seed: int = 0, desc: str = "blocks") -> list[tuple[str, str]]:
    """Tune each block of ``model`` holding ``layers`` to reproduce ``reference``'s (the same model
    before compression) block outputs, on the inputs ``model`` gives it; ``steps`` batches per
    block. Returns ``(block name, what happened)`` per block."""
    blocks = find_blocks(model, layers)
    references = dict(reference.named_modules())
    order = _execution_order(model, [b for _, b in blocks], batches[0])
    blocks = [blocks[i] for i in order]
    compressed = {id(layer) for layer in layers.values()}
    lr = lr if lr is not None else 1.0 / steps  # AutoRound's default: the offsets can cross a whole step
    generator = torch.Generator().manual_seed(seed)
    done: list[tuple[str, str]] = []
    progress = Progress(len(blocks), desc, unit="block")
    started = time.perf_counter()
    try:
        for number, (name, block) in enumerate(blocks):
            inputs = capture(model, block, batches, what="inputs")
            targets = capture(reference, references[name], batches, what="outputs")
            members = [m for m in block.modules() if id(m) in compressed]
            done.append((name, _tune_block(block, _Tuning(block, members), inputs, targets, batches, steps, lr,
                                           generator, "block output error")))
            elapsed = time.perf_counter() - started
            progress.update(number + 1, f"~{elapsed / (number + 1) * (len(blocks) - number - 1):.0f}s left")
    finally:
        progress.close()
    return done


def _tune_block(block: nn.Module, tuning: _Tuning, inputs: list, targets: list, batches: list[Inputs], steps: int,
                lr: float, generator, what: str, progress: Progress | None = None) -> str:
    """Tune, keep the result only if it lowered the error over all batches, bake; says what happened."""
    try:
        with eval_mode(block):
            before = _error(block, inputs, targets, batches)
            start = tuning.state()
            _tune(block, tuning, inputs, targets, batches, steps, lr, generator, progress)
            after = _error(block, inputs, targets, batches)
            if not after < before:
                tuning.load(start)
    except BaseException:
        tuning.put_back()
        raise
    tuning.bake()
    return f"{what} {before:.3g} -> {after:.3g}" if after < before else f"{what} {before:.3g}, kept (tuning did not lower it)"


def tune_end_to_end(model: nn.Module, reference: nn.Module, layers: Mapping[str, nn.Module], batches: list[Inputs],
                    *, steps: int, lr: float | None = None, seed: int = 0) -> str:
    """Tune the scales of ``layers``' grids (integer codes and masks kept), their biases and every
    norm of ``model`` so that the model's output matches ``reference``'s on ``batches``
    (EfficientQAT's second stage): block reconstruction with the whole model as the one block."""
    inputs = capture(model, model, batches, what="inputs")
    targets = capture(reference, reference, batches, what="outputs")
    lr = lr if lr is not None else 0.5 / steps
    progress = Progress(steps, "end-to-end tuning", unit="batch")
    try:
        return _tune_block(model, _Tuning(model, list(layers.values()), rounding=False), inputs, targets, batches,
                           steps, lr, torch.Generator().manual_seed(seed), "model output error", progress)
    finally:
        progress.close()


def _tune(block, tuning: _Tuning, inputs, targets, batches, steps: int, lr: float, generator,
          progress: Progress | None = None) -> None:
    adam_params = tuning.weights + tuning.floats
    adam = torch.optim.Adam(adam_params, lr=FLOAT_LR) if adam_params else None
    params = tuning.parameters()
    for step in range(steps):
        i = int(torch.randint(len(inputs), (1,), generator=generator))
        args, kwargs = inputs[i]
        out = real_positions(first_tensor(block(*args, **kwargs)), batches[i])
        goal = real_positions(targets[i], batches[i])
        loss = (out - goal).square().sum() / _summed(goal.square().sum()).clamp(min=1e-30)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):  # several processes: the gradient of the whole batch's error
            p.grad = _summed(g if g is not None else torch.zeros_like(p))
        rate = lr * (1 - step / steps)  # linear decay, as AutoRound
        for _, _, tuned, _ in tuning.grids:
            tuned.step(rate)
        if adam is not None:
            adam.step()
        for p in params:
            p.grad = None
        if progress is not None:
            progress.update(step + 1, f"loss {float(loss):.3g}")


def _execution_order(model: nn.Module, blocks: list[nn.Module], first: Inputs) -> list[int]:
    """Indices of ``blocks`` in the order the model runs them; a block run twice per forward pass
    (shared) is refused: its one set of weights would have two targets."""
    seen = [int(name) for name, _ in calls_in_order(model, {str(i): block for i, block in enumerate(blocks)}, first)]
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    if repeated:
        raise NetshrinkError(f"block reconstruction: a block runs {seen.count(repeated[0])} times per forward pass; "
                             "its weights cannot match two targets")
    return list(dict.fromkeys(seen))
