import copy

import pytest
import torch

import netshrink


def test_clip_rule_default_and_custom_value(trained):
    dense = trained.fc1.weight.detach().clone()
    netshrink.clip(trained, threshold=0.05)
    assert torch.equal(trained.fc1.weight, torch.where(dense.abs() > 0.05, torch.sign(dense) * 0.05, dense))
    netshrink.clip(trained, threshold=0.05, value=0.0)  # replaces the previous clip
    assert torch.equal(trained.fc1.weight, torch.where(dense.abs() > 0.05, torch.zeros_like(dense), dense))


def test_clip_percentile(trained):
    dense = trained.fc2.weight.detach().clone()
    netshrink.clip(trained, percentile=90)
    threshold = torch.quantile(dense.abs().flatten(), 0.9)
    assert torch.allclose(trained.fc2.weight.abs().max(), threshold)
    assert (dense.abs() > threshold).float().mean().item() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("kwargs", [{"threshold": -1.0}, {}, {"threshold": 1.0, "percentile": 50},
                                    {"percentile": 0}, {"percentile": 101}, {"threshold": 1.0, "value": -2}])
def test_clip_bad_settings(trained, kwargs):
    with pytest.raises(netshrink.NetshrinkError):
        netshrink.clip(trained, **kwargs)
    assert not hasattr(trained.fc1, "parametrizations")


def test_activation_quantization_against_reference(trained, digits):
    x = digits[1].tensors[0][:64]
    captured = {}
    hook = trained.fc2.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    trained(digits[0].tensors[0][:1024])  # the calibration pass sees the first 1,024 examples (the default)
    hook.remove()
    netshrink.quantize(trained, weight_bits=None, activation_bits=4, calibration=(digits[0].tensors[0], digits[0].tensors[1]),
                       observer="minmax")
    q = trained.fc2.input_quantizer
    # min/max over calibration data (post-ReLU: low is 0)
    assert float(q.low) == 0.0 and float(q.high) == pytest.approx(float(captured["x"].max()), rel=1e-5)
    # reference: 4-bit affine fake quant over [0, high]
    hidden = torch.relu(trained.fc1(x.flatten(1)))
    scale = float(q.high) / 15
    reference = torch.clamp(torch.round(hidden / scale), 0, 15) * scale
    assert torch.allclose(trained.fc2.input_quantizer(hidden), reference, atol=1e-6)
    assert torch.unique(trained.fc2.input_quantizer(hidden)).numel() <= 16


def test_percentile_observer_narrows_range(trained, digits):
    data = (digits[0].tensors[0], digits[0].tensors[1])
    netshrink.quantize(trained, weight_bits=None, activation_bits=8, calibration=data, observer="minmax")
    wide = float(trained.fc3.input_quantizer.high)
    netshrink.quantize(trained, weight_bits=None, activation_bits=8, calibration=data, observer="percentile")
    assert float(trained.fc3.input_quantizer.high) < wide


def test_activation_ranges_come_from_the_first_samples_examples_however_batched(trained, digits):
    images, labels = digits[0].tensors
    captured = []
    hook = trained.fc2.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    trained(images[:100])
    hook.remove()
    seen = float(captured[0].max())
    for calibration in ([images[i:i + 7] for i in range(0, 300, 7)], (images[:300], labels[:300])):
        model = copy.deepcopy(trained)
        netshrink.apply(model, netshrink.compress.methods.QuantizeActivations(bits=8, samples=100), calibration=calibration)
        assert float(model.fc2.input_quantizer.high) == pytest.approx(seen, rel=1e-6)
    wider = copy.deepcopy(trained)
    netshrink.apply(wider, netshrink.compress.methods.QuantizeActivations(bits=8, samples=300), calibration=(images, labels))
    assert float(wider.fc2.input_quantizer.high) > seen  # the next 200 examples reach higher
