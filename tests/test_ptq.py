"""Data-aware post-training methods (GPTQ, SparseGPT, Wanda, AdaRound, range search, SmoothQuant,
bias correction), each checked against a dense reference and against the data-free method it
improves on, on a plain MLP, the ResNet/MobileNet-style CNN and a tiny BERT."""
import copy

import pytest
import torch
from torch import nn

import netshrink
from netshrink.compress.methods.adaround import layer_output
from netshrink.compress.methods.gptq import gptq, output_error
from netshrink.compress.methods.grid import choose_grid, expand, round_to
from netshrink.compress.methods.sparsegpt import sparsegpt
from netshrink.zoo.models import build_model


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("group_size, act_order, scheme", [(None, False, "symmetric"), (16, True, "symmetric"),
                                                            (8, False, "affine"), (None, True, "affine")])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_layer_error_is_never_worse_than_rounding(bits, group_size, act_order, scheme):
    for seed in range(5):
        x = correlated_inputs(512, 64, seed)
        w = torch.randn(24, 64, generator=torch.Generator().manual_seed(100 + seed))
        hessian = x.T @ x / len(x)
        scale, zero = choose_grid(w, bits, scheme, group_size, "minmax")
        s, z = expand(scale, w, group_size), expand(zero, w, group_size)
        solved, unrounded = gptq(w, hessian, s, z, bits, scheme, act_order=act_order)
        rounded = round_to(w, s, z, bits, scheme)
        assert torch.equal(round_to(solved, s, z, bits, scheme), solved)  # on the same grid
        assert torch.equal(round_to(unrounded, s, z, bits, scheme), solved)  # what was rounded rounds to it
        assert output_error(w, solved, hessian) <= output_error(w, rounded, hessian)
        assert output_error(w, solved, hessian) < 0.8 * output_error(w, rounded, hessian)  # and clearly better


def test_gptq_keeps_pruned_weights_at_zero():
    x = correlated_inputs(256, 32, 0)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(2)) > 0.5
    scale, zero = choose_grid(w * keep, 4, "symmetric", None, "minmax")
    solved, unrounded = gptq(w * keep, x.T @ x / len(x), expand(scale, w, None), expand(zero, w, None), 4, "symmetric",
                             keep=keep)
    assert torch.all(solved[~keep] == 0) and torch.all(unrounded[~keep] == 0) and torch.count_nonzero(solved[keep]) > 0.8 * keep.sum()


def calibration_error(model, dense, x) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).square().mean())


def test_gptq_public_api_on_the_cnn_beats_rounding_and_survives_a_file(tmp_path):
    dense = build_model("resmobile").eval()
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rounded, solved = copy.deepcopy(dense), copy.deepcopy(dense)
    netshrink.quantize(rounded, weight_bits=3, range="mse")
    reports = netshrink.quantize(solved, weight_bits=3, method="gptq", calibration=(x,), group_size=32)
    details = dict(reports[0].changed)
    assert "GPTQ" in details["block1.conv"] and "GPTQ" in details["depthwise.conv"]  # one Hessian per channel
    assert calibration_error(solved, dense, x) < calibration_error(rounded, dense, x)
    for name, layer in solved.named_modules():  # every layer on at most 2^3 - 1 levels per group
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            groups = rows[:, :rows.shape[1] // 32 * 32].reshape(rows.shape[0], -1, 32) if rows.shape[1] > 32 else rows[:, None]
            assert max(len(torch.unique(g)) for g in groups.reshape(-1, groups.shape[-1])) <= 7, name
    path = tmp_path / "gptq.nsk"
    size = netshrink.save(solved, path)
    loaded = netshrink.load(path)
    assert torch.equal(loaded(x), solved(x))
    assert size < 0.35 * netshrink.save(dense, tmp_path / "dense.nsk")  # codes, not float values
    # the grid came back with its scales: fine-tuning keeps weights on it
    grid = loaded.block1.conv.parametrizations.weight[0]
    assert torch.equal(grid.scale, solved.block1.conv.parametrizations.weight[0].scale)


@pytest.mark.parametrize("keep, n, m", [(0.5, None, None), (0.3, None, None), (None, 2, 4)])
def test_sparsegpt_exact_counts_and_lower_error_than_magnitude(keep, n, m):
    dense = build_model("resmobile").eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    magnitude, solved = copy.deepcopy(dense), copy.deepcopy(dense)
    if m is None:
        netshrink.prune(magnitude, keep=keep)
        report = netshrink.prune(solved, keep=keep, method="sparsegpt", calibration=(x,))
    else:
        netshrink.apply(magnitude, netshrink.NMSparsity(n=n, m=m))
        report = netshrink.apply(solved, netshrink.SparseGPT(n=n, m=m), calibration=(x,))
    changed = dict(report.changed)
    for name, layer in solved.named_modules():
        if name in changed:
            w = layer.weight.detach()
            if m is None:
                assert int(torch.count_nonzero(w)) <= round(keep * w.numel())
                assert int(layer.parametrizations.weight[0].mask.sum()) == round(keep * w.numel()), name
            else:  # n of every m input channels at each kernel tap
                groups = (w != 0).movedim(1, -1).reshape(-1, m).sum(dim=1)
                assert int(groups.max()) <= n, name
    assert "depthwise.conv" not in changed and any(layer == "depthwise.conv" for layer, _ in report.skipped)
    assert calibration_error(solved, dense, x) < calibration_error(magnitude, dense, x)


def test_sparsegpt_solver_prunes_exactly_and_beats_masking_alone():
    x = correlated_inputs(512, 256, 3)
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(4))
    hessian = x.T @ x / len(x)
    new, mask = sparsegpt(w, hessian, keep=0.37)
    assert int(mask.sum()) == round(0.37 * w.numel()) and torch.all(new[~mask] == 0)
    assert output_error(w, new, hessian) < 0.7 * output_error(w, w * mask, hessian)


def test_wanda_equals_magnitude_pruning_per_row_when_inputs_are_alike():
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.ones(64, 32)  # every input the same norm: Wanda's score is |w| times a constant
    report = netshrink.prune(model, keep=0.25, method="wanda", calibration=(x,))
    assert "kept 128 of 512" in report.changed[0][1]
    w = model[0].parametrizations.weight.original.detach()
    kept = model[0].parametrizations.weight[0].mask.bool()
    for row in range(16):  # the 8 kept in each row are its 8 largest
        assert set(torch.topk(w[row].abs(), 8).indices.tolist()) == set(kept[row].nonzero().flatten().tolist())


def test_wanda_prefers_weights_on_large_inputs():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[:, 0] = 0.5  # small weights ...
    x = torch.zeros(16, 8)
    x[:, 0] = 100.0  # ... on a large input
    x[:, 1:] = 0.01
    magnitude = copy.deepcopy(model)
    netshrink.prune(model, keep=0.25, method="wanda", calibration=(x,))
    assert bool(model[0].parametrizations.weight[0].mask[:, 0].all())
    netshrink.prune(magnitude, keep=0.25)  # magnitude alone drops column 0 first
    assert not bool(magnitude[0].parametrizations.weight[0].mask[:, 0].any())


def test_adaround_stays_within_one_step_and_beats_nearest_rounding():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1)).eval()
    x = torch.randn(64, 3, 10, 10)
    rounded, learned = copy.deepcopy(dense), copy.deepcopy(dense)
    netshrink.quantize(rounded, weight_bits=3, range="mse")
    report = netshrink.apply(learned, netshrink.AdaRound(bits=3, iterations=300), calibration=(x,))
    assert {layer for layer, _ in report.changed} == {"0", "2"}  # the depthwise conv too
    for index in (0, 2):
        grid = learned[index].parametrizations.weight[0]
        w = dense[index].weight.detach()
        steps = w / expand(grid.scale, w, None)
        codes = learned[index].weight.detach() / expand(grid.scale, w, None)
        assert torch.all((codes - steps).abs() < 1 + 1e-4)  # floor or ceil of the float weight
    with torch.no_grad():
        first = layer_output(learned[0], x, learned[0].weight)
        assert torch.allclose(first, learned[0](x))
    assert calibration_error(learned, dense, x) < calibration_error(rounded, dense, x)


def test_mse_range_rounds_closer_than_minmax(rand_weight):
    heavy = rand_weight.clone()
    heavy[:, 0, 0, 0] = 6.0  # one outlier per channel stretches the min-max grid
    for bits in (2, 3, 4):
        errors = {}
        for search in ("minmax", "mse"):
            scale, zero = choose_grid(heavy, bits, "symmetric", None, search)
            errors[search] = float((round_to(heavy, expand(scale, heavy, None), expand(zero, heavy, None), bits,
                                             "symmetric") - heavy).square().sum())
        assert errors["mse"] < errors["minmax"]


def test_bias_correction_restores_the_output_mean(trained, digits):
    x = digits[0].tensors[0][:256]
    dense = copy.deepcopy(trained).eval()
    plain, corrected = copy.deepcopy(trained), copy.deepcopy(trained)
    netshrink.prune(plain, keep=0.3, method="wanda", calibration=(x,))
    report = netshrink.apply(corrected, netshrink.Wanda(keep=0.3, bias_correction=True), calibration=(x,))
    assert all("bias corrected" in detail for _, detail in report.changed)
    with torch.no_grad():
        shift = lambda m: float((m(x).mean(0) - dense(x).mean(0)).abs().mean())  # noqa: E731
        assert shift(corrected) < 0.5 * shift(plain)


def test_smoothquant_is_exact_before_rounding_and_auto_never_worse(make_tiny_bert):
    from test_real_inputs import bert_batches

    dense = make_tiny_bert()
    with torch.no_grad():  # an outlier channel, as trained transformers have
        dense.embeddings.LayerNorm.weight[3] = 25.0
    data = bert_batches()
    outputs = {}
    for smooth in (None, 0.5, "auto"):
        model = copy.deepcopy(dense)
        netshrink.quantize(model, weight_bits=None, activation_bits=8, calibration=data, smooth=smooth)
        query = model.encoder.layer[0].attention.self.query
        if smooth == 0.5:  # weight columns scaled by the factors, inputs divided by them: same product
            factors = query.input_quantizer.smooth
            assert torch.allclose(query.weight / factors, dense.encoder.layer[0].attention.self.query.weight)
            assert float(factors[3]) > 2 * float(factors.median())
        with torch.no_grad():
            outputs[smooth] = torch.cat([model(**b).last_hidden_state.flatten() for b in data])
    with torch.no_grad():
        reference = torch.cat([dense(**b).last_hidden_state.flatten() for b in data])
    errors = {k: float((v - reference).square().mean()) for k, v in outputs.items()}
    assert errors["auto"] <= errors[None] * 1.05


@pytest.mark.parametrize("method", ["gptq", "adaround", "sparsegpt", "wanda"])
def test_every_method_runs_on_a_transformer_and_round_trips(method, make_tiny_bert, tmp_path):
    from test_real_inputs import bert_batches

    model, data = make_tiny_bert(), bert_batches()
    dense = copy.deepcopy(model)
    if method == "gptq":
        netshrink.quantize(model, weight_bits=4, method=method, calibration=data, group_size=16)
    elif method == "adaround":
        netshrink.apply(model, netshrink.AdaRound(bits=4, iterations=60), calibration=data)
    else:
        netshrink.prune(model, keep=0.5, method=method, calibration=data)
    with torch.no_grad():
        ours = torch.cat([model(**b).last_hidden_state for b in data])
        reference = torch.cat([dense(**b).last_hidden_state for b in data])
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(0, 1), reference.flatten(0, 1)).mean()
    assert 0.8 < float(cosine) < 1.0
    netshrink.save(model, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk")  # rebuilt from the recorded transformers config
    with torch.no_grad():
        assert torch.equal(torch.cat([loaded(**b).last_hidden_state for b in data]), ours)


def test_data_aware_methods_refuse_clearly_and_leave_the_model_alone(trained, digits):
    x = digits[0].tensors[0][:64]
    before = copy.deepcopy(trained.state_dict())
    cases = [
        lambda: netshrink.quantize(trained, weight_bits=4, method="gptq"),
        lambda: netshrink.prune(trained, keep=0.5, method="sparsegpt"),
        lambda: netshrink.prune(trained, keep=0.5, method="wanda", calibration=(x,), scope="global"),
        lambda: netshrink.quantize(trained, weight_bits=4, method="optimal", calibration=(x,)),
        lambda: netshrink.quantize(trained, weight_bits=4, method="adaround", calibration=(x,), group_size=8),
        lambda: netshrink.quantize(trained, weight_bits=4, method="gptq", calibration=(torch.full((8, 1, 8, 8), float("nan")),)),
        lambda: netshrink.quantize(trained, weight_bits=4, method="gptq", calibration=(torch.randn(8, 3),)),
        lambda: netshrink.apply(trained, netshrink.GPTQ(bits=4, group_size=0), calibration=(x,)),
        lambda: netshrink.apply(trained, netshrink.SparseGPT(n=2), calibration=(x,)),
        lambda: netshrink.apply(trained, netshrink.SparseGPT(n=3, m=3 * 7), calibration=(x,)),
        lambda: netshrink.apply(trained, netshrink.AdaRound(bits=1), calibration=(x,)),
        lambda: netshrink.quantize(trained, weight_bits=None, activation_bits=8, calibration=(x,), smooth=1.5),
        lambda: netshrink.quantize(trained, weight_bits=4, smooth=0.5),
    ]
    for case in cases:
        with pytest.raises(netshrink.NetshrinkError) as error:
            case()
        assert "\n" not in str(error.value)
        assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items()) and len(trained.state_dict()) == len(before)
    netshrink.quantize(trained, weight_bits=4, range="mse")
    with pytest.raises(netshrink.NetshrinkError, match="already quantized"):
        netshrink.quantize(trained, weight_bits=4, method="gptq", calibration=(x,))


def test_calibration_runs_each_layer_group_once_per_batch_and_stops_early(trained, digits):
    from netshrink.compress.calibration import each_layer

    calls = {"fc1": 0, "fc3": 0}
    for name in calls:
        trained.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    layers = {n: trained.get_submodule(n) for n in ("fc1", "fc2", "fc3")}
    seen = [name for name, stats in each_layer(trained, layers, digits[0], frozenset({"hessian"}), samples=100, batch_size=50)]
    assert seen == ["fc1", "fc2", "fc3"]
    # fc1 ran in the order pass and in fc2's and fc3's passes (2 batches each), never in its own
    # (the pass stops at its input); fc3 ran only in the order pass.
    assert calls == {"fc1": 1 + 2 + 2, "fc3": 1}


def test_padded_positions_are_not_calibration_data(make_tiny_bert):
    from netshrink.compress.calibration import each_layer

    model = make_tiny_bert()
    ids = torch.randint(1, 120, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:4, 5:] = 0  # half the sentences are short: their tails are padding
    layers = {"encoder.layer.0.attention.self.query": model.encoder.layer[0].attention.self.query}
    [(name, stats)] = list(each_layer(model, layers, [{"input_ids": ids, "attention_mask": mask}],
                                      frozenset({"hessian"}), samples=8, batch_size=8))
    assert stats.count == int(mask.sum())


def test_one_pass_statistics_equal_the_layer_by_layer_ones_of_an_unchanged_model(make_tiny_bert):
    """dense_statistics is each_layer without a pass per layer: the same Hessians (real tokens only)
    when nothing changes between layers."""
    from netshrink.compress.calibration import dense_statistics, each_layer

    model = make_tiny_bert()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:4, 6:] = 0
    data = [{"input_ids": torch.randint(1, 120, (8, 12), generator=g), "attention_mask": mask} for _ in range(3)]
    layers = {n: model.get_submodule(n) for n in ("encoder.layer.0.output.dense", "encoder.layer.1.attention.output.dense",
                                                  "encoder.layer.1.intermediate.dense")}
    once = dense_statistics(model, layers, data, frozenset({"hessian"}), samples=20, batch_size=8)
    stepwise = dict(each_layer(model, layers, data, frozenset({"hessian"}), samples=20, batch_size=8))
    assert set(once) == set(stepwise) == set(layers)
    for name in layers:
        assert once[name].count == stepwise[name].count == int(mask.sum()) * 2 + int(mask[:4].sum())
        assert torch.allclose(once[name].hessian, stepwise[name].hessian, atol=1e-6)


def test_summary_reads_bits_off_grouped_grids(trained, digits):
    netshrink.quantize(trained, weight_bits=3, method="gptq", group_size=16, calibration=(digits[0].tensors[0][:64],))
    assert {row["bits"] for row in netshrink.summary(trained).rows} == {3}


def test_grouped_gptq_model_exports_to_onnx_runtime(trained, digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    netshrink.quantize(trained, 4, method="gptq", group_size=16, activation_bits=8, calibration=digits[0])
    x = digits[1].tensors[0]
    with torch.no_grad():
        ours = trained(x).argmax(1).numpy()
    for int8 in (False, True):
        path = tmp_path / f"m{int8}.onnx"
        netshrink.export(trained, path, int8=int8, calibration=digits[0] if int8 else None)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
        assert (theirs == ours).mean() >= 0.99
