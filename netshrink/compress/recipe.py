"""Recipes: an ordered list of compression steps and fine-tuning, in Python or YAML.

A step is one method (``prune``, ``nm``, ``clip``, ``quantize``, ``activations``, ``share``) with its
settings, or ``finetune``. What and when stay apart: a ``prune`` step with a ``gradual`` schedule
tightens its masks along Zhu & Gupta's polynomial during that many epochs of fine-tuning, ranking
weights by magnitude or (``ranking: variational``) by what sparse variational dropout learns;
a ``rate`` step trains the weights and their code together during its schedule::

    name: example
    steps:
      - prune: {keep: {fc1: 0.08, "*": 0.2}}
        gradual: {epochs: 4, lr: 0.001, every: 50}
      - finetune: {epochs: 2, lr: 0.0001, distill: {temperature: 4, alpha: 0.7}}
      - share: {bits: 5}

The whole recipe is parsed and checked before the model is touched. The teacher for distillation
is a frozen copy of the model as it was when the recipe started (or the ``teacher`` given to
``run``, for a recipe that continues from an earlier one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import NetshrinkError, first_line
from ..files import open_regular
from .methods import REGISTRY
from .methods.base import Method, apply
from ..errors import preserved
from .methods.prune import Prune
from ..training.batches import Data, check_data, check_model_fits, evaluate
from ..training.fit import Distill, fit, frozen_copy
from ..errors import check_number

STEP_KINDS = tuple(REGISTRY) + ("finetune",)
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 64


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases and with a bound on nesting. A recipe is a short list of
    steps: it never needs an alias, and aliases of aliases (the "billion laughs") make a few lines
    expand to billions of nodes; deep nesting would exhaust Python's stack."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: D102 - yaml's own hook
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "recipes may not use aliases (*name)",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_RECIPE_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_RECIPE_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


@dataclass(frozen=True, kw_only=True)
class Finetune:
    """Fine-tune for ``epochs`` at ``lr`` (cosine-annealed), optionally distilling from the teacher."""

    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 128
    augment: int = 0
    distill: Distill | None = None


@dataclass(frozen=True)
class Step:
    action: Method | Finetune
    schedule: Finetune | None = None  # only for gradual pruning: prune while fine-tuning
    every: int = 50  # with a schedule: steps between mask updates

    def describe(self) -> str:
        if isinstance(self.action, Finetune):
            text = f"finetune {self.action.epochs:g} epochs, lr {self.action.lr:g}"
            return text + (" + distillation" if self.action.distill else "")
        # The settings the user chose (what files store), not every default.
        settings = self.action.to_dict()[self.action.name]
        text = f"{self.action.name} " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "(default settings)")
        if self.schedule is not None:
            text += f" (gradual over {self.schedule.epochs:g} epochs)"
        return text


def _build(cls: type, settings: Any, where: str):
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise NetshrinkError(f"{where}: settings must be a mapping. Received: {settings!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(settings) - known
    if unknown:
        raise NetshrinkError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known - {'name'}))}")
    # YAML lists become tuples; anything else (a bare string, a number) is for check() to refuse
    settings = {k: tuple(v) if k in ("targets", "ignore") and isinstance(v, list) else v for k, v in settings.items()}
    try:
        obj = cls(**settings)
    except TypeError as exc:
        raise NetshrinkError(f"{where}: {exc}") from None
    if isinstance(obj, Method):
        try:
            obj.check()
        except NetshrinkError as exc:  # which step said it
            raise NetshrinkError(f"{where}: {exc}") from None
    return obj


def _finetune(settings: Any, where: str) -> Finetune:
    settings = dict(settings or {})
    distill = settings.pop("distill", None)
    if distill is True:
        distill = Distill()
    elif isinstance(distill, dict):
        distill = _build(Distill, distill, f"{where}.distill")
    elif distill not in (None, False):
        raise NetshrinkError(f"{where}: distill must be true, false or a mapping. Received: {distill!r}")
    step = _build(Finetune, settings, where)
    return _checked_finetune(Finetune(epochs=step.epochs, lr=step.lr, batch_size=step.batch_size,
                                      augment=step.augment, distill=distill or None), where)


def _checked_finetune(step: Finetune, where: str) -> Finetune:
    try:
        check_number("epochs", step.epochs, positive=True)
        check_number("lr", step.lr, positive=True)
        check_number("batch_size", step.batch_size, positive=True, integer=True)
        check_number("augment", step.augment, integer=True)
    except NetshrinkError as exc:
        raise NetshrinkError(f"{where}: {exc}") from None
    if step.distill is not None and not isinstance(step.distill, Distill):
        raise NetshrinkError(f"{where}: distill must be a netshrink.Distill. Received: {step.distill!r}")
    return step


def _check_schedule(action, schedule, where: str) -> None:
    learned = isinstance(action, Method) and type(action).schedule is not Method.schedule
    if schedule is not None and not learned:
        raise NetshrinkError(f"{where}: 'gradual' schedules apply to prune and rate steps only")
    if schedule is None and isinstance(action, Method) and action.needs_schedule():
        what = "ranking: variational" if isinstance(action, Prune) else f"{action.name}"
        raise NetshrinkError(f"{where}: {what} is learned while fine-tuning: add a 'gradual' schedule")


def parse_step(raw: Any, index: int) -> Step:
    where = f"step {index + 1}"
    if isinstance(raw, Step):
        raw = raw.action if raw.schedule is None else raw
    if isinstance(raw, Step):  # a gradual step built in Python: check both of its parts
        _check_schedule(raw.action, raw.schedule, where)
        raw.action.check()
        _checked_finetune(raw.schedule, f"{where}.gradual")
        check_number("every", raw.every, positive=True, integer=True)
        return raw
    if isinstance(raw, Method):
        raw.check()
        _check_schedule(raw, None, where)
        return Step(raw)
    if isinstance(raw, Finetune):
        return Step(_checked_finetune(raw, where))
    if not isinstance(raw, dict):
        raise NetshrinkError(f"{where}: expected a mapping like {{prune: {{keep: 0.1}}}}. Received: {raw!r}")
    raw = dict(raw)
    schedule = raw.pop("gradual", None)
    if len(raw) != 1:
        raise NetshrinkError(f"{where}: exactly one of {', '.join(STEP_KINDS)} per step. Received: {sorted(raw)}")
    (kind, settings), = raw.items()
    if kind not in STEP_KINDS:
        raise NetshrinkError(f"{where}: unknown step {kind!r}; choose one of {', '.join(STEP_KINDS)}")
    if kind == "finetune":
        action: Method | Finetune = _finetune(settings, where)
    else:
        action = _build(REGISTRY[kind], settings, f"{where} ({kind})")
    _check_schedule(action, schedule, where)
    every = 50
    if schedule is not None:
        schedule = dict(schedule)
        every = int(schedule.pop("every", 50))
        if every < 1:
            raise NetshrinkError(f"{where}: gradual.every must be >= 1. Received: every={every}")
        schedule = _finetune(schedule, f"{where}.gradual")
    return Step(action, schedule, every)


@dataclass
class Recipe:
    """An ordered list of steps. Build from Python objects, dicts, YAML text, a file or a name."""

    steps: list[Step]
    name: str = "custom"
    raw: list = field(default_factory=list)

    @classmethod
    def from_steps(cls, steps: list, name: str = "custom") -> "Recipe":
        if not isinstance(steps, list) or not steps:
            raise NetshrinkError(f"a recipe needs a non-empty list of steps. Received: {steps!r}")
        parsed = [parse_step(s, i) for i, s in enumerate(steps)]
        raw = [s if isinstance(s, dict) else _to_raw(p) for s, p in zip(steps, parsed)]
        return cls(parsed, name, raw)

    @classmethod
    def from_yaml(cls, text: str, name: str = "custom") -> "Recipe":
        try:
            data = yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader without aliases
        except yaml.YAMLError as exc:
            raise NetshrinkError(f"recipe is not valid YAML: {first_line(exc)}") from None
        except RecursionError:
            raise NetshrinkError("recipe is not valid YAML: nested too deeply") from None
        if isinstance(data, dict):
            return cls.from_steps(data.get("steps"), data.get("name", name))
        return cls.from_steps(data, name)

    @staticmethod
    def quick_steps(*, prune: float | None = None, prune_method: str = "magnitude", clip_percentile: float | None = None,
                    share_bits: int | None = None, weight_bits: int | None = None, weight_method: str = "round",
                    group_size: int | None = None, activation_bits: int | None = None, finetune: float | None = None,
                    lr: float = 1e-4, augment: int = 0, flags: bool = False) -> list[dict]:
        """The steps of a recipe made of a few common choices, in the order that works (prune, clip, share,
        quantize weights and activations, fine-tune with distillation): what ``netshrink compress --prune
        0.2 --weight-bits 4 ...`` runs. Data-aware weight methods see quantized activations first.
        ``flags``: name settings as the command line's options in errors.

        >>> Recipe.quick_steps(prune=0.2, weight_bits=4)
        [{'prune': {'keep': 0.2}}, {'quantize': {'bits': 4}}]
        """
        from .api import refined

        def named(what: str) -> str:
            return f"--{what.replace('_', '-')}" if flags else what

        steps: list[dict] = []
        if prune is not None:
            method = prune_method.partition("+")[0]
            steps.append({"prune" if method == "magnitude" else method: {"keep": prune, **refined(prune_method)}})
        elif prune_method != "magnitude":
            raise NetshrinkError(f"{named('prune_method')} needs {named('prune')}")
        if clip_percentile is not None:
            steps.append({"clip": {"percentile": clip_percentile}})
        if share_bits is not None:
            steps.append({"share": {"bits": share_bits}})
        data_aware = weight_method != "round"
        if activation_bits is not None and data_aware:
            steps.append({"activations": {"bits": activation_bits}})
        if weight_bits is not None:
            solver = weight_method.partition("+")[0]
            method = "quantize" if solver == "round" else solver
            settings = {"bits": weight_bits, **refined(weight_method)}
            if weight_method == "round+blocks":
                settings["range"] = "mse"  # AutoRound's start: grids searched for the least rounding error
            if group_size is not None:
                if weight_method == "adaround":
                    raise NetshrinkError(f"{named('group_size')} works with {named('weight_method')} round or gptq (adaround is per channel)")
                settings["group_size"] = group_size
            elif method == "gptq":
                settings["group_size"] = None  # per channel unless asked: the zoo's layers are narrow
            steps.append({method: settings})
        elif data_aware or group_size is not None:
            raise NetshrinkError(f"{named('weight_method')} and {named('group_size')} need {named('weight_bits')}")
        if activation_bits is not None and not data_aware:
            steps.append({"activations": {"bits": activation_bits}})
        if finetune is not None:
            steps.append({"finetune": {"epochs": finetune, "lr": lr, "augment": augment,
                                       "distill": True}})
        return steps

    @classmethod
    def load(cls, name_or_path: str) -> "Recipe":
        """A built-in recipe by name (see :func:`builtin_recipes`) or a YAML file."""
        if name_or_path in builtin_recipes():
            text = resources.files("netshrink.compress").joinpath(f"recipes/{name_or_path}.yaml").read_text()
            return cls.from_yaml(text, name_or_path)
        path = Path(name_or_path)
        if not path.exists():
            raise NetshrinkError(f"no recipe {name_or_path!r}: not a built-in ({', '.join(builtin_recipes())}) "
                                 "and no such file")
        with open_regular(path, "recipe") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise NetshrinkError(f"recipe {path} is over {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise NetshrinkError(f"recipe {path} is not UTF-8 text") from None
        return cls.from_yaml(text, path.stem)

    def run(self, model: nn.Module, train: Data, test: Data | None = None, *, seed: int = 0,
            progress: bool = True, on_row=None, teacher: nn.Module | None = None) -> list[dict]:
        """Run every step on ``model`` in place; returns one row per step (accuracy if ``test``).
        ``teacher``: the model distilling steps learn from (default: ``model`` as it is now), e.g.
        the dense model when this recipe continues from one that already compressed ``model``.

        Every step is checked against the model (its layer selection and per-layer maps) and the
        data are checked before the first step runs; if any step fails, or the run is interrupted,
        the model is put back as it was."""
        if not isinstance(model, nn.Module):
            raise NetshrinkError(f"expected a torch.nn.Module. Received: {type(model).__name__}")
        for i, step in enumerate(self.steps):
            if isinstance(step.action, Method):
                try:
                    step.action.select(model)
                except NetshrinkError as exc:
                    raise NetshrinkError(f"step {i + 1} ({step.action.name}): {exc}") from None
        check_data(train, "training data")
        check_model_fits(model, train)
        if test is not None:
            check_data(test, "test data")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise NetshrinkError(f"teacher must be a torch.nn.Module. Received: {type(teacher).__name__}")
        with preserved(model, values=True):
            return self._run(model, train, test, seed, progress, on_row, teacher)

    def _run(self, model, train, test, seed, progress, on_row, teacher=None) -> list[dict]:
        if any(_distills(s) for s in self.steps):
            teacher = frozen_copy(model if teacher is None else teacher)
        else:
            teacher = None
        rows = []
        for i, step in enumerate(self.steps):
            started = time.perf_counter()
            if isinstance(step.action, Finetune):
                _run_finetune(model, step.action, train, teacher, seed + i, progress, f"step {i + 1}")
            elif step.schedule is not None:
                with step.action.schedule(model, every=step.every) as (callback, penalty):
                    _run_finetune(model, step.schedule, train, teacher, seed + i, progress, f"step {i + 1}",
                                  callback, penalty)
            else:
                apply(model, step.action, calibration=train)
            row = {"step": i + 1, "what": step.describe(), "seconds": time.perf_counter() - started}
            if test is not None:
                row["accuracy"] = evaluate(model, test)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows


def _distills(step: Step) -> bool:
    return any(isinstance(s, Finetune) and s.distill for s in (step.action, step.schedule))


def _run_finetune(model, step: Finetune, train, teacher, seed, progress, desc, on_step=None, penalty=None) -> None:
    fit(model, train, epochs=step.epochs, lr=step.lr, batch_size=step.batch_size, seed=seed,
        teacher=teacher if step.distill else None, distill=step.distill, on_step=on_step, augment=step.augment,
        progress=progress, desc=desc, penalty=penalty)


def _finetune_raw(step: Finetune) -> dict:
    raw = {f.name: getattr(step, f.name) for f in fields(step) if f.name != "distill"}
    if step.distill is not None:
        raw["distill"] = {"temperature": step.distill.temperature, "alpha": step.distill.alpha}
    return raw


def _to_raw(step: Step) -> dict:
    """The dict (YAML) form of a step, complete enough to rebuild it: files store this."""
    if isinstance(step.action, Finetune):
        return {"finetune": _finetune_raw(step.action)}
    raw = step.action.to_dict()
    if step.schedule is not None:
        raw["gradual"] = {**_finetune_raw(step.schedule), "every": step.every}
    return raw


def builtin_recipes() -> list[str]:
    folder = resources.files("netshrink.compress").joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
