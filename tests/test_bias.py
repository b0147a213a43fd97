"""Biases on a grid (netshrink.QuantizeBiases, recipe step ``bias``): against the dense model's
outputs, stored by the file as grid codes, exact through save and load; on a BatchNorm/residual
CNN and a tiny BERT."""
import copy

import pytest
import torch

import netshrink
from netshrink.store.artifact import to_bytes
from netshrink.store.codec import weights as codec
from netshrink.compress.methods import QuantizeBiases, apply


@pytest.mark.parametrize("bits", [4, 6, 8, 12])
def test_biases_land_on_a_grid_the_file_stores_exactly(trained, digits, tmp_path, bits):
    dense = copy.deepcopy(trained)
    report = apply(trained, QuantizeBiases(bits=bits))
    assert [name for name, _ in report.changed] == ["fc1", "fc2", "fc3"]
    for name in ("fc1", "fc2", "fc3"):
        bias, reference = getattr(trained, name).bias.detach(), getattr(dense, name).bias.detach()
        step = reference.abs().max() / (2 ** (bits - 1) - 1)
        assert (bias - reference).abs().max() <= 0.5001 * step  # rounded to the nearest level
        assert len(torch.unique(bias)) <= 2 ** bits - 1
        stats = {}
        payload = codec.encode(bias.numpy(), stats)
        assert stats["kind"] == "grid" and len(payload) < bias.numel() * bits / 6 + 16  # header + codes
        assert torch.equal(getattr(trained, name).weight, getattr(dense, name).weight)  # weights untouched
    accuracy, reference_accuracy = netshrink.evaluate(trained, digits[1]), netshrink.evaluate(dense, digits[1])
    assert accuracy >= reference_accuracy - (0.01 if bits >= 8 else 0.05)
    netshrink.save(trained, tmp_path / "m.nsk")
    assert (tmp_path / "m.nsk").stat().st_size < len(to_bytes(dense))
    loaded = netshrink.load(tmp_path / "m.nsk")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_bias_step_in_a_recipe_and_on_held_out_models(digits, make_tiny_bert):
    model = netshrink.build_model("resmobile", (1, 8, 8))
    with_bias = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None]
    recipe = netshrink.Recipe.from_yaml("steps:\n  - bias: {bits: 8}\n")
    dense = copy.deepcopy(model).eval()
    recipe.run(model, digits[0], progress=False)
    x = digits[1].tensors[0][:64]
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), dense(x), atol=1e-2, rtol=1e-2)
    assert with_bias and all(len(torch.unique(model.get_submodule(n).bias)) <= 255 for n in with_bias)
    bert = make_tiny_bert()
    reference = copy.deepcopy(bert)
    report = netshrink.apply(bert, QuantizeBiases(bits=8))
    assert any("attention.self.query" in name for name, _ in report.changed)
    ids = torch.randint(1, 120, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(bert(ids).last_hidden_state.flatten(1),
                                                       reference(ids).last_hidden_state.flatten(1))
    assert cosine.min() > 0.999


@pytest.mark.parametrize("bits", [1, 13, 2.5, "8"])
def test_bad_bias_bits_are_refused_before_anything_changes(trained, bits):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    with pytest.raises(netshrink.NetshrinkError, match="bits"):
        netshrink.apply(trained, QuantizeBiases(bits=bits))
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
