import pytest
import torch
from torch import nn

import netshrink
from netshrink.compress.methods.structured import remove_units


class UserCNN(nn.Module):
    """An ordinary user CNN: conv-BN-ReLU blocks, a residual block, flatten into a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.res, self.bn_res = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 3 * 3, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = y + torch.relu(self.bn_res(self.res(y)))
        y = self.pool(torch.relu(self.conv3(y)))
        return self.out(torch.relu(self.fc(torch.flatten(y, 1))))


def silence_removed(model, fresh, report, norms=None):
    """The dense model with the removed units silenced (weights, bias and BatchNorm affine zeroed):
    it must compute exactly what the physically smaller model computes."""
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        for layer, kept in report.kept.items():
            removed = [i for i in range(model.get_submodule(layer).weight.shape[0]) if i not in kept]
            fresh.get_submodule(layer).weight[removed] = 0
            fresh.get_submodule(layer).bias[removed] = 0
            norm = (norms or {}).get(layer)
            if norm:
                fresh.get_submodule(norm).weight[removed] = 0
                fresh.get_submodule(norm).bias[removed] = 0
    return fresh


@pytest.mark.parametrize("name,shape", [("lenet-300-100", (1, 28, 28)), ("lenet-5", (1, 28, 28))])
def test_zoo_models_shrink_and_match_masked_reference(name, shape):
    model = netshrink.build_model(name, shape).eval()
    x = torch.rand(8, *shape)
    small, report = remove_units(model, keep=0.5, example_input=x)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert [layer for layer, _ in report.skipped] == [list(dict(model.named_children()))[-1]]  # output layer kept
    reference = silence_removed(model, netshrink.build_model(name, shape), report)
    assert torch.allclose(small(x), reference(x), atol=1e-5)


def test_user_cnn_with_batchnorm_and_residual():
    torch.manual_seed(0)
    model = UserCNN()
    model.train()
    model(torch.rand(32, 1, 8, 8))  # BatchNorm statistics
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    small, report = remove_units(model, keep=0.5, criterion="l1-bn", example_input=x)
    changed = {layer for layer, _ in report.changed}
    assert changed == {"conv1", "conv2", "res", "conv3", "fc"}
    # conv2 and res feed one residual add: they lose the same channels, and so do bn2 and bn_res.
    assert report.kept["conv2"] == report.kept["res"] and len(report.kept["res"]) == 6
    assert "coupled with res" in dict(report.changed)["conv2"]
    assert small.bn1.num_features == 4 and small.conv2.in_channels == 4 and small.bn_res.num_features == 6
    assert small.conv3.in_channels == 6 and small.fc.in_features == 8 * 3 * 3
    reference = silence_removed(model, UserCNN(), report,
                                norms={"conv1": "bn1", "conv2": "bn2", "res": "bn_res"})
    assert torch.allclose(small(x), reference(x), atol=1e-5)
    assert report.macs_after < 0.4 * report.macs_before


def test_shrunk_zoo_model_saves_loads_and_fine_tunes(tmp_path, digits):
    model = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.fit(model, digits[0], epochs=5, progress=False)
    small, _ = remove_units(model, keep=0.5)
    netshrink.fit(small, digits[0], epochs=2, lr=1e-3, progress=False)
    netshrink.save(small, tmp_path / "small.nsk")
    loaded = netshrink.load(tmp_path / "small.nsk")
    assert loaded.fc1.weight.shape == (150, 64)
    x = digits[1].tensors[0]
    assert torch.equal(loaded(x), small(x))


def test_structured_errors():
    with pytest.raises(netshrink.NetshrinkError, match="keep"):
        remove_units(netshrink.build_model("mlp"), keep=0)
    with pytest.raises(netshrink.NetshrinkError, match="example_input"):
        _, report = remove_units(netshrink.build_model("lenet-5"), keep=0.5)
        raise netshrink.NetshrinkError(dict(report.skipped)["conv2"])
    model = netshrink.build_model("mlp")
    netshrink.prune(model, keep=0.5)
    with pytest.raises(netshrink.NetshrinkError, match="before other compression"):
        remove_units(model, keep=0.5)


def test_structured_step_in_a_recipe_then_unstructured_then_quantized(digits):
    """Structured, then unstructured, then quantized: each keeps what the step before did."""
    train, test = digits
    model = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.fit(model, train, epochs=10, lr=2e-3, batch_size=64, progress=False)
    dense = netshrink.evaluate(model, test)
    recipe = netshrink.Recipe.from_steps([
        {"structured": {"keep": 0.5}},
        {"finetune": {"epochs": 5, "lr": 0.001}},
        {"prune": {"keep": 0.3}},
        {"quantize": {"bits": 4}},
        {"finetune": {"epochs": 5, "lr": 0.001}},
    ])
    rows = recipe.run(model, train, test, progress=False)
    assert model.fc1.weight.shape == (150, 64) and model.fc2.weight.shape == (50, 150)
    assert int((model.fc1.weight != 0).sum()) <= round(0.3 * 150 * 64)
    for row in model.fc1.weight:
        assert torch.unique(row[row != 0]).numel() <= 15
    # Against the dense reference: the last fine-tune recovers most of what compression cost.
    assert rows[-1]["accuracy"] >= rows[-2]["accuracy"] + 0.05
    assert rows[-1]["accuracy"] >= dense - 0.08


def _bn_statistics(model, shape):
    model.train()
    with torch.no_grad():
        model(torch.rand(32, *shape))
    return model.eval()


def test_resmobile_residual_groups_and_depthwise_shrink_together():
    model = _bn_statistics(netshrink.build_model("resmobile", (1, 16, 16)), (1, 16, 16))
    x = torch.rand(4, 1, 16, 16)
    small, report = remove_units(model, keep=0.5, example_input=x)
    changed = dict(report.changed)
    assert report.kept["block1b.conv"] == report.kept["shortcut.conv"] == report.kept["project.conv"]
    assert changed["depthwise.conv"] == "depthwise: follows expand.conv"
    assert small.depthwise.conv.groups == small.depthwise.conv.in_channels == small.expand.conv.out_channels == 72
    assert small.separable_dw.conv.groups == 24 and small.head.in_features == 48
    assert report.macs_after < 0.35 * report.macs_before
    assert small(x).shape == (4, 10)
    netshrink.fit(small, (torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,))), epochs=1, progress=False)


def test_kept_counts_round_to_a_multiple_and_keep_the_best_channels():
    """multiple_of=8: every kept count a multiple of 8 (at least 8, at most the layer's units), and
    the kept channels are exactly those remove_units keeps when asked for that count directly."""
    model = _bn_statistics(netshrink.build_model("resmobile", (1, 16, 16)), (1, 16, 16))
    x = torch.rand(4, 1, 16, 16)
    for keep in (0.7, 0.1, 0.99):
        small, report = remove_units(model, keep=keep, multiple_of=8, example_input=x)
        fractions = {}
        for layer, kept in report.kept.items():
            units = model.get_submodule(layer).weight.shape[0]
            assert len(kept) % 8 == 0 and 8 <= len(kept) <= units
            assert abs(len(kept) - keep * units) <= 4 or len(kept) in (8, units)
            fractions[layer] = len(kept) / units
        assert remove_units(model, keep=fractions, example_input=x)[1].kept == report.kept
        assert small(x).shape == (4, 10)
    assert remove_units(model, keep=0.7, multiple_of=8, example_input=x)[1].kept["expand.conv"].__len__() == 104
    with pytest.raises(netshrink.NetshrinkError, match="multiple_of must be an integer"):
        remove_units(model, keep=0.5, multiple_of=0)


class EveryLayerType(nn.Module):
    """Structures structured pruning must handle or refuse: concatenation, a grouped convolution,
    channel indexing, a squeeze-excitation multiply, a stored per-channel offset, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.se_reduce, self.se_expand = nn.Linear(16, 4), nn.Linear(4, 16)
        self.c = nn.Conv2d(16, 12, 1)
        self.offset = nn.Parameter(torch.zeros(1, 12, 1, 1))
        self.d = nn.Conv2d(12, 10, 1)
        self.norm = nn.LayerNorm(10)
        self.out = nn.Linear(10, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        y = self.grouped(y)
        scale = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean(dim=(2, 3))))))
        y = y * scale[:, :, None, None]
        y = self.c(y) + self.offset
        y = self.d(y[:, :12])
        return self.out(self.norm(y.mean(dim=(2, 3))))


def test_every_layer_type_is_pruned_correctly_or_refused_with_a_reason():
    torch.manual_seed(0)
    model = EveryLayerType().eval()
    x = torch.rand(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = remove_units(model, keep=0.5, example_input=x)
    skipped = dict(report.skipped)
    assert skipped == {"a": "its channels reach cat (a concatenation)",
                       "b": "its channels reach cat (a concatenation)",
                       "grouped": "it is a grouped convolution (groups=4)",
                       "se_expand": "its channels reach getitem",
                       "c": "its channels meet a stored tensor in add",
                       "d": "its channels reach LayerNorm (norm)",
                       "out": "its channels reach the model output"}
    assert dict(report.changed)["se_reduce"].startswith("kept 2 of 4")  # the squeeze layer shrinks
    assert small(x).shape == (2, 5) and small.se_expand.in_features == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_a_user_identity_subclass_with_a_stored_offset_is_refused():
    class Offset(nn.Identity):
        def __init__(self, channels):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

        def forward(self, x):
            return x + self.bias

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Offset(8), nn.Conv2d(8, 4, 1))
    _, report = remove_units(model, keep=0.5, example_input=torch.rand(2, 3, 4, 4))
    assert "stored tensor" in dict(report.skipped)["0"]


def test_a_pruning_that_would_break_the_model_is_refused_and_undone(monkeypatch):
    """The safety net: if the rebuilt model fails its own forward pass, the model is restored."""
    from netshrink.compress.methods import structured

    def rebuild_forgetting_consumers(model, plans):
        for space, _ in plans:
            space.consumers.clear()
        original(model, plans)

    original = structured._rebuild
    monkeypatch.setattr(structured, "_rebuild", rebuild_forgetting_consumers)
    model = UserCNN().eval()
    x = torch.rand(2, 1, 8, 8)
    reference = model(x)
    with pytest.raises(netshrink.NetshrinkError, match="would break the model"):
        netshrink.apply(model, netshrink.RemoveUnits(keep=0.5), calibration=x)
    assert model.conv1.weight.shape == (8, 1, 3, 3) and model.bn1.num_features == 8
    assert torch.equal(model(x), reference)


def test_shrunk_resmobile_saves_and_loads_without_the_model(tmp_path):
    model = _bn_statistics(netshrink.build_model("resmobile", (1, 16, 16)), (1, 16, 16))
    x = torch.rand(4, 1, 16, 16)
    small, _ = remove_units(model, keep=0.5, example_input=x)
    netshrink.prune(small, keep=0.5)
    netshrink.save(small, tmp_path / "small.nsk")
    for skeleton in (None, netshrink.build_model("resmobile", (1, 16, 16))):
        loaded = netshrink.load(tmp_path / "small.nsk", model=skeleton)
        assert loaded.depthwise.conv.groups == 72 and torch.equal(loaded(x), small(x))


def test_removing_units_in_place_leaves_batchnorm_statistics_alone(digits):
    """The example input traces shapes in eval mode: a training-mode BatchNorm would fold it into
    its running statistics."""
    model = netshrink.build_model("resmobile", (1, 8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    netshrink.apply(model, netshrink.RemoveUnits(keep=1.0), calibration=digits[0].tensors[0][:8])
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
