"""Deployment: a netshrink model written in the format of the runtime that will run it.

One file per target, one entry point, :func:`export`:

=====================  ==================================  ===========================================
format                 file                                runs in
=====================  ==================================  ===========================================
``onnx``               ``.onnx`` (:mod:`.to_onnx`)         ONNX Runtime: fp32, int8 QDQ, or the
                                                           model's own 2-8-bit codes (MatMulNBits)
``openvino``           ``.xml`` + ``.bin``                 OpenVINO: u2/u4/u8 weight constants with
                       (:mod:`.to_openvino`)               their scales
``gguf``               ``.gguf`` (:mod:`.to_gguf`)         llama.cpp: Q8_0 / Q4_0 / Q4_1 blocks, F32
``compressed-tensors`` a folder (:mod:`.to_compressed_     vLLM and ``transformers``: pack-quantized
                       tensors`)                           int4/int8 with group scales
=====================  ==================================  ===========================================

Every low-bit target writes netshrink's integer codes as they are (:mod:`.codes`); where a format
cannot hold a layer's grid, the report says so, layer by layer. :mod:`.bench` times the written
models against the runtimes' own quantizers, on the machine :mod:`.machine` describes.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NetshrinkError

FORMATS = ("onnx", "openvino", "gguf", "compressed-tensors")
_MODULES = {"onnx": "to_onnx", "openvino": "to_openvino", "gguf": "to_gguf", "compressed-tensors": "to_compressed_tensors"}
_SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".gguf": "gguf"}


def format_of(path: str | Path, format: str | None = None) -> str:
    """``format`` if given, else the one the file name says (.onnx, .xml, .gguf)."""
    import os

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise NetshrinkError(f"path must be a file path (a str or os.PathLike). Received: path={path!r}")
    if format is not None:
        if format not in FORMATS:
            raise NetshrinkError(f"format must be one of {', '.join(FORMATS)}. Received: format={format!r}")
        return format
    found = _SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise NetshrinkError(f"cannot tell the format from the name {str(path)!r} (.onnx, .xml for OpenVINO, .gguf): "
                             f"give format= one of {', '.join(FORMATS)}")
    return found


def hugging_face_model(model):
    """The ``transformers`` model inside ``model`` (itself, or the first submodule that is one,
    e.g. a sentence-transformers model's encoder)."""
    import sys

    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)  # loaded if the model holds one
    for module in model.modules() if base is not None else ():
        if isinstance(module, base):
            return module
    raise NetshrinkError("this export writes Hugging Face checkpoints: the model holds no transformers model")


def export(model, path: str | Path, *, format: str | None = None, **options):
    """Write ``model`` to ``path`` in ``format`` (default: from the file name), atomically; returns
    the export's report (a table of how each layer was written). Under several processes
    (``torchrun``), the first writes and returns the report; the others wait and return None.

    ``options`` go to the target: :func:`netshrink.deploy.to_onnx.export` (``int8``, ``low_bit``,
    ``calibration``, ``example_inputs``, ...), :func:`netshrink.deploy.to_openvino.export`,
    :func:`netshrink.deploy.to_gguf.export`, :func:`netshrink.deploy.to_compressed_tensors.export`.

    >>> import netshrink, tempfile, os
    >>> model = netshrink.build_model("mlp", in_shape=(1, 8, 8))
    >>> report = netshrink.quantize(model, weight_bits=4)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     report = netshrink.export(model, os.path.join(folder, "mlp.onnx"), low_bit=True)
    >>> report.layers[0][1]
    '4-bit, symmetric per channel (blocks of 64)'
    """
    import importlib

    from ..training import distributed

    target = importlib.import_module(f".{_MODULES[format_of(path, format)]}", __name__)
    return distributed.first_process(lambda: target.export(model, path, **options), str(path))
