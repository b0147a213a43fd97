"""netshrink.auto under a latency budget: the groups of units it can remove, the search with a
stand-in timer (deterministic: latency proportional to parameters) checked against the policy it
predicts, a real ONNX Runtime run whose budget cannot fail on timing noise, bad input, and the
CLI as a subprocess. No test asserts a measured time against a threshold."""
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import netshrink
from netshrink.deploy.bench import Timing
from netshrink.search.latency import UnitChoice
from netshrink.compress.methods.structured import unit_groups

FAST = dict(epochs=1, progress=False)


def _parameters(model):
    return sum(p.numel() for p in model.parameters())


def _stand_in_timer(models, example, threads, **_):
    """Latency proportional to a model's parameters: deterministic, and additive over groups."""
    return [Timing(1e-8 * _parameters(m), 1e-8 * _parameters(m), 0.0) for m in models]


@pytest.fixture(scope="module")
def resmobile(digits):
    torch.manual_seed(0)
    model = netshrink.build_model("resmobile", (1, 8, 8))
    netshrink.fit(model, digits[0], epochs=3, progress=False)
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_unit_groups_follow_residual_adds_and_leave_out_the_output(resmobile, digits):
    x = digits[0].tensors[0][:2]
    groups = unit_groups(resmobile, x)
    assert groups and all(info["layers"][0] == first for first, info in groups.items())
    assert "head" not in {layer for info in groups.values() for layer in info["layers"]}  # the output stays
    coupled = [info["layers"] for info in groups.values() if len(info["layers"]) > 1]
    assert coupled, "a residual add couples the layers that feed it into one group"
    # Shrinking one group changes its layers (and what consumes them) and nothing else's outputs.
    first = next(iter(groups))
    small, _ = netshrink.remove_units(resmobile, keep={first: 0.5, "*": 1.0}, example_input=x)
    for name, module in small.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            shrunk = name in groups[first]["layers"]
            assert (module.weight.shape[0] < resmobile.get_submodule(name).weight.shape[0]) == shrunk, name


def test_auto_max_latency_search_with_a_stand_in_timer(resmobile, digits, tmp_path):
    train, test = digits
    before = _state(resmobile)
    dense = 1e-8 * _parameters(resmobile)
    with mock.patch("netshrink.search.latency.ort_latencies", side_effect=_stand_in_timer):
        found = netshrink.auto(resmobile, train, max_latency=0.6 * dense, latency_batch=4, trials=2, **FAST)
        again = netshrink.auto(resmobile, train, max_latency=0.6 * dense, latency_batch=4, trials=2, **FAST)
    assert all(torch.equal(before[k], v) for k, v in resmobile.state_dict().items())  # the caller's model is kept
    assert found.met and found.latency <= 0.6 * dense
    assert found.dense_latency == pytest.approx(dense) and found.latency == pytest.approx(1e-8 * _parameters(found.model))
    assert any(c.keep < 1 for c in found.policy.values())
    assert again.policy == found.policy and again.latency == found.latency  # no state kept between calls
    # The prediction is the dense latency plus each chosen group's change, each measured alone.
    first = found.trials[0]
    predicted = dense + sum(c.latency - dense for c in found.policy.values())
    assert first["predicted_latency"] == pytest.approx(predicted)
    # The chosen units are really gone, and the model still classifies after one epoch.
    for group, choice in found.policy.items():
        assert found.model.get_submodule(group).weight.shape[0] == choice.units
    assert netshrink.evaluate(found.model, test) > 0.5  # dense ~0.9, a 1-epoch fine-tune
    # Exported to ONNX, it computes what the PyTorch model computes.
    ort = pytest.importorskip("onnxruntime")
    x = test.tensors[0][:16]
    netshrink.export(found.model, tmp_path / "fast.onnx", example_inputs=x)
    session = ort.InferenceSession(str(tmp_path / "fast.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = found.model.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected, atol=1e-4)
    # Saved with its recipe and loaded back: the same smaller model.
    found.save(tmp_path / "fast.nsk")
    loaded = netshrink.load(tmp_path / "fast.nsk")
    with torch.no_grad():
        np.testing.assert_allclose(loaded.eval()(x).numpy(), expected, atol=1e-6)
    # Another budget with the measured table: not measured again.
    with mock.patch("netshrink.search.latency.ort_latencies", side_effect=_stand_in_timer), \
            mock.patch("netshrink.search.latency.measure", side_effect=AssertionError("measured again")):
        faster = netshrink.auto(resmobile, train, max_latency=0.4 * dense, latency_batch=4, trials=2,
                                sensitivity=found.sensitivity, **FAST)
    assert faster.sensitivity == found.sensitivity and faster.latency < found.latency


def test_the_solver_meets_a_latency_budget_against_brute_force():
    """Latency choices through the same knapsack, checked against every combination."""
    import itertools

    from netshrink.compress.knapsack import solve

    rng = np.random.default_rng(0)
    table = {f"g{i}": [UnitChoice(k, int(64 * k), float(rng.uniform(1, 2) * k), float(rng.uniform(0, 1) * (1 - k)))
                       for k in (1.0, 0.75, 0.5, 0.25)] for i in range(4)}
    cost = lambda c: round(1000 * c.latency)  # noqa: E731
    for budget in (3000, 4000, 5000, 6000):
        policy = solve(table, budget, cost_of=cost)
        fits = [p for p in itertools.product(*table.values()) if sum(map(cost, p)) <= budget]
        assert sum(map(cost, policy.values())) <= budget
        assert sum(c.damage for c in policy.values()) == pytest.approx(min(sum(c.damage for c in p) for p in fits))


def test_a_budget_below_the_smallest_model_is_refused_when_savings_overlap(resmobile, digits):
    """Savings measured one group at a time can add up to more than the dense time (here the timer is
    convex in the parameters, so cuts overlap); the smallest model is then timed, not predicted."""
    from netshrink.search.latency import shrunk

    dense_parameters = _parameters(resmobile)
    timer = lambda models, example, threads, **_: [  # noqa: E731
        Timing(1e-3 * (_parameters(m) / dense_parameters) ** 4, 0.0, 0.0) for m in models]
    x = digits[0].tensors[0][:2]
    smallest = shrunk(resmobile, {group: 0.5 for group in unit_groups(resmobile, x)}, x)
    floor = 1e-3 * (_parameters(smallest) / dense_parameters) ** 4
    with mock.patch("netshrink.search.latency.ort_latencies", side_effect=timer):
        table = netshrink.auto(resmobile, digits[0], max_latency=1.0, latency_batch=4, trials=1, keeps=(1.0, 0.5),
                               **FAST).sensitivity
        predicted = 1e-3 + sum(min(c.latency for c in choices) - 1e-3 for choices in table.values())
        assert predicted < 0.5 * floor  # the additive prediction alone would call half the floor reachable
        with pytest.raises(netshrink.NetshrinkError, match="cannot be met") as refused:
            netshrink.auto(resmobile, digits[0], max_latency=0.5 * floor, latency_batch=4, trials=1,
                           keeps=(1.0, 0.5), sensitivity=table, **FAST)
    assert f"about {1e3 * floor:.3f} ms" in str(refused.value)


@pytest.mark.slow
def test_auto_max_latency_on_onnx_runtime(resmobile, digits):
    """Real timings; a budget so generous that noise cannot break it: the dense model is kept."""
    found = netshrink.auto(resmobile, digits[0], max_latency=10.0, latency_batch=8, trials=1, keeps=(1.0, 0.5), **FAST)
    assert found.met and 0 < found.latency < 10.0 and found.dense_latency > 0, found.trials
    # Every policy fits, so the least damage is chosen: none (the dense model, or a shrunk group whose
    # measured damage is 0 as well).
    assert sum(c.damage for c in found.policy.values()) == 0, found.policy
    if found.steps == []:
        assert all(torch.equal(a, b) for a, b in zip(found.model.state_dict().values(), resmobile.state_dict().values()))
    assert all(len(choices) == 2 and all(c.latency > 0 for c in choices) for choices in found.sensitivity.values())
    with pytest.raises(netshrink.NetshrinkError, match="cannot be met"):
        netshrink.auto(resmobile, digits[0], max_latency=1e-9, trials=1, keeps=(1.0, 0.5), **FAST)


@pytest.mark.parametrize("settings, message", [
    ({"max_latency": 0}, "max_latency"),
    ({"max_latency": -1.0}, "max_latency"),
    ({"max_latency": 1.0, "max_bytes": 5000}, "exactly one budget"),
    ({"max_latency": 1.0, "latency_batch": 0}, "latency_batch"),
    ({"max_latency": 1.0, "threads": 0}, "threads"),
    ({"max_latency": 1.0, "address": "local"}, "this machine"),
    ({"max_latency": 1.0, "runtime": "int4"}, "runtime"),
    ({"max_latency": 1.0, "bits": (None, 4)}, "bits"),
    ({"max_latency": 1.0, "ranking": "variational"}, "ranking"),
    ({"max_latency": 1.0, "sensitivity": {"fc1": []}}, "not a latency table"),
])
def test_auto_max_latency_bad_settings_are_one_error_and_change_nothing(trained, digits, settings, message):
    before = _state(trained)
    with pytest.raises(netshrink.NetshrinkError, match=message):
        netshrink.auto(trained, digits[0], **{**FAST, **settings})
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_auto_max_latency_refuses_models_it_cannot_shrink(digits, make_tiny_bert):
    with pytest.raises(netshrink.NetshrinkError, match="no group of units"):
        netshrink.auto(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), digits[0], max_latency=1.0, **FAST)
    bert = make_tiny_bert()
    batches = [{"input_ids": torch.randint(0, 120, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for _ in range(10)]
    with pytest.raises(netshrink.NetshrinkError, match="not a tensor"):
        netshrink.auto(bert, batches, validation=batches[:3], max_latency=1.0, **FAST)


@pytest.mark.slow
def test_cli_auto_max_latency(tmp_path, resmobile):
    netshrink.save(resmobile, tmp_path / "dense.nsk")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "netshrink.cli", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    done = cli("auto", "dense.nsk", "--data", "digits", "--max-latency", "10000", "--latency-batch", "4", "--epochs", "1",
               "--trials", "1", "--keeps", "1", "0.5", "--runtime", "int8", "-o", "fast.nsk")
    assert done.returncode == 0, done.stderr
    assert "ONNX Runtime ms" in done.stdout and "met" in done.stdout and "group" in done.stdout and "int8" in done.stdout
    assert netshrink.load(tmp_path / "fast.nsk") is not None
    report = cli("report", "fast.nsk", "-o", "report.html")
    assert report.returncode == 0, report.stderr
    assert "ONNX Runtime ms" in (tmp_path / "report.html").read_text() or "Sensitivity" in (tmp_path / "report.html").read_text()
    for bad in (["--max-latency", "0"], ["--max-latency", "1", "--max-bytes", "100"], ["--max-latency", "1", "--threads", "0"]):
        failed = cli("auto", "dense.nsk", "--data", "digits", *bad, "-o", "x.nsk")
        assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, (bad, failed.stderr)
    assert not (tmp_path / "x.nsk").exists()
