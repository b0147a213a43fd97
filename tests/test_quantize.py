import pytest
import torch

import netshrink
from netshrink.compress.methods.quantize import binarize, fake_quantize, quantization_grid, ternarize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_error_within_half_step_and_level_count(rand_weight, bits, scheme, per_channel):
    q = fake_quantize(rand_weight, bits, scheme, per_channel)
    scale, _, _, _ = quantization_grid(rand_weight, bits, scheme, per_channel)
    assert torch.all((q - rand_weight).abs() <= scale / 2 * (1 + 1e-5) + 1e-7)
    groups = q.reshape(q.shape[0], -1) if per_channel else q.reshape(1, -1)
    for group in groups:
        assert torch.unique(group).numel() <= 2 ** bits


def test_symmetric_matches_reference_formula(rand_weight):
    # Dense reference, written out: per output channel scale = max|w| / 7, round, clamp to [-7, 7].
    scale = rand_weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 7
    reference = torch.clamp(torch.round(rand_weight / scale), -7, 7) * scale
    assert torch.allclose(fake_quantize(rand_weight, 4, "symmetric", True), reference)


def test_founding_formula_would_zero_every_weight(rand_weight):
    founding = torch.round(rand_weight * 0.1 / 2 ** 7) * 2 ** 7  # round(w / 2^(b-1)) * 2^(b-1), b=8
    assert torch.count_nonzero(founding) == 0
    assert torch.count_nonzero(fake_quantize(rand_weight * 0.1, 8)) > 0.9 * rand_weight.numel()


def test_binary_and_ternary_reference(rand_weight):
    b = binarize(rand_weight, per_channel=True)
    for w, row in zip(rand_weight, b):
        assert torch.unique(row).numel() == 2
        assert torch.allclose(row.abs(), w.abs().mean().expand_as(row))
    t = ternarize(rand_weight, per_channel=True)
    for w, row in zip(rand_weight, t):
        delta = 0.7 * w.abs().mean()
        keep = w.abs() > delta
        assert torch.equal(row != 0, keep)
        assert torch.allclose(row[keep].abs(), w.abs()[keep].mean().expand(int(keep.sum())))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_model_weights_take_at_most_2_to_the_b_values_per_channel(trained, bits):
    netshrink.quantize(trained, weight_bits=bits)
    for row in trained.fc1.weight:
        assert torch.unique(row).numel() <= 2 ** bits


def test_prune_then_quantize_keeps_zeros_and_order_matters(trained):
    netshrink.prune(trained, keep=0.2)
    zeros = trained.fc2.weight == 0
    netshrink.quantize(trained, weight_bits=3, scheme="affine")
    assert torch.all(trained.fc2.weight[zeros] == 0)
    names = [type(t).__name__ for t in trained.fc2.parametrizations.weight]
    assert names == ["Mask", "FakeQuantize"]


def test_straight_through_gradient(rand_weight):
    from netshrink.compress.methods.quantize import FakeQuantize

    w = rand_weight.clone().requires_grad_(True)
    FakeQuantize(4)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_learned_step_trains_the_step(trained, digits):
    netshrink.quantize(trained, weight_bits=4, learned_step=True)
    step = trained.fc1.parametrizations.weight[0].step
    before = step.detach().clone()
    netshrink.fit(trained, digits[0], epochs=1, lr=1e-3, progress=False)
    assert not torch.equal(before, step.detach())
    for row in trained.fc1.weight:
        assert torch.unique(row).numel() <= 16


@pytest.mark.parametrize("kwargs,match", [({"weight_bits": 0}, "bits"), ({"weight_bits": 9}, "bits"),
                                          ({"weight_bits": 4, "scheme": "log"}, "scheme"),
                                          ({"weight_bits": 4, "granularity": "row"}, "granularity"),
                                          ({"weight_bits": None, "activation_bits": 8}, "calibration"),
                                          ({"weight_bits": 4, "activation_bits": 1, "calibration": (torch.zeros(1, 1, 8, 8), torch.zeros(1))}, "activation bits")])
def test_bad_settings_rejected_before_change(trained, kwargs, match):
    with pytest.raises(netshrink.NetshrinkError, match=match):
        netshrink.quantize(trained, **kwargs)
    assert not hasattr(trained.fc1, "parametrizations") and not hasattr(trained.fc1, "input_quantizer")
