"""Near-lossless files (``save(..., max_error=E)``): every parameter within E of the model's,
smaller than the exact file, buffers and quantizer inputs exact, bad bounds refused before a
file is touched. Checked against the exact file on a pruned MLP, a CNN with BatchNorm, residual
adds and depthwise convolutions, and a tiny BERT."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import netshrink
from netshrink.store.codec import weights as codec
from netshrink.grids import round_within
from netshrink.errors import NetshrinkError
from netshrink.compress.methods.base import baked_state_dict


def largest_change(model, path):
    before, after = baked_state_dict(model), baked_state_dict(netshrink.load(path))
    parameters = {k for k in before if not k.startswith("_")} & set(after)
    return {k: (before[k].double() - after[k].double()).abs().max().item() if before[k].numel() else 0.0
            for k in parameters if before[k].is_floating_point()}


@pytest.mark.parametrize("kind", ["pruned mlp", "resmobile", "bert"])
def test_every_value_within_the_bound_and_the_file_smaller(kind, trained, make_tiny_bert, tmp_path):
    if kind == "pruned mlp":
        model = trained
        netshrink.prune(model, keep=0.1)
    elif kind == "resmobile":
        model = netshrink.build_model("resmobile")
        model.train()(torch.randn(8, 1, 28, 28))  # BatchNorm statistics away from their initial values
        model.eval()
    else:
        model = make_tiny_bert()
    exact = netshrink.save(model, tmp_path / "exact.nsk")
    assert max(largest_change(model, tmp_path / "exact.nsk").values()) == 0.0
    sizes = []
    for bound in (1e-4, 1e-3, 1e-2):
        for attempt in range(2):  # twice: no state kept between saves
            sizes.append(netshrink.save(model, tmp_path / f"near{bound}.nsk", max_error=bound))
            changes = largest_change(model, tmp_path / f"near{bound}.nsk")
            assert max(changes.values()) <= bound
            assert max(changes.values()) > bound / 10  # something was rounded
        assert sizes[-1] == sizes[-2]
        buffers = [name for name, _ in model.named_buffers()]
        assert all(changes[name] == 0.0 for name in buffers if name in changes)
    assert exact > sizes[0] > sizes[2] > sizes[4]


def test_quantized_weights_stay_exact_and_floats_round(trained, tmp_path):
    netshrink.quantize(trained, weight_bits=4, targets=("fc1",))  # a quantizer applied again on loading
    netshrink.save(trained, tmp_path / "near.nsk", max_error=1e-2)
    changes = largest_change(trained, tmp_path / "near.nsk")
    assert changes["fc1.weight"] == 0.0
    assert 0 < changes["fc2.weight"] <= 1e-2


def test_the_exact_payload_is_kept_when_it_is_smaller():
    codes = np.random.default_rng(0).integers(-7, 8, size=(64, 64)).astype(np.float32)
    on_grid = codes * np.float32(0.05)  # a 4-bit grid: 15 values, coarser than the bound's
    rounded, step = round_within(on_grid, 1e-3)
    # the rounded values lie on a finer grid of the same 15 values: coded as one step (format 6) they
    # cost what the exact ones do, never less
    assert len(codec.encode(on_grid)) <= len(codec.encode(rounded, step=step))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-3, 3, width=32), min_size=0, max_size=300),
       bound=st.sampled_from([1e-5, 1e-3, 0.1]), rows=st.sampled_from([1, 3]))
def test_rounded_tensors_decode_to_what_was_rounded(values, bound, rows):
    array = np.array(values + [0.0] * (-len(values) % rows), dtype=np.float32).reshape(rows, -1)
    found = round_within(array, bound)
    if found is None:  # only beyond the coder's codes
        assert np.abs(array).max() / (2 * bound) > 2000
        return
    rounded, step = found
    assert np.abs(rounded.astype(np.float64) - array).max(initial=0) <= bound
    assert (rounded.view(np.uint32) != 0x80000000).all()  # no -0.0
    decoded = codec.decode(codec.encode(rounded, step=step), rounded.shape)
    assert (decoded.view(np.uint32) == rounded.view(np.uint32)).all()


@pytest.mark.parametrize("bound", [0, -1e-3, float("nan"), float("inf"), "1e-3", True])
def test_bad_bounds_are_refused_before_a_file_is_written(trained, tmp_path, bound):
    with pytest.raises(NetshrinkError, match="max_error"):
        netshrink.save(trained, tmp_path / "m.nsk", max_error=bound)
    assert not (tmp_path / "m.nsk").exists()


@pytest.mark.slow
def test_the_command_line_reports_the_files_accuracy(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "netshrink.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path)

    exact = run("compress", "--model", "mlp", "--data", "digits", "--epochs", "2", "--prune", "0.3", "-o", "exact.nsk")
    near = run("compress", "--model", "mlp", "--data", "digits", "--epochs", "2", "--prune", "0.3",
               "--max-error", "0.01", "-o", "near.nsk")
    assert exact.returncode == 0 and near.returncode == 0, near.stderr
    assert (tmp_path / "near.nsk").stat().st_size < (tmp_path / "exact.nsk").stat().st_size
    bad = run("compress", "--model", "mlp", "--data", "digits", "--max-error", "-1", "-o", "bad.nsk")
    assert bad.returncode == 2 and "--max-error" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.nsk").exists()
