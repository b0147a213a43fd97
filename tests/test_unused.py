import copy

import pytest
import torch

import netshrink
from netshrink.store.artifact import to_bytes
from netshrink.compress.methods.base import transforms


def _outputs(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x)


def test_units_nothing_reads_are_zeroed_and_outputs_do_not_change():
    torch.manual_seed(0)
    model = netshrink.build_model("lenet-5", (1, 28, 28))
    netshrink.apply(model, netshrink.Prune(keep={"conv2": 0.1, "fc1": 0.012, "fc2": 0.1}, targets=("conv2", "fc1", "fc2")))
    netshrink.apply(model, netshrink.ShareWeights(bits=2))
    x = torch.rand(16, 1, 28, 28)
    reference, size = _outputs(model, x), len(to_bytes(model))
    w2 = model.fc2.weight.detach()
    unread = (w2 == 0).all(0)  # fc1 units fc2 does not read: the dense reference for what must go
    assert unread.any() and (model.fc1.weight.detach()[unread] != 0).any()

    report = netshrink.apply(model, netshrink.PruneUnused(), calibration=x)

    assert dict(report.changed) == {"fc1": f"{int(unread.sum())} of 500 units read by no later layer: zeroed"}
    assert (model.fc1.weight.detach()[unread] == 0).all() and (model.fc1.bias.detach()[unread] == 0).all()
    assert (model.fc1.weight.detach()[~unread] != 0).sum() > 0
    assert torch.equal(_outputs(model, x), reference)
    assert len(to_bytes(model)) < size
    # the zeros hold through fine-tuning (the mask and the codebook were tightened), and again
    # nothing is left to do
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (16,)))
    netshrink.fit(model, data, epochs=2, lr=1e-2, batch_size=8, progress=False)
    assert (model.fc1.weight.detach()[unread] == 0).all()
    assert netshrink.apply(model, netshrink.PruneUnused(), calibration=x).changed == []


def test_a_residual_group_is_zeroed_only_where_every_reader_skips_it(tmp_path):
    torch.manual_seed(0)
    model = netshrink.build_model("resmobile", (1, 16, 16)).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():  # BatchNorm statistics away from the defaults, so zeroed affine terms matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    # The residual channels 3 and 5 (block1b + shortcut + project) are read by expand.conv and, past
    # the depthwise convolution, by separable_pw.conv: channel 3 is skipped by both, 5 by one.
    masks = {"expand.conv": torch.ones_like(model.expand.conv.weight, dtype=torch.bool),
             "separable_pw.conv": torch.ones_like(model.separable_pw.conv.weight, dtype=torch.bool)}
    masks["expand.conv"][:, 3] = masks["separable_pw.conv"][:, 3] = False
    masks["expand.conv"][:, 5] = False
    for name, mask in masks.items():
        netshrink.apply(model, netshrink.Prune(keep=float(mask.float().mean()), targets=(name,)))
        transforms(model.get_submodule(name))[0].mask.copy_(mask)
    reference = _outputs(model, x)
    for _ in range(2):  # twice: the second finds nothing new
        report = netshrink.apply(model, netshrink.PruneUnused(), calibration=x)
    assert report.changed == []
    for name in ("block1b.conv", "shortcut.conv", "project.conv", "separable_dw.conv"):
        w = model.get_submodule(name).weight.detach()
        assert (w[3] == 0).all() and (w[5] != 0).any(), name
    for name in ("block1b.bn", "shortcut.bn", "project.bn", "separable_dw.bn"):
        bn = model.get_submodule(name)
        assert bn.weight[3] == 0 and bn.bias[3] == 0 and bn.bias[5] != 0
    assert torch.allclose(_outputs(model, x), reference, atol=1e-6)
    # and the file holds it: loaded, the model computes the same
    netshrink.save(model, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk", netshrink.build_model("resmobile", (1, 16, 16)))
    assert torch.allclose(_outputs(loaded, x), reference, atol=1e-6)


def test_output_layer_selection_and_untraceable_models_are_left_alone(make_tiny_bert):
    model = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.apply(model, netshrink.Prune(keep=0.01, targets=("fc2",)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 8, 8)
    report = netshrink.apply(model, netshrink.PruneUnused(ignore=("fc1",)), calibration=x)  # fc1 not selected
    assert report.changed == [] and dict(report.skipped)["fc3"] == "its channels reach the model output"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bert = make_tiny_bert()
    netshrink.apply(bert, netshrink.Prune(keep=0.05))
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    report = netshrink.apply(bert, netshrink.PruneUnused(), calibration=torch.randint(0, 120, (2, 8)))
    assert report.changed == [] and all("left as it is" in why for _, why in report.skipped)
    assert all(torch.equal(state[k], v) for k, v in bert.state_dict().items())


def test_a_recipe_step_on_the_command_line(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n- prune: {keep: 0.02, targets: [fc1, fc2]}\n- unused: {}\n")
    dense = tmp_path / "dense.nsk"
    netshrink.save(netshrink.build_model("lenet-300-100", (1, 8, 8)), dense)
    out = subprocess.run([sys.executable, "-m", "netshrink.cli", "compress", str(dense), "--data", "digits", "--recipe",
                          str(recipe), "-o", str(tmp_path / "small.nsk")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    small = netshrink.load(tmp_path / "small.nsk")
    unread = (small.fc2.weight.detach() == 0).all(0)
    assert unread.any() and (small.fc1.weight.detach()[unread] == 0).all()


@pytest.mark.parametrize("bad", [{"keep": 0.5}, {"targets": 3}, {"targets": "fc1"}])
def test_bad_settings_are_one_error(bad):
    with pytest.raises(netshrink.NetshrinkError, match="unused"):
        netshrink.Recipe.from_steps([{"unused": bad}], "bad")
