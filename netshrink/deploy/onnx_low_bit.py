"""Low-bit weights in an ONNX graph, as netshrink's own codes: ONNX Runtime's block-quantized kernels.

An fp32 graph's weights are replaced, layer by layer, by the layer's integer codes and scales
(:mod:`netshrink.deploy.codes`), never rounded again:

* a Linear layer's MatMul / Gemm becomes ``MatMulNBits`` (com.microsoft): codes packed along the
  inputs in blocks with one scale (and zero point) each. ONNX Runtime's CPU kernel holds 2, 4 and
  8 bits, so 3-bit codes go in 4-bit containers and 5-7-bit codes in 8-bit ones, unchanged;
  ``accuracy_level=4`` lets it compute with int8 activations (quantized per block at run time).
* an embedding's Gather becomes ``GatherBlockQuantized`` (com.microsoft): only the looked-up rows
  are dequantized.
* a convolution's weight is stored as uint8 codes with a small Cast/Sub/Mul/Reshape in front of
  the Conv; ONNX Runtime folds it into a float weight when the session starts.

OpenVINO's ONNX reader turns both com.microsoft operators into its own u2/u4/u8 weight constants
with scales, so the same graph is also what :mod:`netshrink.deploy.to_openvino` converts.

A netshrink group of ``g`` inputs maps onto blocks of the largest power of two (at least 16) that
divides ``g``, each block repeating its group's scale: the same numbers. A per-channel grid fits
any block (32 where its row length has no power-of-two divisor of 16 or more; the last block is
padded). A group size with no such divisor cannot be held; that layer stays fp32 and the report
says so.
"""
from __future__ import annotations

import numpy as np
import torch

from .codes import IntegerWeight

CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # bits -> the kernels' width that holds them
MIN_BLOCK = 16  # MatMulNBits and GatherBlockQuantized take power-of-two blocks of at least 16


def block_size(weight: IntegerWeight) -> int | None:
    """The largest power-of-two block (>= 16) that divides the weight's group size, or None. A
    per-channel grid takes any block (every block repeats the row's scale; the last one is padded)."""
    size = weight.group & -weight.group  # largest power of two dividing the group
    if size < MIN_BLOCK and weight.group_size is None:
        return 32 if weight.inputs >= 32 else MIN_BLOCK
    return size if size >= MIN_BLOCK else None


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``[..., n]`` (n a multiple of 8 / bits) as bytes, the first code in the
    lowest bits: the layout of MatMulNBits and GatherBlockQuantized."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint8)


def blocks(weight: IntegerWeight, block: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes ``[rows, blocks, block]`` unsigned in ``bits``, scales ``[rows, blocks]``, zero points
    ``[rows, blocks]`` or None where every one is the format's default 2^(bits-1)). The last block is
    padded with the zero point, which contributes nothing."""
    codes, zero = (t.numpy() for t in weight.unsigned(bits))
    rows, inputs = codes.shape
    count = -(-inputs // block)
    per_group = weight.group // block
    index = np.minimum(np.arange(count) // per_group, weight.scale.shape[1] - 1)
    scales = weight.scale.numpy()[:, index].astype(np.float32)
    zeros = zero[:, index]
    padded = np.repeat(zeros, block, axis=1).copy()
    padded[:, :inputs] = codes
    default = weight.scheme == "symmetric"
    return padded.reshape(rows, count, block), scales, None if default else zeros


def matmul_nbits(weight: IntegerWeight, name: str, source: str, output: str, accuracy_level: int,
                 helper, numpy_helper) -> tuple[list, list, str] | None:
    """(initializers, nodes, description) of a MatMulNBits computing ``source @ weight^T``."""
    block = block_size(weight)
    if block is None:
        return None
    bits = CONTAINER[weight.bits]
    codes, scales, zeros = blocks(weight, block, bits)
    rows, count, _ = codes.shape
    initializers = [numpy_helper.from_array(pack(codes, bits), f"{name}.codes"),
                    numpy_helper.from_array(scales.reshape(-1), f"{name}.scales")]
    inputs = [source, f"{name}.codes", f"{name}.scales"]
    if zeros is not None:  # packed like the codes, each row padded to whole bytes
        per_byte = 8 // bits
        padded = np.zeros((rows, -(-count // per_byte) * per_byte), np.uint8)
        padded[:, :count] = zeros
        initializers.append(numpy_helper.from_array(pack(padded, bits).reshape(-1), f"{name}.zeros"))
        inputs.append(f"{name}.zeros")
    node = helper.make_node("MatMulNBits", inputs, [output], domain="com.microsoft", name=f"{name}.matmul_nbits",
                            K=weight.inputs, N=rows, bits=bits, block_size=block, accuracy_level=accuracy_level)
    return initializers, [node], _how(weight, bits, block)


def gather_block_quantized(weight: IntegerWeight, name: str, indices: str, output: str,
                           helper, numpy_helper) -> tuple[list, list, str] | None:
    """(initializers, nodes, description) of a GatherBlockQuantized looking up rows of the table."""
    block = block_size(weight)
    if block is None or weight.inputs % 2:
        return None
    bits = 4 if weight.bits <= 4 else 8
    codes, scales, zeros = blocks(weight, block, bits)
    rows = codes.shape[0]
    packed = pack(codes.reshape(rows, -1)[:, :weight.inputs] if codes.size else codes.reshape(rows, -1), bits)
    initializers = [numpy_helper.from_array(packed, f"{name}.codes"), numpy_helper.from_array(scales, f"{name}.scales")]
    inputs = [f"{name}.codes", indices, f"{name}.scales"]
    if zeros is not None:
        if zeros.shape[1] % (8 // bits):
            return None
        initializers.append(numpy_helper.from_array(pack(zeros, bits), f"{name}.zeros"))
        inputs.append(f"{name}.zeros")
    node = helper.make_node("GatherBlockQuantized", inputs, [output], domain="com.microsoft", name=f"{name}.gather",
                            gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    return initializers, [node], _how(weight, bits, block)


def dequantized_codes(weight: IntegerWeight, name: str, output: str, helper, numpy_helper) -> tuple[list, list, str]:
    """(initializers, nodes, description) computing the float weight from uint8 codes with standard
    operators: ``(codes - zero) * scale`` per group, in netshrink's order (so the same floats)."""
    codes, zero = (t.numpy() for t in weight.unsigned(8))
    groups = weight.scale.shape[1]
    padded_inputs = groups * weight.group
    stored = np.repeat(zero, weight.group, axis=1)  # the padding holds the zero point: nothing
    stored[:, :weight.inputs] = codes
    initializers = [numpy_helper.from_array(stored.reshape(codes.shape[0], groups, weight.group), f"{name}.codes"),
                    numpy_helper.from_array(zero[:, :, None].astype(np.float32), f"{name}.zeros"),
                    numpy_helper.from_array(weight.scale.numpy()[:, :, None].astype(np.float32), f"{name}.scales"),
                    numpy_helper.from_array(np.array([codes.shape[0], padded_inputs], np.int64), f"{name}.rows"),
                    numpy_helper.from_array(np.array(weight.shape, np.int64), f"{name}.shape")]
    nodes = [helper.make_node("Cast", [f"{name}.codes"], [f"{name}.float_codes"], to=1),  # 1 = FLOAT
             helper.make_node("Sub", [f"{name}.float_codes", f"{name}.zeros"], [f"{name}.centred"]),
             helper.make_node("Mul", [f"{name}.centred", f"{name}.scales"], [f"{name}.grouped"]),
             helper.make_node("Reshape", [f"{name}.grouped", f"{name}.rows"], [f"{name}.padded"])]
    if padded_inputs != weight.inputs:
        initializers += [numpy_helper.from_array(np.array([0], np.int64), f"{name}.start"),
                         numpy_helper.from_array(np.array([weight.inputs], np.int64), f"{name}.end"),
                         numpy_helper.from_array(np.array([1], np.int64), f"{name}.axis")]
        nodes.append(helper.make_node("Slice", [f"{name}.padded", f"{name}.start", f"{name}.end", f"{name}.axis"],
                                      [f"{name}.rows_only"]))
    nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], f"{name}.shape"], [output]))
    return initializers, nodes, f"{weight.bits}-bit codes in uint8, {weight.scheme} {weight.layout}"


def _how(weight: IntegerWeight, bits: int, block: int) -> str:
    held = f"{weight.bits}-bit" if bits == weight.bits else f"{weight.bits}-bit codes in {bits}-bit containers"
    return f"{held}, {weight.scheme} {weight.layout} (blocks of {block})"


def rewrite(graph_model, modules: dict, integer: dict[str, IntegerWeight], locate, accuracy_level: int,
            report) -> None:
    """Replace the fp32 weights of ``graph_model`` by the codes in ``integer`` (layer -> codes),
    in place; ``locate`` maps an initializer to (layer, transposed) as the int8 export does."""
    from onnx import helper, numpy_helper

    from torch import nn

    graph = graph_model.graph
    initializers = {i.name: i for i in graph.initializer}
    replaced: dict[int, list] = {}
    done: dict[str, str] = {}
    transposes = {n.output[0]: n.input[0] for n in graph.node  # Transpose(W) -> MatMul: the dynamo exporter's Linear
                  if n.op_type == "Transpose" and n.input[0] in initializers
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])}
    for index, node in enumerate(graph.node):
        slot = 0 if node.op_type == "Gather" else 1 if node.op_type in ("Gemm", "MatMul", "Conv") else None
        if slot is None or len(node.input) <= slot:
            continue
        source = node.input[slot]
        through_transpose = node.op_type == "MatMul" and source in transposes
        if source not in initializers and not through_transpose:
            continue
        found = locate(initializers[transposes[source] if through_transpose else source])
        if found is None or found[0] not in integer:
            continue
        layer, transposed = found[0], found[1] != through_transpose
        weight, module, tag = integer[layer], modules[layer], f"{layer}.{index}"
        built = None
        # A Linear layer's rows looked up by a Gather: an output layer tied to the token embedding.
        if node.op_type == "Gather" and isinstance(module, (nn.Embedding, nn.Linear)) and not transposed:
            built = gather_block_quantized(weight, tag, node.input[1], node.output[0], helper, numpy_helper)
        elif node.op_type == "MatMul" and isinstance(module, nn.Linear) and transposed:
            built = matmul_nbits(weight, tag, node.input[0], node.output[0], accuracy_level, helper, numpy_helper)
        elif node.op_type == "Gemm" and isinstance(module, nn.Linear) and _plain_gemm(node) and not transposed:
            product = f"{tag}.product" if len(node.input) > 2 else node.output[0]
            built = matmul_nbits(weight, tag, node.input[0], product, accuracy_level, helper, numpy_helper)
            if built is not None and len(node.input) > 2:
                built[1].append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
        elif node.op_type == "Conv" and not transposed:
            built = dequantized_codes(weight, tag, f"{tag}.weight", helper, numpy_helper)
            node.input[1] = f"{tag}.weight"
            built[1].append(node)
        if built is None:
            done.setdefault(layer, f"fp32: a {weight.bits}-bit grid with groups of {weight.group} inputs has no "
                                   f"block of a power of two >= {MIN_BLOCK} that ONNX Runtime's kernels take")
            continue
        graph.initializer.extend(built[0])
        replaced[index] = built[1]
        done[layer] = built[2]
    nodes = []
    for index, node in enumerate(graph.node):
        nodes += replaced.get(index, [node])
    outputs = {o.name for o in graph.output}
    while True:  # drop what fed only the replaced nodes (a Transpose of the old float weight)
        read = {name for node in nodes for name in node.input} | outputs
        live = [node for node in nodes if any(out in read for out in node.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)
    if any(node.domain == "com.microsoft" for node in graph.node) and not any(
            o.domain == "com.microsoft" for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for layer in modules:
        if layer in integer:
            tied = next((other for other in done if other != layer and integer[other].shape == integer[layer].shape
                         and torch.equal(integer[other].codes, integer[layer].codes)), None)
            report.layers.append((layer, done.get(layer) or (f"tied to {tied}: stored with it" if tied else
                                                             "not found as a weight in the graph (fp32 if used)")))


def _plain_gemm(node) -> bool:
    """A Gemm computing x @ W^T + b and nothing more (how a Linear layer is exported)."""
    attributes = {a.name: (a.f if a.type == a.FLOAT else a.i) for a in node.attribute}
    return (attributes.get("transB", 0) == 1 and attributes.get("transA", 0) == 0
            and attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0)

