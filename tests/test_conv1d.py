"""GPT-2's Conv1D layers (a Linear with its weight stored transposed) are compressed like Linear
layers: each method gives what it gives on the same model rewritten with nn.Linear by hand."""
import copy

import numpy as np
import pytest
import torch

import netshrink

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Model(config).eval()


def by_hand(model):
    """The same model with every Conv1D replaced by a plain nn.Linear holding the transposed weight."""
    rewritten = copy.deepcopy(model)
    for name, module in list(rewritten.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(rewritten.get_submodule(parent), child, linear)
    return rewritten


def batches(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 120, (4, 10), generator=g)} for _ in range(count)]


def output(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


COMPRESS = {
    "4-bit per channel": lambda m, data: netshrink.quantize(m, weight_bits=4),
    "4-bit groups of 16": lambda m, data: netshrink.quantize(m, weight_bits=4, group_size=16),
    "2:4 sparsity": lambda m, data: netshrink.apply(m, netshrink.NMSparsity(n=2, m=4)),
    "GPTQ 3-bit": lambda m, data: netshrink.quantize(m, weight_bits=3, method="gptq", calibration=data),
    "SparseGPT half": lambda m, data: netshrink.prune(m, keep=0.5, method="sparsegpt", calibration=data),
    "SmoothQuant W8A8": lambda m, data: netshrink.quantize(m, weight_bits=8, activation_bits=8, smooth="auto",
                                                           calibration=data),
}


@pytest.mark.parametrize("method", COMPRESS)
def test_conv1d_layers_are_compressed_as_the_linear_layers_they_are(method):
    dense = tiny_gpt2()
    assert "h.1.mlp.c_proj" in str(netshrink.summary(dense))  # counted before any method converts it
    data, held_out = batches(4, 0), batches(1, 1)[0]
    reference = by_hand(dense)
    assert torch.allclose(output(reference, held_out), output(dense, held_out), atol=1e-5)
    COMPRESS[method](reference, data)
    for _ in range(2):  # twice: nothing may leak between calls
        model = copy.deepcopy(dense)
        report = COMPRESS[method](model, data)
        report = report[0] if isinstance(report, list) else report
        assert not any(isinstance(m, Conv1D) for m in model.modules())
        assert "Conv1D" in str(report) and "h.0.attn.c_attn" in dict(report.changed)
        assert torch.allclose(output(model, held_out), output(reference, held_out), atol=1e-4)
        assert not torch.allclose(output(model, held_out), output(dense, held_out), atol=1e-4)  # it did compress


def test_a_compressed_gpt2_saves_loads_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    data, held_out = batches(4, 0), batches(1, 1)[0]
    model = tiny_gpt2()
    netshrink.quantize(model, weight_bits=4, method="gptq", calibration=data)
    netshrink.save(model, tmp_path / "gpt2.nsk")
    for loaded in (netshrink.load(tmp_path / "gpt2.nsk"), netshrink.load(tmp_path / "gpt2.nsk", model=tiny_gpt2())):
        assert torch.equal(output(loaded, held_out), output(model, held_out))
    summary = str(netshrink.summary(model))
    assert "h.1.mlp.c_proj" in summary
    netshrink.export(model, tmp_path / "gpt2.onnx", example_inputs=held_out)
    got = ort.InferenceSession(str(tmp_path / "gpt2.onnx")).run(None, {"input_ids": held_out["input_ids"].numpy()})[0]
    assert np.allclose(got, output(model, held_out).numpy(), atol=1e-4)


def test_refused_calls_and_mismatched_files_leave_conv1d_layers_as_they_were(tmp_path, make_tiny_bert):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(netshrink.NetshrinkError, match="matches no"):
        netshrink.quantize(model, weight_bits=4, targets=["h.0.attn.nothing"])
    with pytest.raises(netshrink.NetshrinkError, match="bits must be"):
        netshrink.quantize(model, weight_bits=99)
    assert isinstance(model.h[0].attn.c_attn, Conv1D)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    compressed = tiny_gpt2()
    netshrink.prune(compressed, keep=0.5)
    netshrink.save(compressed, tmp_path / "gpt2.nsk")
    bert = make_tiny_bert()
    with pytest.raises(netshrink.NetshrinkError, match="does not fit"):
        netshrink.load(tmp_path / "gpt2.nsk", model=bert)
    fresh = tiny_gpt2()
    fresh.h[1].mlp.c_fc = torch.nn.Linear(32, 128)  # no longer the Conv1D the file names
    with pytest.raises(netshrink.NetshrinkError, match="h.1.mlp.c_fc"):
        netshrink.load(tmp_path / "gpt2.nsk", model=fresh)
    assert isinstance(fresh.h[0].attn.c_attn, Conv1D)


def test_a_load_failing_after_its_checks_leaves_conv1d_layers_as_they_were(tmp_path, monkeypatch):
    compressed = tiny_gpt2()
    netshrink.prune(compressed, keep=0.5)
    netshrink.save(compressed, tmp_path / "gpt2.nsk")
    def failing(*_):  # a failure after the file was found to fit: the model handed in is still put back
        raise netshrink.NetshrinkError("simulated failure while taking the stored weights")

    monkeypatch.setattr("netshrink.store.artifact._assign", failing)
    fresh = tiny_gpt2()
    with pytest.raises(netshrink.NetshrinkError, match="simulated"):
        netshrink.load(tmp_path / "gpt2.nsk", model=fresh)
    assert isinstance(fresh.h[0].attn.c_attn, Conv1D) and fresh.h[0].attn.c_attn.weight.shape == (32, 96)


@pytest.mark.slow
def test_auto_chooses_settings_for_conv1d_layers_and_its_model_round_trips(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4, num_labels=2,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        ids = torch.randint(1, 120, (16, 8), generator=g)
        data.append({"input_ids": ids, "labels": (ids[:, 0] > 60).long()})
    found = netshrink.auto(model, data[:10], validation=data[10:], max_drop=50.0, epochs=0.5, trials=1, progress=False)
    assert "transformer.h.1.mlp.c_fc" in found.policy
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)  # auto works on copies
    found.save(tmp_path / "auto.nsk")
    loaded = netshrink.load(tmp_path / "auto.nsk")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=data[10]["input_ids"]).logits, found.model(input_ids=data[10]["input_ids"]).logits)
