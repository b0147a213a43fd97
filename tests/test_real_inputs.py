"""Held-out model structures: integer and dict inputs, embeddings (tied to an output layer), and a
tiny BERT built from a transformers config (random weights, no download)."""
import copy

import numpy as np

import pytest
import torch
from torch import nn

import netshrink
from netshrink.store import artifact
from netshrink.compress.methods.quantize import fake_quantize


class TinyTextModel(nn.Module):
    """Token ids (and a mask) in, class scores out; the output layer is tied to the embedding."""

    def __init__(self, vocab=60, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied, as language models do

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.mix(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h.mean(1))[:, :10]


def text_data(n=96, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    ids = torch.randint(0, 60, (n, seq), generator=g)
    ids[:, : seq // 2] = labels[:, None] * 6 + torch.randint(0, 6, (n, seq // 2), generator=g)  # the class shows
    mask = (torch.rand(n, seq, generator=g) > 0.2).long()
    return [({"input_ids": ids[i:i + 32], "attention_mask": mask[i:i + 32]}, labels[i:i + 32])
            for i in range(0, n, 32)]


def test_embeddings_and_tied_layers_compress_as_one(tmp_path):
    torch.manual_seed(0)
    model = TinyTextModel()
    dense = copy.deepcopy(model)
    report = netshrink.quantize(model, weight_bits=4)[0]
    assert ("out", "tied to embed: shares its weight and transform") in report.changed
    assert model.out.weight is not None and torch.equal(model.out.weight, model.embed.weight)
    assert torch.equal(model.embed.weight, fake_quantize(dense.embed.weight.detach(), 4))  # dense reference
    data = text_data()
    netshrink.fit(model, data, epochs=2, progress=False)
    assert torch.equal(model.out.weight, model.embed.weight)  # still tied after training
    for row in model.embed.weight:
        assert torch.unique(row).numel() <= 15
    netshrink.save(model, tmp_path / "tied.nsk")
    untied = TinyTextModel()
    untied.out.weight = nn.Parameter(untied.embed.weight.detach().clone() + 1)
    netshrink.quantize(untied, weight_bits=4)
    netshrink.save(untied, tmp_path / "untied.nsk")
    embed_bytes = 60 * 16 // 2
    assert (tmp_path / "untied.nsk").stat().st_size - (tmp_path / "tied.nsk").stat().st_size > embed_bytes
    loaded = netshrink.load(tmp_path / "tied.nsk", model=TinyTextModel())
    inputs = data[0][0]
    assert torch.equal(loaded(**inputs), model(**inputs))
    assert netshrink.summary(model).weights == 60 * 16 + 16 * 16  # the tied weight counted once


def test_dict_and_integer_inputs_through_calibration_fit_and_evaluate():
    torch.manual_seed(0)
    model = TinyTextModel()
    data = text_data()
    before = netshrink.evaluate(model, data)
    netshrink.fit(model, data, epochs=20, lr=3e-3, progress=False)
    assert netshrink.evaluate(model, data) > before + 0.2
    teacher = copy.deepcopy(model)
    netshrink.prune(model, keep=0.5)
    reports = netshrink.quantize(model, weight_bits=8, activation_bits=8, calibration=data)
    activations = next(r for r in reports if r.method == "activations")
    assert {layer for layer, _ in activations.changed} == {"mix", "out"}  # embeddings take integer ids
    unlabeled = [inputs for inputs, _ in data]  # tokenizer outputs, no labels: distillation only
    result = netshrink.fit(model, unlabeled, epochs=2, teacher=teacher, progress=False)
    assert result["steps"] == 6
    with pytest.raises(netshrink.NetshrinkError, match="unlabeled"):
        netshrink.fit(model, unlabeled, epochs=1, progress=False)
    with pytest.raises(netshrink.NetshrinkError, match="labeled"):
        netshrink.evaluate(model, unlabeled)


transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_bert(make_tiny_bert):
    return make_tiny_bert()


def bert_batches(n=48, seq=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, seq // 2:] = 0
    return [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, n, 16)]


def test_tiny_bert_8_bit_weights_and_embeddings_against_dense(tiny_bert, tmp_path):
    data = bert_batches()
    dense = copy.deepcopy(tiny_bert)
    reports = netshrink.quantize(tiny_bert, weight_bits=8, activation_bits=8, calibration=data)
    quantized = {layer for layer, _ in next(r for r in reports if r.method == "quantize").changed}
    assert {"embeddings.word_embeddings", "embeddings.position_embeddings", "encoder.layer.0.attention.self.query",
            "pooler.dense"} <= quantized
    with torch.no_grad():
        for batch in data:
            ours, reference = tiny_bert(**batch).last_hidden_state, dense(**batch).last_hidden_state
            cosine = torch.nn.functional.cosine_similarity(ours.flatten(1), reference.flatten(1)).min()
            assert cosine > 0.99
    netshrink.save(tiny_bert, tmp_path / "bert.nsk")
    raw = (tmp_path / "bert.nsk").read_bytes()
    _, payloads = artifact.read_manifest(raw)  # each tensor's coded bytes
    modules = dict(tiny_bert.named_modules())
    for layer in quantized:  # each 8-bit weight stored in about a byte (codes + per-row scales)
        assert payloads[f"{layer}.weight"].nbytes <= 1.2 * modules[layer].weight.numel() + 64, layer
    loaded = netshrink.load(tmp_path / "bert.nsk", model=transformers.BertModel(dense.config))
    with torch.no_grad():
        assert torch.equal(loaded(**data[0]).last_hidden_state, tiny_bert(**data[0]).last_hidden_state)


def test_tiny_bert_distils_on_unlabeled_batches(tiny_bert):
    data = bert_batches()
    teacher = copy.deepcopy(tiny_bert)
    netshrink.prune(tiny_bert, keep=0.2, ignore=["re:embeddings.*"])

    def gap():
        with torch.no_grad():
            return sum(float((tiny_bert(**b).last_hidden_state - teacher(**b).last_hidden_state).pow(2).mean())
                       for b in data)

    before = gap()
    netshrink.fit(tiny_bert, data, epochs=20, lr=3e-4, teacher=teacher, distill=netshrink.Distill(objective="mse"),
                  progress=False)
    assert gap() < 0.2 * before  # distillation closes most of the gap
    assert float((tiny_bert.encoder.layer[0].intermediate.dense.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


def test_tiny_bert_exports_to_onnx_runtime_with_named_dynamic_inputs(tiny_bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from netshrink.deploy.to_onnx import saturating_layers

    data = bert_batches()
    netshrink.quantize(tiny_bert, weight_bits=7, activation_bits=8, calibration=data)
    fp32 = netshrink.export(tiny_bert, tmp_path / "fp32.onnx", example_inputs=data[0])
    int8 = netshrink.export(tiny_bert, tmp_path / "int8.onnx", example_inputs=data[0], int8=True)
    how = dict(int8.layers)
    assert how["embeddings.word_embeddings"].startswith("int8 embedding table: exact")
    assert how["encoder.layer.1.attention.self.query"].startswith("int8: weights exact int8")
    assert how.pop("pooler.dense") == "not in the graph: the exported output does not use it"
    assert not any(h.startswith("fp32") for h in how.values()) and fp32.layers
    assert saturating_layers(onnx.load(str(tmp_path / "int8.onnx"))) == []
    for path in ("fp32.onnx", "int8.onnx"):  # eager attention: no NaN guard per layer
        assert "IsNaN" not in {n.op_type for n in onnx.load(str(tmp_path / path)).graph.node}
    assert tiny_bert.config._attn_implementation == "sdpa"  # the user's model is not changed
    batch = {k: v[:5, :11] for k, v in data[1].items()}  # another batch size and sequence length
    with torch.no_grad():
        reference = tiny_bert(**batch).last_hidden_state.numpy()
    for path, least in (("fp32.onnx", 0.999), ("int8.onnx", 0.99)):
        session = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
        theirs = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(theirs).flatten(1),
                                                       torch.from_numpy(reference).flatten(1))
        assert theirs.shape == reference.shape and float(cosine.min()) > least, path


def test_tiny_bert_int8_projections_use_one_fused_kernel_with_the_same_values(tiny_bert, make_tiny_bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from netshrink.deploy.to_onnx import saturating_layers

    data = bert_batches()
    netshrink.quantize(tiny_bert, weight_bits=7, activation_bits=8, calibration=data)
    fused = netshrink.export(tiny_bert, tmp_path / "fused.onnx", example_inputs=data[0], int8=True)
    netshrink.export(tiny_bert, tmp_path / "portable.onnx", example_inputs=data[0], int8=True, portable=True)
    nodes = {p: onnx.load(str(tmp_path / f"{p}.onnx")).graph.node for p in ("fused", "portable")}
    kernels = [n for n in nodes["fused"] if n.op_type == "MatMulIntegerToFloat"]
    assert len(kernels) == 12 and all(len(n.input) == 7 and n.domain == "com.microsoft" for n in kernels)  # bias inside
    assert not any(n.domain for n in nodes["portable"]) and any("MatMulIntegerToFloat" in n for n in fused.notes)
    assert len(saturating_layers(onnx.load(str(tmp_path / "fused.onnx")))) == 0
    eight_bit = make_tiny_bert()
    netshrink.quantize(eight_bit, weight_bits=8, activation_bits=8, calibration=data)
    for portable in (False, True):  # full-range weights are flagged in the fused kernels as in the QDQ graph
        netshrink.export(eight_bit, tmp_path / f"vnni{portable}.onnx", example_inputs=data[0], int8=True, vnni=True,
                         portable=portable)
    flagged = [saturating_layers(onnx.load(str(tmp_path / f"vnni{p}.onnx"))) for p in (False, True)]
    assert flagged[0] == flagged[1] and len(flagged[0]) >= 12
    batch = {k: v[:5, :11].numpy() for k, v in data[1].items()}
    outputs = [ort.InferenceSession(str(tmp_path / f"{p}.onnx"), providers=["CPUExecutionProvider"]).run(None, batch)[0]
               for p in ("fused", "portable")]
    assert np.allclose(outputs[0], outputs[1], atol=1e-4)  # the QDQ graph, as ONNX Runtime runs it, is the reference
    with pytest.raises(netshrink.NetshrinkError, match="portable"):
        netshrink.export(tiny_bert, tmp_path / "x.onnx", example_inputs=data[0], int8=True, portable="yes")


def test_inputs_follow_the_model_to_its_device():
    """Data read on the CPU reaches a model on another device (the meta device stands in for a GPU
    here): tensors, tuples and dicts of them are moved before the model runs, labels to the output's."""
    from netshrink.training.batches import call

    model = nn.Linear(4, 3).to("meta")
    assert call(model, torch.ones(2, 4)).device.type == "meta"

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, features, mask):
            return self.linear(features) * mask

    keywords = Keywords().to("meta")
    assert call(keywords, {"features": torch.ones(2, 4), "mask": torch.ones(2, 1)}).device.type == "meta"
    assert call(keywords, (torch.ones(2, 4), torch.ones(2, 1))).device.type == "meta"
    cpu = nn.Linear(4, 3)
    x = torch.ones(2, 4)
    assert torch.equal(call(cpu, x), cpu(x))  # already there: unchanged
