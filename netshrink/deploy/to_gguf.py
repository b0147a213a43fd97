"""GGUF for llama.cpp: BERT-family encoders (sentence embeddings) and GPT-2 decoders.

Weights on netshrink's integer grids become llama.cpp's own blocks of 32 weights, with the codes as
they are and each block carrying its group's scale:

=====================================  ==========  =========================================
netshrink grid (groups a multiple       GGUF type   block value
of 32, or per channel)
=====================================  ==========  =========================================
symmetric, 2-4 bits                     Q4_0        d * (q - 8), q = code + 8
affine, 2-4 bits                        Q4_1        d * q + m, d = scale, m = -zero * scale
symmetric, 5-8 bits                     Q8_0        d * q, q = code
=====================================  ==========  =========================================

A block's scale is stored as float16 by the format: that changes the scale by at most 2^-11 of
itself (the report gives the largest change); the codes do not change. A grid no type holds
(groups that are not a multiple of 32, affine 5-8 bits) is refused with the layer named, or
written as F32 with ``unfit="float"``. Layers off any grid are F32 (``float_type="F16"`` halves
them). Tensor names and metadata keys are the ``gguf`` package's own (``gguf.TensorNameMap``),
the block layouts those of ggml (``ggml-common.h``); written by hand because the package's
``quants.quantize`` would round the weights again with scales of its choosing.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetshrinkError
from ..files import check_writable
from ..compress.methods.base import baked_state_dict
from ..compress.methods.conv1d import is_conv1d
from . import hugging_face_model
from .codes import IntegerWeight, integer_weight
from .report import ExportReport

BLOCK = 32
ARCHITECTURES = ("bert", "gpt2")
POOLING = ("mean", "cls")  # how llama.cpp turns a BERT model's tokens into one embedding


def gguf_type(weight: IntegerWeight) -> str | None:
    """The GGUF block type that holds ``weight``'s codes exactly, or None."""
    if weight.group % BLOCK or weight.inputs % BLOCK:
        return None
    if weight.bits <= 4:
        return "Q4_0" if weight.scheme == "symmetric" else "Q4_1"
    return "Q8_0" if weight.scheme == "symmetric" else None


def _per_block(grid: torch.Tensor, weight: IntegerWeight) -> np.ndarray:
    """A ``[out, groups]`` grid (scales or zero points) repeated to one value per block of 32."""
    return np.repeat(grid.numpy(), weight.group // BLOCK, axis=1)[:, : weight.inputs // BLOCK]


def _half(values: np.ndarray, layer: str) -> np.ndarray:
    half = values.astype(np.float16)
    if not np.isfinite(half).all() or ((half == 0) & (values != 0)).any():
        raise NetshrinkError(f"layer {layer}: a scale does not fit float16 (GGUF stores block scales as float16)")
    return half


def blocks(weight: IntegerWeight, kind: str, layer: str) -> tuple[np.ndarray, float]:
    """(the GGUF bytes ``[out, bytes per row]``, largest relative change of a scale)."""
    rows, count = weight.shape[0], weight.inputs // BLOCK
    scales = _per_block(weight.scale, weight)
    d = _half(scales, layer)
    change = float(np.max(np.abs(d.astype(np.float32) - scales) / np.where(scales == 0, 1, np.abs(scales)))) if scales.size else 0.0
    codes = weight.codes.numpy().reshape(rows, count, BLOCK)
    if kind == "Q8_0":
        parts = [d.reshape(rows, count, 1).view(np.uint8), codes.astype(np.int8).view(np.uint8)]
    else:
        unsigned = codes + (8 if kind == "Q4_0" else 0)
        # ggml's 4-bit blocks: byte j holds weight j in its low nibble and weight j + 16 in its high one.
        nibbles = (unsigned[..., :16] | (unsigned[..., 16:] << 4)).astype(np.uint8)
        parts = [d.reshape(rows, count, 1).view(np.uint8)]
        if kind == "Q4_1":
            minimum = -_per_block(weight.zero, weight) * scales
            parts.append(_half(minimum, layer).reshape(rows, count, 1).view(np.uint8) if minimum.any()
                         else np.zeros((rows, count, 2), np.uint8))
        parts.append(nibbles)
    return np.concatenate(parts, axis=2).reshape(rows, -1), change


def _uniform_widths(planned: list, arch: str, config) -> int:
    """The feed-forward width every layer has, checked: llama.cpp's BERT and GPT-2 graphs take one
    width for all layers and attention as wide as the model (all heads kept)."""
    hidden = config.hidden_size
    attention = {"bert": ("attn_q", "attn_k", "attn_v"), "gpt2": ("attn_qkv",)}[arch]
    widths, problems = set(), []
    for name, owner, value, _, _ in planned:
        part = name.split(".")[2] if name.startswith("blk.") and name.endswith(".weight") else None
        if part in attention and value.shape[0] != hidden * (3 if part == "attn_qkv" else 1):
            problems.append(f"{owner} has {value.shape[0]} outputs (heads removed)")
        if part == "ffn_up":
            widths.add(value.shape[0])
    if len(widths) > 1:
        problems.append(f"feed-forward widths differ between layers ({', '.join(map(str, sorted(widths)))})")
    if problems:
        raise NetshrinkError(f"llama.cpp's {arch} graph keeps every head and one feed-forward width in all layers: "
                             f"{'; '.join(problems[:3])}. Export this model to ONNX or OpenVINO instead")
    return widths.pop() if widths else (config.intermediate_size if arch == "bert" else config.n_inner or 4 * hidden)


def _hyperparameters(writer, arch: str, config, pooling: str | None, feed_forward: int) -> None:
    """The sizes llama.cpp reads, by transformers' common config names (GPT-2's config maps them
    onto its own n_embd, n_layer, ...)."""
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(feed_forward)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps if arch == "bert" else config.layer_norm_epsilon)
    if arch == "bert":
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.CLS if pooling == "cls" else gguf.PoolingType.MEAN)


def _vocabulary(writer, arch: str, config, tokenizer) -> None:
    """A BERT WordPiece vocabulary the way llama.cpp reads it (words start with U+2581, "##"
    pieces lose it); without a tokenizer, an empty vocabulary of the right size ("none": llama.cpp
    then runs on token ids)."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(config.vocab_size)
        return
    if arch != "bert":
        raise NetshrinkError("a tokenizer is written for BERT models only; export GPT-2 without one (token ids)")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    tokens = [t if t in special else t[2:] if t.startswith("##") else "\u2581" + t for t, _ in vocab]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])  # 3: control, 1: normal
    writer.add_token_type_count(getattr(config, "type_vocab_size", 1))
    for what, token_id in (("bos", tokenizer.cls_token_id), ("eos", tokenizer.sep_token_id),
                           ("unk", tokenizer.unk_token_id), ("sep", tokenizer.sep_token_id),
                           ("pad", tokenizer.pad_token_id), ("mask", tokenizer.mask_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{what}_token_id")(int(token_id))


def export(model: nn.Module, path: str | Path, *, tokenizer=None, pooling: str | None = None,
           unfit: str = "refuse", float_type: str = "F32", **_ignored) -> ExportReport:
    """Write the BERT or GPT-2 model inside ``model`` as GGUF at ``path`` for llama.cpp.

    ``tokenizer`` (a transformers tokenizer; a sentence-transformers model's own is used when there
    is one) makes the file self-contained for BERT; without one llama.cpp runs it on token ids.
    ``pooling`` ("mean" or "cls"; default: the sentence-transformers model's, else mean) is how
    llama.cpp turns a BERT model's tokens into one embedding. ``unfit="float"`` writes layers whose
    grid no GGUF type holds as F32 instead of refusing."""
    try:
        import gguf
    except ImportError:
        raise NetshrinkError("GGUF export needs the gguf package: pip install gguf") from None
    if unfit not in ("refuse", "float"):
        raise NetshrinkError(f"unfit must be 'refuse' or 'float'. Received: unfit={unfit!r}")
    if float_type not in ("F32", "F16"):
        raise NetshrinkError(f"float_type must be 'F32' or 'F16'. Received: float_type={float_type!r}")
    if pooling not in (None, *POOLING):
        raise NetshrinkError(f"pooling must be 'mean' or 'cls'. Received: pooling={pooling!r}")
    path = check_writable(path)
    hf = hugging_face_model(model)
    arch = getattr(hf.config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise NetshrinkError(f"GGUF export covers {', '.join(ARCHITECTURES)} models. Received: model_type={arch!r}")
    if tokenizer is None and hf is not model:
        tokenizer = getattr(model, "tokenizer", None) if arch == "bert" else None
    if pooling is None and hf is not model:
        pooling = _sentence_transformers_pooling(model)
    blocks_count = hf.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT if arch == "bert" else gguf.MODEL_ARCH.GPT2, blocks_count)
    modules = dict(hf.named_modules())
    report = ExportReport(str(path), target=f"GGUF ({arch})")
    state = baked_state_dict(hf)
    planned, unfit_layers, changes = [], [], []
    tied = _tied_output(hf)
    for key, value in state.items():
        owner, _, tensor = key.rpartition(".")
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or (owner == tied):
            continue  # pooler, position ids, an output layer tied to the embedding
        module = modules.get(owner)
        value = value.detach().float()
        if tensor == "weight" and module is not None and is_conv1d(module):
            value = value.t()  # transformers' Conv1D stores [in, out]
        weight = integer_weight(module) if tensor == "weight" and isinstance(module, (nn.Linear, nn.Embedding)) else None
        if weight is not None and isinstance(module, nn.Embedding) and name != "token_embd.weight":
            # llama.cpp adds position and token-type rows without dequantizing them; they are small.
            weight = None
        kind = gguf_type(weight) if weight is not None else None
        if weight is not None and kind is None:
            unfit_layers.append(f"{owner} ({weight.bits}-bit {weight.scheme}, groups of {weight.group})")
        planned.append((name, owner, value, weight, kind))
    widths = _uniform_widths(planned, arch, hf.config)
    if unfit_layers and unfit == "refuse":
        raise NetshrinkError(f"no GGUF block type holds the grid of {', '.join(unfit_layers)}: quantize in groups "
                             "of a multiple of 32 (symmetric for 5-8 bits), or pass unfit='float' to write them as F32")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        temporary = Path(folder) / "model.gguf"
        writer = gguf.GGUFWriter(str(temporary), arch)
        _hyperparameters(writer, arch, hf.config, pooling, widths)
        _vocabulary(writer, arch, hf.config, tokenizer)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
        for name, owner, value, weight, kind in planned:
            if kind is not None:
                data, change = blocks(weight, kind, owner)
                changes.append(change)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
                report.layers.append((owner, f"{kind}: {weight.bits}-bit codes, {weight.layout}"))
                continue
            array = value.numpy()
            if float_type == "F16" and array.ndim == 2:
                array = array.astype(np.float16)
            writer.add_tensor(name, np.ascontiguousarray(array))
            if array.ndim == 2:
                report.layers.append((owner, "F16" if array.dtype == np.float16 else "F32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    if changes:
        report.notes.append(f"block scales stored as float16 (the format's): largest relative change {max(changes):.1e}; "
                            "codes unchanged")
    return report


def _tied_output(hf: nn.Module) -> str | None:
    """The output layer's name when it shares the embedding's weight (GPT-2's lm_head): llama.cpp
    then reads the embedding for both."""
    tied = getattr(hf.config, "tie_word_embeddings", False) and getattr(hf, "lm_head", None) is not None
    return "lm_head" if tied else None


def _sentence_transformers_pooling(model: nn.Module) -> str | None:
    for module in model.modules():
        mode = getattr(module, "pooling_mode_cls_token", None)
        if mode is not None:
            return "cls" if mode else "mean"
    return None

