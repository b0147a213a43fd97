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

Scores are weight magnitudes (L1 of everything the unit owns: its rows in the input projections
and its columns in the output projection); distillation afterwards recovers what they cost.
A model without either block is refused before anything changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import NetshrinkError
from .base import Method, Report, check_map_keys, check_range, per_layer, preserved, shrink_layer

QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
HEAD_SIZE_NAMES = ("attention_head_size", "dim_per_head", "head_dim")
FFN_NAMES = (("intermediate.dense", "output.dense"), ("ffn.lin1", "ffn.lin2"))


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


def _keep_top(score: torch.Tensor, fraction: float) -> torch.Tensor:
    count = max(1, int(round(fraction * len(score))))
    return torch.sort(torch.topk(score, count).indices).values


@dataclass(frozen=True, kw_only=True)
class RemoveHeads(Method):
    """Remove attention heads and feed-forward neurons of a transformer: keep the fraction
    ``heads`` of each attention block's heads and ``neurons`` of each feed-forward block's
    neurons (1.0 keeps all), ranked by weight magnitude. Per-block maps use the block's module name
    (e.g. ``{"encoder.layer.0.attention.self": 1.0, "*": 0.7}``)."""

    name: ClassVar[str] = "heads"
    heads: float | dict = 0.7
    neurons: float | dict = 0.7

    def check(self) -> None:
        super().check()
        check_range("heads", self.heads, 0.0, 1.0, low_open=True)
        check_range("neurons", self.neurons, 0.0, 1.0, low_open=True)

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

    def run(self, model: nn.Module, **_: Any) -> Report:
        self.select(model)
        report = Report(self.name)
        plans = []
        for name, module, qkv, output, size in attention_blocks(model):
            heads = qkv[0].out_features // size
            score = sum(layer.weight.detach().abs().reshape(heads, -1).sum(1) for layer in qkv)
            score = score + output.weight.detach().abs().reshape(output.out_features, heads, size).sum((0, 2))
            kept = _keep_top(score, float(per_layer(self.heads, name, "heads")))
            if len(kept) < heads:
                plans.append(("heads", module, qkv, output, size, kept))
                report.changed.append((name, f"kept {len(kept)} of {heads} heads"))
        for name, first, second in ffn_blocks(model):
            score = first.weight.detach().abs().sum(1) + second.weight.detach().abs().sum(0)
            kept = _keep_top(score, float(per_layer(self.neurons, name, "neurons")))
            if len(kept) < len(score):
                plans.append(("ffn", first, second, kept))
                report.changed.append((name, f"kept {len(kept)} of {len(score)} feed-forward neurons"))
        with preserved(model), torch.no_grad():
            for plan in plans:
                if plan[0] == "heads":
                    _, module, qkv, output, size, kept = plan
                    rows = (kept[:, None] * size + torch.arange(size)).flatten()
                    for layer in qkv:
                        shrink_layer(layer, 0, rows)
                    shrink_layer(output, 1, rows)
                    for attribute, value in (("num_attention_heads", len(kept)), ("n_heads", len(kept)),
                                             ("all_head_size", len(rows))):
                        if isinstance(getattr(module, attribute, None), int):
                            setattr(module, attribute, value)
                else:
                    _, first, second, kept = plan
                    shrink_layer(first, 0, kept)
                    shrink_layer(second, 1, kept)
        return report
