"""auto(coding="rate"): rate-aware training with its one trade-off searched for the budget."""
import subprocess
import sys

import pytest
import torch

import netshrink
from netshrink.search.tradeoff import FACTOR, START
from netshrink.training.batches import hold_out

# digits trains in few steps: a faster rate than auto's default so that trade-offs move the file
FAST = dict(epochs=4, lr=5e-3, progress=False, coding="rate")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_error_rate_budget_gets_the_smallest_file_within_it(trained, digits, tmp_path):
    before = _state(trained)
    validation = hold_out(digits[0], 0.1, 0)[1]  # what auto scores on (validation_share 0.1, seed 0)
    rate = 100 * (1 - netshrink.evaluate(trained, validation)) + 3.0
    found = netshrink.auto(trained, digits[0], max_error_rate=rate, trials=3, **FAST)
    tradeoffs = [t["tradeoff"] for t in found.trials]
    # the search moves by FACTOR toward the side it has not seen, then bisects the bracket
    assert tradeoffs[0] == START
    assert tradeoffs[1] == pytest.approx(START * FACTOR if found.trials[0]["passed"] else START / FACTOR)
    if found.trials[0]["passed"] != found.trials[1]["passed"]:
        assert tradeoffs[2] == pytest.approx((tradeoffs[0] * tradeoffs[1]) ** 0.5)
    for t in found.trials:
        assert t["passed"] == (100 * (1 - t["accuracy"]) <= rate + 1e-9)
    assert found.met and 100 * (1 - found.accuracy) <= rate + 1e-9
    assert found.file_bytes == min(t["file_bytes"] for t in found.trials if t["passed"])
    assert found.ratio > 5
    by_tradeoff = sorted(found.trials, key=lambda t: t["tradeoff"])
    assert [t["file_bytes"] for t in by_tradeoff] == sorted((t["file_bytes"] for t in by_tradeoff), reverse=True)
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # the input is left as it was
    # the result is what its file holds, and its recipe reruns as a plain recipe
    path = tmp_path / "rate.nsk"
    assert found.save(path) == found.file_bytes
    x = digits[1].tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(netshrink.load(path)(x), found.model.eval()(x))
    assert found.steps[0]["rate"]["tradeoff"] in [float(f"{t:.4g}") for t in tradeoffs]
    assert "rate:" in found.yaml()


def test_a_byte_budget_gets_the_most_accurate_file_that_fits(trained, digits):
    """A budget just under the first trial's file: that trial fails, the next (a larger
    trade-off) fits, and the most accurate fitting trial is returned."""
    first = netshrink.auto(trained, digits[0], max_bytes=10**9, trials=1, **FAST).file_bytes
    found = netshrink.auto(trained, digits[0], max_bytes=first - 1, trials=3, **FAST)
    assert found.trials[0]["file_bytes"] == first and not found.trials[0]["passed"]
    assert found.trials[1]["tradeoff"] == pytest.approx(START * FACTOR)
    fitting = [t for t in found.trials if t["file_bytes"] < first]
    assert found.met and fitting and found.file_bytes < first
    assert found.file_bytes == min(fitting, key=lambda t: t["loss"])["file_bytes"]


@pytest.mark.parametrize("settings, message", [
    ({"max_drop": 1.0, "keeps": (0.5,)}, "keeps belong"),
    ({"max_drop": 1.0, "ranking": "variational"}, "ranking"),
    ({"max_drop": 1.0, "parallel": 2}, "parallel"),
    ({"max_latency": 0.01}, "max_latency"),
    ({"max_drop": 1.0, "coding": "entropy"}, "coding"),
])
def test_settings_of_the_per_layer_search_are_refused(trained, digits, settings, message):
    before = _state(trained)
    with pytest.raises(netshrink.NetshrinkError, match=message):
        netshrink.auto(trained, digits[0], **{**FAST, **settings})
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())


def test_cli_auto_coding_rate(tmp_path):
    run = [sys.executable, "-m", "netshrink.cli"]
    trained = subprocess.run([*run, "train", "--data", "digits", "--epochs", "3", "-o", "dense.nsk"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    done = subprocess.run([*run, "auto", "dense.nsk", "--data", "digits", "--coding", "rate", "--max-error-rate", "40",
                           "--epochs", "1", "--trials", "1", "-o", "rate.nsk"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "trials (rate-aware training)" in done.stdout and "--max-error-rate 40%: met" in done.stdout
    rerun = netshrink.Recipe.load(str(tmp_path / "rate.yaml"))
    assert rerun.raw[0]["rate"]["tradeoff"] == START
