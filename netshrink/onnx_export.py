"""Moved to :mod:`netshrink.deploy.to_onnx`; these names keep working from here."""
from .deploy.report import ExportReport  # noqa: F401
from .deploy.to_onnx import export, saturating_layers, weight_as_int8  # noqa: F401
