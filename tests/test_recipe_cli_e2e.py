import copy
import subprocess
import sys

import pytest
import torch

import netshrink
from netshrink.cli import main
from netshrink.compress.recipe import Recipe, builtin_recipes


def test_builtin_recipes_parse():
    assert "deep-compression" in builtin_recipes()
    for name in builtin_recipes():
        assert Recipe.load(name).steps


@pytest.mark.parametrize("steps,match", [
    ([{"prune": {"keep": 2}}], "keep"),
    ([{"prune": {"kep": 0.1}}], "unknown setting"),
    ([{"squash": {}}], "unknown step"),
    ([{"share": {"bits": 4}, "gradual": {"epochs": 1}}], "gradual"),
    ([{"finetune": {"epochs": 0}}], "epochs"),
    ([], "non-empty"),
])
def test_bad_recipes_rejected_before_running(steps, match):
    with pytest.raises(netshrink.NetshrinkError, match=match):
        Recipe.from_steps(steps)


def test_end_to_end_on_digits(digits, tmp_path):
    """Train, compress with a gradual-pruning + sharing + distillation recipe, fine-tune, save, load."""
    train, test = digits
    model = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.fit(model, train, epochs=20, lr=2e-3, batch_size=64, progress=False)
    dense = netshrink.evaluate(model, test)
    assert dense > 0.93
    recipe = Recipe.from_yaml("""
name: test
steps:
  - prune: {keep: {fc1: 0.1, "*": 0.3}}
    gradual: {epochs: 6, lr: 0.002, every: 10}
  - share: {bits: 4}
  - finetune: {epochs: 3, lr: 0.0005, distill: {temperature: 2, alpha: 0.5}}
""")
    rows = recipe.run(model, train, test, progress=False)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert int((model.fc1.weight != 0).sum()) == round(0.1 * model.fc1.weight.numel())
    assert torch.unique(model.fc1.weight[model.fc1.weight != 0]).numel() <= 16
    compressed = netshrink.evaluate(model, test)
    assert compressed > dense - 0.05
    size = netshrink.save(model, tmp_path / "small.nsk", recipe=recipe.raw)
    dense_size = 4 * sum(p.numel() for p in netshrink.build_model("lenet-300-100", (1, 8, 8)).parameters())
    assert size < dense_size / 10  # 90% pruned, 4-bit codebook, entropy coded
    assert netshrink.evaluate(netshrink.load(tmp_path / "small.nsk"), test) == compressed


def test_cli_train_compress_evaluate_summary(tmp_path, capsys):
    dense, small = tmp_path / "dense.nsk", tmp_path / "small.nsk"
    assert main(["train", "--model", "mlp", "--data", "digits", "--epochs", "5", "-o", str(dense)]) == 0
    assert main(["compress", str(dense), "--data", "digits", "--prune", "0.3", "--weight-bits", "4",
                 "--finetune", "1", "-o", str(small)]) == 0
    assert main(["evaluate", str(small), "--data", "digits"]) == 0
    assert main(["summary", str(small)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "fc1" in out
    assert small.stat().st_size < dense.stat().st_size / 4


@pytest.mark.parametrize("args,message", [
    (["compress", "x.nsk", "--data", "digits", "--prune", "1.5", "-o", "y.nsk"], "keep"),
    (["compress", "x.nsk", "--data", "digits", "--weight-bits", "9", "-o", "y.nsk"], "bits"),
    (["compress", "x.nsk", "--data", "digits", "--weight-bits", "0", "-o", "y.nsk"], "bits"),
    (["compress", "x.nsk", "--data", "digits", "--recipe", "nope", "-o", "y.nsk"], "no recipe"),
    (["evaluate", "missing.nsk", "--data", "digits"], "cannot read"),
])
def test_cli_bad_input_exits_nonzero_without_traceback(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert message in result.stdout + result.stderr


def test_cli_unknown_model_and_data(tmp_path):
    for args in (["train", "--model", "resnet", "-o", "m.nsk"], ["train", "--data", "imagenet", "-o", "m.nsk"]):
        result = subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_recipe_raw_form_rebuilds_the_same_steps():
    from netshrink.compress.recipe import Finetune, Step

    steps = [Step(netshrink.Prune(keep=0.2), Finetune(epochs=2, lr=1e-3, augment=1), every=7),
             Step(Finetune(epochs=1, lr=1e-4, distill=netshrink.Distill(temperature=3, alpha=0.5))),
             netshrink.ShareWeights(bits=3)]
    recipe = Recipe.from_steps(steps)
    again = Recipe.from_steps(recipe.raw)
    assert [s.describe() for s in again.steps] == [s.describe() for s in recipe.steps]
    assert again.steps[0].every == 7 and again.steps[0].schedule.augment == 1
    assert again.steps[1].action.distill == netshrink.Distill(temperature=3, alpha=0.5)


def test_a_continued_recipe_distils_from_the_teacher_it_is_given(trained, digits):
    """Pure distillation (alpha 1: the labels play no part) pulls the student towards the teacher
    ``run`` is given, not towards the model as the recipe found it; the teacher is not changed."""
    recipe = Recipe.from_steps([{"finetune": {"epochs": 6, "lr": 5e-3, "distill": {"temperature": 1, "alpha": 1.0}}}])
    x = digits[1].tensors[0]
    other = copy.deepcopy(trained)  # a teacher that names every digit one class further on
    with torch.no_grad():
        other.fc3.weight.copy_(other.fc3.weight.roll(1, 0))
        other.fc3.bias.copy_(other.fc3.bias.roll(1, 0))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with torch.no_grad():
        target = other(x).argmax(1)
        agree_before = (trained(x).argmax(1) == target).float().mean()
    alone = copy.deepcopy(trained)
    recipe.run(trained, digits[0], progress=False, teacher=other)
    recipe.run(alone, digits[0], progress=False)  # its own teacher: the model as it was
    with torch.no_grad():
        agree_after = (trained.eval()(x).argmax(1) == target).float().mean()
        agree_alone = (alone.eval()(x).argmax(1) == target).float().mean()
    assert agree_before < 0.1 and agree_alone < 0.1 and agree_after > 0.5, (agree_before, agree_alone, agree_after)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(netshrink.NetshrinkError, match="teacher must be"):
        recipe.run(trained, digits[0], progress=False, teacher="dense.nsk")
