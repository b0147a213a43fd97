"""The public API as users call it: ``import netshrink`` and ``netshrink.<name>``, each call made
twice on the same model where state could leak between calls."""
import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink


def test_every_public_name_resolves_and_no_submodule_shadows_a_function():
    for name in netshrink.__all__:
        assert getattr(netshrink, name) is not None, name
    for found in pkgutil.walk_packages(netshrink.__path__, "netshrink."):  # every module, as a user might import it
        importlib.import_module(found.name)
    for name in netshrink.__all__:
        assert not isinstance(getattr(netshrink, name), types.ModuleType), name
    for name in ("export", "prune", "quantize", "load", "save", "summary", "fit", "auto", "benchmark"):
        assert callable(getattr(netshrink, name)), name


def test_old_import_paths_still_work_and_name_the_new_ones(monkeypatch):
    """netshrink 0.6's module paths: the same objects as the new ones, with a warning naming where they live now,
    and never a second copy of a module (a class imported both ways is one class)."""
    for old in ("methods", "methods.base", "train", "machine", "onnx_export", "report"):  # imported by other tests
        monkeypatch.delitem(sys.modules, f"netshrink.{old}", raising=False)
    with pytest.warns(DeprecationWarning, match="netshrink.compress.methods.base"):
        from netshrink.methods.base import Method as old_method
    from netshrink.compress.methods.base import Method
    assert old_method is Method
    with pytest.warns(DeprecationWarning, match="netshrink.training.fit and netshrink.training.batches"):
        from netshrink.train import batches, fit
    assert fit is netshrink.fit and batches.__module__ == "netshrink.training.batches"
    with pytest.warns(DeprecationWarning, match="netshrink.deploy.machine"):
        from netshrink.machine import describe
    assert callable(describe)
    with pytest.warns(DeprecationWarning, match="netshrink.deploy.to_onnx"):
        from netshrink.onnx_export import ExportReport, export
    assert export is importlib.import_module("netshrink.deploy.to_onnx").export and ExportReport
    with pytest.raises(ImportError), pytest.warns(DeprecationWarning):
        from netshrink.report import no_such_name  # noqa: F401


def test_no_import_circles():
    """Between modules (imports inside functions included) and between the stage packages: a lower room never
    borrows from a higher one."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "layout.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class Wrapped(nn.Module):
    """A user's wrapper with dropout: calibration must not leave it in training mode."""

    def __init__(self):
        super().__init__()
        self.body = netshrink.build_model("lenet-300-100", (1, 8, 8))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.body(x))


def test_each_call_twice(digits, tmp_path):
    train, test = digits
    model = Wrapped()
    netshrink.fit(model, train, epochs=3, progress=False)
    model.eval()
    model.dropout.train()  # a mixed state: every flag must come back as it was
    originals = list(model.modules())
    modes = [m.training for m in originals]
    for _ in range(2):
        report = netshrink.prune(model, keep=0.3)
        assert all("30.0%" in detail for _, detail in report.changed)  # re-pruning tightens, never stacks
        netshrink.quantize(model, weight_bits=4, activation_bits=8, calibration=train)
        assert [m.training for m in originals] == modes
    assert [type(t).__name__ for t in model.body.fc1.parametrizations.weight] == ["Mask", "FakeQuantize"]
    for _ in range(2):
        netshrink.fit(model, train, epochs=1, progress=False)
        assert [m.training for m in originals] == modes
        assert netshrink.evaluate(model, test) > 0.5
        assert [m.training for m in originals] == modes
    model.eval()
    x = test.tensors[0]
    expected = model(x)
    sizes = {netshrink.save(model, tmp_path / f"m{i}.nsk") for i in range(2)}
    assert len(sizes) == 1 and netshrink.summary(model).file_bytes == sizes.pop()
    for i in range(2):
        skeleton = Wrapped()
        loaded = netshrink.load(tmp_path / f"m{i}.nsk", model=skeleton)
        assert torch.equal(loaded(x), expected)
    for i in range(2):
        pytest.importorskip("onnxruntime")
        report = netshrink.export(model.body, tmp_path / f"m{i}.onnx", int8=True)
        assert report.layers and "every x86-64 CPU" in report.target
