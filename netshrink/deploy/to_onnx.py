"""Export to ONNX: fp32, or int8 in QDQ form that ONNX Runtime fuses into integer kernels.

The int8 graph is the fp32 export with, for every compressed Linear/Conv layer:

* its weight stored as an int8 initializer with one float scale per output channel, behind a
  DequantizeLinear (axis 0). Weights already on a per-channel integer grid that fits the target
  (netshrink quantization at b <= 7 bits, or 8 with ``vnni=True``) are stored exactly: their integer
  codes are written as they are. Other weights are quantized now, per channel, and the report says so.
* its input activation behind QuantizeLinear/DequantizeLinear (uint8, affine) with the range that
  netshrink calibrated (the layer's ``input_quantizer``; b < 8 bits are widened to 8 bits over the
  same range), or, for a model without activation quantizers, 8-bit ranges calibrated now.
* the same Quantize/Dequantize pair on the output of the layer that produces that input, when
  only ReLU, MaxPool, Flatten or Reshape stand between them. Those ops commute with a monotone
  quantizer (ReLU of a grid value is on the grid, a max of grid values is one of them), so the
  result is exactly what netshrink computes, and ONNX Runtime sees "DQ -> Conv/Gemm -> Q", which it
  fuses into QLinearConv / QGemm, with int8 MaxPool in between.
* for a Linear layer on 3-D inputs (a transformer's projections), unless ``portable=True``: ONNX
  Runtime's MatMulIntegerToFloat with the bias inside, in place of DequantizeLinear -> MatMul -> Add.

**Correct on every x86-64 CPU.** ONNX Runtime's uint8 x int8 kernels on CPUs without VNNI (AVX2,
AVX-512 without VNNI) multiply with ``vpmaddubsw``, which adds two u8*s8 products in a 16-bit
register and saturates: with activations up to 255 and two weights of magnitudes a + b > 128 the
sum overflows and the layer silently computes something else (OpenVINO and ONNX Runtime document
this; ORT's own quantizer offers ``reduce_range``). netshrink therefore limits weights to 7 bits
(codes in [-63, 63]) by default; ``vnni=True`` keeps the full int8 range for targets known to have
VNNI (or ARM), and the report names the choice. :func:`saturating_layers` checks a graph for the
risk from its integer weights alone, whatever CPU runs the check.

**BatchNorm** after a convolution is folded into it. For a weight on an integer grid, folding
multiplies each output channel by a constant, so the integer codes stay exactly as quantized and only
the channel's scale changes (scale * gamma / sqrt(var + eps)); folding the float weight first and
quantizing again would move the weights off their grid.

The graph surgery uses the ``onnx`` helpers: exporter and runtime do the rest.
"""
from __future__ import annotations

import copy
import io
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import NetshrinkError
from ..files import atomic_write, check_writable
from ..compress.methods.activations import ActivationQuantizer, QuantizeActivations, detach_all, input_quantizer
from ..compress.methods.base import LINEAR_CONV, apply, bake
from .decoder_cache import cache_shape, cached_graph
from .codes import codes_of, integer_layers
from .onnx_low_bit import rewrite
from .report import ExportReport

SAFE_PAIR_SUM = 128  # 255 * (a + b) <= 32767 for |a| + |b| <= 128: no 16-bit saturation
SAFE_CODE, VNNI_CODE = 63, 127  # largest weight code: 7-bit (any x86-64 CPU) or full int8 (VNNI)


def _input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise NetshrinkError(f"input_shape must be positive integers (without the batch dimension). "
                                 f"Received: input_shape={input_shape!r}")
        return tuple(int(d) for d in input_shape)
    spec = getattr(model, "spec", None)
    if spec:
        return tuple(spec["in_shape"])
    raise NetshrinkError("give example_inputs=<one batch of inputs: a tensor, tuple or dict> (or input_shape=(C, H, W)) "
                         "for a model netshrink did not build")


@dataclass
class _Signature:
    """How the exported graph is called: its example arguments, their names, and which axes vary."""

    args: tuple
    names: list[str]
    keys: list[str] | None  # the keyword names when the model takes a dict
    dynamic: dict[str, dict[int, str]]


def _signature(model: nn.Module, example_inputs, input_shape) -> _Signature:
    """Inputs are named after a dict's keys ("input" for one tensor); the batch axis is dynamic,
    and so is the sequence axis (1) of integer inputs such as token ids and attention masks."""
    from collections.abc import Mapping

    if example_inputs is None:
        example_inputs = torch.zeros(1, *_input_shape(model, input_shape))
    if isinstance(example_inputs, Mapping):
        keys = list(example_inputs)
        args, names = tuple(example_inputs.values()), keys
    elif isinstance(example_inputs, (tuple, list)):
        keys, args = None, tuple(example_inputs)
        names = [f"input_{i}" for i in range(len(args))]
    else:
        keys, args, names = None, (example_inputs,), ["input"]
    if not args or not all(torch.is_tensor(a) and a.dim() >= 1 for a in args):
        raise NetshrinkError("example_inputs must be a tensor, or a tuple or dict of tensors with a batch dimension")
    dynamic = {name: {0: "batch", **({1: "sequence"} if not a.is_floating_point() and a.dim() >= 2 else {})}
               for name, a in zip(names, args)}
    return _Signature(args, names, keys, dynamic)


class _Exported(nn.Module):
    """What the graph computes: the model's output tensor for positional graph inputs (rebuilt into
    keyword arguments for a model that takes a dict)."""

    def __init__(self, model: nn.Module, keys: list[str] | None, forward) -> None:
        super().__init__()
        self.model, self.keys, self.adapter = model, keys, forward

    def forward(self, *args):
        from ..training.batches import default_forward

        inputs = dict(zip(self.keys, args)) if self.keys else args[0] if len(args) == 1 else args
        return (self.adapter or default_forward)(self.model, inputs)


def _plain_attention(model: nn.Module, report: ExportReport) -> None:
    """Switch Hugging Face models from scaled_dot_product_attention to their eager attention.

    The TorchScript exporter writes SDPA as MatMul/Softmax plus, per layer, an IsNaN/Where guard
    for rows whose keys are all masked, and ONNX Runtime cannot fuse around it: on all-MiniLM-L6-v2
    the guard is 14% of the int8 graph's time. The eager implementation computes the same attention
    (it differs only on sequences that are all padding) with the mask added before Softmax."""
    switched = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and callable(getattr(module, "set_attn_implementation", None)):
            try:
                module.set_attn_implementation("eager")
            except Exception:  # a model without an eager path keeps SDPA
                continue
            switched.append(name or type(module).__name__)
    if switched:
        report.notes.append(f"attention exported with the eager implementation instead of SDPA ({', '.join(switched)}): "
                            "the same computation without a NaN guard per layer")


def _to_onnx_bytes(model: nn.Module, signature: _Signature, opset: int, forward=None) -> bytes:
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Exported(model, signature.keys, forward).eval(), signature.args, buffer, dynamo=False,
                              input_names=signature.names, output_names=["output"], opset_version=opset,
                              dynamic_axes={**signature.dynamic, "output": {0: "batch"}})
    except NetshrinkError:
        raise
    except Exception as exc:  # the exporter raises many types; the first line says which op failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NetshrinkError(f"ONNX export failed: {first}") from None
    return buffer.getvalue()


def _fold_batchnorm(model: nn.Module, report: ExportReport) -> dict[str, torch.Tensor]:
    """Fold every eval-mode BatchNorm that directly follows a convolution (and is its only user)
    into it, in place; returns {convolution: per-channel factor gamma / sqrt(var + eps)}.

    Written here rather than with ``torch.fx.experimental.optimization.fuse`` because the factor
    is what keeps integer grids exact (see the module docstring), and fuse does not expose it."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx tracing fails on data-dependent control flow
        report.notes.append(f"BatchNorm not folded ({type(exc).__name__}: the model cannot be traced); "
                            "it runs in float between integer kernels")
        return {}
    modules = dict(traced.named_modules())
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    factors = {}
    with torch.no_grad():
        for node in traced.graph.nodes:
            norm = modules.get(node.target) if node.op == "call_module" else None
            source = node.args[0] if node.args else None
            if not (isinstance(norm, nn.modules.batchnorm._BatchNorm) and isinstance(source, torch.fx.Node)
                    and source.op == "call_module" and len(source.users) == 1):
                continue
            conv = modules[source.target]
            if not (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and norm.running_var is not None
                    and calls[node.target] == 1 and calls[source.target] == 1
                    and conv.weight.shape[0] == norm.num_features):
                continue
            factor = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                factor = factor * norm.weight
            shift = -norm.running_mean * factor + (norm.bias if norm.bias is not None else 0)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(factor)
            conv.weight = nn.Parameter(conv.weight * factor.view(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(bias * factor + shift)
            parent, _, child = node.target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
            factors[source.target] = factor.detach().clone()
    if factors:
        report.notes.append(f"BatchNorm folded into {', '.join(factors)} (integer codes kept, scales multiplied)")
    return factors


def weight_as_int8(w: np.ndarray, limit: int = SAFE_CODE) -> tuple[np.ndarray, np.ndarray, str]:
    """(int8 codes, per-channel scales, how): exact when ``w`` is a per-row grid whose codes lie
    within +-``limit``, else quantized now to that many levels per side (symmetric per channel)."""
    from ..grids import grid

    flat = np.ascontiguousarray(w, dtype=np.float32).ravel()
    found = grid(flat.view(np.uint32), int(np.prod(w.shape[1:]))) if flat.size else None
    if found is not None and np.abs(found[1]).max() <= limit:
        scales, codes = found
        levels = int(np.abs(codes).max())
        return codes.reshape(w.shape).astype(np.int8), scales.astype(np.float32), f"exact int8 ({levels} levels each side)"
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scales = np.where(amax > 0, amax / limit, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scales.reshape(-1, *[1] * (w.ndim - 1))), -limit, limit).astype(np.int8)
    was = f"{int(np.abs(found[1]).max())}-level grid" if found is not None else "float weights"
    return codes, scales, f"{was} quantized now to {limit} levels each side per channel"


def saturating_layers(graph_model) -> list[str]:
    """Names of the int8 weight initializers in an ONNX graph that can saturate the 16-bit pair sums
    of u8 x s8 kernels on CPUs without VNNI: some output channel has two codes with |a| + |b| > 128.
    Read off the weights alone, so the answer is the same on every machine."""
    from onnx import numpy_helper

    weights = {i.name: i for i in graph_model.graph.initializer}
    risky = []
    for node in graph_model.graph.node:
        index = {"DequantizeLinear": 0, "MatMulIntegerToFloat": 1}.get(node.op_type)
        if index is None or node.input[index] not in weights:
            continue
        codes = numpy_helper.to_array(weights[node.input[index]])
        if codes.dtype != np.int8 or codes.ndim < 2:
            continue  # activations' zero points and scalars, not weights
        # The pairs are summed along each output channel: axis 0 of a Conv/Gemm weight [out, in, ...],
        # axis 1 of a MatMul weight [in, out] (the DequantizeLinear's axis; ONNX's default is 1).
        channel = next((a.i for a in node.attribute if a.name == "axis"), 1) if index == 0 else 1
        magnitudes = np.sort(np.abs(np.moveaxis(codes, channel, 0).astype(np.int32)).reshape(codes.shape[channel], -1),
                             axis=1)
        top_two = magnitudes[:, -2:].sum(axis=1) if magnitudes.shape[1] > 1 else magnitudes[:, -1]
        if (top_two > SAFE_PAIR_SUM).any():
            risky.append(node.input[index])
    return risky


def export(model: nn.Module, path: str | Path, *, int8: bool = False, calibration=None,
           example_inputs=None, input_shape: tuple[int, ...] | None = None, opset: int = 17,
           int8_logits: bool = False, vnni: bool = False, integer_outputs: bool = True,
           portable: bool = False, forward=None, low_bit: bool = False, accuracy_level: int = 4,
           cache: bool = False) -> ExportReport:
    """Write ``model`` as ONNX to ``path`` (fp32, int8 QDQ with ``int8=True``, or its own 2-8-bit
    weights with ``low_bit=True``), atomically.

    ``example_inputs`` is one batch of inputs as the model takes them: a tensor, a tuple
    (positional) or a dict (keyword, e.g. ``input_ids`` and ``attention_mask``); graph inputs are
    named after the dict's keys, with batch and sequence axes dynamic. Zoo models need none;
    ``input_shape`` gives a float input of that shape. The graph's output is the model's output
    tensor (``.logits`` or ``.last_hidden_state`` of Hugging Face models), or ``forward(model,
    inputs)``'s. Embedding tables are stored as int8 behind a DequantizeLinear in int8 exports.

    The model is not changed. For int8, activation ranges come from the model's activation
    quantizers, else from ``calibration`` data (8 bits, min/max). Weights are limited to 7 bits so
    the model computes correctly on every x86-64 CPU; ``vnni=True`` uses the full int8 range, for
    targets known to have VNNI (AVX512-VNNI, AVX-VNNI) or ARM. ``int8_logits=True`` also
    quantizes the model's output (range calibrated on ``calibration``), so the last layer runs as
    an integer kernel too; its predictions may then differ from netshrink's evaluation on near-ties.

    ``integer_outputs`` (default, with ``calibration`` data): float tensors between integer kernels
    that netshrink's model does not quantize (a convolution's output going into a residual add, the
    add's output, ...) get 8-bit ranges calibrated on ``calibration``, so ONNX Runtime runs the whole
    chain as QLinearConv/QLinearAdd instead of falling back to float kernels around every add (as
    ``quantize_static`` does). Those extra roundings make the graph differ slightly from netshrink's
    evaluation; the report lists them. ``integer_outputs=False`` keeps exactly netshrink's computation.

    ``portable=True`` writes standard ONNX operators only. By default an int8 transformer's
    projections use ONNX Runtime's MatMulIntegerToFloat kernel with the bias inside (1.09-1.14x as
    fast on all-MiniLM-L6-v2), which other runtimes do not have.

    ``low_bit=True`` writes every layer whose weight is on an integer grid (2-8 bits, per channel
    or in groups) with its own codes and scales, not rounded again, activations float: ONNX
    Runtime's MatMulNBits for Linear layers, GatherBlockQuantized for embeddings, uint8 codes for
    convolutions (:mod:`netshrink.deploy.onnx_low_bit`). Other layers stay fp32; the report names
    each. ``accuracy_level=4`` (default) lets MatMulNBits compute with int8 activations quantized
    per block at run time, 0 in float. On an AVX2 CPU without VNNI, 4-bit GPT-2 with 4 generated
    2.84x as fast as fp32 (one token per step; benchmarks/results/decoder_deploy.md), while on
    all-MiniLM-L6-v2 at 32 x 128 tokens 0 was 1.24x as fast as 4 (low_bit_deploy.md against
    low_bit_deploy-level0.md).

    ``cache=True`` (a transformers causal LM, fp32 or ``low_bit``) writes the graph for generation
    with its key/value cache: inputs ``input_ids``, ``past_keys``, ``past_values``, outputs
    ``logits``, ``keys``, ``values`` (:mod:`netshrink.deploy.decoder_cache`).
    """
    import onnx
    from onnx import helper, numpy_helper

    for flag, value in (("int8", int8), ("int8_logits", int8_logits), ("vnni", vnni),
                        ("integer_outputs", integer_outputs), ("portable", portable), ("low_bit", low_bit),
                        ("cache", cache)):
        if not isinstance(value, bool):
            raise NetshrinkError(f"{flag} must be True or False. Received: {flag}={value!r}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= 21:
        raise NetshrinkError(f"opset must be an integer in [13, 21]. Received: opset={opset!r}")
    if int8_logits and not int8:
        raise NetshrinkError("int8_logits=True needs int8=True")
    if cache and int8:
        raise NetshrinkError("cache=True writes fp32 or low_bit=True graphs; int8 activations need calibrated ranges "
                             "of the graph without a cache")
    if low_bit and int8:
        raise NetshrinkError("low_bit=True (weights at their own width, float activations) and int8=True "
                             "(int8 weights and activations) are two different exports: choose one")
    if accuracy_level not in (0, 1, 2, 3, 4) or isinstance(accuracy_level, bool):
        raise NetshrinkError(f"accuracy_level must be 0-4 (4: int8 arithmetic in MatMulNBits, 0: float). "
                             f"Received: accuracy_level={accuracy_level!r}")
    if int8_logits and calibration is None:
        raise NetshrinkError("int8_logits needs calibration data for the output range")
    path = check_writable(path)
    signature = None if cache else _signature(model, example_inputs, input_shape)
    if cache:
        cache_shape(model)  # a causal LM, checked before any work
    integer = codes_of(model, (*LINEAR_CONV, nn.Embedding)) if low_bit else {}
    work = bake(copy.deepcopy(model)).eval()
    layers = {name: m for name, m in work.named_modules() if isinstance(m, LINEAR_CONV)}
    report = ExportReport(str(path), int8)
    ranges: dict[str, ActivationQuantizer] = {}
    limit = VNNI_CODE if vnni else SAFE_CODE
    if int8:
        report.target = ("int8 weights, full range: for CPUs with VNNI (or ARM)" if vnni else
                         "7-bit weights: correct on every x86-64 CPU, VNNI or not")
        if not layers:
            raise NetshrinkError("nothing to export as int8: the model has no Linear or Conv layer")
        missing = [n for n, m in layers.items() if not isinstance(input_quantizer(m), ActivationQuantizer)]
        if missing:
            if calibration is None:
                raise NetshrinkError(f"int8 export needs activation ranges: layers {', '.join(missing)} have none; "
                                     "pass calibration data or quantize activations first")
            apply(work, QuantizeActivations(bits=8, targets=tuple(missing)), calibration=calibration)
            report.notes.append(f"activation ranges calibrated now (8-bit min/max) for {', '.join(missing)}")
        ranges = {n: input_quantizer(m) for n, m in layers.items()}
        narrow = sorted({q.bits for q in ranges.values() if q.bits < 8})
        if narrow:
            report.notes.append(f"{'/'.join(map(str, narrow))}-bit activations exported as 8-bit over the same range")
    zero_fraction = {n: float((m.weight == 0).float().mean()) for n, m in layers.items()}
    sparse = [f"{n} ({100 * f:.0f}% zeros)" for n, f in zero_fraction.items() if f >= 0.5]
    if sparse:
        report.notes.append(f"sparse weights exported as dense tensors with zeros (ONNX Runtime has no sparse "
                            f"CPU kernels for these ops): {', '.join(sparse)}")
    # Integer codes come from the weights as netshrink computes them, before BatchNorm folding.
    weights = {n: weight_as_int8(m.weight.detach().numpy(), limit) for n, m in layers.items()} if int8 else {}
    detach_all(work)
    _plain_attention(work, report)
    for layer, factor in _fold_batchnorm(work, report).items():
        if layer in integer:  # the codes stay; each channel's scales take its BatchNorm factor
            integer[layer].scale = integer[layer].scale * factor.view(-1, 1)
        if layer in weights:
            codes, scales, how = weights[layer]
            sign = np.where(factor.numpy() < 0, -1, 1).astype(np.int8)
            weights[layer] = (codes * sign.reshape(-1, *[1] * (codes.ndim - 1)),
                              (scales * np.abs(factor.numpy())).astype(np.float32), how + ", BatchNorm folded into scales")
    if int8:
        weights.update({n: weight_as_int8(m.weight.detach().numpy(), limit) for n, m in work.named_modules()
                        if isinstance(m, nn.Embedding)})
    float_graph = cached_graph(work, opset) if cache else _to_onnx_bytes(work, signature, opset, forward)
    graph_model = onnx.load_from_string(float_graph)
    if int8:
        _insert_qdq(graph_model, dict(work.named_modules()), layers, weights, ranges, report, helper, numpy_helper)
        _simplify_pairs(graph_model.graph)
        if integer_outputs:
            _quantize_between_kernels(graph_model, float_graph, signature, calibration, report, helper, numpy_helper)
        _pool_globally(graph_model, report, helper, numpy_helper)
        if not portable:
            _integer_matmul_with_bias(graph_model, report, helper)
        used = {name for node in graph_model.graph.node for name in node.input}
        for initializer in [i for i in graph_model.graph.initializer if i.name not in used]:  # merged pairs' grids
            graph_model.graph.initializer.remove(initializer)
        if int8_logits:
            _quantize_output(graph_model, float_graph, signature, calibration, report, helper, numpy_helper)
        risky = report.full_range = saturating_layers(graph_model)
        if risky:
            named = ", ".join(risky[:3]) + (f" and {len(risky) - 3} more" if len(risky) > 3 else "")
            report.notes.append(f"weights {named} use the full int8 range: CPUs without VNNI saturate on them "
                                "(export without vnni=True for those)")
    elif low_bit:
        report.target = "low-bit weights (their own codes), float activations"
        modules = dict(work.named_modules())
        rewrite(graph_model, modules, integer, _weight_locator(modules, list(integer), numpy_helper), accuracy_level,
                report)
        report.layers += [(n, "fp32") for n in layers if n not in integer]
    else:
        report.layers = [(n, "fp32") for n in layers]
        on_grid = integer_layers(model, (*LINEAR_CONV, nn.Embedding))
        if on_grid:
            report.notes.append(f"{len(on_grid)} layer(s) hold 2-8-bit integer weights, written here as fp32: "
                                "low_bit=True keeps them at their own width")
    onnx.checker.check_model(graph_model)
    # Intermediate shapes are not stored (value_info): with them ONNX Runtime 1.32 fuses a
    # transformer's residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel
    # made all-MiniLM-L6-v2 slower, fp32 and int8 alike (investigations/onnx_shapes.py).
    atomic_write(path, graph_model.SerializeToString())
    return report


COMMUTING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape")


def _weight_locator(modules: dict[str, nn.Module], names: list[str], numpy_helper):
    """A function from an initializer to (layer, transposed) or None. The exporter names a weight
    after its layer ("fc1.weight"), or, for Linear layers on 3-D inputs (transformers), stores it
    transposed under a generated name, so those are matched by content."""
    import hashlib

    by_content = {}
    for name in names:
        w = modules[name].weight.detach().numpy()
        by_content[(w.shape, hashlib.sha1(np.ascontiguousarray(w).tobytes()).digest())] = (name, False)
        if w.ndim == 2:
            by_content[(w.T.shape, hashlib.sha1(np.ascontiguousarray(w.T).tobytes()).digest())] = (name, True)

    def locate(initializer):
        layer = initializer.name[: -len(".weight")] if initializer.name.endswith(".weight") else None
        if layer in names:
            return layer, False
        array = numpy_helper.to_array(initializer)
        return by_content.get((array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest()))

    return locate


def _insert_qdq(graph_model, modules, layers, weights, ranges, report, helper, numpy_helper) -> None:
    graph = graph_model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = _readers(graph.node)
    locate = _weight_locator(modules, list(weights), numpy_helper)
    before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    after: dict[int, list] = {}  # id(node) -> nodes to insert after it
    dequantized: dict[str, str] = {}  # float initializer -> its DequantizeLinear output
    seen = set()

    def int8_weight(initializer_name: str, layer: str, transposed: bool, node) -> str:
        if initializer_name in dequantized:  # a weight several nodes share is stored once
            return dequantized[initializer_name]
        codes, scales, _ = weights[layer]
        tag = f"{layer}.weight{'_t' if transposed else ''}"
        graph.initializer.remove(initializers[initializer_name])
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(codes.T if transposed else codes),
                                                          f"{tag}_int8"),
                                  numpy_helper.from_array(scales, f"{tag}_scale"),
                                  numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{tag}_zero")])
        # Per output channel: axis 0 of [out, in, ...]; axis 1 of a transposed [in, out] MatMul weight.
        before.setdefault(id(node), []).append(helper.make_node(
            "DequantizeLinear", [f"{tag}_int8", f"{tag}_scale", f"{tag}_zero"], [f"{tag}_dq"], axis=1 if transposed else 0))
        dequantized[initializer_name] = f"{tag}_dq"
        return f"{tag}_dq"

    for index, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input and node.input[0] in initializers:
            found = locate(initializers[node.input[0]])
            if found is not None and not found[1] and found[0] in weights and found[0] not in layers:
                if found[0] not in seen:  # a table looked up by several Gathers is stored once
                    _store_int8_table(graph, initializers[node.input[0]], weights[found[0]], found[0], numpy_helper)
                    report.layers.append((found[0], f"int8 embedding table: {weights[found[0]][2]}"))
                _gather_int8_rows(node, found[0], f"{found[0]}.gather{index}", after, helper)
                seen.add(found[0])
            continue
        if not (node.op_type in ("Gemm", "Conv", "MatMul") and len(node.input) > 1 and node.input[1] in initializers):
            continue
        found = locate(initializers[node.input[1]])
        if found is None or found[0] not in layers:
            continue
        layer, transposed = found
        if node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if trans_b == transposed:  # Gemm computes x @ B^T with transB=1: B must be [out, in]
                report.layers.append((layer, "fp32 (unexpected Gemm layout)"))
                seen.add(layer)
                continue
        elif node.op_type == "MatMul" and not transposed:
            report.layers.append((layer, "fp32 (unexpected MatMul layout)"))
            seen.add(layer)
            continue
        weight_input = int8_weight(node.input[1], layer, transposed, node)
        quantizer = ranges[layer]
        scale, zero_point = _eight_bit_grid(quantizer)
        tag = f"{layer}.input.{index}"
        qparams = [f"{tag}_scale", f"{tag}_zero"]
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), qparams[0]),
                                  numpy_helper.from_array(np.array(zero_point, np.uint8), qparams[1])])
        source, smoothed = node.input[0], quantizer.smooth is not None
        if smoothed:
            # SmoothQuant: the weight's input columns were multiplied by the factors, so the layer
            # reads its input divided by them, on a tensor of its own (other readers get it as it is).
            graph.initializer.append(numpy_helper.from_array((1 / quantizer.smooth).numpy().astype(np.float32),
                                                             f"{tag}{SMOOTHING}"))
            before.setdefault(id(node), []).append(
                helper.make_node("Mul", [source, f"{tag}{SMOOTHING}"], [f"{tag}_smoothed"]))
            source = f"{tag}_smoothed"
        before.setdefault(id(node), []).extend([
            helper.make_node("QuantizeLinear", [source, *qparams], [f"{tag}_q"]),
            helper.make_node("DequantizeLinear", [f"{tag}_q", *qparams], [f"{tag}_dq"])])
        upstream = None if smoothed else _commuting_source(node.input[0], producer, consumers)
        if upstream is not None and id(upstream) not in after:
            # The producer now writes a raw tensor; the pair re-creates the original name, so every
            # consumer downstream reads the quantized values without being rewired.
            out = upstream.output[0]
            upstream.output[0] = f"{tag}.producer_raw"
            after[id(upstream)] = [
                helper.make_node("QuantizeLinear", [f"{tag}.producer_raw", *qparams], [f"{tag}.producer_q"]),
                helper.make_node("DequantizeLinear", [f"{tag}.producer_q", *qparams], [out])]
        node.input[0], node.input[1] = f"{tag}_dq", weight_input
        if layer not in seen:
            report.layers.append((layer, f"int8: weights {weights[layer][2]}; inputs{' smoothed,' * smoothed} uint8 "
                                         f"scale {scale:.4g}, zero {zero_point}"))
        seen.add(layer)
    nodes = []
    for node in graph.node:
        nodes += before.get(id(node), []) + [node] + after.get(id(node), [])
    del graph.node[:]
    graph.node.extend(nodes)
    missing = [name for name in layers if name not in seen]
    if missing:
        in_graph = {found[0] for i in graph.initializer
                    if (found := locate(i)) is not None}
        for name in missing:
            report.layers.append((name, "fp32 (not found as a Gemm/Conv/MatMul weight in the graph)" if name in in_graph
                                  else "not in the graph: the exported output does not use it"))


def _store_int8_table(graph, table, weight, layer: str, numpy_helper) -> None:
    """Replace an embedding table by its int8 codes and one scale per row."""
    codes, scales, _ = weight
    graph.initializer.remove(table)
    graph.initializer.extend([numpy_helper.from_array(codes, f"{layer}.weight_int8"),
                              numpy_helper.from_array(scales.reshape(-1, 1), f"{layer}.weight_row_scale")])


def _gather_int8_rows(node, layer: str, tag: str, after: dict, helper) -> None:
    """An embedding lookup on the int8 table: gather the looked-up rows' codes and their scales,
    then multiply. Dequantizing the whole table in front of the Gather would cost a pass over every
    row at every inference, however few tokens are looked up; the product is the same numbers."""
    indices, out = node.input[1], node.output[0]
    node.input[0], node.output[0] = f"{layer}.weight_int8", f"{tag}.rows_int8"
    after[id(node)] = [
        helper.make_node("Gather", [f"{layer}.weight_row_scale", indices], [f"{tag}.rows_scale"]),
        helper.make_node("Cast", [f"{tag}.rows_int8"], [f"{tag}.rows_float"], to=1),  # 1 = FLOAT
        helper.make_node("Mul", [f"{tag}.rows_float", f"{tag}.rows_scale"], [out])]


def _quantize_output(graph_model, float_graph: bytes, signature: _Signature, calibration, report, helper,
                     numpy_helper) -> None:
    """Q/DQ on the graph output, over its min/max in the float graph on (at most 8 batches of)
    calibration data."""
    graph = graph_model.graph
    output = graph.output[0].name
    low, high = _tensor_ranges(float_graph, [output], signature, calibration)[output]
    scale, zero_point = ActivationQuantizer(8, low, high).grid()
    producer = next(node for node in graph.node if output in node.output)
    producer.output[list(producer.output).index(output)] = "logits_raw"
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "logits_scale"),
                              numpy_helper.from_array(np.array(zero_point, np.uint8), "logits_zero")])
    graph.node.extend([helper.make_node("QuantizeLinear", ["logits_raw", "logits_scale", "logits_zero"], ["logits_q"]),
                       helper.make_node("DequantizeLinear", ["logits_q", "logits_scale", "logits_zero"], [output])])
    report.notes.append(f"logits quantized to uint8 over [{low:.3g}, {high:.3g}]")


def _commuting_source(tensor: str, producer: dict, consumers: dict):
    """The Conv/Gemm/MatMul whose output reaches ``tensor`` through single-consumer ReLU/MaxPool/
    Flatten/Reshape nodes only, or None."""
    node = producer.get(tensor)
    while node is not None and node.op_type in COMMUTING_OPS and len(consumers.get(node.input[0], [])) == 1:
        node = producer.get(node.input[0])
    if node is not None and node.op_type in ("Conv", "Gemm", "MatMul") and len(consumers.get(node.output[0], [])) == 1:
        return node
    return None


INTEGER_OPS = ("Add", "Relu", "MaxPool")  # ONNX Runtime runs these on uint8 when every input is quantized
SMOOTHING = "_unsmooth"  # the name ending of a SmoothQuant layer's 1/factors, which its input is multiplied by


def _quantized_next(reader) -> bool:
    """Does ``reader`` quantize the tensor it reads: a QuantizeLinear, or a SmoothQuant layer's
    division in front of its own (quantizing the tensor before it too would round twice)?"""
    return reader.op_type == "QuantizeLinear" or (reader.op_type == "Mul" and reader.input[1].endswith(SMOOTHING))


def _quantize_between_kernels(graph_model, float_graph: bytes, signature: _Signature, calibration, report,
                              helper, numpy_helper) -> None:
    """Quantize the float tensors that sit between integer kernels (see ``export``'s
    ``integer_outputs``): the output of every int8 Conv/Gemm that no quantizer follows, and the
    output of every Add/Relu/MaxPool whose inputs are all quantized, in graph order so chains of
    residual blocks become integer end to end. Graph outputs stay float.

    A tensor a layer's own input quantizer already reads (a fork: the layer and a residual add)
    takes that quantizer's grid, and the layer's separate pair is dropped, so every tensor is
    quantized once. Other ranges are the min/max of the tensor in the float graph over (at most 8
    batches of) the calibration data, run by ONNX Runtime itself."""
    graph = graph_model.graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    consumers = _readers(graph.node)
    outputs = {o.name for o in graph.output}
    wanted = []
    for node in graph.node:
        out = node.output[0] if node.output else None
        readers = consumers.get(out, [])
        if out in outputs or not readers or all(_quantized_next(c) for c in readers):
            continue  # a graph output, unused, or already followed by its quantizer
        integer_kernel = node.op_type in ("Conv", "Gemm") and all(i in dequantized for i in node.input[:2])
        integer_op = node.op_type in INTEGER_OPS and all(i in dequantized for i in node.input if i)
        if integer_kernel or integer_op:
            if not (len(readers) == 1 and readers[0].op_type == "Relu"):
                wanted.append(out)  # else quantized after the ReLU, which ONNX Runtime then fuses away
            dequantized.add(out)
    if not wanted:
        return
    if calibration is None:
        report.notes.append(f"{len(wanted)} tensors between integer kernels stay float (pass calibration data to "
                            "quantize them too, so ONNX Runtime runs the chain as integer kernels)")
        return
    qparams, dropped, rename = {}, set(), {}
    for name in wanted:  # a layer's own grid where one already quantizes this tensor (a fork)
        pair = next((c for c in consumers.get(name, []) if c.op_type == "QuantizeLinear"), None)
        if pair is not None:  # _simplify_pairs left one pair per grid on a tensor
            qparams[name] = tuple(pair.input[1:3])
            dequantize = consumers[pair.output[0]][0]
            dropped |= {id(pair), id(dequantize)}
            rename[dequantize.output[0]] = name
    ranges = _tensor_ranges(float_graph, [n for n in wanted if n not in qparams], signature, calibration)
    for name, (low, high) in ranges.items():
        scale, zero_point = ActivationQuantizer(8, low, high).grid()
        tag = f"{name}.between"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_scale"),
                                  numpy_helper.from_array(np.array(zero_point, np.uint8), f"{tag}_zero")])
        qparams[name] = (f"{tag}_scale", f"{tag}_zero")
    nodes = []
    for node in _rewired(graph.node, dropped, rename):
        nodes.append(node)
        out = node.output[0] if node.output else None
        if out in qparams:
            node.output[0] = f"{out}.raw"
            nodes += [helper.make_node("QuantizeLinear", [f"{out}.raw", *qparams[out]], [f"{out}.q"]),
                      helper.make_node("DequantizeLinear", [f"{out}.q", *qparams[out]], [out])]
    del graph.node[:]
    graph.node.extend(nodes)
    report.notes.append(f"{len(wanted)} tensors between integer kernels quantized to 8 bits ({len(ranges)} ranges "
                        "calibrated now, the rest on the grid of the layer reading them) so ONNX Runtime runs "
                        "residual adds and their convolutions as integer kernels; results differ from netshrink's "
                        "evaluation by these roundings (integer_outputs=False keeps them float)")


def _through_identity(name: str, producer: dict) -> str:
    """The tensor ``name`` copies through Identity nodes (itself when none)."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def _integer_matmul_with_bias(graph_model, report, helper) -> None:
    """A quantized Linear on 3-D inputs (a transformer's projections: DequantizeLinear -> MatMul ->
    Add of the bias) becomes ONNX Runtime's MatMulIntegerToFloat with the bias inside: the same
    values in one kernel. From the QDQ form ONNX Runtime fuses the kernel without the bias and then
    adds it in a separate pass over the output; its own fusion that would take the bias only matches
    opset-13 graphs. all-MiniLM-L6-v2 runs 1.09x faster at batch 1 and 1.14x at batch 32 with the
    same outputs (investigations/results/fused_projections.md). The node
    is in the com.microsoft domain, so the file then needs ONNX Runtime."""
    graph = graph_model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph.node)
    replaced: dict[int, list] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        data, weight = (producer.get(name) for name in node.input)
        after = readers.get(node.output[0], [])
        if (data is None or weight is None or data.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear"
                or weight.input[0] not in initializers or len(after) != 1 or after[0].op_type != "Add"):
            continue
        add = after[0]
        sources = [_through_identity(name, producer) for name in add.input]  # the exporter shares equal tensors
        bias = next((name for name in sources if name in initializers and len(initializers[name].dims) == 1), None)
        if bias is None or len(data.input) < 3 or len(weight.input) < 3 or \
                any(a.name == "axis" and a.i != 1 for a in weight.attribute):
            continue
        replaced[id(node)] = [helper.make_node(
            "MatMulIntegerToFloat", [data.input[0], weight.input[0], data.input[1], weight.input[1], data.input[2],
                                     weight.input[2], bias], [add.output[0]], domain="com.microsoft")]
        replaced[id(add)] = []
    if not replaced:
        return
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    while True:  # Dequantize nodes that only fed the rewritten MatMuls now have no reader
        used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        unused = {id(n) for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] not in used}
        if not unused:
            break
        nodes = [n for n in nodes if id(n) not in unused]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report.notes.append(f"{sum(1 for v in replaced.values() if v)} Linear layers on 3-D inputs written as ONNX Runtime's "
                        "MatMulIntegerToFloat with the bias inside (the file needs ONNX Runtime)")


def _pool_globally(graph_model, report, helper, numpy_helper) -> None:
    """A mean over the spatial axes of a quantized feature map (``x.mean((2, 3))``, exported as
    ReduceMean) that is quantized again becomes GlobalAveragePool (and Flatten of its uint8 codes
    when the mean drops those axes). The same average on the same grids, but ONNX
    Runtime fuses "DQ -> GlobalAveragePool -> Q" into QLinearGlobalAveragePool, which reads the
    uint8 map in the layout the integer convolutions left it in: no float copy of the whole map and
    no transpose back to NCHW before the classifier. Other reductions are left as they are."""
    import onnx

    graph = graph_model.graph
    if not any(node.op_type == "ReduceMean" for node in graph.node):
        return  # shape inference copies the whole model (a transformer's hundreds of MB): only when needed
    shapes = onnx.shape_inference.infer_shapes(graph_model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*shapes.value_info, *shapes.input, *shapes.output]
            if v.type.tensor_type.HasField("shape")}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph.node)
    pooled = []
    for node in list(graph.node):  # a copy: Flatten nodes are inserted on the way
        if node.op_type != "ReduceMean" or rank.get(node.input[0]) != 4:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes", constants.get(node.input[1]) if len(node.input) > 1 else None)
        source = producer.get(node.input[0])
        quantize = readers.get(node.output[0], [])
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3] or source is None \
                or source.op_type != "DequantizeLinear" or len(quantize) != 1 or quantize[0].op_type != "QuantizeLinear":
            continue
        dequantize = readers.get(quantize[0].output[0], [])
        keepdims = attributes.get("keepdims", 1)
        if not keepdims and (len(dequantize) != 1 or dequantize[0].op_type != "DequantizeLinear"):
            continue
        node.op_type = "GlobalAveragePool"  # rewritten in place: same input, output and name
        del node.input[1:], node.attribute[:]
        if not keepdims:  # the quantized [N, C, 1, 1] codes flattened as the mean was, so "DQ -> Gemm" still fuses
            codes = quantize[0].output[0]
            dequantize[0].input[0] = f"{codes}.flat"
            graph.node.insert(list(graph.node).index(dequantize[0]),
                              helper.make_node("Flatten", [codes], [f"{codes}.flat"], axis=1))
        pooled.append(node.name)
    if pooled:
        report.notes.append(f"spatial means ({', '.join(pooled)}) exported as GlobalAveragePool, which ONNX Runtime "
                            "runs on the uint8 feature map")


def _simplify_pairs(graph) -> None:
    """Remove the Quantize/Dequantize pairs that change no value, so that every tensor is quantized
    once and ONNX Runtime sees the single-reader chains it fuses into integer kernels:

    * several layers reading one tensor through pairs on the same grid (a fork: a residual block's
      main path and its shortcut) share one pair;
    * a pair in front of a ReLU whose only reader quantizes on the same grid with zero point 0 goes
      (ReLU then that quantizer gives the same codes), so kernel -> ReLU -> Quantize fuses."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}

    def grid_of(quantize) -> tuple:
        return tuple(numpy_helper.to_array(initializers[n]).tobytes() if n in initializers else n
                     for n in quantize.input[1:3])

    consumers = _readers(graph.node)
    dropped, rename, kept = set(), {}, {}
    for node in graph.node:
        follower = consumers.get(node.output[0], []) if node.op_type == "QuantizeLinear" else []
        if len(follower) != 1 or follower[0].op_type != "DequantizeLinear":
            continue
        key = (node.input[0], grid_of(node))
        if key in kept:
            dropped |= {id(node), id(follower[0])}
            rename[follower[0].output[0]] = kept[key]
        else:
            kept[key] = follower[0].output[0]
    nodes = list(_rewired(graph.node, dropped, rename))
    producer = {out: node for node in nodes for out in node.output}
    readers = _readers(nodes)
    dropped, rename = set(), {}
    for relu in nodes:
        dequantize = producer.get(relu.input[0]) if relu.op_type == "Relu" else None
        quantize = producer.get(dequantize.input[0]) if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None
        after = readers.get(relu.output[0], [])
        if (quantize is None or quantize.op_type != "QuantizeLinear" or len(readers[dequantize.output[0]]) != 1
                or len(after) != 1 or after[0].op_type != "QuantizeLinear" or grid_of(after[0]) != grid_of(quantize)
                or not _zero_point_is_zero(initializers, quantize)):
            continue
        dropped |= {id(quantize), id(dequantize)}
        rename[dequantize.output[0]] = quantize.input[0]
    nodes = list(_rewired(nodes, dropped, rename))
    del graph.node[:]
    graph.node.extend(nodes)


def _zero_point_is_zero(initializers: dict, quantize) -> bool:
    from onnx import numpy_helper

    zero = initializers.get(quantize.input[2]) if len(quantize.input) > 2 else None
    return zero is not None and not numpy_helper.to_array(zero).any()


def _readers(nodes) -> dict[str, list]:
    """{tensor: the nodes that read it}."""
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _rewired(nodes, dropped: set, rename: dict):
    """The nodes without the dropped ones, with inputs renamed."""
    for node in nodes:
        if id(node) in dropped:
            continue
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        yield node


def _tensor_ranges(float_graph: bytes, names: list[str], signature: _Signature, calibration,
                   max_batches: int = 8) -> dict[str, tuple[float, float]]:
    """{tensor: (min, max)} of intermediate tensors of the float graph over the calibration data,
    computed by ONNX Runtime with those tensors exposed as extra graph outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ..training.batches import batches

    if not names:
        return {}
    model = onnx.load_from_string(float_graph)
    present = {o.name for o in model.graph.output}
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                               if n not in present])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    low = dict.fromkeys(names, 0.0)
    high = dict.fromkeys(names, 0.0)
    for count, (inputs, _) in enumerate(batches(calibration, 256)):
        if count >= max_batches:
            break
        args = (list(inputs[k] for k in signature.keys) if signature.keys else
                list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
        feed = {name: torch.as_tensor(a).numpy() for name, a in zip(signature.names, args)}
        for name, value in zip(names, session.run(names, feed)):
            low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
    return {n: (low[n], high[n]) for n in names}


def _eight_bit_grid(quantizer: ActivationQuantizer) -> tuple[float, int]:
    """(scale, zero point) of the 8-bit grid over the quantizer's range: its own grid at 8 bits,
    the widened equivalent for narrower ones."""
    wide = ActivationQuantizer(8, float(quantizer.low), float(quantizer.high))
    return wide.grid()
