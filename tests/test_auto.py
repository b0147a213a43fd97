"""netshrink.auto and the HTML report: the solver against brute force, budgets verified on real
files, the policy rerunnable as a recipe, held-out models (a BatchNorm/residual/depthwise CNN, a
tiny BERT), bad input, and the CLI as a subprocess."""
import copy
import itertools
import os
import json
import shutil
import socket
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

import netshrink
from netshrink.store.artifact import to_bytes
from netshrink.search.auto import Choice
from netshrink.compress.knapsack import solve
from netshrink.reporting.page import tensor_bytes
from netshrink.training.batches import hold_out

FAST = dict(epochs=1, progress=False, keeps=(1.0, 0.3, 0.1, 0.03), bits=(None, 6, 4, 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", range(6))
def test_solver_meets_a_byte_budget_exactly_and_optimally_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = {f"layer{i}": [Choice(1.0, None, int(b), float(d)) for b, d in
                             zip(rng.integers(1, 400, 5), rng.random(5))] for i in range(4)}
    combos = list(itertools.product(*options.values()))
    for budget in [min(sum(c.bytes for c in combo) for combo in combos) - 1,
                   *[sum(c.bytes for c in combo) for combo in combos[:: 37]], 2000]:
        fitting = [combo for combo in combos if sum(c.bytes for c in combo) <= budget]
        policy = solve(options, budget)
        if not fitting:
            assert policy is None
            continue
        best = min(sum(c.damage for c in combo) for combo in fitting)
        assert sum(c.bytes for c in policy.values()) <= budget
        assert sum(c.damage for c in policy.values()) == pytest.approx(best)
        assert list(policy) == list(options)


def test_solver_in_buckets_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    options = {f"l{i}": [Choice(1.0, None, int(b), float(d)) for b, d in zip(rng.integers(1000, 90_000, 8), rng.random(8))]
               for i in range(12)}
    for budget in (150_000, 400_000, 777_777):
        policy = solve(options, budget, units=512)  # buckets of hundreds of bytes
        assert policy is not None and sum(c.bytes for c in policy.values()) <= budget


@pytest.fixture(scope="module")
def found_digits(trained_state, digits):
    """(dense model, auto's result under 9,000 bytes, the dense state before the call)."""
    model = netshrink.build_model("lenet-300-100", (1, 8, 8))
    model.load_state_dict(trained_state)
    before = _state(model)
    return model, netshrink.auto(model, digits[0], max_bytes=9000, **FAST), before


def test_auto_max_bytes_on_digits_end_to_end(found_digits, digits, tmp_path):
    train, test = digits
    trained, found, before = found_digits
    assert _same(before, _state(trained))  # the caller's model is not changed
    assert found.met and found.file_bytes <= 9000
    assert found.save(tmp_path / "auto.nsk") == found.file_bytes == (tmp_path / "auto.nsk").stat().st_size
    dense_accuracy = netshrink.evaluate(trained, test)
    assert netshrink.evaluate(found.model, test) > dense_accuracy - 0.15  # 20x smaller, 1 epoch of fine-tuning
    assert found.ratio > 15
    # Each layer's bias ends on the grid the policy chose for it (measured like the weights' settings).
    from netshrink.search.auto import BIAS_BITS
    from netshrink.compress.methods.bias import grid_bias

    for name, choice in found.policy.items():
        bias = found.model.get_submodule(name).bias.detach()
        assert choice.bias_bits in BIAS_BITS and f"{choice.bias_bits}-bit bias" in choice.describe()
        assert torch.equal(grid_bias(bias, choice.bias_bits), bias)
    # The policy is a recipe anyone can rerun: the same seed gives the same weights.
    rerun = copy.deepcopy(trained)
    netshrink.Recipe.from_yaml(found.yaml()).run(rerun, found_split(train), progress=False)
    assert _same(netshrink.bake(copy.deepcopy(rerun)).state_dict(), netshrink.bake(copy.deepcopy(found.model)).state_dict())
    # Called again: the same answer (no state kept between calls).
    again = netshrink.auto(trained, train, max_bytes=9000, **FAST)
    assert again.file_bytes == found.file_bytes and again.policy == found.policy
    # Another budget, reusing the measured sensitivity: not measured again, the same table.
    with mock.patch("netshrink.search.auto.measure_sensitivity", side_effect=AssertionError("measured again")):
        smaller = netshrink.auto(trained, train, max_bytes=7000, sensitivity=found.sensitivity, **FAST)
    assert smaller.sensitivity == found.sensitivity and smaller.file_bytes <= 7000


def found_split(train):
    """The training part auto used: the same seeded split (validation_share 0.1, seed 0)."""
    return hold_out(train, 0.1, 0)[0]


def test_auto_max_drop_keeps_validation_accuracy_within_the_drop(trained, digits):
    found = netshrink.auto(trained, digits[0], max_drop=2.0, trials=3, **FAST)
    assert found.met
    assert 100 * (found.dense_accuracy - found.accuracy) <= 2.0
    assert found.ratio > 5  # smaller than dense, not just a copy
    assert [t["trial"] for t in found.trials] == [1, 2, 3]
    passing = [t for t in found.trials if t["drop"] <= 2.0]
    assert found.file_bytes == min(t["file_bytes"] for t in passing)  # the smallest passing trial
    policies = [tuple(t["policy"].items()) for t in found.trials]
    assert len(set(policies)) == len(policies)  # a policy is never run twice


def test_auto_max_error_rate_finds_the_smallest_file_within_the_error_rate(trained, digits):
    """An error rate is a drop from the dense model's validation accuracy: the same search, judged
    on the trials' own error rates; a rate the dense model already misses is refused up front."""
    validation = hold_out(digits[0], 0.1, 0)[1]  # what auto scores on (validation_share 0.1, seed 0)
    rate = 100 * (1 - netshrink.evaluate(trained, validation)) + 2.0
    found = netshrink.auto(trained, digits[0], max_error_rate=rate, trials=3, **FAST)
    assert found.met and found.budget == {"max_error_rate": rate}
    assert 100 * (1 - found.accuracy) <= rate + 1e-9
    passing = [t for t in found.trials if 100 * (1 - t["accuracy"]) <= rate + 1e-9]
    assert found.file_bytes == min(t["file_bytes"] for t in passing)
    assert found.ratio > 5
    untrained = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
    with pytest.raises(netshrink.NetshrinkError, match="cannot be met: the dense model itself errs"):
        netshrink.auto(untrained, digits[0], max_error_rate=5.0, trials=1, **FAST)


def test_a_search_with_nothing_between_its_smallest_and_its_safe_policy_still_runs_it(trained, digits):
    """Offered only dense layers, the smallest policy is also the one predicted safe: with nothing
    to search between them, that policy is run and judged (it used to end with "auto found no
    policy to run")."""
    found = netshrink.auto(trained, digits[0], max_drop=1.0, trials=3,
                           bias_bits=None, **{**FAST, "keeps": (1.0,), "bits": (None,)})
    assert found.met and len(found.trials) == 1 and found.trials[0]["drop"] <= 1.0
    assert found.file_bytes == found.trials[0]["file_bytes"]


@pytest.mark.slow
def test_rounds_of_trials_on_ray_find_what_they_find_in_this_process(trained, digits):
    """A local Ray cluster runs each round's two trials as tasks: every trial, and the model found,
    are the same as in this process."""
    pytest.importorskip("ray")
    settings = dict(max_drop=2.0, trials=4, parallel=2, **FAST)
    here = netshrink.auto(trained, digits[0], **settings)
    first_round = [t["target_bytes"] for t in here.trials[:2]]
    assert len(here.trials) == 4 and first_round[0] < first_round[1]  # two budgets at once
    there = netshrink.auto(trained, digits[0], address="local", sensitivity=here.sensitivity, **settings)
    assert there.trials == here.trials
    assert to_bytes(there.model, recipe=there.steps) == to_bytes(here.model, recipe=here.steps)  # the same file
    with torch.no_grad():
        x = digits[1].tensors[0][:64]
        assert torch.equal(there.model.eval()(x), here.model.eval()(x))
    assert there.file_bytes == here.file_bytes and there.met == here.met


def test_auto_on_a_batchnorm_residual_depthwise_cnn(digits):
    torch.manual_seed(0)
    model = netshrink.build_model("resmobile", (1, 8, 8))
    netshrink.fit(model, digits[0], epochs=3, progress=False)
    dense = len(to_bytes(model))
    found = netshrink.auto(model, digits[0], max_bytes=dense // 6, trials=2, **FAST)
    assert found.met and found.file_bytes <= dense // 6
    assert netshrink.evaluate(found.model, digits[1]) > 0.5  # it still classifies (dense: ~0.9)
    assert any(c.keep < 1 or c.bits is not None for c in found.policy.values())


def test_auto_on_a_tiny_bert_with_unlabeled_batches(make_tiny_bert):
    model = make_tiny_bert()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 120, (16, 12), generator=g),
             "attention_mask": torch.ones(16, 12, dtype=torch.long)} for _ in range(4)]
    dense = len(to_bytes(model))
    with pytest.raises(netshrink.NetshrinkError, match="in-memory data only"):
        netshrink.auto(model, data, max_bytes=dense // 3, **FAST)
    with pytest.raises(netshrink.NetshrinkError, match="labeled"):
        netshrink.auto(model, data[:3], validation=data[3:], max_drop=1.0, **FAST)
    found = netshrink.auto(model, data[:3], validation=data[3:], max_bytes=dense // 3, trials=2, **FAST)
    assert found.met and found.file_bytes <= dense // 3
    assert found.steps[1]["finetune"]["distill"] == {"objective": "mse"}  # hidden states: no class scores
    with torch.no_grad():
        ours, reference = found.model(**data[3]).last_hidden_state, model(**data[3]).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ours.flatten(1), reference.flatten(1)).mean() > 0.8


@pytest.mark.parametrize("settings, message", [
    ({}, "exactly one budget"),
    ({"max_bytes": 5000, "max_drop": 1.0}, "exactly one budget"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": 1.5}, "max_bytes"),
    ({"max_drop": -1}, "max_drop"),
    ({"max_error_rate": 100}, "below 100"),
    ({"max_error_rate": -1}, "max_error_rate"),
    ({"max_drop": 1.0, "max_error_rate": 2.0}, "exactly one budget"),
    ({"max_bytes": 100}, "cannot be met"),
    ({"max_bytes": 5000, "keeps": (0,)}, "keeps"),
    ({"max_bytes": 5000, "bits": (9,)}, "bits"),
    ({"max_bytes": 5000, "validation_share": 1.0}, "validation_share"),
    ({"max_bytes": 5000, "targets": ["nope"]}, "matches no"),
    ({"max_bytes": 5000, "trials": 0}, "trials"),
    ({"max_bytes": 5000, "sensitivity": {"fc1": []}}, "sensitivity is not a table"),
    ({"max_drop": 1.0, "parallel": 0}, "parallel"),
    ({"max_drop": 1.0, "address": ""}, "address"),
    ({"max_bytes": 5000, "bias_bits": []}, "bias_bits"),
    ({"max_bytes": 5000, "bias_bits": (8, 1)}, "bits"),
])
def test_auto_bad_settings_are_one_error_and_change_nothing(trained, digits, settings, message):
    before = _state(trained)
    with pytest.raises(netshrink.NetshrinkError, match=message):
        netshrink.auto(trained, digits[0], **{"progress": False, "epochs": 1, **settings})
    assert _same(before, _state(trained))


def test_auto_refuses_a_model_that_is_already_compressed(trained, digits):
    netshrink.prune(trained, keep=0.5)
    with pytest.raises(netshrink.NetshrinkError, match="dense model"):
        netshrink.auto(trained, digits[0], max_bytes=9000, **FAST)


def test_report_accounts_for_every_byte_and_draws_each_section(found_digits, tmp_path):
    found = found_digits[1]
    path = tmp_path / "m.nsk"
    found.save(path)
    raw = path.read_bytes()
    rows, overhead = tensor_bytes(raw)
    assert sum(r["bytes"] for r in rows) + overhead == len(raw)
    pruned = [n for n, c in found.policy.items() if c.keep < 1]
    assert all(next(r for r in rows if r["name"] == f"{n}.weight")["position_bytes"] > 0 for n in pruned)
    (tmp_path / "m.auto.json").write_text(json.dumps(found.to_json()))
    page = netshrink.report_page(path, tmp_path / "r.html")  # finds m.auto.json beside the file
    text = page.read_text()
    assert text.count("<img") == 3 and "Sensitivity per layer" in text and "Search" in text
    assert "http" not in text.replace("http://www.w3.org", "")  # self-contained: nothing fetched
    with pytest.raises(netshrink.NetshrinkError, match="both"):
        netshrink.report_page(path, tmp_path / "x.html", reference=path)
    with pytest.raises(netshrink.NetshrinkError):
        netshrink.report_page(path, path)  # would overwrite its input
    assert path.read_bytes() == raw


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "netshrink.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_auto_then_report_rendered_in_a_browser(tmp_path, trained):
    netshrink.save(trained, tmp_path / "dense.nsk")
    grid = ["--keeps", "1", "0.3", "0.1", "--bits", "0", "4", "2"]
    done = _cli("auto", "dense.nsk", "--data", "digits", "--max-bytes", "9000", "--epochs", "1", "--trials", "2",
                *grid, "--bias-bits", "6", "4", "--ranking", "variational", "-o", "auto.nsk", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "policy" in done.stdout and "met" in done.stdout
    assert (tmp_path / "auto.nsk").stat().st_size <= 9000
    steps = yaml.safe_load((tmp_path / "auto.yaml").read_text())["steps"]
    assert any("prune" in s or "share" in s for s in steps)
    assert all(s["prune"]["ranking"] == "variational" for s in steps if "prune" in s)  # rerun below with it
    bias_grids = [s["bias"]["bits"] for s in steps if "bias" in s]
    assert bias_grids and all(b in (6, 4) for g in bias_grids for b in (g.values() if isinstance(g, dict) else [g]))
    rerun = _cli("compress", "dense.nsk", "--data", "digits", "--recipe", "auto.yaml", "-o", "again.nsk", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    report = _cli("report", "auto.nsk", "-o", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "Sensitivity per layer" in (tmp_path / "report.html").read_text()
    for bad in (["auto", "dense.nsk", "--data", "digits", "-o", "x.nsk"],  # no budget
                ["auto", "dense.nsk", "--max-bytes", "10", "--max-drop", "1", "-o", "x.nsk"],
                ["auto", "dense.nsk", "--data", "digits", "--max-bytes", "100", "-o", "x.nsk"],
                ["report", "missing.nsk", "-o", "r.html"],
                ["report", "auto.nsk", "--data", "digits", "-o", "r2.html"]):
        failed = _cli(*bad, cwd=tmp_path)
        assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, (bad, failed.stderr)
    assert not (tmp_path / "x.nsk").exists()
    browser = next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium here to render the page (the HTML was checked above)")
    png = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1800",
                    f"--screenshot={png}", (tmp_path / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 20  # plots and tables drawn, not a blank page
    assert (pixels < 128).mean() > 0.01


def test_auto_reports_an_over_budget_run_when_no_smaller_policy_exists(trained, digits, monkeypatch):
    """A byte budget just above the smallest choices, and a run whose file comes out larger than
    predicted (a stand-in trial adds 4,000 bytes to every file, as fine-tuning can make a codebook
    code worse): no smaller policy is left to solve for, so auto returns that run, marked as not
    meeting the budget, instead of failing."""
    import re

    import netshrink.search.auto as autotune

    real_trial = autotune._run_trial
    monkeypatch.setattr(autotune, "_run_trial", lambda shared, steps: (
        lambda data, *rest: (data + bytes(4000), *rest))(*real_trial(shared, steps)))
    grid = dict(FAST, keeps=(1.0, 0.1, 0.03), bits=(None, 4, 2))
    with pytest.raises(netshrink.NetshrinkError, match="cannot be met") as refused:
        netshrink.auto(trained, digits[0], max_bytes=100, **grid)
    smallest = int(re.search(r"need about ([\d,]+) B", str(refused.value)).group(1).replace(",", ""))
    found = netshrink.auto(trained, digits[0], max_bytes=smallest + 5, **grid)
    assert not found.met and found.file_bytes > smallest + 5
    assert len(found.trials) == 1 and found.file_bytes == found.trials[-1]["file_bytes"]


def test_variational_ranking_predicts_the_bytes_of_layers_it_keeps_whole(trained, digits):
    """A layer the policy keeps whole is not trained under variational noise in the trial, so its
    shared weights code as the dense ones do: the table sizes them so, and the file agrees with the
    prediction (not with the noise-shrunk weights the ranking pass leaves, which code far smaller)."""
    from netshrink.search.auto import coded_bytes, compressed_weight

    grid = dict(FAST, epochs=4, keeps=(1.0,), bits=(4, 2))
    found = netshrink.auto(trained, digits[0], max_bytes=60_000, ranking="variational", trials=1, **grid)
    for name, choices in found.sensitivity.items():
        dense = trained.get_submodule(name).weight
        assert [c.bytes for c in choices] == [coded_bytes(compressed_weight(dense, 1.0, c.bits)) for c in choices]
    trial = found.trials[0]
    assert abs(trial["file_bytes"] - trial["predicted_bytes"]) < 0.05 * trial["file_bytes"], trial


@pytest.mark.slow
def test_cli_auto_scores_on_the_part_train_held_out_and_refuses_what_the_model_saw(tmp_path):
    """`netshrink train` holds out a part of the training split and records it; `auto` scores its
    choices on exactly that part, and refuses a model whose file says it trained on all of it."""
    trained = _cli("train", "--data", "digits", "--epochs", "3", "-o", "dense.nsk", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert netshrink.load(tmp_path / "dense.nsk").netshrink_manifest["info"]["held_out"] == {"share": 0.1, "seed": 0}
    done = _cli("auto", "dense.nsk", "--data", "digits", "--max-drop", "2", "--epochs", "1", "--trials", "1",
                "--keeps", "1", "0.3", "--bits", "0", "4", "-o", "auto.nsk", cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    assert "was never trained on" in done.stdout
    record = json.loads((tmp_path / "auto.auto.json").read_text())
    model = netshrink.load(tmp_path / "dense.nsk")
    rest, held = hold_out(netshrink.load_dataset("digits", "train"), 0.1, 0)
    assert record["dense_accuracy"] == pytest.approx(netshrink.evaluate(model, held), abs=1e-9)
    assert netshrink.evaluate(model, held) < netshrink.evaluate(model, rest)  # unseen examples score lower here
    everything = _cli("train", "--data", "digits", "--epochs", "1", "--validation", "0", "-o", "all.nsk", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    refused = _cli("auto", "all.nsk", "--data", "digits", "--max-drop", "2", "-o", "x.nsk", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "memorised" in refused.stderr and "--validation test" in refused.stderr
    assert not (tmp_path / "x.nsk").exists()


@pytest.mark.slow
def test_cli_auto_on_ray_checks_the_cluster_first_and_runs_on_a_started_head(tmp_path, trained):
    """`--ray HOST:PORT` where nothing listens is one line before any work; against a head started
    with `ray start --head` the same search runs as Ray tasks (authentication off for this
    test's own cluster, as RAY_AUTH_MODE says)."""
    pytest.importorskip("ray")
    netshrink.save(trained, tmp_path / "dense.nsk")
    search = ["auto", "dense.nsk", "--data", "digits", "--max-drop", "3", "--epochs", "1", "--trials", "1",
              "--keeps", "1", "0.3", "--bits", "0", "4"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = _cli(*search, "--ray", f"127.0.0.1:{port}", "-o", "x.nsk", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "nothing answers" in refused.stderr and "sensitivity" not in refused.stdout + refused.stderr
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    try:
        done = subprocess.run([sys.executable, "-m", "netshrink.cli", *search, "--ray", f"127.0.0.1:{port}",
                               "-o", "ray.nsk"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    assert f"Ray cluster at 127.0.0.1:{port}: 2 CPUs" in done.stdout and (tmp_path / "ray.nsk").exists()


def test_cli_auto_takes_an_error_rate_budget(tmp_path):
    trained = _cli("train", "--data", "digits", "--epochs", "3", "-o", "dense.nsk", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    done = _cli("auto", "dense.nsk", "--data", "digits", "--max-error-rate", "40", "--epochs", "1", "--trials", "1",
                "--keeps", "1", "0.3", "--bits", "0", "4", "-o", "auto.nsk", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--max-error-rate 40%: met" in done.stdout
    record = json.loads((tmp_path / "auto.auto.json").read_text())
    assert record["budget"] == {"max_error_rate": 40.0} and 100 * (1 - record["accuracy"]) <= 40
    refused = _cli("auto", "dense.nsk", "--data", "digits", "--max-error-rate", "0", "--epochs", "1",
                   "-o", "x.nsk", cwd=tmp_path)
    assert refused.returncode != 0 and "cannot be met" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x.nsk").exists()
