import math

import pytest
import torch

import netshrink
from netshrink.train import Distill, random_shift


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
