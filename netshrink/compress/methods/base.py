"""What every compression method shares: layer selection, per-layer settings, validation, reports.

A method is an inert, frozen config dataclass (what to do); :func:`apply` does it to a model.
Settings are checked, layers selected and every new transform computed before the model is
touched, so a rejected call leaves the model exactly as it was.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...errors import NetshrinkError, preserved
from .conv1d import as_linear, is_conv1d

LINEAR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers that compute on float activations
COMPRESSIBLE = (*LINEAR_CONV, nn.Embedding, nn.EmbeddingBag)  # layers whose weights the methods compress


def _kind_names(kinds: tuple) -> str:
    return "/".join(sorted({k.__name__.rstrip("123d").replace("Bag", "") for k in kinds}))


def weight_source(layer: nn.Module) -> torch.Tensor:
    """The parameter a layer's weight is computed from (under its transforms): layers that share
    it are tied (an embedding and an output layer, say) and are compressed as one."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def distinct_weights(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``layers`` with a weight tied to several of them kept once, under its first name."""
    owners: dict[int, str] = {}
    return {n: m for n, m in layers.items() if owners.setdefault(id(weight_source(m)), n) == n}


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def check_patterns(what: str, patterns: Any) -> tuple[str, ...]:
    """``targets``/``ignore`` must be a list or tuple of layer names / ``re:`` patterns. A bare
    string is refused: iterating it would select layers by single characters."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, (list, tuple)):
        hint = f" (did you mean [{patterns!r}]?)" if isinstance(patterns, str) else ""
        raise NetshrinkError(f"{what} must be a list or tuple of layer names{hint}. Received: {what}={patterns!r}")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise NetshrinkError(f"{what} entries must be non-empty strings. Received: {what}={list(patterns)!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise NetshrinkError(f"{what} pattern {pattern!r} is not a valid regular expression ({exc})") from None
    return tuple(patterns)


def select_layers(model: nn.Module, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                  kinds: tuple = COMPRESSIBLE) -> dict[str, nn.Module]:
    """The layers of ``model`` of the given ``kinds`` named by ``targets`` (all of them when empty),
    minus ``ignore``. Names are ``model.named_modules()`` names; ``re:`` prefixes a regular expression."""
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    targets, ignore = check_patterns("targets", targets), check_patterns("ignore", ignore)
    # transformers' Conv1D is a Linear layer to the user (its name is a valid target); every method
    # works on it once as_linear has made it one
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kinds) or nn.Linear in kinds and is_conv1d(m)}
    what = _kind_names(kinds)
    for pattern in (*targets, *ignore):
        if not any(_matches(name, pattern) for name in layers):
            listed = ", ".join(list(layers)[:20]) + (" ..." if len(layers) > 20 else "")
            raise NetshrinkError(f"{'target' if pattern in targets else 'ignore'} {pattern!r} matches no {what} "
                                 f"layer; layers are: {listed or 'none'}")
    chosen = {n: m for n, m in layers.items()
              if (not targets or any(_matches(n, p) for p in targets))
              and not any(_matches(n, p) for p in ignore)}
    if not chosen:
        raise NetshrinkError(f"nothing to compress: {type(model).__name__} has no selected {what} layer "
                             f"(targets={list(targets)}, ignore={list(ignore)})")
    return chosen


def per_layer(value: Any, name: str, what: str) -> Any:
    """Resolve a setting that is one value or a ``{layer name | 're:pattern' | '*': value}`` map."""
    if not isinstance(value, Mapping):
        return value
    for pattern, v in value.items():
        if pattern != "*" and _matches(name, pattern):
            return v
    if "*" in value:
        return value["*"]
    raise NetshrinkError(f"{what} has no entry for layer {name!r} (add it or a '*' default). "
                         f"Received: {what}={dict(value)}")


def check_map_keys(what: str, value: Any, layers: dict[str, nn.Module]) -> list[str]:
    """Check a per-layer map's keys against the selected layers; returns the ``re:`` keys that
    matched none. A literal layer name must name a selected layer (a typo would otherwise leave
    the layer at the default without a word). A ``re:`` pattern beside a ``'*'`` default may match
    nothing: it refines the default, as generic recipes do (``{"re:conv.*": 0.5, "*": 0.1}`` on a
    model without convolutions); the method's report names it."""
    if not isinstance(value, Mapping):
        return []
    unmatched = []
    for pattern in value:
        if not isinstance(pattern, str):
            raise NetshrinkError(f"{what} keys must be layer names. Received: {what}={dict(value)!r}")
        if pattern == "*":
            continue
        check_patterns(what, [pattern])
        if not any(_matches(name, pattern) for name in layers):
            if not (pattern.startswith("re:") and "*" in value):
                raise NetshrinkError(f"{what} key {pattern!r} matches no selected layer; layers are: {', '.join(layers)}")
            unmatched.append(f"{what}[{pattern!r}]")
    return unmatched


def each_value(value: Any) -> list:
    return list(value.values()) if isinstance(value, Mapping) else [value]


def check_range(what: str, value: Any, low: float, high: float, *, low_open: bool = False,
                integer: bool = False) -> None:
    """Raise unless every value of a (possibly per-layer) setting lies in its range."""
    if isinstance(value, Mapping) and not value:
        raise NetshrinkError(f"{what} is an empty map. Received: {what}={{}}")
    for v in each_value(value):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (not integer or float(v).is_integer()) and (low < v if low_open else low <= v) and v <= high
        if not ok:
            bracket = "(" if low_open else "["
            kind = "an integer" if integer else "a number"
            raise NetshrinkError(f"{what} must be {kind} in {bracket}{low}, {high}]. Received: {what}={v!r}")


def tied_weights(model: nn.Module) -> set[int]:
    """Ids of the weights (``weight_source``) that more than one layer of ``model`` computes with."""
    seen: set[int] = set()
    tied: set[int] = set()
    for module in model.modules():
        if isinstance(module, COMPRESSIBLE):
            source = id(weight_source(module))
            (tied if source in seen else seen).add(source)
    return tied


def check_choice(what: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise NetshrinkError(f"{what} must be one of {', '.join(map(str, choices))}. Received: {what}={value!r}")


@dataclass
class Report:
    """What a call changed and what it skipped, one row per layer."""

    method: str
    changed: list[tuple[str, str]] = field(default_factory=list)  # (layer, detail)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)
    notes: list[str] = field(default_factory=list)  # what else the call did to the model

    def __str__(self) -> str:
        rows = [(layer, "changed", detail) for layer, detail in self.changed]
        rows += [(layer, "skipped", reason) for layer, reason in self.skipped]
        lines = [f"{self.method}: {len(self.changed)} layer(s) changed, {len(self.skipped)} skipped"]
        lines += text_table(("layer", "", "what"), rows) if rows else []
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __repr__ = __str__  # what a notebook or a REPL shows: the table, not the fields


class Reports(list):
    """The reports of a call that applied several methods, shown one table after another."""

    def __str__(self) -> str:
        return "\n\n".join(str(report) for report in self)

    __repr__ = __str__


def text_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], width: int = 110) -> list[str]:
    """Rows as aligned plain-text lines under ``headers``; the last column wraps at ``width``."""
    import textwrap

    sizes = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    room = max(30, width - sum(sizes) - 2 * len(sizes))
    lines = []
    for row in [headers, *rows]:
        lead = "  ".join(str(cell).ljust(size) for cell, size in zip(row, sizes))
        wrapped = textwrap.wrap(str(row[-1]), room) or [""]
        lines += [f"  {lead}  {wrapped[0]}".rstrip()] + [f"  {' ' * len(lead)}  {rest}" for rest in wrapped[1:]]
    return lines


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base of every method config. ``targets``/``ignore`` choose layers by name or ``re:`` pattern."""

    name: ClassVar[str] = "method"
    layer_kinds: ClassVar[tuple] = COMPRESSIBLE
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what in ("targets", "ignore"):  # lists (from YAML) become tuples; anything else is checked
            if isinstance(getattr(self, what), list):
                object.__setattr__(self, what, tuple(getattr(self, what)))

    def check(self) -> None:
        """Raise :class:`NetshrinkError` for invalid settings. Must not touch any model.
        Subclasses call ``super().check()``."""
        check_patterns("targets", self.targets)
        check_patterns("ignore", self.ignore)

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers this method works on, with every per-layer map checked against them."""
        return self._select(model)[0]

    def _select(self, model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
        layers = select_layers(model, self.targets, self.ignore, self.layer_kinds)
        unmatched = [key for f in fields(self) for key in check_map_keys(f.name, getattr(self, f.name), layers)]
        return layers, unmatched

    def new_report(self, unmatched: list[str]) -> "Report":
        report = Report(self.name)
        report.skipped += [(key, "pattern matched no layer; the '*' default applied") for key in unmatched]
        return report

    def needs_schedule(self) -> bool:
        """Whether this method is learned while fine-tuning (a recipe step's ``gradual`` schedule)."""
        return False

    def schedule(self, model: nn.Module, *, every: int = 50):
        """A context manager giving ``(on_step, penalty)`` for ``fit`` while the method is learned
        during fine-tuning, applying it as the block ends (pruning tightens a mask every ``every``
        steps; rate-aware training prices the weights' code)."""
        raise NetshrinkError(f"'gradual' schedules apply to prune and rate steps, not {self.name}")

    def prepare(self, layers: dict[str, nn.Module], **context: Any) -> list[tuple[str, nn.Module, str]]:
        """Compute one transform per layer: ``(layer name, parametrization, detail)``."""
        raise NotImplementedError

    def run(self, model: nn.Module, **context: Any) -> "Report":
        """Apply to ``model``. The default stacks one transform per selected layer; a method that
        reshapes the model (structured pruning) overrides this."""
        layers, unmatched = self._select(model)
        # Tied layers share one weight: compute its transform once, on the first of them, and give
        # every other the same transform, so all keep computing with one (compressed) weight.
        primary = distinct_weights(layers)
        owner_of = {id(weight_source(m)): n for n, m in primary.items()}
        tied = {n: owner_of[id(weight_source(m))] for n, m in layers.items() if n not in primary}
        planned = self.prepare(primary, model=model, **context)  # everything computed before any change
        report = self.new_report(unmatched)
        for layer_name, transform, detail in planned:
            self.commit(layers[layer_name], transform)
            report.changed.append((layer_name, detail))
            for other, owner in tied.items():
                if owner == layer_name:
                    self.commit(layers[other], transform)
                    report.changed.append((other, f"tied to {owner}: shares its weight and transform"))
        done = {name for name, _ in report.changed}
        report.skipped += [(n, "left as it is by this method") for n in layers if n not in done]
        return report

    def commit(self, layer: nn.Module, transform: nn.Module) -> None:
        """Attach a prepared transform; weight methods stack a parametrization."""
        add_transform(layer, transform)

    def to_dict(self) -> dict:
        """JSON-able ``{method name: settings}``, the form recipes and files store."""
        data = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                data[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
        return {self.name: data}


def apply(model: nn.Module, method: Method, **context: Any) -> Report:
    """Apply one method to ``model`` in place and report what changed.

    >>> from netshrink.zoo.models import build_model
    >>> from netshrink.compress.methods.prune import Prune
    >>> print(apply(build_model("mlp"), Prune(keep=0.5)).changed[0])
    ('fc1', 'kept 50176 of 100352 weights (50.0%)')
    """
    return apply_all(model, [method], **context)[0]


def apply_all(model: nn.Module, methods: list[Method], **context: Any) -> Reports:
    """Apply several methods in order, as one change: every setting and every layer selection is
    checked first, and if any step fails the model is restored exactly as it was. transformers'
    ``Conv1D`` layers (GPT-2) are compressed as the Linear layers they are (:mod:`.conv1d`)."""
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
    for method in methods:
        if not isinstance(method, Method):
            raise NetshrinkError(f"expected a method config such as Prune(keep=0.1). Received: {method!r}")
        method.check()
    with preserved(model):  # selections are checked on the Linear form; a refusal puts Conv1D back
        converted = as_linear(model)
        for method in methods:
            method.select(model)
        reports = [method.run(model, **context) for method in methods]
    if converted and reports:
        reports[0].notes.append(f"{len(converted)} transformers Conv1D layers ({converted[0]}, ...) are now "
                                "nn.Linear layers with the weight transposed: the same outputs, compressible")
    return Reports(reports)


def replace_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Give ``layer`` a new weight (under its transforms, if any) as a new Parameter: the old one is
    not written into, so ``preserved`` can put it back if a later step fails."""
    source = weight_source(layer)
    new = nn.Parameter(value.detach().reshape(source.shape).to(source.dtype).clone())
    if parametrize.is_parametrized(layer, "weight"):
        layer.parametrizations.weight.original = new
    else:
        layer.weight = new


def add_transform(layer: nn.Module, transform: nn.Module) -> None:
    """Stack ``transform`` on the layer's weight; one already there of the same kind is replaced
    in place (so re-pruning tightens a mask instead of stacking a second one)."""
    if parametrize.is_parametrized(layer, "weight"):
        stack = layer.parametrizations.weight
        for i, existing in enumerate(stack):
            if type(existing) is type(transform):
                stack[i] = transform
                return
    with torch.no_grad():  # registering runs the transform once, as a check: no training step
        parametrize.register_parametrization(layer, "weight", transform)


def transforms(layer: nn.Module) -> list[nn.Module]:
    return list(layer.parametrizations.weight) if parametrize.is_parametrized(layer, "weight") else []


def keep_mask(layer: nn.Module) -> torch.Tensor | None:
    """Where the layer's weight may be non-zero, if a mask (pruning) restricts it."""
    masks = [t.mask for t in transforms(layer) if hasattr(t, "mask")]
    if not masks:
        return None
    keep = masks[0] != 0
    for mask in masks[1:]:
        keep &= mask != 0
    return keep


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight as the layer uses it (all transforms applied), detached."""
    with torch.no_grad():
        return layer.weight.detach()


def bake(model: nn.Module) -> nn.Module:
    """Remove every weight transform, leaving the transformed weights as plain parameters.

    Activation quantizers stay: they are part of how the model computes.
    """
    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"model must be a torch.nn.Module. Received: {type(model).__name__}")
    return remove_transforms(model, keep_values=True)


def remove_transforms(model: nn.Module, *, keep_values: bool) -> nn.Module:
    """Remove every weight transform: leaving the transformed weights (``keep_values=True``, what
    :func:`bake` does) or the untransformed originals."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            # A deep copy of a parametrized module shares its generated class, and removing a
            # parametrization deletes the property from that class, which would break every copy
            # (and any snapshot that restores the class). Give this module a private class first.
            cls = module.__class__
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=keep_values)
    return model


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``bake(model)`` would have, computed without changing ``model``."""
    return dict(baked_items(model))


def baked_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`baked_state_dict` one entry at a time: a transformed weight is computed when its turn
    comes, so a caller that handles each and lets it go holds one at a time."""
    for key, value in model.state_dict().items():
        name = baked_name(key)
        if name == key:
            yield key, value
            continue
        owner_name, _, tensor_name = name.rpartition(".")
        if key != ".".join(filter(None, (owner_name, "parametrizations", tensor_name, "original"))):
            continue  # a transform's own tensor (a mask, a grid's scales)
        owner = model.get_submodule(owner_name) if owner_name else model
        with torch.no_grad():
            value = getattr(owner, tensor_name).detach()
        yield name, value
        del value  # let go before the next is computed


def baked_name(key: str) -> str:
    """The plain name of a state-dict entry: ``fc1.parametrizations.weight.original`` is ``fc1.weight``
    (the name :func:`baked_items` gives the transformed tensor)."""
    if ".parametrizations." not in f".{key}":
        return key
    prefix, rest = f".{key}".split(".parametrizations.", 1)
    return f"{prefix}.{rest.split('.', 1)[0]}"[1:]


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one filter per input channel (groups == in == out channels)."""
    groups = getattr(module, "groups", 1)
    return isinstance(module, LINEAR_CONV) and groups > 1 and groups == module.in_channels == module.out_channels


def sync_sizes(module: nn.Module) -> None:
    """Make a Linear/Conv/BatchNorm module's size attributes match its tensors again, after a
    weight or statistic changed shape (structured pruning, loading a shrunk model)."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, LINEAR_CONV):
        if is_depthwise(module) and module.weight.shape[1] == 1:  # its channels follow its input's
            module.groups = module.weight.shape[0]
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]


def shrink_layer(layer: nn.Module, dim: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``dim`` of a Linear/Conv layer's weight (0: output units, with the bias;
    1: inputs) and update its size attributes: how structured pruning removes units."""
    layer.weight = nn.Parameter(layer.weight.detach().index_select(dim, index).clone())
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[index].clone())
    sync_sizes(layer)


def channel_view(w: torch.Tensor) -> torch.Tensor:
    """[out_channels, everything else]: the groups that per-channel methods work on."""
    return w.reshape(w.shape[0], -1)
