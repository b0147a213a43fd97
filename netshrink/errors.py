"""The one exception type users need to catch, the checks that raise it, and ``preserved``, which
puts a model back as it was when anything fails.

Every call checks its settings before it changes anything; these are the checks many of them
share. Importing this module does not import PyTorch (the command line's ``--help`` uses it).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class NetshrinkError(ValueError):
    """Invalid settings, data or files. The message is one line and names the offending value."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """An exception's message as one line (its type's name when the message is empty, as a
    MemoryError's often is), cut at ``limit`` characters (None: whole)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def check_number(what: str, value: Any, *, positive: bool = False, integer: bool = False) -> None:
    """Raise unless ``value`` is a finite number (an integer with ``integer``), > 0 with ``positive``, else >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and (value > 0 if positive else value >= 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise NetshrinkError(f"{what} must be {kind} {'> 0' if positive else '>= 0'}. Received: {what}={value!r}")


def check_flag(what: str, value: Any) -> None:
    """Raise unless ``value`` is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise NetshrinkError(f"{what} must be True or False. Received: {what}={value!r}")


@contextlib.contextmanager
def preserved(model: nn.Module, *, values: bool = False) -> Iterator[None]:
    """On any exception inside the block (Ctrl-C included), put ``model`` back as it was: every
    module's class, parameters, buffers, submodules, hooks and attributes, and with ``values=True``
    the contents of its tensors too (for work that trains in place). Methods attach transforms and
    replace tensors rather than writing into them, so the structure alone restores them, without
    copying any weight."""
    saved = _structure(model)
    live = model.state_dict(keep_vars=True) if values else {}
    tensors = {k: v.detach().clone() for k, v in live.items()}
    try:
        yield
    except BaseException:
        _put_back(saved)
        for key, tensor in tensors.items():
            live[key].data.copy_(tensor)  # .data: outside autograd
        raise


@contextlib.contextmanager
def trial(model: nn.Module) -> Iterator[None]:
    """Put ``model``'s structure back as it was when the block ends, however it ends: for trying a
    change that replaces layers' tensors (not writes into them) and measuring it."""
    saved = _structure(model)
    try:
        yield
    finally:
        _put_back(saved)


def _structure(model: nn.Module) -> list:
    return [(module, module.__class__, {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
            for module in model.modules()]


def _put_back(saved: list) -> None:
    for module, cls, state in saved:
        module.__class__ = cls
        module.__dict__.clear()
        module.__dict__.update(state)
