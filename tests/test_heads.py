"""Transformer heads and feed-forward neurons, physically removed, against dense references."""
import copy

import pytest
import torch

import netshrink

def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, 120, (4, 10), generator=g), "attention_mask": torch.ones(4, 10, dtype=torch.long)}


def silenced(dense, model_report_kept):
    """The dense model with the removed heads' value rows and output columns zeroed and the removed
    neurons' rows zeroed: it must compute what the physically smaller model computes."""
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for i, (heads, neurons) in enumerate(model_report_kept):
            layer = reference.encoder.layer[i]
            dropped = [h for h in range(4) if h not in heads]
            for h in dropped:
                layer.attention.output.dense.weight[:, h * 8:(h + 1) * 8] = 0
            dropped_neurons = [j for j in range(64) if j not in neurons]
            layer.output.dense.weight[:, dropped_neurons] = 0
    return reference


def test_heads_and_neurons_removed_match_the_silenced_dense_model(tmp_path, make_tiny_bert):
    dense = make_tiny_bert()
    model = copy.deepcopy(dense)
    report = netshrink.remove_heads(model, heads=0.5, neurons=0.75)
    assert dict(report.changed)["encoder.layer.0.attention.self"] == "kept 2 of 4 heads"
    assert dict(report.changed)["encoder.layer.1"] == "kept 48 of 64 feed-forward neurons"
    attention = model.encoder.layer[0].attention
    assert attention.self.query.out_features == 16 and attention.output.dense.in_features == 16
    assert model.encoder.layer[0].intermediate.dense.out_features == 48
    kept = []
    for i in range(2):
        layer, dense_layer = model.encoder.layer[i], dense.encoder.layer[i]
        rows = [r for r in range(32) if any(torch.equal(layer.attention.self.query.weight[k],
                                                         dense_layer.attention.self.query.weight[r]) for k in range(16))]
        neurons = [j for j in range(64) if any(torch.equal(layer.intermediate.dense.weight[k],
                                                            dense_layer.intermediate.dense.weight[j]) for k in range(48))]
        kept.append((sorted({r // 8 for r in rows}), neurons))
    reference = silenced(dense, kept)
    with torch.no_grad():
        assert torch.allclose(model(**batch()).last_hidden_state, reference(**batch()).last_hidden_state, atol=1e-5)
    netshrink.save(model, tmp_path / "small.nsk")
    loaded = netshrink.load(tmp_path / "small.nsk", model=make_tiny_bert())  # a fresh full-size model is fitted
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).last_hidden_state, model(**batch()).last_hidden_state)


def test_heads_refused_without_change_where_they_do_not_apply(make_tiny_bert):
    model = netshrink.build_model("mlp")
    with pytest.raises(netshrink.NetshrinkError, match="no attention block"):
        netshrink.remove_heads(model, heads=0.5)
    bert = make_tiny_bert()
    netshrink.prune(bert, keep=0.5)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(netshrink.NetshrinkError, match="before other compression"):
        netshrink.remove_heads(bert, heads=0.5)
    with pytest.raises(netshrink.NetshrinkError, match="matches no selected layer"):
        netshrink.remove_heads(make_tiny_bert(), heads={"encoder.layer.9.attention.self": 0.5, "*": 0.7})
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_remove_units_on_a_transformer_points_to_remove_heads(make_tiny_bert):
    bert = make_tiny_bert()
    with pytest.raises(netshrink.NetshrinkError, match="remove_heads") as refused:
        netshrink.remove_units(bert, keep=0.5, example_input=torch.randint(0, 120, (2, 8)))
    named = str(refused.value).rsplit("netshrink.", 1)[1]
    assert callable(getattr(netshrink, named))  # the advice names a function that exists


def test_a_pruned_and_quantized_bert_loads_without_passing_the_model(tmp_path, make_tiny_bert):
    model = make_tiny_bert()
    netshrink.remove_heads(model, heads=0.5, neurons=0.5)
    netshrink.quantize(model, weight_bits=8)
    netshrink.save(model, tmp_path / "bert.nsk")
    loaded = netshrink.load(tmp_path / "bert.nsk")
    assert type(loaded).__name__ == "BertModel" and loaded.encoder.layer[1].attention.self.query.out_features == 16
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).last_hidden_state, model(**batch()).last_hidden_state)
