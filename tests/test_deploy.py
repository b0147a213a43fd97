"""Every export target on tiny models: codes written exactly, each runtime's output against the
PyTorch model, grids a format cannot hold refused or named."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import netshrink
from netshrink.deploy.codes import integer_weight
from netshrink.deploy.onnx_low_bit import pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# By default OpenVINO computes float operations in bfloat16 on CPUs that have it (AVX512-BF16, AMX)
# and, on CPUs with VNNI, rounds the inputs of layers with compressed weights to int8 on the fly
# (dynamic quantization): the tests check that the exported graph holds netshrink's model, so they
# ask for float32 and no dynamic quantization.
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}


def mlp(**quantize) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    netshrink.quantize(model, **quantize)
    return model


def tiny_bert(**quantize) -> nn.Module:
    """A two-layer BERT with random weights, quantized with ``quantize`` if given."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = BertModel(config).eval()
    if quantize:
        netshrink.quantize(model, **quantize)
    return model


def tiny_gpt2(**quantize) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    netshrink.quantize(model, **quantize)
    return model


GRIDS = [dict(weight_bits=4), dict(weight_bits=3, method="round", group_size=16), dict(weight_bits=8),
         dict(weight_bits=2, method="round", group_size=32, scheme="affine"),
         dict(weight_bits=5, method="gptq", group_size=16)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "-".join(f"{v}" for v in g.values()))
def test_onnx_low_bit_keeps_codes_and_matches_pytorch(tmp_path, grid):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    x = torch.randn(7, 64)
    model = mlp(**grid) if grid.get("method") != "gptq" else None
    if model is None:
        model = mlp(weight_bits=grid["weight_bits"], method="gptq", group_size=16, calibration=[torch.randn(32, 64)])
    codes = integer_weight(model[0])
    assert codes is not None and codes.bits == grid["weight_bits"]
    report = netshrink.export(model, tmp_path / "m.onnx", example_inputs=x, low_bit=True, accuracy_level=0)
    assert [row[0] for row in report.layers] == ["0", "2"] and "fp32" not in report.layers[0][1]
    graph = onnx.load(tmp_path / "m.onnx")
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits")
    stored = numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == node.input[1]))
    bits = next(a.i for a in node.attribute if a.name == "bits")
    container, _ = codes.unsigned(bits)
    rows, inputs = container.shape
    block = next(a.i for a in node.attribute if a.name == "block_size")
    padded = np.zeros((rows, -(-inputs // block) * block), np.uint8)
    padded[:, :inputs] = container.numpy()
    assert np.array_equal(stored.reshape(rows, -1), pack(padded, bits))  # the codes, bit for bit
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - model(x).detach().numpy()).max() < 1e-5


def test_onnx_low_bit_embeddings_and_int8_kernels(tmp_path):
    import onnxruntime as ort

    model = tiny_bert(weight_bits=4, method="round", group_size=32)
    ids = torch.randint(0, 96, (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reference = model(**inputs).last_hidden_state.detach().numpy()
    report = netshrink.export(model, tmp_path / "b.onnx", example_inputs=inputs, low_bit=True)  # accuracy_level 4: int8 arithmetic inside MatMulNBits
    how = dict(report.layers)
    assert how["embeddings.word_embeddings"].startswith("4-bit") and how["encoder.layer.0.attention.self.query"].startswith("4-bit")
    session = ort.InferenceSession(str(tmp_path / "b.onnx"))
    assert {n.op_type for n in __import__("onnx").load(tmp_path / "b.onnx").graph.node} >= {"MatMulNBits", "GatherBlockQuantized"}
    out = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    cosine = (out * reference).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.min() > 0.999  # int8 activations inside the kernel: close, not equal
    fp32 = netshrink.export(model, tmp_path / "f.onnx", example_inputs=inputs)
    assert any("low_bit=True" in note for note in fp32.notes)
    assert (tmp_path / "b.onnx").stat().st_size * 3 < (tmp_path / "f.onnx").stat().st_size


def test_onnx_low_bit_rows_of_any_length_per_channel(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    netshrink.quantize(model, 4)  # per channel: rows of 300 and 100 inputs, no power-of-two block divides them
    x = torch.randn(5, 64)
    report = netshrink.export(model, tmp_path / "m.onnx", example_inputs=x, low_bit=True, accuracy_level=0)
    assert [how for _, how in report.layers] == ["4-bit, symmetric per channel (blocks of 64)",
                                                 "4-bit, symmetric per channel (blocks of 32)",
                                                 "4-bit, symmetric per channel (blocks of 32)"]
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - model(x).detach().numpy()).max() < 1e-5
    if importlib.util.find_spec("openvino"):  # padded last blocks read the same way by OpenVINO
        import openvino as ov

        netshrink.export(model, tmp_path / "m.xml", example_inputs=x)
        out = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU", EXACT)(x.numpy())[0]
        assert np.abs(out - model(x).detach().numpy()).max() < 1e-5


def test_onnx_low_bit_names_a_group_no_block_holds(tmp_path):
    model = mlp(weight_bits=4, method="round", group_size=24)  # 24 = 8 * 3: no power-of-two block >= 16
    report = netshrink.export(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 64), low_bit=True)
    assert dict(report.layers)["0"].startswith("fp32: a 4-bit grid with groups of 24")
    with pytest.raises(netshrink.NetshrinkError, match="choose one"):
        netshrink.export(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 64), low_bit=True, int8=True)


def test_openvino_holds_four_bit_constants(tmp_path):
    ov = pytest.importorskip("openvino")
    model = mlp(weight_bits=4, method="round", group_size=32)
    x = torch.randn(5, 64)
    for attempt in range(2):  # the public entry point, twice
        report = netshrink.export(model, tmp_path / "m.xml", example_inputs=x)
        assert report.target.startswith("OpenVINO IR")
    read = ov.Core().read_model(str(tmp_path / "m.xml"))
    assert "u4" in {op.get_output_element_type(0).get_type_name() for op in read.get_ops() if op.get_type_name() == "Constant"}
    out = ov.Core().compile_model(read, "CPU", EXACT)(x.numpy())[0]
    assert np.abs(out - model(x).detach().numpy()).max() < 1e-4
    with pytest.raises(netshrink.NetshrinkError, match=".xml"):
        netshrink.export(model, tmp_path / "m.bin", format="openvino", example_inputs=x)


def test_compressed_tensors_loads_back_in_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModel

    ids = torch.randint(0, 96, (2, 9))
    for grid in (dict(weight_bits=4, method="round", group_size=32), dict(weight_bits=3, method="round", group_size=16),
                 dict(weight_bits=4, method="round", group_size=32, scheme="affine")):
        model = tiny_bert(**grid)
        report = netshrink.export(model, tmp_path / "ct", format="compressed-tensors")
        how = dict(report.layers)["encoder.layer.0.intermediate.dense"]
        back = AutoModel.from_pretrained(tmp_path / "ct").eval()
        out = back(input_ids=ids).last_hidden_state
        assert torch.equal(out, model(input_ids=ids).last_hidden_state), grid
        if grid.get("scheme") == "affine":
            assert how.startswith("float: its 4-bit affine grid")
        else:
            assert how == f"pack-quantized {grid['weight_bits']}-bit, symmetric, groups of {grid['group_size']}"
            assert back.config.quantization_config is not None


def test_gguf_blocks_hold_the_codes(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = tiny_gpt2(weight_bits=4, method="round", group_size=32)
    netshrink.export(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    assert tensor.tensor_type.name == "Q4_0"
    layer = integer_weight(model.transformer.h[0].attn.c_attn)
    raw = np.asarray(tensor.data).reshape(layer.shape[0], -1, 18)  # 2 bytes of scale, 16 of nibbles per block
    nibbles = raw[..., 2:]
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.int16) - 8
    assert np.array_equal(codes.reshape(layer.shape[0], -1), layer.codes.numpy())
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    reference = layer.values().numpy()
    assert np.abs(values - reference).max() <= 2 ** -11 * np.abs(reference).max()  # float16 block scales only


def test_gguf_refuses_a_grid_no_block_type_holds(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_gpt2(weight_bits=4, method="round", group_size=16)
    with pytest.raises(netshrink.NetshrinkError, match=r"transformer\.h\.0\.attn\.c_attn \(4-bit symmetric, groups of 16\)"):
        netshrink.export(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    report = netshrink.export(model, tmp_path / "m.gguf", unfit="float")
    assert dict(report.layers)["transformer.h.0.attn.c_attn"] == "F32"


@pytest.mark.slow
def test_llama_cpp_runs_netshrink_gguf(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_gpt2(weight_bits=4, method="round", group_size=32)
    mixed = copy.deepcopy(model)
    ids = [5, 17, 99, 3, 42, 7]
    reference = mixed(torch.tensor([ids])).logits[0].detach().numpy()
    netshrink.export(model, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    assert np.abs(logits - reference).max() < 0.02 * np.abs(reference).max()  # Q4_0 x Q8 activations


def test_format_comes_from_the_name(tmp_path):
    model = mlp(weight_bits=4)
    with pytest.raises(netshrink.NetshrinkError, match="cannot tell the format"):
        netshrink.export(model, tmp_path / "m.bin")
    with pytest.raises(netshrink.NetshrinkError, match="format must be one of"):
        netshrink.export(model, tmp_path / "m.onnx", format="tflite")


@pytest.mark.slow
def test_cli_exports_each_format(tmp_path):
    model = tiny_bert(weight_bits=4, method="round", group_size=32)
    netshrink.save(model, tmp_path / "b.nsk")
    for output, extra in (("b.onnx", ["--low-bit"]), ("b.gguf", []), ("ct", ["--format", "compressed-tensors"])):
        run = subprocess.run([sys.executable, "-m", "netshrink.cli", "export", str(tmp_path / "b.nsk"), "-o",
                              str(tmp_path / output), *extra], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "embeddings.word_embeddings" in run.stdout or "encoder.layer.0" in run.stdout
    run = subprocess.run([sys.executable, "-m", "netshrink.cli", "export", str(tmp_path / "b.nsk"), "-o",
                          str(tmp_path / "b.gguf"), "--low-bit"], capture_output=True, text=True)
    assert run.returncode != 0 and "ONNX choices" in run.stderr and "Traceback" not in run.stderr


def test_compressed_tensors_records_two_four_sparsity(tmp_path):
    pytest.importorskip("compressed_tensors")
    import json

    from transformers import AutoModel

    ids = torch.randint(0, 96, (2, 9))
    for bits in (None, 4):  # a float 2:4 encoder, then a 4-bit one
        model = tiny_bert()
        netshrink.apply(model, netshrink.NMSparsity(n=2, m=4, targets=("re:encoder\\..*",)))
        if bits:
            netshrink.quantize(model, bits, method="round", group_size=32)
        report = netshrink.export(model, tmp_path / f"ct{bits}", format="compressed-tensors")
        config = json.loads((tmp_path / f"ct{bits}" / "config.json").read_text())["quantization_config"]
        sparse = config["sparsity_config"]
        assert sparse["sparsity_structure"] == "2:4" and "encoder.layer.0.output.dense" in sparse["targets"]
        assert "pooler.dense" not in sparse["targets"]
        assert dict(report.layers)["encoder.layer.1.attention.self.key"].endswith("2:4 sparse")
        back = AutoModel.from_pretrained(tmp_path / f"ct{bits}").eval()
        assert torch.equal(back(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_gguf_refuses_a_model_with_heads_removed(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_bert()
    narrow = copy.deepcopy(model)
    netshrink.remove_heads(narrow, heads=0.5, neurons=1.0)
    with pytest.raises(netshrink.NetshrinkError, match="heads removed"):
        netshrink.export(narrow, tmp_path / "h.gguf")
    assert not (tmp_path / "h.gguf").exists()


def test_cnn_with_batchnorm_residuals_and_depthwise_convs_in_onnx_runtime_and_openvino(tmp_path):
    """Convolutions keep their codes (BatchNorm folded into their scales), Linear layers go to
    MatMulNBits; both runtimes compute what PyTorch computes."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = netshrink.build_model("resmobile", (1, 8, 8))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    model.eval()
    netshrink.quantize(model, 4)
    x = torch.randn(6, 1, 8, 8)
    report = netshrink.export(model, tmp_path / "c.onnx", example_inputs=x, low_bit=True, accuracy_level=0)
    how = dict(report.layers)
    assert sum("4-bit codes in uint8" in h for h in how.values()) >= 3  # the convolutions, depthwise ones too
    reference = model(x).detach().numpy()
    out = ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - reference).max() < 1e-3 * np.abs(reference).max() + 1e-4
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        netshrink.export(model, tmp_path / "c.xml", example_inputs=x, accuracy_level=0)
        out = ov.Core().compile_model(str(tmp_path / "c.xml"), "CPU", EXACT)(x.numpy())[0]
        assert np.abs(out - reference).max() < 1e-3 * np.abs(reference).max() + 1e-4


def test_decoder_with_its_cache_generates_like_pytorch(tmp_path):
    import onnxruntime as ort

    model = tiny_gpt2(weight_bits=4, method="round", group_size=32)
    for low_bit in (False, True):
        report = netshrink.export(model, tmp_path / "d.onnx", cache=True, low_bit=low_bit, accuracy_level=0)
        if low_bit:
            how = dict(report.layers)
            assert how["lm_head"].startswith("4-bit") and how["transformer.wte"] == "tied to lm_head: stored with it"
        session = ort.InferenceSession(str(tmp_path / "d.onnx"))
        keys = values = np.zeros((2, 1, 4, 0, 16), np.float32)
        prompt, sequence = [5, 17, 99, 3], [5, 17, 99, 3]
        logits, keys, values = session.run(None, {"input_ids": np.array([prompt]), "past_keys": keys, "past_values": values})
        assert np.abs(logits[0] - model(torch.tensor([prompt])).logits[0].detach().numpy()).max() < 1e-4
        for token in (7, 8, 9):  # one token at a time, the cache fed back
            sequence.append(token)
            logits, keys, values = session.run(None, {"input_ids": np.array([[token]]), "past_keys": keys,
                                                      "past_values": values})
            reference = model(torch.tensor([sequence])).logits[0, -1].detach().numpy()
            assert np.abs(logits[0, -1] - reference).max() < 1e-4
    with pytest.raises(netshrink.NetshrinkError, match="causal language model"):
        netshrink.export(tiny_bert(), tmp_path / "b.onnx", cache=True)
