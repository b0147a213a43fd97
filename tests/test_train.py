import copy
import math

import pytest
import torch

import netshrink
from netshrink.training.fit import Distill, random_shift


def test_distillation_loss_against_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    t, alpha = 3.0, 0.25
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    ce = -torch.log_softmax(student, 1)[torch.arange(5), y].mean()
    reference = alpha * t * t * kl + (1 - alpha) * ce
    assert torch.allclose(Distill(temperature=t, alpha=alpha).loss(student, teacher, y), reference, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"alpha": 1.5}])
def test_distill_rejects_bad_settings(kwargs):
    with pytest.raises(netshrink.NetshrinkError):
        Distill(**kwargs)


class RolledTeacher(torch.nn.Module):
    """A confident teacher that is wrong on purpose: it predicts class (y + 1) mod 10."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).roll(1, dims=1)


def test_distillation_follows_the_teacher_not_the_labels(digits, trained):
    student = netshrink.build_model("lenet-300-100", (1, 8, 8), seed=3)
    teacher = RolledTeacher(trained.eval())
    netshrink.fit(student, digits[0], epochs=5, lr=2e-3, batch_size=64, teacher=teacher,
                  distill=Distill(temperature=2, alpha=1.0), progress=False)
    x, y = digits[1].tensors
    with torch.no_grad():
        agreement = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agreement > 0.8  # learned the teacher's (shifted) mapping
    assert netshrink.evaluate(student, digits[1]) < 0.3  # ... and not the labels, since alpha = 1


def test_random_shift_moves_content_and_keeps_mass():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the blob never leaves the frame
    assert not torch.equal(shifted, x)


def test_fit_rejects_bad_settings(trained, digits):
    for kwargs in ({"epochs": 0}, {"lr": -1}):
        with pytest.raises(netshrink.NetshrinkError):
            netshrink.fit(trained, digits[0], **kwargs)
    assert math.isfinite(netshrink.evaluate(trained, digits[1]))


def test_validation_returns_the_start_when_training_only_hurts(trained, digits):
    """Labels shuffled at random: training on them can only lower held-out accuracy, so with
    validation the model ends exactly as it began; without, it ends worse."""
    x, y = digits[0].tensors
    noise = (x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    start = {k: v.clone() for k, v in trained.state_dict().items()}
    accuracy = netshrink.evaluate(trained, digits[1])
    for _ in range(2):  # a second call starts from the same weights: nothing leaks between calls
        result = netshrink.fit(trained, noise, epochs=3, lr=3e-3, validation=digits[1], checks=4, progress=False)
        assert result["kept_step"] == 0 and [s for s, _ in result["validation"]] == [0, *[round(result["steps"] * i / 4) for i in range(1, 5)]]
        assert min(v for _, v in result["validation"]) == result["validation"][0][1]
        assert all(torch.equal(v, start[k]) for k, v in trained.state_dict().items())
    unguarded = netshrink.fit(trained, noise, epochs=3, lr=3e-3, progress=False)
    assert "validation" not in unguarded and netshrink.evaluate(trained, digits[1]) < accuracy - 0.05


def _held_out_mse(student, teacher, data, forward):
    """The distillation objective on held-out batches, computed here independently: mean per example."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs in data:
            s, t = forward(student, inputs), forward(teacher, inputs)
            total += float(torch.nn.functional.mse_loss(s, t)) * len(s)
            count += len(s)
    return total / count


def _last_hidden(model, inputs):
    return model(**inputs).last_hidden_state if isinstance(inputs, dict) else model(inputs)


@pytest.mark.parametrize("kind", ["resmobile", "bert"])
def test_validation_keeps_the_best_weights_seen(kind, make_tiny_bert):
    """Distilling a pruned CNN (BatchNorm, residual adds, depthwise convolutions) and a pruned
    transformer: the model returned scores the least held-out loss of all checks, and that score is
    the objective recomputed independently on it."""
    g = torch.Generator().manual_seed(1)
    if kind == "bert":
        dense = make_tiny_bert()
        data = [{"input_ids": torch.randint(1, 120, (16, 10), generator=g),
                 "attention_mask": torch.ones(16, 10, dtype=torch.long)} for _ in range(6)]
        train, held = data[:4], data[4:]
        student = copy.deepcopy(dense)
        netshrink.remove_heads(student, heads=0.5, neurons=0.5, calibration=train)
    else:
        dense = netshrink.build_model("resmobile", (1, 16, 16)).eval()
        train = [torch.rand(16, 1, 16, 16, generator=g) for _ in range(4)]
        held = [torch.rand(16, 1, 16, 16, generator=g) for _ in range(2)]
        student = copy.deepcopy(dense)
        netshrink.prune(student, keep=0.3)
    result = netshrink.fit(student, train, epochs=4, lr=1e-2, teacher=dense, distill=Distill(objective="mse"),
                           forward=_last_hidden, validation=held, checks=8, progress=False)
    losses = [v for _, v in result["validation"]]
    assert len(losses) == 9 and result["validation"][0][0] == 0
    best = min(losses)
    assert dict(result["validation"])[result["kept_step"]] == best
    student.eval()
    assert _held_out_mse(student, dense, held, _last_hidden) == pytest.approx(best, rel=1e-5)


def test_validation_rejects_bad_input_before_training(trained, digits):
    start = {k: v.clone() for k, v in trained.state_dict().items()}
    x, _ = digits[1].tensors
    for kwargs, message in (({"validation": "held.pt"}, "validation data must be"),
                            ({"validation": digits[1], "checks": 0}, "checks must be"),
                            ({"validation": [x[:8]]}, "needs a teacher"),
                            ({"validation": [torch.rand(4, 3, 5)]}, "does not run on this data")):
        with pytest.raises(netshrink.NetshrinkError, match=message):
            netshrink.fit(trained, digits[0], progress=False, **kwargs)
        assert all(torch.equal(v, start[k]) for k, v in trained.state_dict().items())
