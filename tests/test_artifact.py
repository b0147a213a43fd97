import contextlib
import copy
import os
from unittest import mock

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

import netshrink
from netshrink.store import artifact
from netshrink.store.codec import weights as codec


def test_roundtrip_bit_identical_weights_and_predictions(trained, digits, tmp_path):
    netshrink.prune(trained, keep=0.1)
    netshrink.share(trained, bits=4)
    netshrink.quantize(trained, weight_bits=None, activation_bits=8, calibration=digits[0])
    path = tmp_path / "m.nsk"
    size = netshrink.save(trained, path, recipe=[{"prune": {"keep": 0.1}}])
    assert size == path.stat().st_size
    loaded = netshrink.load(path)
    for name, tensor in artifact.baked_state_dict(trained).items():
        assert torch.equal(artifact.baked_state_dict(loaded)[name], tensor), name
    x = digits[1].tensors[0]
    assert torch.equal(loaded(x), trained(x))
    assert loaded.netshrink_manifest["recipe"] == [{"prune": {"keep": 0.1}}]


def test_user_model_needs_and_accepts_a_skeleton(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    model(torch.randn(8, 1, 8, 8))  # touch BatchNorm statistics
    netshrink.prune(model, keep=0.5)
    path = tmp_path / "user.nsk"
    netshrink.save(model, path)
    with pytest.raises(netshrink.NetshrinkError, match="pass model="):
        netshrink.load(path)
    skeleton = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    loaded = netshrink.load(path, model=skeleton)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))


def _corruptions(data: bytes):
    yield "empty", b""
    yield "truncated header", data[:20]
    yield "truncated body", data[: len(data) // 2]
    yield "one byte short", data[:-1]
    flipped = bytearray(data)
    flipped[-50] ^= 0x5A
    yield "flipped byte in payload", bytes(flipped)
    yield "garbage", os.urandom(3000)


def test_corrupt_files_give_one_line_errors(trained, tmp_path):
    netshrink.prune(trained, keep=0.1)
    netshrink.share(trained, bits=3)
    good = tmp_path / "good.nsk"
    netshrink.save(trained, good)
    data = good.read_bytes()
    for label, bad in _corruptions(data):
        path = tmp_path / "bad.nsk"
        path.write_bytes(bad)
        with pytest.raises(netshrink.NetshrinkError) as info:
            netshrink.load(path)
        assert "\n" not in str(info.value), label


def test_foreign_safetensors_and_missing_file(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(netshrink.NetshrinkError, match="not a netshrink file|not a readable"):
        netshrink.load(tmp_path / "foreign.safetensors")
    with pytest.raises(netshrink.NetshrinkError, match="cannot read"):
        netshrink.load(tmp_path / "missing.nsk")


def test_files_are_safetensors_with_a_small_overhead(tmp_path):
    from safetensors import safe_open

    from netshrink.store.codec import weights

    model = netshrink.build_model("lenet-300-100")
    netshrink.prune(model, keep=0.08)
    netshrink.share(model, bits=5)
    path = tmp_path / "small.nsk"
    size = netshrink.save(model, path)
    with safe_open(path, "np") as f:  # any safetensors reader opens it: one uint8 blob
        assert f.metadata() == {"netshrink": str(artifact.VERSION)} and list(f.keys()) == ["netshrink"]
        blob = f.get_tensor("netshrink")
        assert blob.dtype == np.uint8
    # netshrink writes the safetensors header itself (to avoid copies): byte for byte safetensors' own
    from safetensors.numpy import save
    data = path.read_bytes()
    assert data == save({"netshrink": blob}, metadata={"netshrink": str(artifact.VERSION)})
    payloads = sum(len(weights.encode(a)) for a in artifact.stored_arrays(model).values())
    overhead = size - payloads  # header, manifest (names, shapes, transforms), checksum
    assert 0 < overhead <= 300, overhead


def test_atomic_write_keeps_old_file_on_failure(trained, tmp_path, monkeypatch):
    path = tmp_path / "m.nsk"
    netshrink.save(trained, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    netshrink.prune(trained, keep=0.1)
    with pytest.raises(netshrink.NetshrinkError, match="disk full"):
        netshrink.save(trained, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.nsk"]  # no temporary left behind


def test_masked_negative_zeros_are_stored_as_sparse(trained):
    """w * mask leaves -0.0 for pruned negative weights; the file must still store them as zeros."""
    from netshrink.store.codec import weights as codec

    netshrink.prune(trained, keep=0.1)
    assert torch.signbit(trained.fc1.weight[trained.fc1.weight == 0]).any()  # the -0.0s are there
    arrays = artifact.stored_arrays(trained)
    assert codec.encoding_name(codec.encode(arrays["fc1.weight"])).endswith("+map")
    dense_bytes = 4 * sum(a.size for a in arrays.values())
    assert sum(len(codec.encode(a)) for a in arrays.values()) <= len(artifact.to_bytes(trained)) < dense_bytes / 4


class Tied(torch.nn.Module):
    """An embedding tied to the output layer, and two biases equal to each other but not tied."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.other = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 50)
        self.out.weight = self.embed.weight
        with torch.no_grad():
            self.hidden.bias.zero_()
            self.other.bias.zero_()

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.out(self.hidden(x) + self.other(x))


@pytest.mark.parametrize("band", [None, 100])
def test_tied_weights_stay_tied_and_equal_tensors_stay_apart(tmp_path, band):
    """(``band``: the weights coded in bands of rows, streamed into the file as they are coded;
    the tied copy is found once written, and taken back.)"""
    torch.manual_seed(0)
    model = Tied()
    netshrink.quantize(model, weight_bits=6)
    path = tmp_path / "tied.nsk"
    with mock.patch.object(codec, "BAND", band) if band else contextlib.nullcontext():
        netshrink.save(model, path)
    manifest, stored = artifact.read_manifest(path.read_bytes())
    assert manifest["tensors"]["out.weight"]["same_as"] == "embed.weight" and "out.weight" not in stored
    assert (codec.encoding_name(bytes(stored["embed.weight"])).endswith(" in bands")) == bool(band)
    tokens = torch.arange(10)
    expected = netshrink.bake(copy.deepcopy(model)).eval()(tokens)
    for _ in range(2):  # twice: nothing from the first load leaks into the second
        torch.manual_seed(1)
        loaded = netshrink.load(path, model=Tied(), restore=False)
        assert torch.equal(loaded(tokens), expected)
        assert loaded.out.weight is loaded.embed.weight
        assert loaded.hidden.bias.data_ptr() != loaded.other.bias.data_ptr()
        with torch.no_grad():
            loaded.hidden.bias.add_(1.0)
        assert torch.all(loaded.other.bias == 0)


def test_a_model_built_on_the_meta_device_is_filled_from_the_file(tmp_path):
    """For models too large to hold twice: build the skeleton without memory, load fills it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 5))
    netshrink.prune(model, keep=0.3)
    netshrink.quantize(model, weight_bits=4)
    path = tmp_path / "meta.nsk"
    netshrink.save(model, path)
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 5))
    loaded = netshrink.load(path, model=skeleton)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(7, 40)
    assert torch.equal(loaded(x), model.eval()(x))
    # a float64 model keeps its dtype (the file's float32 values converted, as a copy would)
    double = netshrink.load(path, model=torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30),
                                                            torch.nn.Linear(30, 5)).double(), restore=False)
    assert all(t.dtype == torch.float64 for t in double.state_dict().values())


def test_payloads_spooled_to_disk_give_the_same_file(tmp_path, monkeypatch):
    """Payloads beyond SPOOL_MEMORY wait in a temporary file while saving; the file is the same."""
    torch.manual_seed(0)
    model = netshrink.build_model("lenet-5")
    netshrink.prune(model, keep=0.3)
    netshrink.quantize(model, weight_bits=5)
    in_memory = artifact.to_bytes(model)
    monkeypatch.setattr(artifact, "SPOOL_MEMORY", 100)
    path = tmp_path / "spooled.nsk"
    assert netshrink.save(model, path) == len(in_memory)
    assert path.read_bytes() == in_memory
    loaded = netshrink.load(path)
    for name, tensor in artifact.baked_state_dict(model).items():
        assert torch.equal(artifact.baked_state_dict(loaded)[name], tensor), name
