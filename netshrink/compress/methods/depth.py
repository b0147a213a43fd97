"""Depth pruning of transformers: whole blocks (layers) are removed, so every token passes
through fewer of them. Removing width (heads, neurons, channels) leaves the number of operators
the runtime launches per block unchanged, and at batch 1 that fixed cost is a large part of a
small transformer's time; a removed block takes its share of both.

The blocks are the ``nn.ModuleList`` a Hugging Face model iterates, the one whose length is the
config's ``num_hidden_layers`` (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT,
``layers`` in most decoders). Removal shortens that list and the config, so the model saves,
loads (rebuilt from its config) and exports as the shallower model it now is; attributes that
index blocks (``layer_idx``) and per-block config lists (``layer_types``) follow.

Which blocks go is measured, not guessed: a block whose output is close to its input (the
residual stream passes through it almost unchanged) costs little to skip, but how little only
the model's output tells. Blocks are removed one at a time, each time the one whose removal
leaves the least error at the model's output on calibration data (squared error over real
tokens, relative to the output's energy, :class:`netshrink.compress.calibration.OutputDamage`; or of what
``forward(model, inputs)`` returns, such as a sentence model's pooled embedding), measured
together with the blocks already removed; that is greedy, n + (n-1) + ... trials instead of every
subset. Nothing refits the blocks that stay, so a removed block costs more than the same work
removed as heads and neurons: distil afterwards, ``fit(model, data, teacher=dense)``, on as much
unlabeled text as there is time for.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..calibration import OutputDamage, take
from ...errors import NetshrinkError
from ...training.batches import Progress
from .base import Method, Report, check_range
from ...errors import trial
from .heads import keep_count

SCORING_SAMPLES = 256  # calibration examples each trial is measured on (the batch is run once per trial)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the transformer's blocks: the one ModuleList as long as ``num_hidden_layers``."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or isinstance(count, bool):
        raise NetshrinkError(f"{type(model).__name__} has no config.num_hidden_layers: remove_layers removes blocks of "
                             "Hugging Face transformers models")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise NetshrinkError(f"{type(model).__name__}: {'no' if not found else 'more than one'} list of "
                             f"{count} blocks (config.num_hidden_layers) found")
    return found[0]


def _set_blocks(model: nn.Module, name: str, kept: list[nn.Module]) -> None:
    """Make ``kept`` the model's blocks, in order, with the config and block indices to match."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    before = getattr(parent, attribute)
    positions = [next(i for i, b in enumerate(before) if b is block) for block in kept]
    setattr(parent, attribute, nn.ModuleList(kept))
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(before):
        config.layer_types = [layer_types[i] for i in positions]
    config.num_hidden_layers = len(kept)
    for index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


@contextlib.contextmanager
def _config_kept(config) -> Iterator[None]:
    """The config's block count and per-block list as they were when the block ends (a trial
    restores modules; the config is no module)."""
    saved = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


@dataclass(frozen=True, kw_only=True)
class RemoveLayers(Method):
    """Remove whole blocks of a transformer, keeping ``keep`` of them: a count (an int) or a
    fraction of the blocks (a float, rounded to the nearest count, at least one). Needs
    calibration data: each removal is the block the model's output misses least."""

    name: ClassVar[str] = "layers"
    keep: int | float = 0.67
    samples: int = SCORING_SAMPLES
    batch_size: int = 32

    def check(self) -> None:
        super().check()
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise NetshrinkError(f"keep must be a number of blocks (an int) or a fraction (a float). "
                                 f"Received: keep={self.keep!r}")
        if isinstance(self.keep, int):
            check_range("keep", self.keep, 1, 1e9, integer=True)
        else:
            check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_range("samples", self.samples, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)

    def kept_count(self, blocks: int) -> int:
        return self.keep if isinstance(self.keep, int) else keep_count(blocks, self.keep)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        if not isinstance(model, nn.Module):
            raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
        name, blocks = block_list(model)
        if self.kept_count(len(blocks)) > len(blocks):
            raise NetshrinkError(f"keep={self.keep} blocks, but {type(model).__name__} has {len(blocks)}")
        return {f"{name}.{i}" if name else str(i): block for i, block in enumerate(blocks)}

    def _select(self, model: nn.Module):
        return self.select(model), []

    def run(self, model: nn.Module, calibration=None, forward=None, **_: Any) -> Report:
        self.select(model)
        if calibration is None:
            raise NetshrinkError("remove_layers measures which blocks the model misses least: pass calibration=... "
                                 "(batches as the model takes them, e.g. tokenized sentences)")
        name, blocks = block_list(model)
        labels = {id(block): f"{name}.{i}" for i, block in enumerate(blocks)}
        kept, drop = list(blocks), len(blocks) - self.kept_count(len(blocks))
        report = Report(self.name)
        damage = OutputDamage(model, take(calibration, self.samples, self.batch_size), forward)
        progress = Progress(sum(len(blocks) - i for i in range(drop)), f"{self.name}: trying each block's removal",
                            unit="trial")
        tried = 0
        try:
            for _ in range(drop):
                costs = []
                for block in kept:
                    with trial(model), _config_kept(model.config):
                        _set_blocks(model, name, [b for b in kept if b is not block])
                        costs.append(damage())
                    tried += 1
                    progress.update(tried, labels[id(block)])
                cost, worst = min(zip(costs, range(len(kept))))
                report.changed.append((labels[id(kept[worst])], f"removed (output error {100 * cost:.2f}% of its "
                                                               f"energy with the blocks removed before it)"))
                kept.pop(worst)
        finally:
            progress.close()
        _set_blocks(model, name, kept)
        report.skipped += [(labels[id(b)], f"kept, now {name}.{i}") for i, b in enumerate(kept)]
        return report
