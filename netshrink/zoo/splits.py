"""Which examples of a zoo data set a model never saw.

``netshrink train`` holds out a share of the training split (10% by default) and its file records
which (``{"share", "seed"}`` beside the data set's name). ``compress`` keeps that part unseen, and
``auto`` checks its budget there: a budget checked on examples the model was trained on says
nothing about examples it was not.
"""
from __future__ import annotations

from torch import nn

from ..errors import NetshrinkError
from ..training.batches import Data, hold_out
from . import HELD_OUT


def recorded(model: nn.Module) -> dict:
    """What a loaded model's file says of how it was made (``save(info=...)``)."""
    return (getattr(model, "netshrink_manifest", None) or {}).get("info") or {}


def recorded_hold_out(model: nn.Module, data: str, path: str = "the model's file") -> dict | None:
    """The part of data set ``data``'s training split the model's file says it never trained on
    (``{"share", "seed"}``, as ``netshrink train`` holds it out), or None."""
    info = recorded(model)
    held = info.get("held_out") if info.get("data") == data else None
    if held is None:
        return None
    if not (isinstance(held, dict) and isinstance(held.get("share"), float) and 0 < held["share"] < 1
            and type(held.get("seed")) is int):
        raise NetshrinkError(f"{path} records a held-out part it cannot be: {str(held)[:80]}")
    return held


def validation_split(model: nn.Module, data: str, train: Data, test: Data, validation: float | str | None = None,
                     seed: int = 0, path: str = "the model's file") -> tuple[Data, Data, str]:
    """(training data for the trials, validation data, what the validation data are, in words).

    ``validation``: None (the part the model's file says it never saw, else a fresh 10% share), a share of
    the training split, or ``"test"`` (the test split: then the test error is no independent check). A
    model whose file says it saw the whole training split is refused unless the caller names other data.
    """
    held = recorded_hold_out(model, data, path)
    if validation == "test":
        return train, test, f"the {data} test split (--validation test: the test error is not an independent check)"
    if validation is None and held is not None:
        share, held_seed = held["share"], held["seed"]
        rest, checked = hold_out(train, share, held_seed)
        return rest, checked, (f"the {share:.0%} of the {data} training split that {path} was never "
                               f"trained on (drawn with seed {held_seed}, as its file records)")
    if recorded(model).get("data") == data:
        raise NetshrinkError(f"{path} was trained on {'all of ' if held is None else ''}the {data} training "
                             "split, as its file records: a budget checked there is checked on examples it memorised. "
                             "Train it with a held-out part (netshrink train holds out 10% by default) or pass "
                             "--validation test")
    share = validation or HELD_OUT
    rest, checked = hold_out(train, share, seed)
    return rest, checked, (f"{share:.0%} of the {data} training split; {path} does not record what it "
                           "was trained on: if it saw these examples, validation scores are optimistic")
