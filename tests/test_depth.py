"""netshrink.remove_layers: whole transformer blocks removed, chosen by measured damage, against
models built by hand without those blocks; saved, loaded and exported as the shallower model."""
import copy

import numpy as np
import pytest
import torch

import netshrink

transformers = pytest.importorskip("transformers")


def _bert(layers=4, seed=0):
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def _tokens(batches=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        mask = torch.ones(size, 12, dtype=torch.long)
        mask[::2, 7:] = 0  # padded sentences: padding must not count
        out.append({"input_ids": torch.randint(0, 120, (size, 12), generator=g), "attention_mask": mask})
    return out


def _without(model, removed):
    """The dense reference: the same model with those blocks left out by hand."""
    other = copy.deepcopy(model)
    other.encoder.layer = torch.nn.ModuleList([b for i, b in enumerate(other.encoder.layer) if i not in removed])
    other.config.num_hidden_layers = len(other.encoder.layer)
    return other


def _output(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _damage(model, dense, data):
    total = energy = 0.0
    for batch in data:
        mask = batch["attention_mask"].bool()
        ref = _output(dense, batch)[mask]
        total += float((_output(model, batch)[mask] - ref).square().sum())
        energy += float(ref.square().sum())
    return total / energy


def test_the_block_the_output_misses_least_goes_first():
    dense, data = _bert(), _tokens()
    # Block 2 made almost an identity: its residual branches write nothing, its LayerNorms pass
    # the (already normalised) stream through. Its removal costs nearly nothing.
    block = dense.encoder.layer[2]
    with torch.no_grad():
        for linear in (block.attention.output.dense, block.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
    model = copy.deepcopy(dense)
    report = netshrink.remove_layers(model, keep=3, calibration=data)
    assert [name for name, _ in report.changed] == ["encoder.layer.2"]
    assert model.config.num_hidden_layers == len(model.encoder.layer) == 3
    for batch in data:
        assert torch.allclose(_output(model, batch), _output(_without(dense, {2}), batch), atol=1e-6)
        assert torch.allclose(_output(model, batch)[batch["attention_mask"].bool()],
                              _output(dense, batch)[batch["attention_mask"].bool()], atol=1e-4)


def test_greedy_choice_matches_brute_force_at_each_step():
    dense, data = _bert(layers=5, seed=3), _tokens()
    model = copy.deepcopy(dense)
    report = netshrink.remove_layers(model, keep=0.6, calibration=data)  # 5 blocks -> 3
    removed = [int(name.rsplit(".", 1)[1]) for name, _ in report.changed]
    assert len(removed) == 2 and model.config.num_hidden_layers == 3
    first = min(range(5), key=lambda i: _damage(_without(dense, {i}), dense, data))
    second = min((i for i in range(5) if i != first), key=lambda i: _damage(_without(dense, {first, i}), dense, data))
    assert removed == [first, second]
    for batch in data:  # what is left computes as the hand-built model without those blocks
        assert torch.allclose(_output(model, batch), _output(_without(dense, set(removed)), batch), atol=1e-6)
    again = copy.deepcopy(dense)  # a second call on a fresh copy: nothing leaks between calls
    netshrink.remove_layers(again, keep=3, calibration=data)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_shallower_model_saves_loads_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dense, data = _bert(), _tokens()
    model = copy.deepcopy(dense)
    netshrink.remove_layers(model, keep=2, calibration=data)
    netshrink.save(model, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk")  # rebuilt from the recorded config: two blocks
    assert loaded.config.num_hidden_layers == len(loaded.encoder.layer) == 2
    batch = data[0]
    assert torch.allclose(_output(loaded, batch), _output(model, batch), atol=1e-6)
    netshrink.export(model, tmp_path / "m.onnx", example_inputs=batch)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0]
    mask = batch["attention_mask"].bool().numpy()
    assert np.abs(got[mask] - _output(model, batch).numpy()[mask]).max() < 1e-4


def test_distilbert_blocks_and_quantization_afterwards():
    config = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=40, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    dense = transformers.DistilBertModel(config).eval()
    data = _tokens()
    model = copy.deepcopy(dense)
    report = netshrink.remove_layers(model, keep=2, calibration=data)
    (name, _), = report.changed
    assert name.startswith("transformer.layer.") and len(model.transformer.layer) == model.config.n_layers == 2
    removed = int(name.rsplit(".", 1)[1])
    reference = copy.deepcopy(dense)
    reference.transformer.layer = torch.nn.ModuleList([b for i, b in enumerate(reference.transformer.layer)
                                                       if i != removed])
    for batch in data:
        assert torch.allclose(_output(model, batch), _output(reference, batch), atol=1e-6)
    netshrink.quantize(model, weight_bits=8, activation_bits=8, calibration=data)  # the usual next step works
    assert torch.isfinite(_output(model, data[0])).all()


@pytest.mark.parametrize("call, message", [
    (lambda m, d: netshrink.remove_layers(m, keep=3), "pass calibration="),
    (lambda m, d: netshrink.remove_layers(m, keep=5, calibration=d), "keep=5 blocks, but BertModel has 4"),
    (lambda m, d: netshrink.remove_layers(m, keep=0, calibration=d), "keep"),
    (lambda m, d: netshrink.remove_layers(m, keep=1.5, calibration=d), "keep"),
    (lambda m, d: netshrink.remove_layers(m, keep=True, calibration=d), "keep must be a number"),
    (lambda m, d: netshrink.remove_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), keep=1, calibration=d),
     "no config.num_hidden_layers"),
])
def test_bad_requests_are_one_error_and_leave_the_model_as_it_was(call, message):
    model, data = _bert(), _tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(netshrink.NetshrinkError, match=message.replace("(", r"\(").replace("=", "=")):
        call(model, data)
    assert model.config.num_hidden_layers == len(model.encoder.layer) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failure_midway_restores_blocks_and_config():
    model, data = _bert(), _tokens()
    bad = data[:1] + [{"input_ids": torch.full((2, 12), 500), "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    with pytest.raises(Exception):
        netshrink.remove_layers(model, keep=2, calibration=bad)  # token ids beyond the vocabulary
    assert model.config.num_hidden_layers == len(model.encoder.layer) == 4


def test_recipe_step_removes_blocks_then_quantizes():
    """`layers` is a recipe step like any other: the recipe's data are the calibration batches."""
    dense, data = _bert(), _tokens()
    model = copy.deepcopy(dense)
    recipe = netshrink.Recipe.from_yaml("steps:\n  - layers: {keep: 3}\n  - quantize: {bits: 8}\n")
    rows = recipe.run(model, data)
    assert [row["step"] for row in rows] == [1, 2] and len(model.encoder.layer) == 3
    reference = copy.deepcopy(dense)
    netshrink.remove_layers(reference, keep=3, calibration=data)
    netshrink.quantize(reference, weight_bits=8)
    for batch in data:
        assert torch.allclose(_output(model, batch), _output(reference, batch), atol=1e-6)


def _pooled(model, inputs):
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_forward_chooses_by_what_the_user_keeps_of_the_output():
    dense, data = _bert(layers=5, seed=3), _tokens()
    model = copy.deepcopy(dense)
    report = netshrink.remove_layers(model, keep=3, calibration=data, forward=_pooled)
    removed = [int(name.rsplit(".", 1)[1]) for name, _ in report.changed]

    def pooled_damage(kept_out):
        other = _without(dense, kept_out)
        with torch.no_grad():
            return sum(float((_pooled(other, b) - _pooled(dense, b)).square().sum()) for b in data)

    first = min(range(5), key=lambda i: pooled_damage({i}))
    second = min((i for i in range(5) if i != first), key=lambda i: pooled_damage({first, i}))
    assert removed == [first, second]
    # An output no block changes (the embeddings alone): every removal costs nothing, so the first
    # block tried goes, not the near-identity block 2 that the last hidden states single out.
    flat = _bert()
    with torch.no_grad():
        for linear in (flat.encoder.layer[2].attention.output.dense, flat.encoder.layer[2].output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
    by_default, by_embeddings = copy.deepcopy(flat), copy.deepcopy(flat)
    assert [n for n, _ in netshrink.remove_layers(by_default, keep=3, calibration=data).changed] == ["encoder.layer.2"]
    report = netshrink.remove_layers(by_embeddings, keep=3, calibration=data,
                                     forward=lambda m, x: m.embeddings(input_ids=x["input_ids"]))
    assert [name for name, _ in report.changed] == ["encoder.layer.0"]
    with pytest.raises(netshrink.NetshrinkError, match="forward must be a function"):
        netshrink.remove_layers(copy.deepcopy(dense), keep=3, calibration=data, forward="pooled")
