"""Structured pruning with physical removal: whole output neurons (Linear) and channels (Conv)
are deleted, with the BatchNorm after them and the input columns of the layers that consume them,
so the result is a smaller dense model that runs faster with ordinary kernels.

Who consumes a layer's output is read off the traced graph (``torch.fx``), through ops that keep
channels apart (BatchNorm, activations, pooling, dropout, flatten). A layer whose output reaches
anything else (a residual add, a concatenation, the model output) is left whole and reported:
removing its channels would change a shape something else relies on.

Criterion: the L1 or L2 norm of each unit's weights (Li et al. 2017, "Pruning Filters for
Efficient ConvNets"), or L1 times the following BatchNorm's |gamma| (network slimming).
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from ..errors import NetshrinkError
from .base import LINEAR_CONV, Method, Report, check_choice, check_range, per_layer, sync_sizes

PASS_THROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout,
                        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d, nn.Identity)
PASS_THROUGH_FUNCTIONS = {torch.relu, nn.functional.relu, torch.sigmoid, torch.tanh, nn.functional.gelu,
                          nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.dropout}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class StructuredReport(Report):
    """A Report plus, per changed layer, the indices of the output units that were kept."""

    kept: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Plan:
    layer: str
    keep: torch.Tensor  # indices of kept output units, ascending
    norms: list[str]
    consumers: list[tuple[str, int]]  # (layer, input columns per unit)


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, NORMS):
            return "norm"
        if isinstance(module, PASS_THROUGH_MODULES):
            return "pass"
        if isinstance(module, nn.Flatten):
            return "flatten"
        if isinstance(module, LINEAR_CONV) and getattr(module, "groups", 1) == 1:
            return "layer"
    elif node.op == "call_function":
        if node.target in PASS_THROUGH_FUNCTIONS:
            return "pass"
        if node.target is torch.flatten:
            return "flatten"
    elif node.op == "call_method" and node.target in ("flatten", "view", "reshape"):
        return "flatten"
    return "other"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "output":
        return "the model output"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in (operator.add, operator.iadd, torch.add, torch.cat):
        return f"{name} (a residual connection or concatenation)"
    return name


def _consumers(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], list[tuple[str, int]], str | None]:
    """Follow ``start``'s output through channel-preserving ops to the layers that consume it.
    Returns (BatchNorms on the way, (consumer, input columns per unit), reason to leave it whole)."""
    norms: list[str] = []
    consumers: list[tuple[str, int]] = []
    frontier = [(user, 1) for user in start.users]  # (node, input columns per unit so far)
    while frontier:
        node, per_unit = frontier.pop()
        kind = _kind(node, modules)
        if kind in ("norm", "pass"):
            if kind == "norm":
                norms.append(node.target)
            frontier += [(user, per_unit) for user in node.users]
        elif kind == "flatten":
            meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
            if meta is None:
                return norms, consumers, "it is flattened into a Linear layer: pass example_input"
            frontier += [(user, per_unit * math.prod(meta.shape[2:])) for user in node.users]
        elif kind == "layer" and (per_unit == 1 or isinstance(modules[node.target], nn.Linear)):
            consumers.append((node.target, per_unit))
        else:
            return norms, consumers, f"its output reaches {_describe(node, modules)}"
    if not consumers:
        return norms, consumers, "nothing consumes its output"
    return norms, consumers, None


@dataclass(frozen=True, kw_only=True)
class RemoveUnits(Method):
    """Physically remove the fraction 1 - ``keep`` of output units (neurons / channels) of each
    selected layer, ranked by ``criterion`` (``l1``, ``l2``, or ``l1-bn``: L1 times the following
    BatchNorm's |gamma|). The model's output layer is never shrunk. Applies in place; calibration
    data (one batch) supplies shapes when a convolution feeds a Linear through a flatten.
    """

    name: ClassVar[str] = "structured"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    keep: float | Mapping[str, float] = 0.5
    criterion: str = "l1"

    def check(self) -> None:
        super().check()
        check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_choice("criterion", self.criterion, ("l1", "l2", "l1-bn"))

    def run(self, model: nn.Module, calibration=None, **_: Any) -> StructuredReport:
        layers, unmatched = self._select(model)
        if any(hasattr(m, "parametrizations") for m in layers.values()):
            raise NetshrinkError("remove units before other compression (the model has weight transforms): "
                                 "start from the dense model, or netshrink.bake it first")
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types on untraceable Python control flow
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise NetshrinkError(f"structured pruning needs a model torch.fx can trace ({type(exc).__name__}: {first})") from None
        modules = dict(traced.named_modules())
        if calibration is not None:
            from torch.fx.passes.shape_prop import ShapeProp

            from ..train import batches

            example = calibration if torch.is_tensor(calibration) else next(iter(batches(calibration, 2)))[0]
            ShapeProp(traced).propagate(example)
        report = StructuredReport(self.name, skipped=self.new_report(unmatched).skipped)
        plans = []
        for node in traced.graph.nodes:
            if node.op != "call_module" or node.target not in layers:
                continue
            norms, consumers, reason = _consumers(node, modules)
            if reason is not None:
                report.skipped.append((node.target, reason))
                continue
            weight = modules[node.target].weight.detach()
            units = weight.shape[0]
            flat = weight.reshape(units, -1)
            score = flat.pow(2).sum(1).sqrt() if self.criterion == "l2" else flat.abs().sum(1)
            if self.criterion == "l1-bn" and norms:
                score = score * modules[norms[0]].weight.detach().abs()
            count = max(1, int(round(float(per_layer(self.keep, node.target, "keep")) * units)))
            kept = torch.sort(torch.topk(score, count).indices).values
            plans.append(_Plan(node.target, kept, norms, consumers))
            report.changed.append((node.target, f"kept {count} of {units} units ({self.criterion})"))
            report.kept[node.target] = kept.tolist()
        _rebuild(model, plans)  # all plans made first: a failure above leaves the model untouched
        return report


def remove_units(model: nn.Module, keep: float | Mapping[str, float] = 0.5, *, criterion: str = "l1",
                 example_input: torch.Tensor | None = None, targets: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = ()) -> tuple[nn.Module, StructuredReport]:
    """A smaller copy of ``model`` (``model`` is unchanged); see :class:`RemoveUnits`.

    >>> from netshrink.models import build_model
    >>> small, report = remove_units(build_model("lenet-300-100"), keep=0.5)
    >>> small.fc1.weight.shape, small.fc2.weight.shape, small.fc3.weight.shape
    (torch.Size([150, 784]), torch.Size([50, 150]), torch.Size([10, 50]))
    """
    method = RemoveUnits(keep=keep, criterion=criterion, targets=targets, ignore=ignore)
    method.check()
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    if example_input is not None and not torch.is_tensor(example_input):
        raise NetshrinkError(f"example_input must be a tensor (one batch of inputs). Received: {type(example_input).__name__}")
    result = copy.deepcopy(model)
    return result, method.run(result, calibration=example_input)


def _rebuild(result: nn.Module, plans: list[_Plan]) -> None:
    with torch.no_grad():
        for plan in plans:
            _shrink(result.get_submodule(plan.layer), 0, plan.keep)
            for norm_name in plan.norms:
                norm = result.get_submodule(norm_name)
                for name in ("weight", "bias"):
                    if getattr(norm, name) is not None:
                        setattr(norm, name, nn.Parameter(getattr(norm, name)[plan.keep].clone()))
                for name in ("running_mean", "running_var"):
                    if getattr(norm, name) is not None:
                        setattr(norm, name, getattr(norm, name)[plan.keep].clone())
                sync_sizes(norm)
            for consumer_name, per_unit in plan.consumers:
                columns = (plan.keep[:, None] * per_unit + torch.arange(per_unit)).flatten()
                _shrink(result.get_submodule(consumer_name), 1, columns)


def _shrink(layer: nn.Module, dim: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``dim`` of the layer's weight (0: outputs, with bias; 1: inputs)."""
    layer.weight = nn.Parameter(layer.weight.detach().index_select(dim, index).clone())
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[index].clone())
    sync_sizes(layer)
