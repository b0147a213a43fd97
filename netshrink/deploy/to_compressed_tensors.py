"""A Hugging Face checkpoint in the compressed-tensors format, which ``transformers`` and vLLM read.

The folder holds ``config.json`` (the model's own, plus a ``quantization_config``) and
``model.safetensors``. Every Linear layer on a symmetric integer grid is stored "pack-quantized":
its codes densely packed into int32 (``weight_packed``, any width from 2 to 8 bits), its scales
(``weight_scale``, one per output channel or per group) and its shape. compressed-tensors counts
codes in the signed range [-2^(b-1), 2^(b-1)), which holds netshrink's symmetric codes as they
are. Affine grids stay float (the report says so): transformers 5.25 cannot load packed zero
points. Layers are grouped by grid (bits, group size) and named exactly, so a mixed-precision
model keeps each layer's width. The packing is compressed-tensors' own.

Layers with 2:4 sparsity (two zeros in every four consecutive inputs, as ``NMSparsity(2, 4)`` and
``SparseGPT(n=2, m=4)`` leave them) are listed in a ``sparsity_config`` with that structure, for
runtimes with 2:4 kernels; their values are stored as above ("dense" format: compressed-tensors
0.20 no longer has a compressor for the 2:4 bitmask).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import NetshrinkError
from ..files import check_writable
from ..compress.methods.base import baked_state_dict
from . import hugging_face_model
from .codes import IntegerWeight, integer_weight
from .report import ExportReport


def is_two_four(weight: torch.Tensor) -> bool:
    """At least two zeros in every four consecutive inputs of every row."""
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % 4:
        return False
    return bool(((rows.reshape(rows.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def _scheme(weight: IntegerWeight) -> dict:
    return {"num_bits": weight.bits, "type": "int", "symmetric": weight.scheme == "symmetric",
            "strategy": "group" if weight.group_size else "channel", "group_size": weight.group_size,
            "dynamic": False, "observer": "minmax"}


def _packed(weight: IntegerWeight) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    tensors = {"weight_packed": pack_to_int32(weight.codes.to(torch.int8), weight.bits),  # symmetric: signed codes
               "weight_scale": weight.scale.clone(),
               "weight_shape": torch.tensor(weight.shape)}
    return tensors


def export(model: nn.Module, path: str | Path, **_ignored) -> ExportReport:
    """Write the Hugging Face model inside ``model`` to the folder ``path`` as a compressed-tensors
    checkpoint (``transformers.AutoModel.from_pretrained(path)`` loads it, with
    ``pip install compressed-tensors``). Layers off any integer grid stay float. Returns a table of
    how each Linear layer was written."""
    try:
        import compressed_tensors  # noqa: F401  (its packing, and what the reader will need)
    except ImportError:
        raise NetshrinkError("compressed-tensors export needs the package: pip install compressed-tensors") from None
    from safetensors.torch import save_file

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NetshrinkError(f"a compressed-tensors checkpoint is a folder; {folder} is a file")
    check_writable(folder / "config.json")
    hf = hugging_face_model(model)
    tensors = baked_state_dict(hf)
    report = ExportReport(str(folder), target="compressed-tensors (pack-quantized)")
    groups: dict[str, dict] = {}
    two_four, zeros, total = [], 0, 0
    for name, module in hf.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if is_two_four(tensors[f"{name}.weight"]):
            two_four.append(name)
            zeros, total = zeros + int((tensors[f"{name}.weight"] == 0).sum()), total + tensors[f"{name}.weight"].numel()
        weight = integer_weight(module)
        if weight is None:
            report.layers.append((name, "float"))
            continue
        if weight.scheme != "symmetric":
            # compressed-tensors packs zero points along the output channels, and transformers
            # 5.25 allocates them unpacked when it loads the folder: the checkpoint would not load.
            report.layers.append((name, f"float: its {weight.bits}-bit affine grid needs zero points, which "
                                        "transformers cannot load from a pack-quantized checkpoint"))
            continue
        scheme = _scheme(weight)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None,
                                "output_activations": None})["targets"].append(name)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v for k, v in _packed(weight).items()})
        report.layers.append((name, f"pack-quantized {weight.bits}-bit, {weight.scheme}, {weight.layout}"))
    if not groups and not two_four:
        report.notes.append("no Linear layer is on an integer grid or 2:4 sparse: written as a plain float checkpoint")
    config = hf.config.to_dict()
    if groups or two_four:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized" if groups else "dense",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())}, "ignore": [],
            "kv_cache_scheme": None}
    if two_four:
        config["quantization_config"]["sparsity_config"] = {
            "format": "dense", "sparsity_structure": "2:4", "targets": two_four, "ignore": [],
            "global_sparsity": zeros / total}
        report.layers = [(n, f"{how}, 2:4 sparse" if n in two_four else how) for n, how in report.layers]
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # safetensors refuses shared memory
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".netshrink-") as work:
        save_file(tensors, os.path.join(work, "model.safetensors"), metadata={"format": "pt"})
        Path(work, "config.json").write_text(json.dumps(config, indent=2, default=str))
        os.replace(os.path.join(work, "model.safetensors"), folder / "model.safetensors")
        os.replace(os.path.join(work, "config.json"), folder / "config.json")  # last: the folder is complete
    return report
