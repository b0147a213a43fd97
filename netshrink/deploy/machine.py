"""The machine a measurement ran on, read off it rather than assumed: the CPU, the instruction sets
that decide ONNX Runtime's int8 speed, and whether its u8 x s8 kernels add products exactly.

ONNX Runtime's int8 matrix kernels differ by CPU: without VNNI (AVX2, AVX-512 without VNNI) they
multiply with ``vpmaddubsw``, which adds two u8*s8 products in a 16-bit register that saturates;
with VNNI (AVX-VNNI, AVX512-VNNI) or AMX the sums are exact 32-bit. A latency or accuracy figure
means little without knowing which kind produced it, so every benchmark and ``netshrink bench``
state it. The saturation is measured by running ONNX Runtime itself on products that overflow 16
bits, because which kernel its dispatcher picks is its own decision, not a CPU flag's.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) that decide int8 and fp32 kernel choice, in the order shown.
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx_vnni": "AVX-VNNI", "avx512_vnni": "AVX512-VNNI",
            "amx_int8": "AMX-INT8", "asimddp": "ARM dot product"}


def cpu(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(the CPU's model name, its int8-relevant instruction sets) from ``cpuinfo`` (the text of
    /proc/cpuinfo; read from the machine when None). Outside Linux the model name is the platform's
    and the instruction sets are unknown (an empty list)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())  # the first processor's lines
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return " ".join(name.split()), [label for flag, label in FEATURES.items() if flag in flags]


@functools.lru_cache(maxsize=1)
def int8_sums_saturate() -> bool:
    """Whether ONNX Runtime's u8 x s8 matrix product on this machine saturates at 16 bits (CPUs
    without VNNI), measured: 255 * 127 summed over 64 products must come out exact."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    depth, rows, columns = 64, 8, 16  # large enough for the blocked GEMM kernel, not a scalar tail
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "saturation",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, columns])],
        [numpy_helper.from_array(np.full((depth, columns), 127, np.int8), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    product = session.run(None, {"a": np.full((rows, depth), 255, np.uint8)})[0]
    return bool((product != 255 * 127 * depth).any())


def describe(cpuinfo: str | None = None, saturates: bool | None = None) -> str:
    """One line for a report: the CPU, its int8 instruction sets and how ONNX Runtime's int8 kernels
    add on it (measured unless ``saturates`` is given)."""
    name, features = cpu(cpuinfo)
    if saturates is None:
        saturates = int8_sums_saturate()
    kernels = ("16-bit pair sums that saturate (no VNNI): netshrink's 7-bit weights are exact, full-range "
               "int8 weights are not" if saturates else "exact 32-bit sums (VNNI or AMX)")
    return f"{name} ({', '.join(features) or 'instruction sets unknown'}); ONNX Runtime int8 kernels: {kernels}"
