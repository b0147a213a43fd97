"""OpenVINO IR (``.xml`` + ``.bin``) with netshrink's own low-bit weights.

The model is first written as a low-bit ONNX graph (:mod:`netshrink.deploy.onnx_low_bit`), which
OpenVINO's own ONNX reader turns into what NNCF's ``compress_weights`` produces: u2/u4/u8 weight
constants, a Convert, the zero point subtracted and the group scales multiplied in front of each
MatMul, which OpenVINO's CPU plugin runs as a weight-compressed MatMul. The codes are the same
integers, so nothing is rounded again; OpenVINO writes the IR and netshrink only moves it into
place (both files, or neither).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import NetshrinkError
from ..files import check_writable


def export(model, path: str | Path, **options):
    """Write ``model`` as OpenVINO IR: ``path`` (``.xml``) and the weights beside it (``.bin``).

    ``options`` are those of :func:`netshrink.deploy.to_onnx.export` (``example_inputs``,
    ``low_bit`` (default True: the model's own 2-8-bit codes), ``accuracy_level``, ...). Returns
    that export's report. Needs ``pip install openvino``."""
    try:
        import openvino as ov
    except ImportError:
        raise NetshrinkError("OpenVINO export needs openvino: pip install 'netshrink[openvino]'") from None
    from .to_onnx import export as to_onnx

    path = check_writable(path)
    if path.suffix.lower() != ".xml":
        raise NetshrinkError(f"an OpenVINO model is an .xml file (its weights go beside it in .bin). Received: {path}")
    options.setdefault("low_bit", not options.get("int8", False))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as folder:
        onnx_path = Path(folder) / "model.onnx"
        report = to_onnx(model, onnx_path, **options)
        try:
            converted = ov.convert_model(str(onnx_path))
            ov.save_model(converted, str(Path(folder) / "model.xml"), compress_to_fp16=False)
        except Exception as exc:  # OpenVINO raises its own types; the first line names the op
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NetshrinkError(f"OpenVINO could not convert the model: {first}") from None
        # .bin first: an .xml that exists always has its weights beside it.
        os.replace(Path(folder) / "model.bin", path.with_suffix(".bin"))
        os.replace(Path(folder) / "model.xml", path)
    report.path, report.target = str(path), f"OpenVINO IR, {report.target}"
    return report
