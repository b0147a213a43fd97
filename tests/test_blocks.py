"""Block reconstruction (``method="gptq+blocks"``, ``"sparsegpt+blocks"``, ``"wanda+blocks"``): each
block's output error never ends above where the layer-wise solver left it, codes stay on their
grids, masks stay exact, and a block that cannot be reconstructed is refused with the reason."""
import copy
import re

import pytest
import torch
from torch import nn

import netshrink
from netshrink.compress.methods.blocks import find_blocks
from netshrink.compress.methods.grid import FixedGrid, expand, levels
from netshrink.zoo.models import build_model

transformers = pytest.importorskip("transformers")


def bert_batches(n=64, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, seq // 2:] = 0
    return [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, n, 16)]


def block_reports(reports):
    """``{block: (error before, error after)}`` from a method's report."""
    found = {}
    for name, detail in reports[0].changed if isinstance(reports, list) else reports.changed:
        if name.endswith("(block)"):
            numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", detail.split("error")[1])]
            found[name[:-len(" (block)")]] = (numbers[0], numbers[-1])
    return found


def first_block_error(model, dense, data):
    """The first encoder layer's output error against the dense model's, on the same inputs
    (real tokens only: padding is not data)."""
    outputs = {}
    for key, m in (("now", model), ("dense", dense)):
        kept = []
        handle = m.encoder.layer[0].register_forward_hook(lambda mod, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            for batch in data:
                m(**batch)
        handle.remove()
        outputs[key] = torch.cat([k[b["attention_mask"].bool()] for k, b in zip(kept, data)])
    return float((outputs["now"] - outputs["dense"]).square().sum())


def assert_on_grids(model):
    for name, module in model.named_modules():
        stack = list(module.parametrizations.weight) if hasattr(module, "parametrizations") else []
        grids = [t for t in stack if isinstance(t, FixedGrid)]
        if not grids:
            continue
        grid = grids[-1]
        w = module.weight.detach()
        scale, zero = expand(grid.scale, w, grid.group_size), expand(grid.zero, w, grid.group_size)
        codes = w / scale + zero
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        low, high = levels(grid.bits, grid.scheme)
        assert codes.round().min() >= low and codes.round().max() <= high, name


@pytest.mark.parametrize("method", ["round+blocks", "gptq+blocks"])
def test_blocks_lower_block_errors_and_keep_codes_on_grids(make_tiny_bert, tmp_path, method):
    data = bert_batches()
    dense = make_tiny_bert()
    plain, tuned = make_tiny_bert(), make_tiny_bert()
    if method == "gptq+blocks":
        netshrink.quantize(plain, 3, method="gptq", group_size=16, calibration=data)
    else:
        netshrink.quantize(plain, 3, group_size=16, range="mse")
    reports = netshrink.quantize(tuned, 3, method=method, group_size=16, calibration=data)
    blocks = block_reports(reports)
    assert set(blocks) == {"encoder.layer.0", "encoder.layer.1", "pooler.dense"}
    assert all(after <= before for before, after in blocks.values()), blocks
    assert any(after < 0.95 * before for before, after in blocks.values()), blocks
    # Independently: the first block sees the same (quantized-embedding) inputs in both models.
    assert first_block_error(tuned, dense, data) <= first_block_error(plain, dense, data)
    assert_on_grids(tuned)
    # The tuned scales are the file's: a saved and loaded model computes the same outputs.
    netshrink.save(tuned, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk", make_tiny_bert())
    with torch.no_grad():
        assert torch.allclose(tuned(**data[0]).last_hidden_state, loaded(**data[0]).last_hidden_state, atol=1e-5)


def test_sparsegpt_blocks_keeps_masks_exact(make_tiny_bert):
    data = bert_batches()
    plain, tuned = make_tiny_bert(), make_tiny_bert()
    encoder = ("re:encoder\\..*",)
    netshrink.prune(plain, 0.5, method="sparsegpt", calibration=data, targets=encoder)
    report = netshrink.prune(tuned, 0.5, method="sparsegpt+blocks", calibration=data, targets=encoder)
    blocks = block_reports(report)
    assert set(blocks) == {"encoder.layer.0", "encoder.layer.1"}
    assert all(after <= before for before, after in blocks.values()), blocks
    changed = 0
    for (name, a), b in zip(plain.named_modules(), tuned.modules()):
        if isinstance(a, nn.Linear) and name.startswith("encoder"):
            mask = b.parametrizations.weight[0].mask
            assert torch.equal(a.parametrizations.weight[0].mask, mask), name  # the same weights removed
            assert bool((b.weight[mask == 0] == 0).all()), name
            changed += int(not torch.equal(a.weight, b.weight))
    assert changed > 0  # the kept weights were tuned


def test_cnn_blocks_with_batchnorm_residuals_and_depthwise():
    torch.manual_seed(0)
    model = build_model("resmobile")
    images = [torch.randn(32, 1, 28, 28) for _ in range(3)]
    names = [name for name, _ in find_blocks(model, {n: m for n, m in model.named_modules()
                                                        if isinstance(m, (nn.Conv2d, nn.Linear))})]
    assert names[:3] == ["stem", "block1", "block1b"] and "head" in names
    report = netshrink.quantize(model, 4, method="gptq+blocks", calibration=images)
    blocks = block_reports(report)
    assert len(blocks) == 10 and all(after <= before for before, after in blocks.values()), blocks
    assert_on_grids(model)
    with torch.no_grad():
        assert torch.isfinite(model(images[0])).all()


def test_a_block_run_twice_is_refused_and_the_model_left_as_it_was():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 8)

        def forward(self, x):
            return self.layer(torch.relu(self.layer(x)))

    model = Twice()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(netshrink.NetshrinkError, match="runs 2 times per forward pass"):
        netshrink.quantize(model, 4, method="gptq+blocks", calibration=[torch.randn(16, 8)])
    assert not hasattr(model.layer, "parametrizations")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_methods_are_listed_and_checked():
    with pytest.raises(netshrink.NetshrinkError, match="round\\+blocks.*gptq\\+blocks"):
        netshrink.quantize(build_model("mlp"), 4, method="unknown")
    with pytest.raises(netshrink.NetshrinkError, match="sparsegpt\\+blocks.*wanda\\+blocks"):
        netshrink.prune(build_model("mlp"), 0.5, method="unknown")
    with pytest.raises(netshrink.NetshrinkError, match="fixed grids"):
        netshrink.compress.methods.QuantizeWeights(bits=4, block_steps=10).check()
    with pytest.raises(netshrink.NetshrinkError, match="block_steps"):
        netshrink.compress.methods.GPTQ(block_steps=-1).check()


def stored_bits(model):
    """Bits per weight of every quantized weight, codes and 16-bit scales (with zero points)."""
    from netshrink.compress.methods.mixed import layer_cost
    bits = weights = 0
    for module in model.modules():
        grids = [t for t in module.parametrizations.weight if isinstance(t, FixedGrid)] \
            if hasattr(module, "parametrizations") else []
        if grids:
            w = module.weight
            bits += layer_cost(w, grids[-1].bits, grids[-1].group_size, grids[-1].scheme)
            weights += w.numel()
    return bits / weights, weights


def output_error(model, dense, data):
    with torch.no_grad():
        return sum(float((model(**b).last_hidden_state - dense(**b).last_hidden_state)[b["attention_mask"].bool()]
                         .square().sum()) for b in data)


def test_average_bits_fits_the_budget_and_beats_uniform_width(make_tiny_bert):
    data, dense = bert_batches(), make_tiny_bert()
    uniform, mixed = make_tiny_bert(), make_tiny_bert()
    netshrink.quantize(uniform, 4, method="gptq", group_size=16, calibration=data)
    reports = netshrink.quantize(mixed, 8, average_bits=5.5, method="gptq", group_size=16, calibration=data)
    average, weights = stored_bits(mixed)
    assert weights == stored_bits(uniform)[1]  # every weight, embedding tables included
    assert stored_bits(uniform)[0] <= average <= 5.5
    assert "mixed precision for at most 5.5 bits" in str(reports[-1])
    assert output_error(mixed, dense, data) < output_error(uniform, dense, data)
    with pytest.raises(netshrink.NetshrinkError, match="below what the narrowest"):
        netshrink.quantize(make_tiny_bert(), 8, average_bits=2.0, method="gptq", group_size=16, calibration=data)
    with pytest.raises(netshrink.NetshrinkError, match="average_bits chooses"):
        netshrink.quantize(make_tiny_bert(), 8, average_bits=4.5, method="gptq", group_size=16)


def grid_codes(model):
    """``{layer: its integer codes}`` of every layer whose last transform is a fixed grid."""
    found = {}
    for name, module in model.named_modules():
        grids = [t for t in module.parametrizations.weight if isinstance(t, FixedGrid)] \
            if hasattr(module, "parametrizations") else []
        if grids:
            w = module.weight.detach()
            found[name] = (w / expand(grids[-1].scale, w, grids[-1].group_size)).round()
    return found


def test_end_to_end_tuning_moves_scales_only(make_tiny_bert, tmp_path):
    data, dense = bert_batches(), make_tiny_bert()
    plain, tuned = make_tiny_bert(), make_tiny_bert()
    netshrink.apply(plain, netshrink.compress.methods.GPTQ(bits=3, group_size=16, block_steps=20), calibration=data)
    report = netshrink.apply(tuned, netshrink.compress.methods.GPTQ(bits=3, group_size=16, block_steps=20,
                                                           end_to_end_steps=60), calibration=data)
    detail = dict(report.changed)["(model)"]
    before, after = (float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", detail)[:2])
    assert after < before, detail
    assert output_error(tuned, dense, data) < output_error(plain, dense, data)
    codes, start = grid_codes(tuned), grid_codes(plain)
    assert codes.keys() == start.keys() and all(torch.equal(codes[k], start[k]) for k in codes)  # integers kept
    scales = [(a.parametrizations.weight[-1].scale, b.parametrizations.weight[-1].scale)
              for a, b in zip(plain.modules(), tuned.modules()) if hasattr(a, "parametrizations")]
    assert any(not torch.equal(a, b) for a, b in scales)  # what moved: the scales
    assert_on_grids(tuned)
    netshrink.save(tuned, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk", make_tiny_bert())
    with torch.no_grad():
        assert torch.allclose(tuned(**data[0]).last_hidden_state, loaded(**data[0]).last_hidden_state, atol=1e-5)
    with pytest.raises(netshrink.NetshrinkError, match="end_to_end_steps"):
        netshrink.compress.methods.SparseGPT(end_to_end_steps=1.5).check()


def test_remove_heads_then_blocks_tunes_the_smaller_layers(make_tiny_bert):
    def make():  # projections 8x the initial scale, so that heads and neurons matter next to the residual path
        model = make_tiny_bert()
        with torch.no_grad():
            for module in model.encoder.modules():
                if isinstance(module, nn.Linear):
                    module.weight.mul_(8)
        return model

    data, dense = bert_batches(), make()
    plain, tuned = make(), make()
    netshrink.remove_heads(plain, 0.5, 0.5, calibration=data)
    report = netshrink.remove_heads(tuned, 0.5, 0.5, calibration=data, block_steps=40)
    blocks = block_reports(report)
    assert set(blocks) == {"encoder.layer.0", "encoder.layer.1"}
    assert all(after < before for before, after in blocks.values()), blocks
    assert first_block_error(tuned, dense, data) < first_block_error(plain, dense, data)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
    assert shapes(tuned) == shapes(plain)  # the same heads and neurons removed; only values tuned
    assert not any(hasattr(m, "parametrizations") for m in tuned.modules())
    with pytest.raises(netshrink.NetshrinkError, match="block_steps=40 tunes the layers on data"):
        netshrink.remove_heads(make_tiny_bert(), 0.5, 0.5, block_steps=40)
