"""Structured pruning with physical removal: whole output neurons (Linear) and channels (Conv) are
deleted, with everything that must shrink with them, so the result is a smaller dense model that
runs faster with ordinary kernels.

**Channel spaces.** Which channels must be removed together is read off the traced graph
(``torch.fx``), in the manner of Torch-Pruning's dependency graph. The channel dimension of every
tensor belongs to a *space*:

* a Linear or (ungrouped) Conv layer starts a new space: its output units;
* ops that keep channels apart (activations, BatchNorm, pooling, dropout, means over other
  dimensions) pass their input's space on; a depthwise convolution does too (its channels follow
  its input's), and is pruned along with it;
* an elementwise add, subtract or multiply of two tensors joins their spaces into one (a residual
  connection couples every layer that feeds it);
* flattening turns a space into ``per_unit`` columns per channel of the Linear layer after it.

A space whose channels reach anything else (a concatenation, a grouped convolution, a reshape, a
LayerNorm, the model's input or output) is *fixed* and never pruned; the report says why. Pruning
a space removes the same indices from all of its producers' outputs, its BatchNorms and depthwise
convolutions, and its consumers' inputs. The result is run on the example input before it is
returned; if it fails, the model is restored and the error says so.

Criterion: the L1 or L2 norm of each channel's weights summed over the producers of its space
(Li et al. 2017), or L1 times the following BatchNorm's |gamma| (network slimming).
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
from torch.fx.passes.shape_prop import ShapeProp

from ...errors import NetshrinkError
from ...training.batches import eval_mode
from .base import (LINEAR_CONV, Method, Report, check_choice, check_range, is_depthwise, per_layer, shrink_layer, sync_sizes)
from ...errors import preserved

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
                nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity)
F = nn.functional
PASS_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                  torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.max_pool2d, F.avg_pool2d,
                  F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.clamp, torch.clip}
PASS_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "contiguous", "clone"}
MERGE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.sub,
                   torch.mul}
MERGE_METHODS = {"add", "add_", "sub", "mul", "mul_"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class StructuredReport(Report):
    """A Report plus, per changed layer, the indices of the output units that were kept, and the
    multiply-accumulates of one example before and after (when an example input was given)."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0


@dataclass
class _Space:
    producers: list[str] = field(default_factory=list)  # layers whose output units are these channels
    norms: list[str] = field(default_factory=list)  # BatchNorms over these channels
    depthwise: list[str] = field(default_factory=list)  # depthwise convolutions over these channels
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, input columns per channel)
    fixed: str | None = None  # why these channels cannot be removed


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[_Space] = []

    def new(self, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.info.append(_Space(fixed=fixed))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> _Space:
        return self.info[self.find(i)]

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            first, second = self.info[a], self.info[b]
            first.producers += second.producers
            first.norms += second.norms
            first.depthwise += second.depthwise
            first.consumers += second.consumers
            first.fixed = first.fixed or second.fixed
        return a

    def fix(self, i: int, reason: str) -> None:
        space = self.get(i)
        space.fixed = space.fixed or reason


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "output":
        return "the model output"
    if node.op == "placeholder":
        return "the model input"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in (torch.cat, torch.concat, torch.stack):
        return f"{name} (a concatenation)"
    return name


def _meta_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _analyse(traced: fx.GraphModule, modules: dict[str, nn.Module], spaces: _Spaces) -> dict[str, int]:
    """Walk the graph once; returns the output space of every Linear/Conv layer."""
    space_of: dict[fx.Node, tuple[int, int]] = {}  # node -> (space, columns per channel; > 1 after a flatten)
    layer_space: dict[str, int] = {}

    def spaces_in(node) -> list[tuple[int, int]]:
        return [space_of[a] for a in node.all_input_nodes if a in space_of]

    def fix_inputs(node, reason: str) -> None:
        for space, _ in spaces_in(node):
            spaces.fix(space, reason)

    for node in traced.graph.nodes:
        inputs = spaces_in(node)
        first = space_of.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            space_of[node] = (spaces.new(fixed="its channels come from the model input"), 1)
        elif node.op == "output":
            fix_inputs(node, "its channels reach the model output")
        elif node.op == "get_attr":
            continue
        elif node.op == "call_module":
            module = modules[node.target]
            groups = getattr(module, "groups", 1)
            if isinstance(module, LINEAR_CONV) and groups == 1:
                shape = _meta_shape(node.args[0])
                if isinstance(module, nn.Linear) and shape is not None and len(shape) != 2:
                    fix_inputs(node, f"it feeds {node.target}, a Linear layer on {len(shape)}-D inputs")
                    new = spaces.new(fixed=f"{node.target} works on {len(shape)}-D inputs (transformers have "
                                           "their own rules: prune heads and FFN neurons)")
                else:  # its input's channels, where known, shrink with their space
                    if first is not None:
                        spaces.get(first[0]).consumers.append((node.target, first[1]))
                    new = spaces.new()
                spaces.get(new).producers.append(node.target)
                layer_space[node.target] = new
                space_of[node] = (new, 1)
            elif is_depthwise(module) and first is not None and first[1] == 1:
                spaces.get(first[0]).depthwise.append(node.target)  # depthwise: channels follow the input
                space_of[node] = first
            elif isinstance(module, NORMS) and first is not None and first[1] == 1:
                spaces.get(first[0]).norms.append(node.target)
                space_of[node] = first
            elif isinstance(module, PASS_MODULES) and first is not None:
                space_of[node] = first
            elif isinstance(module, nn.Flatten) and first is not None:
                _flatten(node, first, space_of, spaces)
            else:
                reason = f"its channels reach {_describe(node, modules)}"
                if isinstance(module, LINEAR_CONV):
                    reason = f"its channels reach {node.target}, a grouped convolution (groups={groups})"
                fix_inputs(node, reason)
                new = spaces.new(fixed=f"it is a grouped convolution (groups={groups})"
                                 if isinstance(module, LINEAR_CONV) else reason)
                if isinstance(module, LINEAR_CONV):
                    spaces.get(new).producers.append(node.target)
                    layer_space[node.target] = new
                space_of[node] = (new, 1)
        else:  # call_function, call_method
            target = node.target
            if target in PASS_FUNCTIONS or target in PASS_METHODS:
                if first is not None:
                    space_of[node] = first
            elif target in MERGE_FUNCTIONS or target in MERGE_METHODS:
                channel_inputs = [s for s in inputs if s[1] == 1]
                if any(a.op == "get_attr" for a in node.all_input_nodes):
                    fix_inputs(node, f"its channels meet a stored tensor in {_describe(node, modules)}")
                elif len(channel_inputs) != len(inputs):
                    fix_inputs(node, f"a flattened tensor reaches {_describe(node, modules)}")
                elif channel_inputs:
                    merged = channel_inputs[0][0]
                    for other, _ in channel_inputs[1:]:
                        merged = spaces.union(merged, other)
                    space_of[node] = (merged, 1)
            elif target in (torch.flatten, "flatten", "view", "reshape") and first is not None:
                _flatten(node, first, space_of, spaces)
            elif (target in REDUCE_FUNCTIONS or target in REDUCE_METHODS) and first is not None:
                before, after = _meta_shape(node.args[0]), _meta_shape(node)
                if before is not None and after is not None and len(after) >= 2 and after[:2] == before[:2]:
                    space_of[node] = first  # a reduction over the other dimensions keeps channels
                else:
                    fix_inputs(node, f"its channels reach {_describe(node, modules)} (pass example_input to "
                                     "see which dimensions it reduces)")
            elif target in (getattr, "size", "dim") or target is getattr:
                continue
            elif inputs:
                reason = f"its channels reach {_describe(node, modules)}"
                fix_inputs(node, reason)
                space_of[node] = (spaces.new(fixed=reason), 1)
    return layer_space


def _flatten(node: fx.Node, source: tuple[int, int], space_of: dict, spaces: _Spaces) -> None:
    """A flatten into [N, C * rest] keeps channel c as columns [c * rest, (c + 1) * rest)."""
    before, after = _meta_shape(node.args[0]), _meta_shape(node)
    if before is None or after is None:
        spaces.fix(source[0], "it is flattened into a Linear layer: pass example_input")
        return
    if len(after) == 2 and after[0] == before[0] and len(before) >= 2 and after[1] == math.prod(before[1:]):
        space_of[node] = (source[0], source[1] * math.prod(before[2:]))
    elif after == before:
        space_of[node] = source
    else:
        spaces.fix(source[0], f"its channels are reshaped to {list(after)}")


def _macs(traced: fx.GraphModule, modules: dict[str, nn.Module]) -> int:
    """Multiply-accumulates of the Linear/Conv layers for the example that shaped the graph."""
    total = 0
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), LINEAR_CONV):
            out = _meta_shape(node)
            if out is not None:
                weight = modules[node.target].weight
                total += math.prod(out) * math.prod(weight.shape[1:])
    return total


@dataclass(frozen=True, kw_only=True)
class RemoveUnits(Method):
    """Physically remove the fraction 1 - ``keep`` of output units (neurons / channels) of each
    selected layer, with every layer coupled to it (see the module docstring), ranked by
    ``criterion`` (``l1``, ``l2``, or ``l1-bn``: L1 times the following BatchNorm's |gamma|).
    The model's output layer is never shrunk. Applies in place; calibration data (one batch)
    gives shapes for flattens and reductions, and the pruned model is checked on it.

    ``multiple_of``: each kept count is rounded to the nearest multiple of it (at least one
    multiple, never more than the layer has). Integer and vectorised kernels run channel counts in
    blocks (ONNX Runtime's int8 convolutions on AVX2: 8), so 34 channels can be slower than 48;
    benchmarks/deployment.py rounds its CNN's counts to multiples of 8 for that reason.
    """

    name: ClassVar[str] = "structured"
    layer_kinds: ClassVar[tuple] = LINEAR_CONV
    keep: float | Mapping[str, float] = 0.5
    criterion: str = "l1"
    multiple_of: int = 1

    def check(self) -> None:
        super().check()
        check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_range("multiple_of", self.multiple_of, 1, 4096, integer=True)
        check_choice("criterion", self.criterion, ("l1", "l2", "l1-bn"))

    def run(self, model: nn.Module, calibration=None, **_: Any) -> StructuredReport:
        unmatched, example, traced, modules, groups = self._groups(model, calibration)
        report = StructuredReport(self.name, skipped=self.new_report(unmatched).skipped)
        report.macs_before = _macs(traced, modules) if example is not None else 0
        plans = []
        for space, selected, reason in groups:
            if reason is not None:
                report.skipped += [(p, reason) for p in selected]
                continue
            kept = self._choose(space, modules)
            plans.append((space, kept))
            coupled = f", coupled with {', '.join(p for p in space.producers[1:])}" if len(space.producers) > 1 else ""
            units = modules[space.producers[0]].weight.shape[0]
            for producer in space.producers:
                report.changed.append((producer, f"kept {len(kept)} of {units} units ({self.criterion}{coupled})"
                                       if producer == space.producers[0] else f"kept {len(kept)} of {units} units "
                                       f"(coupled with {space.producers[0]})"))
                report.kept[producer] = kept.tolist()
            report.changed += [(name, f"depthwise: follows {space.producers[0]}") for name in space.depthwise]
        with preserved(model):  # all plans made first: a failure above leaves the model untouched
            _rebuild(model, plans)
            if example is not None:
                try:
                    with torch.no_grad(), eval_mode(model):
                        shrunk = fx.symbolic_trace(model)
                        ShapeProp(shrunk).propagate(example)
                except Exception as exc:  # noqa: BLE001 - restored by preserved(), then one line
                    raise NetshrinkError(f"structured pruning would break the model ({type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0]}); it was left as it was") from None
                report.macs_after = _macs(shrunk, dict(shrunk.named_modules()))
        return report

    def _groups(self, model: nn.Module, calibration):
        """The traced graph's channel spaces that hold a selected layer, each with its selected
        producers and the reason it cannot be pruned (None: it can); with what was traced."""
        layers, unmatched = self._select(model)
        if any(hasattr(m, "parametrizations") for m in layers.values()):
            raise NetshrinkError("remove units before other compression (the model has weight transforms): "
                                 "start from the dense model, or netshrink.bake it first")
        example, traced, modules, spaces = channel_spaces(model, calibration)
        return (unmatched, example, traced, modules, selected_spaces(spaces, layers))

    def _choose(self, space: _Space, modules: dict[str, nn.Module]) -> torch.Tensor:
        """Indices of the channels to keep, ascending: the highest-scoring, scores summed over
        every producer of the space."""
        score = 0
        for producer in space.producers:
            flat = modules[producer].weight.detach().reshape(modules[producer].weight.shape[0], -1)
            score = score + (flat.pow(2).sum(1).sqrt() if self.criterion == "l2" else flat.abs().sum(1))
        if self.criterion == "l1-bn" and space.norms:
            score = score * modules[space.norms[0]].weight.detach().abs()
        units = len(score)
        count = float(per_layer(self.keep, space.producers[0], "keep")) * units
        step = int(self.multiple_of)
        count = min(units, max(step, step * int(round(count / step)))) if step > 1 else max(1, int(round(count)))
        return torch.sort(torch.topk(score, count).indices).values


def channel_spaces(model: nn.Module, calibration) -> tuple[torch.Tensor | None, fx.GraphModule, dict, list[_Space]]:
    """Trace ``model`` (shapes from one batch of ``calibration``, in eval mode) and read its
    channel spaces (see the module docstring): ``(example, traced, modules, spaces)``, one space
    per group of Linear/Conv layers whose output units go together. Weight transforms may be on:
    layers are leaves of the trace."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on untraceable Python control flow
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise NetshrinkError(f"structured pruning needs a model torch.fx can trace ({type(exc).__name__}: "
                             f"{first}); for Hugging Face transformers use netshrink.remove_heads") from None
    example = _example(calibration)
    if example is not None:
        try:  # in eval mode: a training-mode BatchNorm would fold the example into its running statistics
            with torch.no_grad(), eval_mode(model):
                ShapeProp(traced).propagate(example)
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
            raise NetshrinkError(f"the model does not run on the example input: {str(exc).splitlines()[0]}") from None
    modules = dict(traced.named_modules())
    spaces = _Spaces()
    layer_space = _analyse(traced, modules, spaces)
    return example, traced, modules, [spaces.info[root] for root in sorted({spaces.find(s) for s in layer_space.values()})]


def selected_spaces(spaces: list[_Space], layers: dict[str, nn.Module]) -> list[tuple[_Space, list[str], str | None]]:
    """The spaces holding a selected layer, each with its selected producers and why its units
    cannot be removed (None: they can)."""
    groups = []
    for space in spaces:
        selected = [p for p in space.producers if p in layers]
        if not selected:
            continue
        reason = space.fixed or (None if space.consumers else "nothing consumes its output")
        outside = [p for p in space.producers if p not in layers]
        if reason is None and outside:
            reason = f"it is coupled with {', '.join(outside)}, which is not selected"
        groups.append((space, selected, reason))
    return groups


def _example(calibration) -> torch.Tensor | None:
    if calibration is None:
        return None
    if torch.is_tensor(calibration):
        return calibration
    from ...training.batches import batches

    inputs = next(iter(batches(calibration, 2)))[0]
    if not torch.is_tensor(inputs):
        raise NetshrinkError("structured pruning of a traced graph takes one input tensor as its example")
    return inputs


def remove_units(model: nn.Module, keep: float | Mapping[str, float] = 0.5, *, criterion: str = "l1",
                 multiple_of: int = 1, example_input: torch.Tensor | None = None, targets: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = ()) -> tuple[nn.Module, StructuredReport]:
    """A smaller copy of ``model`` (``model`` is unchanged); see :class:`RemoveUnits`.

    >>> from netshrink.zoo.models import build_model
    >>> small, report = remove_units(build_model("lenet-300-100"), keep=0.5)
    >>> small.fc1.weight.shape, small.fc2.weight.shape, small.fc3.weight.shape
    (torch.Size([150, 784]), torch.Size([50, 150]), torch.Size([10, 50]))
    """
    method = RemoveUnits(keep=keep, criterion=criterion, multiple_of=multiple_of, targets=targets, ignore=ignore)
    method.check()
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    if example_input is not None and not torch.is_tensor(example_input):
        raise NetshrinkError(f"example_input must be a tensor (one batch of inputs). Received: {type(example_input).__name__}")
    result = copy.deepcopy(model)
    return result, method.run(result, calibration=example_input)


def unit_groups(model: nn.Module, example_input: torch.Tensor | None = None, *, targets: tuple[str, ...] = (),
                ignore: tuple[str, ...] = ()) -> dict[str, dict]:
    """The groups of output units :class:`RemoveUnits` can remove from ``model``, keyed by each
    group's first layer (the key a per-layer ``keep`` map is read with): ``{"layers": the layers
    whose outputs shrink together, "units": how many units they have}``. Groups that cannot be
    pruned (the model's output, a concatenation, ...) are left out. ``model`` is not changed.

    >>> from netshrink.zoo.models import build_model
    >>> unit_groups(build_model("lenet-300-100"))
    {'fc1': {'layers': ['fc1'], 'units': 300}, 'fc2': {'layers': ['fc2'], 'units': 100}}
    """
    method = RemoveUnits(targets=targets, ignore=ignore)
    method.check()
    *_, modules, groups = method._groups(model, example_input)
    return {space.producers[0]: {"layers": list(space.producers), "units": int(modules[space.producers[0]].weight.shape[0])}
            for space, _, reason in groups if reason is None}


def _rebuild(result: nn.Module, plans: list[tuple[_Space, torch.Tensor]]) -> None:
    with torch.no_grad():
        for space, keep in plans:
            for producer in space.producers:
                shrink_layer(result.get_submodule(producer), 0, keep)
            for name in space.depthwise:
                shrink_layer(result.get_submodule(name), 0, keep)  # sync_sizes sets groups to the new width
            for norm_name in space.norms:
                norm = result.get_submodule(norm_name)
                for name in ("weight", "bias"):
                    if getattr(norm, name) is not None:
                        setattr(norm, name, nn.Parameter(getattr(norm, name)[keep].clone()))
                for name in ("running_mean", "running_var"):
                    if getattr(norm, name) is not None:
                        setattr(norm, name, getattr(norm, name)[keep].clone())
                sync_sizes(norm)
            for consumer_name, per_unit in space.consumers:
                columns = (keep[:, None] * per_unit + torch.arange(per_unit)).flatten()
                shrink_layer(result.get_submodule(consumer_name), 1, columns)
