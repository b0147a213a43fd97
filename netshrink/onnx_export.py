"""Moved to :mod:`netshrink.deploy.to_onnx`; these names keep working from here."""
from .deploy.to_onnx import ExportReport, export, saturating_layers, weight_as_int8  # noqa: F401
