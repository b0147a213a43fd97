import numpy as np
import pytest
import torch
from torch import nn

import netshrink
from netshrink.deploy.machine import int8_sums_saturate
from netshrink.deploy.to_onnx import export, saturating_layers

ort = pytest.importorskip("onnxruntime")


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


class ResidualCNN(nn.Module):
    """A model netshrink did not define: BatchNorm, a residual connection, global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.stem(x)))
        y = torch.relu(y + self.bn2(self.conv(y)))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("lenet-300-100", (1, 8, 8)), ("lenet-5", (1, 28, 28))])
def test_fp32_export_matches_pytorch(tmp_path, name, shape):
    model = netshrink.build_model(name, shape).eval()
    netshrink.prune(model, keep=0.3)  # sparse models export with dense zeros
    x = torch.rand(16, *shape)
    report = export(model, tmp_path / "m.onnx")
    assert all(how == "fp32" for _, how in report.layers)
    assert np.allclose(run_onnx(tmp_path / "m.onnx", x), model(x).detach().numpy(), atol=1e-4)


def test_int8_export_agrees_with_netshrink_evaluation(tmp_path, trained, digits):
    train, test = digits
    netshrink.prune(trained, keep=0.5)
    netshrink.quantize(trained, weight_bits=4, activation_bits=8, calibration=train)
    report = export(trained, tmp_path / "q.onnx", int8=True)
    assert all("exact int8 (7 levels" in how for _, how in report.layers)  # 4-bit grids stored exactly
    ours = trained(test.tensors[0]).detach().numpy()
    theirs = run_onnx(tmp_path / "q.onnx", test.tensors[0])
    # Stated tolerance: integer kernels requantize with fixed-point multipliers, so a hidden value may
    # land one 8-bit step away; logits stay within 2% of their range and predictions agree >= 99%.
    assert np.abs(ours - theirs).max() <= 0.02 * (ours.max() - ours.min())
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99


def test_int8_export_of_user_cnn_with_batchnorm_and_residual(tmp_path):
    torch.manual_seed(0)
    model = ResidualCNN()
    data = (torch.rand(256, 1, 8, 8), torch.zeros(256, dtype=torch.long))
    model.train()
    model(data[0])  # BatchNorm statistics
    model.eval()
    report = export(model, tmp_path / "cnn.onnx", int8=True, calibration=data, input_shape=(1, 8, 8))
    assert {layer for layer, how in report.layers if how.startswith("int8")} == {"stem", "conv", "head"}
    assert any("calibrated now" in note for note in report.notes)
    x = torch.rand(64, 1, 8, 8)
    reference = model(x).detach().numpy()
    theirs = run_onnx(tmp_path / "cnn.onnx", x)
    assert np.abs(reference - theirs).max() <= 0.05 * (reference.max() - reference.min()) + 1e-3
    fp32 = export(model, tmp_path / "cnn32.onnx", input_shape=(1, 8, 8))
    assert fp32.layers and np.allclose(run_onnx(tmp_path / "cnn32.onnx", x), reference, atol=1e-4)


def test_export_errors_are_clear(tmp_path, trained):
    with pytest.raises(netshrink.NetshrinkError, match="calibration"):
        export(trained, tmp_path / "q.onnx", int8=True)
    with pytest.raises(netshrink.NetshrinkError, match="input_shape"):
        export(nn.Sequential(nn.Linear(4, 2)), tmp_path / "x.onnx")
    with pytest.raises(netshrink.NetshrinkError, match="no Linear or Conv"):
        export(nn.Sequential(nn.ReLU()), tmp_path / "x.onnx", int8=True, input_shape=(4,))

    class NotExportable(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    with pytest.raises(netshrink.NetshrinkError, match="ONNX export failed"):
        export(NotExportable(), tmp_path / "x.onnx", input_shape=(4,))
    assert not (tmp_path / "x.onnx").exists()


def test_structured_and_sparse_models_export(tmp_path, trained, digits):
    small, _ = netshrink.remove_units(trained, keep=0.5)
    netshrink.prune(small, keep=0.2)
    report = export(small, tmp_path / "small.onnx", int8=True, calibration=digits[0])
    assert any("dense tensors with zeros" in note and "fc1 (80% zeros)" in note for note in report.notes)
    x = digits[1].tensors[0]
    ours, theirs = small(x).detach().numpy(), run_onnx(tmp_path / "small.onnx", x)
    assert theirs.shape == (len(x), 10)
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.97  # 8-bit activations calibrated at export


def test_int8_logits_option(tmp_path, trained, digits):
    netshrink.quantize(trained, weight_bits=8, activation_bits=8, calibration=digits[0])
    report = export(trained, tmp_path / "q.onnx", int8=True, int8_logits=True, calibration=digits[0])
    assert any("logits quantized" in note for note in report.notes)
    x = digits[1].tensors[0]
    ours, theirs = trained(x).detach().numpy(), run_onnx(tmp_path / "q.onnx", x)
    assert np.abs(ours - theirs).max() <= 0.03 * (ours.max() - ours.min())
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.98  # near-ties may flip once logits are 8-bit
    with pytest.raises(netshrink.NetshrinkError, match="int8_logits needs calibration"):
        export(trained, tmp_path / "x.onnx", int8=True, int8_logits=True)


def emulate_u8s8_without_vnni(x_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """x [n, k] uint8 @ w [out, k] int8 as AVX2 computes it without VNNI (vpmaddubsw): each pair of
    adjacent products is added in 16 bits with saturation, then pairs are summed in 32 bits."""
    k = x_u8.shape[1] + x_u8.shape[1] % 2
    x = np.pad(x_u8.astype(np.int64), ((0, 0), (0, k - x_u8.shape[1])))
    w = np.pad(w_s8.astype(np.int64), ((0, 0), (0, k - w_s8.shape[1])))
    products = x[:, None, :] * w[None, :, :]  # [n, out, k]
    pairs = np.clip(products[..., 0::2] + products[..., 1::2], -32768, 32767)
    return pairs.sum(-1)


def int8_weights(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".weight_int8")}


def test_default_int8_export_cannot_saturate_on_cpus_without_vnni(tmp_path, trained, digits):
    """Read off the exported integer weights, so it fails on any machine, VNNI or not."""
    import onnx

    netshrink.quantize(trained, weight_bits=8, activation_bits=8, calibration=digits[0])
    safe = netshrink.export(trained, tmp_path / "safe.onnx", int8=True)
    assert "every x86-64 CPU" in safe.target
    assert saturating_layers(onnx.load(str(tmp_path / "safe.onnx"))) == []
    assert all("quantized now to 63 levels" in how for _, how in safe.layers)  # 8-bit grids re-quantized
    full = netshrink.export(trained, tmp_path / "vnni.onnx", int8=True, vnni=True)
    assert "VNNI" in full.target and any("exact int8 (127 levels" in how for _, how in full.layers)
    assert saturating_layers(onnx.load(str(tmp_path / "vnni.onnx"))) != []
    assert any("saturate" in note for note in full.notes)
    # The emulated pre-VNNI kernel is exact on the safe weights and wrong on the full-range ones.
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, size=(64, 64), dtype=np.uint8)
    for path, exact in (("safe.onnx", True), ("vnni.onnx", False)):
        w = int8_weights(tmp_path / path)["fc1.weight_int8"]
        emulated, true = emulate_u8s8_without_vnni(x, w), x.astype(np.int64) @ w.astype(np.int64).T
        assert np.array_equal(emulated, true) == exact


def test_saturation_check_pairs_codes_within_each_output_channel_of_matmul_weights():
    """A MatMul weight is [in, out]: pairs are summed along an output column. Each row here has one
    large code, but column 0 has two."""
    from onnx import TensorProto, helper, numpy_helper

    codes = np.array([[100, 1, 1], [100, 1, 1], [1, 1, 1], [1, 1, 1]], np.int8)
    initializers = [numpy_helper.from_array(codes, "w_int8"), numpy_helper.from_array(np.ones(3, np.float32), "w_scale"),
                    numpy_helper.from_array(np.zeros(3, np.int8), "w_zero")]
    for kernel in ("dequantize", "fused"):
        if kernel == "dequantize":
            nodes = [helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w"], axis=1),
                     helper.make_node("MatMul", ["x", "w"], ["y"])]
        else:
            nodes = [helper.make_node("MatMulIntegerToFloat", ["xq", "w_int8", "s", "w_scale"], ["y"],
                                      domain="com.microsoft")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializers)
        assert saturating_layers(helper.make_model(graph)) == ["w_int8"], kernel
        safe = helper.make_graph(nodes, "g", graph.input, graph.output,
                                 [numpy_helper.from_array(codes.T.copy(), "w_int8"), *initializers[1:]])
        assert saturating_layers(helper.make_model(safe)) == [], kernel  # one large code per output column


def test_batchnorm_folding_keeps_low_bit_grids_exact(tmp_path):
    torch.manual_seed(0)
    model = ResidualCNN()
    data = (torch.rand(256, 1, 8, 8), torch.zeros(256, dtype=torch.long))
    model.train()
    model(data[0])
    model.eval()
    with torch.no_grad():
        model.bn2.weight.copy_(torch.linspace(-1.5, 1.5, 8))  # a negative gamma flips the channel's sign
    netshrink.quantize(model, weight_bits=4, activation_bits=8, calibration=data)
    report = netshrink.export(model, tmp_path / "bn.onnx", int8=True, input_shape=(1, 8, 8))
    assert any("BatchNorm folded" in note for note in report.notes)
    exported = int8_weights(tmp_path / "bn.onnx")
    for layer in ("stem", "conv"):
        codes = exported[f"{layer}.weight_int8"]
        assert np.abs(codes).max() <= 7  # still the 4-bit grid: 15 levels, not re-quantized to 8 bits
        w = getattr(model, layer).weight.detach().numpy()
        scale = np.abs(w.reshape(len(w), -1)).max(1) / 7
        assert np.array_equal(np.abs(codes), np.abs(np.rint(w / scale[:, None, None, None])).astype(np.int8))
    x = torch.rand(64, 1, 8, 8)
    reference, theirs = model(x).detach().numpy(), run_onnx(tmp_path / "bn.onnx", x)
    assert np.abs(reference - theirs).max() <= 0.05 * (reference.max() - reference.min()) + 1e-3


def test_public_export_works_any_number_of_times(tmp_path, trained, digits):
    import importlib

    for module in ("netshrink.onnx_export", "netshrink.deploy", "netshrink.deploy.to_onnx"):
        importlib.import_module(module)  # importing a submodule must not shadow the function
    for i in range(2):
        report = netshrink.export(trained, tmp_path / f"m{i}.onnx")
        assert report.layers and (tmp_path / f"m{i}.onnx").stat().st_size > 0
    # A failing export leaves an existing file as it was (writes are atomic).
    before = (tmp_path / "m0.onnx").read_bytes()
    with pytest.raises(netshrink.NetshrinkError):
        netshrink.export(trained, tmp_path / "m0.onnx", int8=True)  # no calibration data
    assert (tmp_path / "m0.onnx").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_int8_embedding_looked_up_twice_is_stored_once(tmp_path):
    """Each Gather reads the int8 rows it needs and scales them; a table used twice is one table."""
    import onnx
    import onnxruntime as ort

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, input_ids):
            return self.fc(self.embed(input_ids).mean(1) + self.embed(input_ids.flip(1)).amax(1))

    torch.manual_seed(0)
    model = Twice().eval()
    ids = {"input_ids": torch.randint(0, 50, (3, 6))}
    export(model, tmp_path / "m.onnx", int8=True, calibration=[ids], example_inputs=ids)
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [i.name for i in graph.initializer if i.name.startswith("embed.weight")] == \
        ["embed.weight_int8", "embed.weight_row_scale"]
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == "embed.weight_int8" for n in graph.node)
    # Against the dense model with its table on the same int8 grid (the Linear adds 8-bit input rounding).
    from netshrink.deploy.to_onnx import weight_as_int8

    codes, scales, _ = weight_as_int8(model.embed.weight.detach().numpy())
    reference = Twice().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.embed.weight.copy_(torch.from_numpy(codes * scales[:, None]))
        expected = reference(**ids).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input_ids": ids["input_ids"].numpy()})[0]
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


class _MeanPooled(torch.nn.Module):
    """Spatial means kept (keepdim=True, into a 1x1 convolution) and dropped (into a Linear), and a
    mean over channels, which is no global pool."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.mix = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8 + 64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        kept = torch.relu(self.mix(h.mean((2, 3), keepdim=True)))
        return self.fc(torch.cat([kept.mean((-2, -1)), h.mean(1).flatten(1)], 1))


def test_spatial_means_run_as_integer_global_pooling(tmp_path, digits):
    train, test = digits
    model = _MeanPooled()
    netshrink.fit(model, train, epochs=2, lr=3e-3, seed=0, progress=False)
    netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=train)
    report = export(model, tmp_path / "m.onnx", int8=True, calibration=train, input_shape=(1, 8, 8))
    ops = optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearGlobalAveragePool") >= 1 and any("GlobalAveragePool" in n for n in report.notes)
    assert ops.count("ReduceMean") >= 1  # the channel mean is left as it was
    ours = model.eval()(test.tensors[0]).detach().numpy()
    theirs = run_onnx(tmp_path / "m.onnx", test.tensors[0])
    assert np.abs(ours - theirs).max() <= 0.05 * (ours.max() - ours.min())


def optimized_ops(path, tmp_path) -> list[str]:
    """The operators ONNX Runtime actually runs after its graph fusions (extended level: the QDQ
    fusions, none of the hardware-specific layout rewrites)."""
    import onnx

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_residual_cnn_runs_as_integer_kernels_end_to_end(tmp_path, digits):
    """resmobile (residual adds, one through a projection, depthwise convolutions, BatchNorm): with
    calibration data every convolution and add becomes an integer kernel, as quantize_static's
    graph does; without the extra output ranges the convolutions before each add fall back to float."""
    train, test = digits
    model = netshrink.build_model("resmobile", (1, 8, 8))
    netshrink.fit(model, train, epochs=4, lr=3e-3, seed=0, progress=False)
    netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=train)
    ours = model.eval()(test.tensors[0]).detach().numpy()
    for integer_outputs in (True, False):
        path = tmp_path / f"resmobile_{integer_outputs}.onnx"
        report = export(model, path, int8=True, calibration=train, integer_outputs=integer_outputs)
        ops = optimized_ops(path, tmp_path)
        float_kernels = [op for op in ops if op in ("Conv", "FusedConv", "Add")]
        if integer_outputs:
            assert float_kernels == [] and ops.count("QLinearConv") == 9 and ops.count("QLinearAdd") == 2
            assert any("tensors between integer kernels quantized" in note for note in report.notes)
            # the global mean runs on the uint8 map too: no float ReduceMean over a dequantized copy
            assert "ReduceMean" not in ops and ops.count("QLinearGlobalAveragePool") == 1
        else:
            assert len(float_kernels) >= 4  # the convolutions feeding the adds, the adds
            assert not any("between integer kernels" in note for note in report.notes)
        theirs = run_onnx(path, test.tensors[0])
        assert np.abs(ours - theirs).max() <= 0.05 * (ours.max() - ours.min())
        assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.97
    # Activation ranges from the model alone (no calibration data): the export still works, says
    # which tensors stay float, and does not change the model.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export(model, tmp_path / "nodata.onnx", int8=True)
    assert any("stay float (pass calibration data" in note for note in report.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_smoothquant_models_export_as_they_compute(tmp_path, trained, digits, make_tiny_bert):
    """SmoothQuant moves a factor per input channel from the activations into the weight: the
    exported layer must divide its input by it, on a tensor only it reads (a transformer's Q/K/V
    share an input, each with its own factors; an MLP's hidden ReLU output is not rounded twice)."""
    import onnxruntime as ort

    bert = make_tiny_bert()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 120, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(4)]
    batches[0]["attention_mask"][::2, 7:] = 0
    # Full-range 8-bit weights run exactly only where ONNX Runtime's int8 kernels add without
    # saturating (VNNI); elsewhere 7-bit weights, which every x86-64 CPU computes exactly.
    exact_int8 = not int8_sums_saturate()
    netshrink.quantize(bert, weight_bits=8 if exact_int8 else 7, activation_bits=8, calibration=batches, smooth=0.5)
    feed = {k: v.numpy() for k, v in batches[0].items()}
    with torch.no_grad():
        ours = bert(**batches[0]).last_hidden_state.numpy()
    # As float (the quantizers dropped), the factors come back out of the weights: the graph is the
    # model with its quantized weights, close to the original; left in, the output is another model's.
    export(bert, tmp_path / "float.onnx", example_inputs=batches[0])
    floats = ort.InferenceSession(str(tmp_path / "float.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        original = make_tiny_bert()(**batches[0]).last_hidden_state.numpy()
    assert np.abs(floats - original).max() <= 0.05 * np.abs(original).max()
    for portable in (False, True):
        path = tmp_path / f"bert{portable}.onnx"
        report = export(bert, path, int8=True, example_inputs=batches[0], vnni=exact_int8, portable=portable)
        assert sum("smoothed" in how for _, how in report.layers) == 12
        theirs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(ours).max()  # without the division: another model
    train, test = digits
    netshrink.quantize(trained, weight_bits=8, activation_bits=8, calibration=train, smooth=0.5)
    export(trained, tmp_path / "mlp.onnx", int8=True, calibration=train)
    mine = trained(test.tensors[0]).detach().numpy()
    onnx_out = run_onnx(tmp_path / "mlp.onnx", test.tensors[0])
    assert np.abs(mine - onnx_out).max() <= 0.02 * (mine.max() - mine.min())
    assert (mine.argmax(1) == onnx_out.argmax(1)).mean() >= 0.99
