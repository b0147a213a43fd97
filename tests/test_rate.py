"""Rate-aware training: the priced bits against a reference, the estimate against the real file's
bytes, a larger trade-off giving a smaller file, recipes on held-out models (a BatchNorm/residual/
depthwise CNN, a tiny BERT) stored exactly, and bad input."""
import copy
import math

import pytest
import torch
from torch import nn

import netshrink
from netshrink.compress.methods.rate import RateCoding, estimated_bytes
from netshrink.reporting.page import tensor_bytes


def _rate_recipe(tradeoff, epochs=6, **more):
    return netshrink.Recipe.from_steps([
        {"rate": {"tradeoff": tradeoff, **more}, "gradual": {"epochs": epochs, "lr": 1e-3, "distill": True}}])


def _saved(model, folder) -> bytes:
    path = folder / "model.nsk"
    netshrink.save(model, path)
    return path.read_bytes()


def test_priced_bits_follow_the_probability_model_by_direct_integration():
    """At a code the price is -log2 of the model's mass on [k - 1/2, k + 1/2]; checked against a
    numerical integral of the mixture's density."""
    torch.manual_seed(0)
    coding = RateCoding(torch.randn(50, 20), largest=127)
    with torch.no_grad():
        coding.mixture.copy_(torch.tensor([0.2, -0.1, 0.0, 0.05]))
    codes = torch.tensor([-3.0, 0.0, 1.0, 7.0, 40.0])
    scales = (coding.log_scales * 10).exp().detach()
    weights = torch.softmax(coding.mixture * 10, 0).detach()
    grid = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    reference = 0.0
    for k in codes.double():
        x = (k + grid)[:, None]
        density = (torch.exp(-x / scales.double()) / (scales.double() * (1 + torch.exp(-x / scales.double())) ** 2)) \
            @ weights.double()
        reference += -math.log2(float(torch.trapezoid(density, k + grid)))
    assert float(coding.bits(codes).detach()) == pytest.approx(reference, rel=1e-4)


def test_the_estimate_tracks_the_real_files_bytes(trained, digits, tmp_path):
    """What the penalty prices, at the end of training, against each layer's coded weight in the
    saved file: within 15% per layer (the coder's contexts and learning cost differ from the
    model's i.i.d. price)."""
    model = copy.deepcopy(trained)
    method = netshrink.RateAware(tradeoff=0.3)
    with method.schedule(model) as (on_step, penalty):
        netshrink.fit(model, digits[0], epochs=8, lr=1e-3, on_step=on_step, penalty=penalty, progress=False)
        estimate = estimated_bytes(model)
    rows, _ = tensor_bytes(_saved(model, tmp_path))
    stored = {r["name"]: r["bytes"] for r in rows}
    assert set(estimate) == {"fc1", "fc2", "fc3"}
    for name, predicted in estimate.items():
        assert stored[f"{name}.weight"] == pytest.approx(predicted, rel=0.15), (name, predicted, stored)


def test_a_larger_tradeoff_gives_a_smaller_file_and_the_file_is_exact(trained, digits, tmp_path):
    sizes, accuracies = [], []
    for tradeoff in (0.01, 3.0):
        model = copy.deepcopy(trained)
        _rate_recipe(tradeoff, epochs=10).run(model, digits[0], progress=False)
        sizes.append(len(_saved(model, tmp_path)))
        accuracies.append(netshrink.evaluate(model, digits[1]))
        loaded = netshrink.load(tmp_path / "model.nsk")
        x = digits[1].tensors[0][:64]
        with torch.no_grad():
            assert torch.equal(model.eval()(x), loaded.eval()(x))
        assert not any(isinstance(m, RateCoding) for m in model.modules())
    dense_bytes = 4 * sum(p.numel() for p in trained.parameters())
    assert sizes[1] < 0.75 * sizes[0] < dense_bytes / 4, sizes
    assert accuracies[0] >= netshrink.evaluate(trained, digits[1]) - 0.02
    assert accuracies[1] >= 0.85, accuracies


def test_recipe_on_a_batchnorm_residual_depthwise_cnn_twice_alike(digits, tmp_path):
    torch.manual_seed(0)
    dense = netshrink.build_model("resmobile", (1, 8, 8))
    netshrink.fit(dense, digits[0], epochs=8, progress=False)
    recipe = netshrink.Recipe.from_steps([
        {"rate": {"tradeoff": 0.1}, "gradual": {"epochs": 3, "lr": 1e-3}},
        {"finetune": {"epochs": 1, "lr": 2e-4}},  # BatchNorm statistics of the coded weights
        {"unused": {}}])
    runs = [copy.deepcopy(dense) for _ in range(2)]
    for model in runs:  # twice: nothing of the first run may leak into the second
        recipe.run(model, digits[0], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    assert not any(isinstance(m, RateCoding) for m in runs[0].modules())
    assert len(_saved(runs[0], tmp_path)) < len(_saved(dense, tmp_path)) / 3
    assert netshrink.evaluate(runs[0], digits[1]) >= netshrink.evaluate(dense, digits[1]) - 0.05
    for layer in runs[0].modules():  # every coded layer: few distinct values
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            assert torch.unique(layer.weight.detach()).numel() <= 255


def test_recipe_on_a_tiny_bert(make_tiny_bert, tmp_path):
    model, reference = make_tiny_bert(), make_tiny_bert()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 120, (16, 12), generator=g)} for _ in range(3)]
    netshrink.Recipe.from_steps([
        {"rate": {"tradeoff": 0.01, "targets": ["re:.*(query|key|value|dense)"]},
         "gradual": {"epochs": 2, "lr": 1e-4, "distill": {"objective": "mse"}}}]).run(model, data, progress=False)
    query = model.encoder.layer[0].attention.self.query
    assert torch.unique(query.weight.detach()).numel() <= 255
    _saved(model, tmp_path)
    loaded = netshrink.load(tmp_path / "model.nsk")
    with torch.no_grad():
        ours, dense = model(**data[0]).last_hidden_state, reference(**data[0]).last_hidden_state
        assert torch.equal(ours, loaded(**data[0]).last_hidden_state)
    assert nn.functional.cosine_similarity(ours.flatten(1), dense.flatten(1)).mean() > 0.9


def test_bad_settings_and_a_rate_step_without_schedule_are_refused_and_nothing_changes(trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    with pytest.raises(netshrink.NetshrinkError, match="gradual"):
        netshrink.apply(trained, netshrink.RateAware(tradeoff=0.1))
    with pytest.raises(netshrink.NetshrinkError, match="gradual"):
        netshrink.Recipe.from_yaml("steps:\n  - rate: {tradeoff: 0.1}\n")
    for bad, match in (({"tradeoff": -1}, "tradeoff"), ({"bits": 1}, "bits"), ({"anneal": 2}, "anneal"),
                       ({"tradeoff": {"fc9": 0.1}}, "fc9")):
        with pytest.raises(netshrink.NetshrinkError, match=match):
            netshrink.Recipe.from_steps([{"rate": bad, "gradual": {"epochs": 1}}]).run(trained, [torch.zeros(4, 1, 8, 8)],
                                                                                       progress=False)
    with pytest.raises(netshrink.NetshrinkError, match="prune and rate"):
        netshrink.Recipe.from_yaml("steps:\n  - share: {bits: 3}\n    gradual: {epochs: 1}\n")
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert not any(isinstance(m, RateCoding) for m in trained.modules())
