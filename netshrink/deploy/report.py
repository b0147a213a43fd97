"""What an export wrote: one row per layer, and notes."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..compress.methods.base import text_table


@dataclass
class ExportReport:
    path: str
    int8: bool = False
    target: str = "fp32"
    layers: list[tuple[str, str]] = field(default_factory=list)  # (layer, how it was exported)
    notes: list[str] = field(default_factory=list)
    full_range: list[str] = field(default_factory=list)  # int8 weights a CPU without VNNI saturates on

    def __str__(self) -> str:
        lines = [f"exported {self.path} ({self.target}{', int8' if self.int8 else ''}): {len(self.layers)} layer(s)"]
        lines += text_table(("layer", "how"), self.layers) if self.layers else []
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __repr__ = __str__  # what a notebook or a REPL shows: the table, not the fields
