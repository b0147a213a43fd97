"""A decoder's ONNX graph with its key/value cache, for generation one token at a time.

Without a cache every new token runs the whole sequence again, and weight-only low-bit kernels
cannot help: the work grows with the sequence, not with the weights. The graph written here takes
``input_ids`` (the new tokens), ``past_keys`` and ``past_values`` (``[layers, batch, kv_heads,
past, head_dim]``, ``past`` may be 0) and returns ``logits``, ``keys`` and ``values`` (the cache
grown by the new tokens), so a generation loop feeds the outputs back in.

The transformers model is wrapped so that its own cache (``DynamicCache``) is built from those
tensors and read back; PyTorch's dynamo exporter follows the cache's shapes symbolically (the
TorchScript exporter bakes the past length in, which gives wrong logits for any other length).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import NetshrinkError


class CachedDecoder(nn.Module):
    """``(input_ids, past_keys, past_values) -> (logits, keys, values)`` around a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):  # noqa: D102
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(past_keys.shape[0])],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        return out.logits, torch.stack([layer.keys for layer in layers]), torch.stack([layer.values for layer in layers])


def cache_shape(model: nn.Module, past: int = 0) -> tuple[int, int, int, int, int]:
    """``[layers, batch 1, kv_heads, past, head_dim]`` of the model's cache."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)) \
            or model.get_output_embeddings() is None:
        raise NetshrinkError("cache=True exports a transformers causal language model (one with an output layer, "
                             "e.g. GPT2LMHeadModel, LlamaForCausalLM)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, 1, kv_heads, past, head_dim


def cached_graph(model: nn.Module, opset: int) -> bytes:
    """The ONNX graph of ``model`` (a baked copy: plain weights) with its cache as inputs and outputs."""
    from torch.export import Dim

    shape = cache_shape(model, past=3)  # traced with 2 tokens after 3: both lengths symbolic in the graph
    example = (torch.tensor([[1, 2]]), torch.zeros(shape), torch.zeros(shape))
    past, tokens = Dim("past", min=0, max=1 << 20), Dim("tokens", min=1, max=1 << 20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(CachedDecoder(model).eval(), example, dynamo=True, opset_version=max(opset, 18),
                                        input_names=["input_ids", "past_keys", "past_values"],
                                        output_names=["logits", "keys", "values"], verbose=False,
                                        dynamic_shapes=({1: tokens}, {3: past}, {3: past}))
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NetshrinkError(f"ONNX export with a cache failed: {first}") from None
    return program.model_proto.SerializeToString()
