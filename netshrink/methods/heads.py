"""Structured pruning of transformers: whole attention heads and feed-forward neurons are removed,
so the model becomes a smaller dense transformer that does less work per token on any runtime.

torch.fx cannot trace Hugging Face models, so the couplings are read off the module structure:

* an **attention block** has Linear ``query``/``key``/``value`` layers (``q_lin``/``k_lin``/``v_lin``
  in DistilBERT) and a head size (``attention_head_size`` / ``dim_per_head``); its output
  projection is the ``output.dense`` of the module that holds it (``out_lin`` in DistilBERT).
  Removing head h removes rows [h*d, (h+1)*d) of query, key and value and those columns of the
  output projection. Attention reshapes with ``view(..., -1, head_size)``, so nothing else changes.
* a **feed-forward block** is ``intermediate.dense`` followed by ``output.dense`` in the same layer
  (``ffn.lin1``/``ffn.lin2`` in DistilBERT): removing neuron j removes row j of the first and
  column j of the second.

Without data, units are ranked by weight magnitude (L1 of everything the unit owns: its rows in
the input projections and its columns in the output projection); distillation afterwards
recovers what they cost. With ``calibration`` data the removal is data-aware and needs no
retraining to be usable (the structured Optimal Brain Surgeon of ZipLM, Kurtic et al. 2023, in
the layer-wise form of Kwon et al. 2022): blocks are solved in the order the model runs them,
each on the inputs the already-pruned blocks before it produce. For a block's output projection
``y = W x`` with input second moments ``H`` (of the heads' concatenated contexts, or of the
feed-forward activations), units are removed one at a time, always the one whose loss the other
units can best make up for: removing input group ``g`` costs ``tr(W_g (H^-1_gg)^-1 W_g^T)``
after the optimal change of the remaining columns. The kept columns are then refit by least
squares, ``W_K = (W H)_{:,K} H_KK^-1``, so the projection reproduces the dense block's output as
well as the kept units allow (``H`` damped by 1% of its mean diagonal, which also pulls the
refit gently towards the old weights). The Optimal Brain Surgeon step is written here because no
maintained library applies it to whole heads of Hugging Face modules.

By default every block keeps the same fraction. ``allocation="global"`` keeps the same totals but
spreads them by measured damage: each block is tried alone at several counts on the dense model,
the error each trial leaves at the model's output is measured on calibration data, and the counts
with the least total error are chosen (a multiple-choice knapsack, :mod:`netshrink.knapsack`);
the removal itself then runs as above with those counts.

A model without either block is refused before anything changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import OutputDamage, dense_statistics, each_layer, take
from ..errors import NetshrinkError
from ..knapsack import solve
from ..train import Progress
from .base import Method, Report, check_map_keys, check_range, per_layer, preserved, shrink_layer, trial

QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
HEAD_SIZE_NAMES = ("attention_head_size", "dim_per_head", "head_dim")
FFN_NAMES = (("intermediate.dense", "output.dense"), ("ffn.lin1", "ffn.lin2"))
ALLOCATIONS = ("uniform", "global")
ALLOCATION_LEVELS = 16  # unit counts tried per block for a global allocation (every count for up to 16 units)
SCORING_SAMPLES = 256  # calibration examples a global allocation measures each trial on


def _child(module: nn.Module, dotted: str):
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear], nn.Linear, int]]:
    """(name, attention module, [query, key, value], output projection, head size) per block."""
    found = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        for names in QKV_NAMES:
            qkv = [getattr(module, n, None) for n in names]
            size = next((getattr(module, a) for a in HEAD_SIZE_NAMES if isinstance(getattr(module, a, None), int)), None)
            if not all(isinstance(m, nn.Linear) for m in qkv) or size is None:
                continue
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            output = _child(parent, "output.dense") if parent is not module else None
            output = output if isinstance(output, nn.Linear) else getattr(module, "out_lin", None)
            if isinstance(output, nn.Linear) and output.in_features == qkv[0].out_features:
                found.append((name, module, qkv, output, size))
    return found


def ffn_blocks(model: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """(layer name, first Linear, second Linear) per feed-forward block."""
    found = []
    for name, module in model.named_modules():
        for first_name, second_name in FFN_NAMES:
            first, second = _child(module, first_name), _child(module, second_name)
            if isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and first.out_features == second.in_features \
                    and first.out_features != first.in_features:
                found.append((name, first, second))
    return found


def _levels(units: int) -> list[int]:
    """The unit counts a global allocation tries for a block of ``units``, ascending, ending with all."""
    steps = min(units, ALLOCATION_LEVELS)
    return sorted({max(1, round(units * i / steps)) for i in range(1, steps + 1)})


def keep_count(total: int, fraction: float) -> int:
    """How many of ``total`` units a kept ``fraction`` leaves: the nearest count, at least one."""
    return max(1, int(round(fraction * total)))


def _keep_top(score: torch.Tensor, fraction: float) -> torch.Tensor:
    return torch.sort(torch.topk(score, keep_count(len(score), fraction)).indices).values


def _unit_columns(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The rows/columns that units ``kept`` own when each owns ``size`` consecutive ones (a head's
    dimensions; 1 for a neuron)."""
    return (kept[:, None] * size + torch.arange(size)).flatten()


def _remove_units(inputs: list[nn.Linear], output: nn.Linear, kept: torch.Tensor, size: int,
                  attention: nn.Module | None = None) -> None:
    """Keep only units ``kept`` of a block: their rows of the ``inputs`` projections and their
    columns of ``output``; an attention module's head count and size follow."""
    rows = _unit_columns(kept, size)
    for layer in inputs:
        shrink_layer(layer, 0, rows)
    shrink_layer(output, 1, rows)
    if attention is not None:
        for attribute, value in (("num_attention_heads", len(kept)), ("n_heads", len(kept)),
                                 ("all_head_size", len(rows))):
            if isinstance(getattr(attention, attribute, None), int):
                setattr(attention, attribute, value)


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0  # inputs that never varied: any value serves, and H stays invertible
    return h + torch.eye(len(h), dtype=h.dtype) * damp * float(diagonal.mean())


def surgeon_order(weight: torch.Tensor, hessian: torch.Tensor, group: int, keep: int,
                  damp: float = 0.01) -> list[int]:
    """The input groups (``group`` consecutive columns each) of ``weight`` ``[out, in]`` in the
    order the structured Optimal Brain Surgeon removes them under the input second moments
    ``hessian`` ``[in, in]``, until ``keep`` are left: each time the group whose loss the others
    can best make up for. The order is nested: its first ``k`` are what removing ``k`` takes."""
    w = weight.detach().double()
    inverse = torch.linalg.inv(_damped(hessian, damp))
    groups = w.shape[1] // group
    alive = torch.ones(groups, dtype=torch.bool)
    work, removed = w.clone(), []
    for _ in range(groups - keep):
        blocks = inverse.view(groups, group, groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
        blocks[~alive] = torch.eye(group, dtype=blocks.dtype)  # removed groups' blocks are zero now
        cost = torch.einsum("ong,ngh,onh->n", work.view(-1, groups, group), torch.linalg.inv(blocks),
                            work.view(-1, groups, group))
        cost[~alive] = float("inf")
        g = int(cost.argmin())
        columns = slice(g * group, (g + 1) * group)
        correction = torch.linalg.inv(inverse[columns, columns])
        work -= work[:, columns] @ correction @ inverse[columns, :]
        inverse -= inverse[:, columns] @ correction @ inverse[columns, :]
        alive[g] = False
        removed.append(g)
    return removed


def refit(weight: torch.Tensor, hessian: torch.Tensor, group: int, kept: torch.Tensor,
          damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """The least-squares weight on the columns of groups ``kept`` (``[out, len(kept) * group]``)
    and the output error it leaves, as a fraction of the output's energy ``tr(W H W^T)``."""
    w, h = weight.detach().double(), _damped(hessian, damp)
    columns = _unit_columns(kept, group)
    fitted = torch.linalg.solve(h[columns][:, columns], (w @ h[:, columns]).T).T
    change = w.clone()
    change[:, columns] -= fitted
    energy = float(((w @ h) * w).sum())
    return fitted.to(weight.dtype), float(((change @ h) * change).sum()) / max(energy, 1e-30)


def surgeon_keep(weight: torch.Tensor, hessian: torch.Tensor, group: int, keep: int,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Which ``keep`` input groups of ``weight`` to keep (:func:`surgeon_order`) and their
    :func:`refit`: (kept group indices, sorted; the refit weight; the output error left)."""
    kept = _left(weight.shape[1] // group, surgeon_order(weight, hessian, group, keep, damp))
    return (kept, *refit(weight, hessian, group, kept, damp))


def _left(groups: int, removed: list[int]) -> torch.Tensor:
    """The group indices of ``range(groups)`` not in ``removed``, sorted."""
    gone = set(removed)
    return torch.tensor([g for g in range(groups) if g not in gone], dtype=torch.long)


@dataclass(frozen=True)
class UnitCount:
    """One count a block may keep and the damage measured with it (a knapsack choice)."""

    units: int
    damage: float


@dataclass(frozen=True, kw_only=True)
class RemoveHeads(Method):
    """Remove attention heads and feed-forward neurons of a transformer: keep the fraction
    ``heads`` of each attention block's heads and ``neurons`` of each feed-forward block's
    neurons (1.0 keeps all), ranked by weight magnitude, or with calibration data by the structured
    Optimal Brain Surgeon. Per-block maps use the block's module name (e.g.
    ``{"encoder.layer.0.attention.self": 1.0, "*": 0.7}``); ``allocation="global"`` (with data)
    spreads one model-wide fraction over the blocks instead."""

    name: ClassVar[str] = "heads"
    heads: float | dict = 0.7
    neurons: float | dict = 0.7
    samples: int = 1024  # calibration examples, when data is given: more keep helping (transformer_pruning.md)
    batch_size: int = 32
    allocation: str = "uniform"  # or "global": the same totals, spread over blocks by measured damage (needs data)

    def check(self) -> None:
        super().check()
        check_range("heads", self.heads, 0.0, 1.0, low_open=True)
        check_range("neurons", self.neurons, 0.0, 1.0, low_open=True)
        check_range("samples", self.samples, 1, 1e9, integer=True)
        check_range("batch_size", self.batch_size, 1, 1e9, integer=True)
        if self.allocation not in ALLOCATIONS:
            raise NetshrinkError(f"allocation must be one of {', '.join(ALLOCATIONS)}. Received: "
                                 f"allocation={self.allocation!r}")
        if self.allocation == "global" and any(isinstance(v, dict) for v in (self.heads, self.neurons)):
            raise NetshrinkError("allocation='global' spreads one model-wide fraction of heads and one of neurons: "
                                 "give heads and neurons as numbers, not per-block maps")

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        if not isinstance(model, nn.Module):
            raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
        blocks = {name: module for name, module, *_ in attention_blocks(model)}
        blocks.update({name: module for name, module in model.named_modules()
                       if name in {n for n, _, _ in ffn_blocks(model)}})
        if not blocks:
            raise NetshrinkError(f"{type(model).__name__} has no attention block (query/key/value Linear layers with a "
                                 "head size) and no feed-forward block: use remove_units for other models")
        if any(hasattr(m, "parametrizations") for m in model.modules()):
            raise NetshrinkError("remove heads before other compression (the model has weight transforms): start "
                                 "from the dense model, or netshrink.bake it first")
        check_map_keys("heads", self.heads, blocks)
        check_map_keys("neurons", self.neurons, blocks)
        return blocks

    def _select(self, model: nn.Module):
        return self.select(model), []

    def run(self, model: nn.Module, calibration=None, **_: Any) -> Report:
        self.select(model)
        if calibration is None and self.allocation == "global":
            raise NetshrinkError("allocation='global' measures each block's damage on data: pass calibration=...")
        if calibration is not None:
            return self._run_on_data(model, calibration)
        report = Report(self.name)
        plans = []
        for name, module, qkv, output, size in attention_blocks(model):
            heads = qkv[0].out_features // size
            score = sum(layer.weight.detach().abs().reshape(heads, -1).sum(1) for layer in qkv)
            score = score + output.weight.detach().abs().reshape(output.out_features, heads, size).sum((0, 2))
            kept = _keep_top(score, float(per_layer(self.heads, name, "heads")))
            if len(kept) < heads:
                plans.append((qkv, output, kept, size, module))
                report.changed.append((name, f"kept {len(kept)} of {heads} heads"))
        for name, first, second in ffn_blocks(model):
            score = first.weight.detach().abs().sum(1) + second.weight.detach().abs().sum(0)
            kept = _keep_top(score, float(per_layer(self.neurons, name, "neurons")))
            if len(kept) < len(score):
                plans.append(([first], second, kept, 1, None))
                report.changed.append((name, f"kept {len(kept)} of {len(score)} feed-forward neurons"))
        with preserved(model), torch.no_grad():
            for inputs, output, kept, size, attention in plans:
                _remove_units(inputs, output, kept, size, attention)
        return report

    def _run_on_data(self, model: nn.Module, calibration) -> Report:
        """Data-aware removal (see the module docstring), block after block in execution order."""
        report = Report(self.name)
        blocks: dict[str, list] = {}  # output projection's module name -> how to shrink its block
        names = {id(m): n for n, m in model.named_modules()}
        for name, module, qkv, output, size in attention_blocks(model):
            heads = qkv[0].out_features // size
            keep = keep_count(heads, float(per_layer(self.heads, name, "heads")))
            blocks[names[id(output)]] = [name, "heads", qkv, size, module, keep]
        for name, first, second in ffn_blocks(model):
            keep = keep_count(first.out_features, float(per_layer(self.neurons, name, "neurons")))
            blocks[names[id(second)]] = [name, "feed-forward neurons", [first], 1, None, keep]
        outputs = {n: model.get_submodule(n) for n in blocks}
        if self.allocation == "global":
            self._spread_budgets(model, blocks, outputs, calibration, report)
        outputs = {n: layer for n, layer in outputs.items() if blocks[n][-1] < layer.in_features // blocks[n][3]}
        with torch.no_grad():
            for output_name, stats in each_layer(model, outputs, calibration, frozenset({"hessian"}),
                                                 samples=self.samples, batch_size=self.batch_size, desc=self.name):
                name, unit, inputs, size, attention, keep = blocks[output_name]
                output = outputs[output_name]
                units = output.in_features // size
                kept, weight, error = surgeon_keep(output.weight, stats.hessian, size, keep)
                _remove_units(inputs, output, kept, size, attention)
                output.weight = nn.Parameter(weight)
                report.changed.append((name, f"kept {len(kept)} of {units} {unit} (data-aware"
                                             f"{', allocated globally' if self.allocation == 'global' else ''}: "
                                             f"output error {100 * error:.2f}% of its energy)"))
        return report

    def _spread_budgets(self, model: nn.Module, blocks: dict[str, list], outputs: dict[str, nn.Linear], calibration,
                        report: Report) -> None:
        """Global allocation: keep as many heads, and as many neurons, in all as the uniform
        fractions would, spread where they matter. Each block is tried alone at up to
        ``ALLOCATION_LEVELS`` unit counts (its Optimal Brain Surgeon removal and refit, on the dense
        model's inputs; the rest of the model dense), and the damage of each is measured at the
        model's output on calibration data (squared error over real tokens, relative to the
        output's energy). Damages are added across blocks, as for small changes, and
        :func:`netshrink.knapsack.solve` picks the counts with the least total."""
        hessians = dense_statistics(model, outputs, calibration, frozenset({"hessian"}), samples=self.samples,
                                    batch_size=self.batch_size)
        scoring = take(calibration, min(self.samples, SCORING_SAMPLES), self.batch_size)
        options: dict[str, list[UnitCount]] = {}
        progress = Progress(len(blocks), f"{self.name}: measuring each block's damage", unit="block")
        try:
            damage = OutputDamage(model, scoring)
            with torch.no_grad():
                for done, (output_name, (name, _, inputs, size, attention, uniform)) in enumerate(blocks.items()):
                    output, hessian = outputs[output_name], hessians[output_name].hessian
                    units = output.in_features // size
                    counts = sorted({*_levels(units), uniform})  # the uniform choice always fits the budget
                    removed = surgeon_order(output.weight, hessian, size, counts[0])
                    options[output_name] = [UnitCount(units, 0.0)]
                    for count in counts[:-1]:
                        kept = _left(units, removed[:units - count])  # the removal order is nested
                        weight, _ = refit(output.weight, hessian, size, kept)
                        with trial(model):
                            _remove_units(inputs, output, kept, size, attention)
                            output.weight = nn.Parameter(weight)
                            options[output_name].append(UnitCount(count, damage()))
                    progress.update(done + 1, f"{name}: {len(counts)} counts tried")
        finally:
            progress.close()
        for unit in ("heads", "feed-forward neurons"):
            chosen = [n for n in blocks if blocks[n][1] == unit]
            budget = sum(blocks[n][-1] for n in chosen)
            # Exact (one bucket per unit: a few thousand units per model) and never None, since the
            # uniform counts are among the choices.
            policy = solve({n: options[n] for n in chosen}, budget, units=max(budget, 1),
                           cost_of=attrgetter("units")) if chosen else {}
            for n, choice in policy.items():
                count = blocks[n][-1] = choice.units
                if count == outputs[n].in_features // blocks[n][3]:
                    report.skipped.append((blocks[n][0], f"the global allocation keeps all its {count} {unit}"))
