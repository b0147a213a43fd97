"""What a search found: each layer's (or group's) choice and the result of the whole search, with
its policy as a recipe, and how every search's trials fine-tune. The size search (``autotune``) and the latency search (``latency``) both
return an :class:`AutoResult`; it lives here, below both, so neither borrows from the other."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import yaml
from torch import nn


@dataclass(frozen=True)
class Choice:
    """One layer's setting and what it is predicted to cost."""

    keep: float
    bits: int | None
    bytes: int  # the layer weight's coded bytes
    damage: float  # validation loss increase with only this layer compressed
    ranking: str = "magnitude"  # which weights the keep fraction keeps
    # The grid the layer's bias ends on (None: not chosen here). The solver sees each weight choice
    # once per bias grid, bytes and damages added: rounding a bias after the last fine-tuning and
    # compressing the weight are measured apart and add up.
    bias_bits: int | None = None

    def describe(self) -> str:
        parts = [] if self.keep >= 1 else [f"keep {self.keep:g}"]
        parts += [] if self.bits is None else [f"{self.bits}-bit shared"]
        parts += [] if self.bias_bits is None else [f"{self.bias_bits}-bit bias"]
        return ", ".join(parts) or "dense"


@dataclass
class AutoResult:
    """What :func:`auto` found. ``model`` is the compressed model (the input is left as it was)."""

    model: nn.Module
    policy: dict[str, Choice]
    steps: list[dict]  # the policy as recipe steps (``yaml()`` writes them)
    budget: dict
    met: bool
    file_bytes: int
    dense_bytes: int
    dense_accuracy: float | None
    accuracy: float | None  # validation accuracy of ``model``
    trials: list[dict] = field(default_factory=list)
    # per layer (bytes, accuracy budgets: Choice) or per group of units (latency: latency.UnitChoice)
    sensitivity: dict[str, list] = field(default_factory=dict)
    latency: float | None = None  # seconds per batch on ONNX Runtime (latency budgets), measured
    dense_latency: float | None = None  # the dense model's, in the same measurement

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.file_bytes

    def save(self, path) -> int:
        """Write the compressed model with its recipe: the very bytes whose size was verified."""
        from ..store.artifact import save

        return save(self.model, path, recipe=self.steps)

    def yaml(self) -> str:
        """The policy as a recipe file (``netshrink compress MODEL --recipe FILE`` reruns it)."""
        header = "".join(f"# {line}\n" for line in self._header())
        return header + yaml.safe_dump({"name": "auto", "steps": self.steps}, sort_keys=False)

    def _header(self) -> list[str]:
        budget = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        lines = [f"Found by netshrink auto ({budget}): {self.file_bytes:,} B file, {self.ratio:.1f}x smaller than "
                 f"dense fp32"]
        if self.latency is not None and self.dense_latency is not None:
            lines.append(f"ONNX Runtime latency {1e3 * self.latency:.3f} ms per batch (dense {1e3 * self.dense_latency:.3f} ms)")
        if self.accuracy is not None and self.dense_accuracy is not None:
            lines.append(f"validation accuracy {100 * self.accuracy:.2f}% (dense {100 * self.dense_accuracy:.2f}%)")
        return lines

    def to_json(self) -> dict:
        """Everything the search saw (for reports), JSON-able."""
        return {"budget": self.budget, "met": self.met, "file_bytes": self.file_bytes, "dense_bytes": self.dense_bytes,
                "dense_accuracy": self.dense_accuracy, "accuracy": self.accuracy, "trials": self.trials,
                "latency": self.latency, "dense_latency": self.dense_latency,
                "policy": {n: asdict(c) for n, c in self.policy.items()},
                "sensitivity": {n: [asdict(c) for c in choices] for n, choices in self.sensitivity.items()}}


def trial_tuning(labeled: bool, augment: int) -> dict:
    """How every search's trials fine-tune: distilled from the dense model (class scores by KL,
    other outputs by mean squared error), with the augmentation asked for."""
    return {"distill": True if labeled else {"objective": "mse"}, **({"augment": augment} if augment else {})}
