"""netshrink.deploy.machine: the CPU read off /proc/cpuinfo text, and ONNX Runtime's int8 kernel behaviour
measured, checked against an emulation of both kernel kinds so the test holds on either machine."""
import numpy as np
import pytest

from netshrink.deploy import machine
from test_export import emulate_u8s8_without_vnni

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma bmi2 avx512_vnni
"""
SAPPHIRE = """processor : 0
model name : Intel(R) Xeon(R)   Platinum 8480+
flags : sse2 avx2 avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile
"""
ARM = """processor : 0
Features : fp asimd aes asimddp
"""


def test_cpu_features_read_off_cpuinfo_text():
    # Only the first processor's lines count; flags map to the names a report prints, in a fixed order.
    assert machine.cpu(AVX2_ONLY) == ("AMD EPYC 7B12", ["AVX2"])
    assert machine.cpu(SAPPHIRE) == ("Intel(R) Xeon(R) Platinum 8480+",
                                     ["AVX2", "AVX-512", "AVX-VNNI", "AVX512-VNNI", "AMX-INT8"])
    name, features = machine.cpu(ARM)
    assert features == ["ARM dot product"] and name  # no model name line: the platform's name instead
    assert machine.cpu("")[1] == []


def test_describe_states_the_kernel_kind_it_is_given_or_measures():
    assert "AVX2)" in machine.describe(AVX2_ONLY, saturates=True)
    assert "saturate" in machine.describe(AVX2_ONLY, saturates=True)
    assert "exact 32-bit" in machine.describe(SAPPHIRE, saturates=False)
    assert "instruction sets unknown" in machine.describe("", saturates=False)
    measured = machine.describe()
    assert ("saturate" in measured) == machine.int8_sums_saturate()


def test_measured_saturation_matches_what_onnx_runtime_computes_here():
    """Whichever machine runs this: ONNX Runtime's product of codes whose adjacent pairs overflow 16
    bits (other shapes and values than the probe's) is exact exactly when int8_sums_saturate() says no."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, size=(16, 96), dtype=np.uint8)
    w = rng.choice(np.array([-127, -100, 100, 127], np.int8), size=(32, 96))  # [out, in]: pairs overflow 16 bits
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [16, 32])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    product = session.run(None, {"x": x})[0]
    exact, saturated = x.astype(np.int64) @ w.astype(np.int64).T, emulate_u8s8_without_vnni(x, w)
    assert not np.array_equal(exact, saturated)  # the inputs do tell the two kinds apart
    assert np.array_equal(product, exact) != machine.int8_sums_saturate()
