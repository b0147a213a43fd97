"""Every invalid setting of every public function: one NetshrinkError line, and the model exactly
as it was (weights, transforms, hooks, and every submodule's train/eval flag)."""
import math
import re

import pytest
import torch

import netshrink
from netshrink.store.fuzz import fingerprint
from netshrink.compress.methods.base import baked_state_dict

nan, inf = math.nan, math.inf


def state(model):
    return (fingerprint(baked_state_dict(model)), repr(model),
            [(name, m.training, len(m._forward_pre_hooks)) for name, m in model.named_modules()])


@pytest.fixture
def setup(trained, digits):
    netshrink.prune(trained, keep=0.5, targets=["fc2"])
    trained.fc1.train()  # a mixed train/eval state that must survive every failed call
    train, test = digits
    bad_x = train.tensors[0][:64].clone()
    bad_x[3, 0, 0, 0] = nan
    return trained, train, test, (bad_x, train.tensors[1][:64])


P, Q, C, S = netshrink.prune, netshrink.quantize, netshrink.clip, netshrink.share

CASES = {
    # prune
    "keep > 1": lambda m, d: P(m, keep=1.5),
    "keep 0": lambda m, d: P(m, keep=0),
    "keep nan": lambda m, d: P(m, keep=nan),
    "keep inf": lambda m, d: P(m, keep=inf),
    "keep string": lambda m, d: P(m, keep="0.5"),
    "keep bool": lambda m, d: P(m, keep=True),
    "keep None": lambda m, d: P(m, keep=None),
    "keep empty map": lambda m, d: P(m, keep={}),
    "keep map key matches nothing": lambda m, d: P(m, keep={"fc9": 0.5, "*": 0.1}),
    "keep map misses a layer": lambda m, d: P(m, keep={"fc1": 0.5}),
    "keep map bad regex": lambda m, d: P(m, keep={"re:(": 0.5, "*": 0.1}),
    "scope unknown": lambda m, d: P(m, keep=0.5, scope="globall"),
    "global with map": lambda m, d: P(m, keep={"*": 0.5}, scope="global"),
    "targets string": lambda m, d: P(m, keep=0.5, targets="fc1"),
    "ignore string": lambda m, d: P(m, keep=0.5, ignore="fc1"),
    "targets match nothing": lambda m, d: P(m, keep=0.5, targets=["fc9"]),
    "ignore matches nothing": lambda m, d: P(m, keep=0.5, ignore=["fc9"]),
    "targets bad regex": lambda m, d: P(m, keep=0.5, targets=["re:("]),
    "targets not strings": lambda m, d: P(m, keep=0.5, targets=[1]),
    "everything ignored": lambda m, d: P(m, keep=0.5, ignore=["re:.*"]),
    "not a model": lambda m, d: P("model", keep=0.5),
    # quantize
    "bits 0": lambda m, d: Q(m, weight_bits=0),
    "bits 9": lambda m, d: Q(m, weight_bits=9),
    "bits fractional": lambda m, d: Q(m, weight_bits=4.5),
    "bits nan": lambda m, d: Q(m, weight_bits=nan),
    "bits string": lambda m, d: Q(m, weight_bits="4"),
    "bits bool": lambda m, d: Q(m, weight_bits=True),
    "activation bits 1": lambda m, d: Q(m, weight_bits=4, activation_bits=1, calibration=d[0]),
    "activation bits 9": lambda m, d: Q(m, weight_bits=4, activation_bits=9, calibration=d[0]),
    "activations without calibration": lambda m, d: Q(m, weight_bits=4, activation_bits=8),
    "calibration with NaN": lambda m, d: Q(m, weight_bits=4, activation_bits=8, calibration=d[2]),
    "calibration a string": lambda m, d: Q(m, weight_bits=4, activation_bits=8, calibration="data"),
    "calibration lengths differ": lambda m, d: Q(m, weight_bits=4, activation_bits=8,
                                                 calibration=(d[0].tensors[0][:10], d[0].tensors[1][:5])),
    "calibration wrong shape": lambda m, d: Q(m, weight_bits=4, activation_bits=8,
                                              calibration=(torch.rand(8, 1, 5, 5), torch.zeros(8, dtype=torch.long))),
    "calibration empty": lambda m, d: Q(m, weight_bits=4, activation_bits=8,
                                        calibration=(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))),
    "calibration without activations": lambda m, d: Q(m, weight_bits=4, calibration=d[0]),
    "nothing to quantize": lambda m, d: Q(m, weight_bits=None),
    "scheme unknown": lambda m, d: Q(m, weight_bits=4, scheme="log"),
    "granularity unknown": lambda m, d: Q(m, weight_bits=4, granularity="row"),
    "ternary at 4 bits": lambda m, d: Q(m, weight_bits=4, scheme="ternary"),
    "learned_step not bool": lambda m, d: Q(m, weight_bits=4, learned_step="yes"),
    "learned_step affine": lambda m, d: Q(m, weight_bits=4, scheme="affine", learned_step=True),
    "observer unknown": lambda m, d: Q(m, weight_bits=4, activation_bits=8, calibration=d[0], observer="mean"),
    "quantize targets string": lambda m, d: Q(m, weight_bits=4, targets="fc1"),
    # clip
    "clip nothing": lambda m, d: C(m),
    "clip both": lambda m, d: C(m, threshold=0.1, percentile=99),
    "clip negative": lambda m, d: C(m, threshold=-1),
    "clip threshold inf": lambda m, d: C(m, threshold=inf),
    "clip threshold nan": lambda m, d: C(m, threshold=nan),
    "clip value inf": lambda m, d: C(m, threshold=0.1, value=inf),
    "clip value negative": lambda m, d: C(m, threshold=0.1, value=-1),
    "clip percentile 0": lambda m, d: C(m, percentile=0),
    "clip percentile 101": lambda m, d: C(m, percentile=101),
    # share
    "share bits 0": lambda m, d: S(m, bits=0),
    "share bits 9": lambda m, d: S(m, bits=9),
    "share bits fractional": lambda m, d: S(m, bits=2.5),
    "share init unknown": lambda m, d: S(m, bits=4, init="kmeans++"),
    # apply, N:M
    "nm n > m": lambda m, d: netshrink.apply(m, netshrink.NMSparsity(n=3, m=2)),
    "nm n 0": lambda m, d: netshrink.apply(m, netshrink.NMSparsity(n=0, m=4)),
    "apply a string": lambda m, d: netshrink.apply(m, "prune"),
    "apply to a string": lambda m, d: netshrink.apply("model", netshrink.Prune(keep=0.5)),
    # structured
    "remove_units keep 0": lambda m, d: netshrink.remove_units(m, keep=0),
    "remove_units keep 2": lambda m, d: netshrink.remove_units(m, keep=2),
    "remove_units criterion": lambda m, d: netshrink.remove_units(m, keep=0.5, criterion="l3"),
    "remove_units example not a tensor": lambda m, d: netshrink.remove_units(m, keep=0.5, example_input="x"),
    # fit
    "epochs 0": lambda m, d: netshrink.fit(m, d[0], epochs=0, progress=False),
    "epochs nan": lambda m, d: netshrink.fit(m, d[0], epochs=nan, progress=False),
    "epochs inf": lambda m, d: netshrink.fit(m, d[0], epochs=inf, progress=False),
    "epochs below one step": lambda m, d: netshrink.fit(m, d[0], epochs=0.001, progress=False),
    "epochs string": lambda m, d: netshrink.fit(m, d[0], epochs="1", progress=False),
    "lr 0": lambda m, d: netshrink.fit(m, d[0], lr=0, progress=False),
    "lr inf": lambda m, d: netshrink.fit(m, d[0], lr=inf, progress=False),
    "lr nan": lambda m, d: netshrink.fit(m, d[0], lr=nan, progress=False),
    "lr that diverges": lambda m, d: netshrink.fit(m, d[0], lr=1e30, epochs=0.2, progress=False),
    "batch_size 0": lambda m, d: netshrink.fit(m, d[0], batch_size=0, progress=False),
    "batch_size fractional": lambda m, d: netshrink.fit(m, d[0], batch_size=1.5, progress=False),
    "fit data a string": lambda m, d: netshrink.fit(m, "mnist", progress=False),
    "fit data empty": lambda m, d: netshrink.fit(m, (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)),
                                                 progress=False),
    "fit data NaN": lambda m, d: netshrink.fit(m, d[2], progress=False),
    "fit data wrong shape": lambda m, d: netshrink.fit(m, (torch.rand(8, 1, 5, 5), torch.zeros(8, dtype=torch.long)),
                                                       progress=False),
    "teacher a string": lambda m, d: netshrink.fit(m, d[0], teacher="teacher", progress=False),
    "distill without teacher": lambda m, d: netshrink.fit(m, d[0], distill=netshrink.Distill(), progress=False),
    "augment negative": lambda m, d: netshrink.fit(m, d[0], augment=-1, progress=False),
    "seed fractional": lambda m, d: netshrink.fit(m, d[0], seed=1.5, progress=False),
    # evaluate, save, load, export
    "evaluate a string": lambda m, d: netshrink.evaluate(m, "test"),
    "evaluate batch_size 0": lambda m, d: netshrink.evaluate(m, d[1], batch_size=0),
    "evaluate wrong shape": lambda m, d: netshrink.evaluate(m, (torch.rand(8, 1, 5, 5), torch.zeros(8, dtype=torch.long))),
    "save to a folder": lambda m, d: netshrink.save(m, d[3]),
    "load a folder": lambda m, d: netshrink.load(d[3], model=m),
    "load into a string": lambda m, d: netshrink.load(d[3] / "x.nsk", model="m"),
    "export to a folder": lambda m, d: netshrink.export(m, d[3]),
    "export int8 not bool": lambda m, d: netshrink.export(m, d[3] / "m.onnx", int8="yes"),
    "export opset 5": lambda m, d: netshrink.export(m, d[3] / "m.onnx", opset=5),
    "export input_shape string": lambda m, d: netshrink.export(m, d[3] / "m.onnx", input_shape="1x8x8"),
    "export logits without int8": lambda m, d: netshrink.export(m, d[3] / "m.onnx", int8_logits=True),
    # recipes: checked whole before the first step runs
    "recipe empty": lambda m, d: netshrink.Recipe.from_steps([]),
    "recipe bad keep": lambda m, d: netshrink.Recipe.from_steps([{"prune": {"keep": 2}}]),
    "recipe python step bad": lambda m, d: netshrink.Recipe.from_steps([netshrink.Prune(keep=2)]),
    "recipe finetune lr inf": lambda m, d: netshrink.Recipe.from_steps([{"finetune": {"lr": inf}}]),
    "recipe finetune epochs 0": lambda m, d: netshrink.Recipe.from_steps([{"finetune": {"epochs": 0}}]),
    "recipe unknown step": lambda m, d: netshrink.Recipe.from_steps([{"prun": {"keep": 0.5}}]),
    "recipe unknown setting": lambda m, d: netshrink.Recipe.from_steps([{"prune": {"kep": 0.5}}]),
    "recipe second step matches nothing": lambda m, d: netshrink.Recipe.from_steps(
        [{"prune": {"keep": 0.1}}, {"quantize": {"bits": 4, "targets": ["fc9"]}}]).run(m, d[0], progress=False),
    "recipe data NaN": lambda m, d: netshrink.Recipe.from_steps([{"prune": {"keep": 0.1}}]).run(m, d[2], progress=False),
    "recipe fails in a later fine-tune": lambda m, d: netshrink.Recipe.from_steps(
        [{"prune": {"keep": 0.1}}, {"finetune": {"epochs": 0.2, "lr": 1e30}}]).run(m, d[0], progress=False),
    # constructors
    "distill temperature 0": lambda m, d: netshrink.Distill(temperature=0),
    "distill temperature inf": lambda m, d: netshrink.Distill(temperature=inf),
    "distill alpha 2": lambda m, d: netshrink.Distill(alpha=2),
    "build_model unknown": lambda m, d: netshrink.build_model("resnet"),
    "build_model in_shape 0": lambda m, d: netshrink.build_model("mlp", in_shape=(0,)),
    "build_model in_shape string": lambda m, d: netshrink.build_model("mlp", in_shape="1x28x28"),
    "build_model classes 0": lambda m, d: netshrink.build_model("mlp", classes=0),
    "load_dataset unknown": lambda m, d: netshrink.load_dataset("cifar"),
    "load_dataset split": lambda m, d: netshrink.load_dataset("digits", "val"),
}
# Settings whose error must name them (label: the name the one line carries).
NAMED = {
    "clip value beyond float32": ("value=1e+39", lambda m, d: C(m, threshold=0.1, value=1e39)),
    "clip threshold beyond float32": ("threshold=1e+39", lambda m, d: C(m, threshold=1e39)),
    "fit progress string": ("progress=", lambda m, d: netshrink.fit(m, d[0], progress="no")),
    "save path int": ("path=123", lambda m, d: netshrink.save(m, 123)),
    "save info not JSON": ("info=", lambda m, d: netshrink.save(m, d[3] / "m.nsk", info={"when": object()})),
    "save info NaN": ("info=", lambda m, d: netshrink.save(m, d[3] / "m.nsk", info={"loss": nan})),
    "save recipe not a list": ("recipe=", lambda m, d: netshrink.save(m, d[3] / "m.nsk", recipe="prune")),
    "load restore string": ("restore=", lambda m, d: netshrink.load(d[3] / "m.nsk", restore="no")),
    "load allow_unchecked string": ("allow_unchecked=", lambda m, d: netshrink.load(d[3] / "m.nsk", allow_unchecked=1)),
    "export path int": ("path=123", lambda m, d: netshrink.export(m, 123)),
    "summary not a model": ("model must be", lambda m, d: netshrink.summary("model")),
    "summary file_bytes": ("file_bytes=", lambda m, d: netshrink.summary(m, file_bytes=-5)),
    "bake not a model": ("model must be", lambda m, d: netshrink.bake("model")),
    "build_model seed string": ("seed=", lambda m, d: netshrink.build_model("mlp", seed="0")),
}
CASES.update({label: call for label, (_, call) in NAMED.items()})


@pytest.mark.parametrize("label", list(CASES))
def test_invalid_setting_is_one_line_and_changes_nothing(label, setup, tmp_path):
    model, train, test, nan_data = setup
    before = state(model)
    with pytest.raises(netshrink.NetshrinkError) as info:
        CASES[label](model, (train, test, nan_data, tmp_path))
    assert "\n" not in str(info.value) and str(info.value)
    assert state(model) == before, label
    assert list(tmp_path.iterdir()) == []  # nothing written either


@pytest.mark.parametrize("label", list(NAMED))
def test_the_error_names_the_setting(label, setup, tmp_path):
    model, train, test, nan_data = setup
    with pytest.raises(netshrink.NetshrinkError, match=re.escape(NAMED[label][0])):
        NAMED[label][1](model, (train, test, nan_data, tmp_path))


def test_a_generic_pattern_beside_a_default_may_match_nothing_and_is_reported(trained):
    report = netshrink.prune(trained, keep={"re:conv.*": 0.5, "*": 0.2})
    assert ("keep['re:conv.*']", "pattern matched no layer; the '*' default applied") in report.skipped
    assert all("20.0%" in detail for _, detail in report.changed)
