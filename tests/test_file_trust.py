"""A file is input from a stranger: everything that changes behaviour is checksummed, every size is
bounded before allocation, only NetshrinkError escapes, and a failed load changes nothing."""
import copy
import json
import os
import random
import re
import stat
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest
import torch

import netshrink
from netshrink.store import artifact
from netshrink.store.fuzz import edit_manifest, fingerprint, manifest_text, mutate, reseal

FIXTURES = Path(__file__).parent / "fixtures"


def _compressed(trained, digits):
    netshrink.prune(trained, keep=0.2)
    netshrink.quantize(trained, weight_bits=4, activation_bits=8, calibration=digits[0])
    return trained


def test_loaded_model_keeps_its_compression_while_fine_tuning(trained, digits, tmp_path):
    model = _compressed(trained, digits)
    netshrink.save(model, tmp_path / "m.nsk")
    x = digits[1].tensors[0]
    for restore in (True, False):
        loaded = netshrink.load(tmp_path / "m.nsk", restore=restore)
        assert torch.equal(loaded(x), model(x))  # computes exactly what was saved
        zeros = loaded.fc1.weight == 0
        netshrink.fit(loaded, digits[0], epochs=1, lr=1e-3, progress=False)
        after = loaded.fc1.weight.detach()
        kept_compression = bool((after[zeros] == 0).all()) and all(
            torch.unique(row[row != 0]).numel() <= 15 for row in after)
        assert kept_compression == restore  # the dense reference (restore=False) loses both


def test_codebooks_clips_and_learned_steps_come_back(trained, digits, tmp_path):
    netshrink.clip(trained, percentile=99.0, targets=["fc3"])
    netshrink.prune(trained, keep=0.3, targets=["fc1", "fc3"])
    netshrink.share(trained, bits=3, targets=["fc1"])
    netshrink.quantize(trained, weight_bits=3, learned_step=True, targets=["fc2"])
    netshrink.save(trained, tmp_path / "m.nsk")
    loaded = netshrink.load(tmp_path / "m.nsk")
    kinds = {name: [type(t).__name__ for t in layer.parametrizations.weight]
             for name, layer in loaded.named_children() if hasattr(layer, "parametrizations")}
    assert kinds == {"fc1": ["Mask", "Codebook"], "fc2": ["LearnedStepQuantize"], "fc3": ["Clip", "Mask"]}
    x = digits[1].tensors[0]
    assert torch.equal(loaded(x), trained(x))
    netshrink.fit(loaded, digits[0], epochs=1, lr=1e-3, progress=False)
    assert torch.unique(loaded.fc1.weight[loaded.fc1.weight != 0]).numel() <= 8
    for row in loaded.fc2.weight:
        assert torch.unique(row).numel() <= 7


def _model_state(model):
    return fingerprint(artifact.baked_state_dict(model)), repr(model), [
        (name, m.training, len(m._forward_pre_hooks)) for name, m in model.named_modules()]


def test_failed_load_leaves_the_callers_model_exactly_as_it_was(trained, digits, tmp_path):
    source = _compressed(copy.deepcopy(trained), digits)
    netshrink.save(source, tmp_path / "m.nsk")
    other = netshrink.build_model("lenet-300-100", (1, 8, 8), seed=3)
    netshrink.prune(other, keep=0.5, targets=["fc2"])
    other.fc2.train()
    before = _model_state(other)
    data = (tmp_path / "m.nsk").read_bytes()
    # A file for a smaller fc3 (the check comes after decoding, before any change).
    small, _ = netshrink.remove_units(netshrink.build_model("lenet-300-100", (1, 8, 8)), keep=0.5, ignore=["fc3"])
    netshrink.save(small, tmp_path / "small.nsk")
    wrong = netshrink.build_model("mlp", (1, 8, 8))
    netshrink.save(wrong, tmp_path / "wrong.nsk")
    for path in (tmp_path / "wrong.nsk",):
        with pytest.raises(netshrink.NetshrinkError, match="does not fit"):
            netshrink.load(path, model=other)
        assert _model_state(other) == before
    cut = tmp_path / "cut.nsk"
    cut.write_bytes(data[:-10])
    with pytest.raises(netshrink.NetshrinkError):
        netshrink.load(cut, model=other)
    assert _model_state(other) == before
    loaded = netshrink.load(tmp_path / "m.nsk", model=other)  # the same file loads into it
    assert loaded is other and torch.equal(other(digits[1].tensors[0]), source(digits[1].tensors[0]))


def test_a_file_written_to_while_it_loads_is_an_error_and_the_model_stays(trained, digits, tmp_path):
    """Loading reads a file twice (checksum, then each tensor): a writer in between is caught."""
    path = tmp_path / "m.nsk"
    netshrink.save(_compressed(copy.deepcopy(trained), digits), path)
    target = netshrink.build_model("lenet-300-100", (1, 8, 8), seed=3)
    before = _model_state(target)
    decode_all = artifact._decode_all
    for change in (lambda data: path.write_bytes(data),  # rewritten in place, the same bytes
                   lambda data: path.write_bytes(data[:-100])):  # cut short
        def writer_in_between(*args, change=change):
            change(path.read_bytes())
            return decode_all(*args)
        path.write_bytes(netshrink.store.artifact.to_bytes(_compressed(copy.deepcopy(trained), digits)))
        time.sleep(0.01)  # a later modification time
        with mock.patch.object(artifact, "_decode_all", writer_in_between), \
                pytest.raises(netshrink.NetshrinkError, match="changed while it was read|is corrupt"):
            netshrink.load(path, model=target)
        assert _model_state(target) == before


def test_every_byte_is_covered_by_the_checksum(trained, digits, tmp_path):
    model = _compressed(trained, digits)
    netshrink.save(model, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    edits = [('"fc1":8', '"fc1":4'),  # an activation bit width
             ('"fc1.bias",[300]', '"fc1.bias",[30,10]'),  # a tensor's shape
             ('"name":"lenet-300-100"', '"name":"mlp"')]
    for old, new in edits:
        path = tmp_path / "edited.nsk"
        path.write_bytes(edit_manifest(data, old, new))
        with pytest.raises(netshrink.NetshrinkError, match="checksum"):
            netshrink.load(path)
    for position in range(8, len(data), max(1, len(data) // 97)):  # one flipped bit anywhere
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        (tmp_path / "flip.nsk").write_bytes(bytes(flipped))
        with pytest.raises(netshrink.NetshrinkError):
            netshrink.load(tmp_path / "flip.nsk")


def test_forged_files_cannot_make_loading_allocate_or_hang(trained, digits, tmp_path):
    """Resealed (valid checksum) files that claim huge sizes fail fast with one line."""
    netshrink.prune(trained, keep=0.1)
    netshrink.save(trained, tmp_path / "m.nsk")
    data = (tmp_path / "m.nsk").read_bytes()
    forgeries = {
        "huge encoded shape": ('"fc1.weight",[300,64]', '"fc1.weight",[999999999999,64]'),
        "huge spec": ('"in_shape":[1,8,8]', '"in_shape":[1,4096,4096]'),
        "unknown transform": ('"kind":"mask"', '"kind":"pickle"'),
    }
    length = re.search(r'"fc1.weight",\[300,64\],(\d+)', manifest_text(data)[0]).group(0)
    forgeries["payload beyond the file"] = (length, re.sub(r"\d+$", "99999999999", length))
    for label, (old, new) in forgeries.items():
        (tmp_path / "f.nsk").write_bytes(reseal(edit_manifest(data, old, new)))
        tracemalloc.start()
        started = time.perf_counter()
        with pytest.raises(netshrink.NetshrinkError) as info:
            netshrink.load(tmp_path / "f.nsk")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert "\n" not in str(info.value) and "checksum" not in str(info.value), label
        assert peak < 20 * len(data) and time.perf_counter() - started < 5, label


@pytest.mark.parametrize("kind", ["pruned", "grouped grid"])
def test_fuzzed_files(trained, digits, tmp_path, kind):
    """A few hundred mutated files (benchmarks/fuzz_files.py runs tens of thousands): a pruned,
    shared, quantized model, and one whose weights are stored as codes of grouped grids (GPTQ)."""
    if kind == "pruned":
        model = _compressed(trained, digits)
    else:
        model = trained
        netshrink.quantize(model, weight_bits=3, method="gptq", group_size=16, calibration=(digits[0].tensors[0][:64],))
    netshrink.save(model, tmp_path / "seed.nsk")
    data = (tmp_path / "seed.nsk").read_bytes()
    tracemalloc.start()
    netshrink.load(tmp_path / "seed.nsk")
    honest_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    caller = netshrink.build_model("lenet-300-100", (1, 8, 8), seed=5)
    before = _model_state(caller)
    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(300):
        kind, bad = mutate(data, rng)
        resealed = i % 2 == 1
        if resealed:
            bad = reseal(bad)
        if bad == data:
            continue
        (tmp_path / "bad.nsk").write_bytes(bad)
        tracemalloc.start()
        try:
            netshrink.load(tmp_path / "bad.nsk", model=caller if i % 3 == 0 else None)
            outcomes["loaded"] += 1
            assert resealed, f"a damaged file loaded ({kind})"  # raw damage must always be caught
            before = _model_state(caller)  # a valid forged file may load into the caller
        except netshrink.NetshrinkError as exc:
            outcomes["error"] += 1
            assert "\n" not in str(exc)
            assert _model_state(caller) == before, kind
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= 2 * honest_peak + (1 << 20), kind
    assert outcomes["error"] > 200


def test_version_1_files_load_only_when_the_user_vouches_for_them(tmp_path):
    """Format 1 has no checksum: an edited file (here 8-bit activations made 4-bit) cannot be told
    from a good one, so neither loads unless the user says they trust it."""
    expected = json.loads((FIXTURES / "v1-mlp-digits.json").read_text())
    data = (FIXTURES / "v1-mlp-digits.nsk").read_bytes()
    edited = tmp_path / "edited.nsk"
    edited.write_bytes(data.replace(b'\\"fc1\\":8', b'\\"fc1\\":4', 1))
    assert edited.read_bytes() != data
    for path in (FIXTURES / "v1-mlp-digits.nsk", edited):
        with pytest.raises(netshrink.NetshrinkError, match="no checksum.*allow_unchecked=True"):
            netshrink.load(path)
    with pytest.raises(netshrink.NetshrinkError, match="allow_unchecked must be True or False"):
        netshrink.load(FIXTURES / "v1-mlp-digits.nsk", allow_unchecked="yes")
    model = netshrink.load(FIXTURES / "v1-mlp-digits.nsk", allow_unchecked=True)
    x = netshrink.load_dataset("digits", "test").tensors[0][:32]
    out = model(x).detach()
    assert torch.allclose(out[0], torch.tensor(expected["first_row"]), atol=1e-5)
    assert abs(float(out.sum()) - expected["logits_sum"]) < 1e-3
    assert model.netshrink_manifest["info"] == {"note": "written by netshrink 0.1.0"}


@pytest.mark.parametrize("version", [2, 3, 4])
def test_version_2_to_4_files_load(version):
    # Format 2 (netshrink 0.2-0.3): a safetensors tensor per weight, Huffman-coded sparse,
    # codebook and grid-code tensors, per-tensor checksums. Format 3 (0.4): one blob, context
    # coding with constriction (this fixture also catches a constriction release that would
    # change its models). Format 4 (0.6): packed tensors (zstd). Pruned, shared, grouped-grid layers and an activation quantizer, each
    # restored with its transform.
    expected = json.loads((FIXTURES / f"v{version}-lenet-digits.json").read_text())
    model = netshrink.load(FIXTURES / f"v{version}-lenet-digits.nsk")
    x = netshrink.load_dataset("digits", "test").tensors[0][:32]
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out[0], torch.tensor(expected["first_row"]), atol=1e-5)
    assert abs(float(out.sum()) - expected["logits_sum"]) < 1e-3
    for layer, kinds in expected["transforms"].items():
        recorded = [t.record()["kind"] for t in netshrink.compress.methods.base.transforms(model.get_submodule(layer))]
        assert recorded == kinds, layer
    assert model.fc2.input_quantizer.bits == 8
    assert model.netshrink_manifest["info"]["note"].endswith(f"(format version {version})")


def test_files_get_the_users_umask_and_orphaned_temporaries_are_removed(trained, tmp_path):
    path = tmp_path / "m.nsk"
    old = os.umask(0o022)
    try:
        orphan = tmp_path / ".m.nsk.999999999.abcd.tmp"  # a writer that was killed: pid gone
        orphan.write_bytes(b"x" * 100)
        mine = tmp_path / f".m.nsk.{os.getpid()}.live.tmp"  # a live writer's: kept
        mine.write_bytes(b"x")
        netshrink.save(trained, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert not orphan.exists() and mine.exists()
        os.chmod(path, 0o664)
        os.umask(0o002)
        netshrink.save(trained, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(old)
