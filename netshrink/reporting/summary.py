"""Per-layer accounting: what each layer stores now, and real bytes of the compressed file."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.table import Table
from torch import nn

from ..errors import NetshrinkError
from ..tables import make_table, render
from ..compress.methods.activations import input_quantizer
from ..compress.methods.grid import FixedGrid, expand, last_fixed_grid
from ..compress.methods.base import COMPRESSIBLE, transforms, weight_of, weight_source
from ..compress.methods.conv1d import is_conv1d


@dataclass
class Summary:
    """Rows (one per Linear/Conv layer) and totals; ``str()`` renders a table."""

    rows: list[dict] = field(default_factory=list)
    parameters: int = 0
    nonzero_weights: int = 0
    weights: int = 0
    dense_bytes: int = 0
    file_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("nan")

    def table(self, title: str = "netshrink summary") -> Table:
        columns = ["layer", "weights", "non-zero", "distinct", "bits/w", "act bits", "transforms"]
        rows = [[r["layer"], f"{r['weights']:,}", f"{r['nonzero']:,} ({100 * r['nonzero'] / r['weights']:.1f}%)",
                 f"{r['distinct']:,}" if isinstance(r['distinct'], int) else r['distinct'], str(r["bits"]), str(r["activation_bits"] or "-"), r["transforms"]]
                for r in self.rows]
        caption = (f"{self.parameters:,} parameters, {self.nonzero_weights:,} non-zero weights; "
                   f"file {self.file_bytes:,} B vs dense fp32 {self.dense_bytes:,} B ({self.ratio:.1f}x)")
        return make_table(title, columns, rows, caption)

    def __str__(self) -> str:
        return render(self.table())



def nominal_bits(w: torch.Tensor, fixed: FixedGrid | None = None) -> int:
    """Bits one stored value needs: log2 of the codebook size when the tensor has at most 256
    distinct non-zero values, of the code range when every output channel is an integer grid
    (per-channel quantization) or when ``fixed`` (a layer's last transform) puts it on grids per
    group, else 32 (floats). Read off the values, not the settings."""
    from ..grids import distinct_within, grid

    if fixed is not None:  # the codes the file stores: scales per group are not one grid per row
        codes = torch.round(w.detach() / expand(fixed.scale, w, fixed.group_size))
        return max(1, math.ceil(math.log2(max(int(codes.max() - codes.min()) + 1, 2))))

    values = w.detach().float().cpu().numpy()
    nonzero = values[values != 0]
    distinct = distinct_within(nonzero.view(np.uint32), 256)
    candidates = [32]
    if distinct is not None:
        candidates.append(max(1, math.ceil(math.log2(max(len(distinct), 2)))))
    # Zeros lie on every grid (code 0), so the dense form serves sparse weights too (-0.0 made +0.0).
    matrix = np.where(values == 0, np.float32(0), values).reshape(len(values) if values.ndim > 1 else 1, -1)
    found = grid(np.ascontiguousarray(matrix).ravel().view(np.uint32), matrix.shape[1]) if nonzero.size else None
    if found is not None:
        levels = int(found[1].max() - found[1].min()) + 1
        if levels <= 256:
            candidates.append(max(1, math.ceil(math.log2(max(levels, 2)))))
    return min(candidates)


def _distinct_count(w: torch.Tensor, limit: int = 1 << 16) -> int | str:
    from ..grids import distinct_within

    found = distinct_within(w.detach().float().cpu().numpy().ravel().view(np.uint32), limit)
    return len(found) if found is not None else f"> {limit:,}"


def summary(model: nn.Module, file_bytes: int | None = None) -> Summary:
    """Account for ``model`` layer by layer; ``file_bytes`` is measured by serialising it.

    >>> from netshrink.zoo.models import build_model
    >>> s = summary(build_model("mlp")); s.parameters, 1.0 < s.ratio < 1.3
    (101770, True)
    """
    from ..store.artifact import to_bytes

    if not isinstance(model, nn.Module):
        raise NetshrinkError(f"model must be a torch.nn.Module. Received: {type(model).__name__}")
    if file_bytes is not None and (type(file_bytes) is not int or file_bytes < 0):
        raise NetshrinkError(f"file_bytes must be a byte count (an int >= 0) or None. Received: file_bytes={file_bytes!r}")

    result = Summary()
    result.parameters = parameter_count(model)
    sources = set()
    for name, layer in model.named_modules():
        if not (isinstance(layer, COMPRESSIBLE) or is_conv1d(layer)) or id(weight_source(layer)) in sources:
            continue  # tied layers share one weight: counted once
        sources.add(id(weight_source(layer)))
        w = weight_of(layer)
        quantizer = input_quantizer(layer)
        result.rows.append({
            "layer": name, "weights": w.numel(), "nonzero": int((w != 0).sum()),
            "distinct": _distinct_count(w),
            "bits": nominal_bits(w, last_fixed_grid(layer)), "activation_bits": quantizer.bits if quantizer is not None else None,
            "transforms": ", ".join(type(t).__name__ for t in transforms(layer)) or "-"})
    result.weights = sum(r["weights"] for r in result.rows)
    result.nonzero_weights = sum(r["nonzero"] for r in result.rows)
    result.dense_bytes = 4 * result.parameters
    result.file_bytes = file_bytes if file_bytes is not None else len(to_bytes(model))
    return result


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as it computes: a parametrized weight counts once, as the weight it
    stands for (codebook centroids and learned steps are stored state, accounted in the file)."""
    total = 0
    for name, p in model.named_parameters():
        if ".parametrizations." not in name or name.endswith(".original"):
            total += p.numel()
    return total
