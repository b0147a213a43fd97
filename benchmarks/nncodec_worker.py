"""Encode arrays with NNCodec (Fraunhofer's NNR / MPEG-7 Part 17 implementation) and decode them
again; runs in NNCodec's own environment (its pins clash with netshrink's), called by
benchmarks/codec.py:

    <nncodec-python> benchmarks/nncodec_worker.py arrays.npz out.json

Setup (one time; numpy < 2 and torch 2.13 CPU, NNCodec without its dependencies):

    python3.11 -m venv ~/nncodec-env
    ~/nncodec-env/bin/pip install torch==2.13.0 "numpy<2" tqdm
    ~/nncodec-env/bin/pip install --no-deps nncodec==2.1.3

NNCodec imports torchvision, cv2, h5py, scikit-learn, pandas, ptflops and torchmetrics when it
is imported, for its training examples, and never uses them to code tensors: inert stand-ins
for them are installed below, so none has to be.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
import time
import types
from pathlib import Path

STAND_INS = {"torchvision", "cv2", "h5py", "sklearn", "pandas", "ptflops", "torchmetrics", "click", "wandb"}


class _Anything:
    """Any attribute, call, subclass or subscript of a stand-in module: nothing happens."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)

    def __getitem__(self, key):
        return _Anything()


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STAND_INS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attribute: _Anything()
        return module

    def exec_module(self, module):
        pass


def main() -> None:
    sys.meta_path.insert(0, _StandIns())
    import numpy as np
    from nncodec import nnc

    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    with np.load(source, allow_pickle=False) as archive:
        arrays = {name: archive[name].astype(np.float32) for name in archive.files}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.nnc"
        started = time.perf_counter()
        nnc.compress(arrays, bitstream_path=str(path), verbose=False, **settings)
        encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        decoded = nnc.decompress(str(path), verbose=False)
        decode_seconds = time.perf_counter() - started
        size = path.stat().st_size
    exact = {name: bool(np.array_equal(np.asarray(decoded[name], np.float32), array)) for name, array in arrays.items()}
    worst = {name: float(np.max(np.abs(np.asarray(decoded[name], np.float32) - array))) if array.size else 0.0
             for name, array in arrays.items()}
    squared = {name: float(np.sum((np.asarray(decoded[name], np.float64) - array) ** 2)) for name, array in arrays.items()}
    target.write_text(json.dumps({"bytes": size, "exact": exact, "max_error": worst, "squared_error": squared,
                                  "encode_seconds": encode_seconds, "decode_seconds": decode_seconds}))


if __name__ == "__main__":
    main()
