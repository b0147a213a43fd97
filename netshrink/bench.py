"""Latency, throughput, size and accuracy of one model across runtimes, measured in one run.

Candidates: the model in PyTorch (fp32), the same in ONNX Runtime (fp32), netshrink's int8 QDQ
export, and the baselines a user would otherwise pick: PyTorch dynamic int8 quantization of
Linear layers, ONNX Runtime ``quantize_dynamic`` and ``quantize_static`` (QDQ, per channel,
calibrated on the same data). Latency is the median and 90th percentile over repeats after a
warm-up, per batch size, measured in interleaved rounds (every candidate in turn, ten times) so
that drift on a shared machine affects all alike; all candidates use the same thread count.
Ratios are against PyTorch fp32.
"""
from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import NetshrinkError
from .onnx_export import ExportReport, export
from .methods.activations import detach_all
from .methods.base import bake

COLUMNS = ["candidate", "batch 1 median (us)", "batch 1 p90 (us)", "batch 256 median (us)", "batch 256 p90 (us)",
           "throughput (img/s)", "speed-up b1", "speed-up b256", "file bytes", "test accuracy"]


def _interleaved(runs: list[Callable[[], object]], repeats: int, rounds: int = 10) -> list[tuple[float, float]]:
    """(median, p90) seconds per run, measured in ``rounds`` alternating rounds so that drift on a
    shared machine (other load, frequency changes) hits every candidate alike."""
    for run in runs:  # warm-up: first calls allocate, compile kernels, fill caches
        for _ in range(max(3, repeats // 20)):
            run()
    samples: list[list[float]] = [[] for _ in runs]
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            # ONNX Runtime's worker threads spin-wait for a while after each run (its default, kept:
            # it is what users get); a pause lets them go idle so they do not steal the cores from
            # the next candidate, and a few untimed runs re-warm this one.
            time.sleep(0.05)
            for _ in range(3):
                run()
            for _ in range(per_round):
                started = time.perf_counter()
                run()
                samples[i].append(time.perf_counter() - started)
    return [(float(np.median(s)), float(np.percentile(s, 90))) for s in samples]


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Reader:
    """ONNX Runtime calibration data reader over netshrink data."""

    def __init__(self, images: np.ndarray, batch: int = 128) -> None:
        self.batches = iter([{"input": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def benchmark(model: nn.Module, test, calibration, *, threads: int = 2, repeats: int = 200,
              batch_repeats: int = 30, input_shape=None, workdir: Path | None = None,
              progress: Callable[[str], None] = lambda s: None) -> tuple[list[list], "ExportReport"]:
    """Measure every candidate; returns table rows (see ``COLUMNS``) and the int8 export report."""
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    except ImportError:
        raise NetshrinkError("bench needs onnxruntime: pip install 'netshrink[export]'") from None
    torch.set_num_threads(threads)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="netshrink-bench-"))
    x_test, y_test = test.tensors if hasattr(test, "tensors") else test
    x_cal = (calibration.tensors[0] if hasattr(calibration, "tensors") else calibration[0])[:1024]
    one, many = x_test[:1].numpy(), x_test[:256].numpy()
    dense = bake(copy.deepcopy(model)).eval()
    detach_all(dense)
    candidates: list[tuple[str, Callable, Callable, int]] = []  # name, run(batch), predict(all), bytes

    def torch_candidate(name: str, module: nn.Module):
        path = workdir / f"{name.replace(' ', '_')}.pt"
        torch.save(module.state_dict(), path)  # our own file, just written: the size of what ships
        with torch.no_grad():
            return (name, lambda b: module(torch.from_numpy(b)), lambda: module(x_test).argmax(1).numpy(),
                    path.stat().st_size)

    def ort_candidate(name: str, path: Path):
        session = _ort_session(path, threads)
        return (name, lambda b: session.run(None, {"input": b}),
                lambda: np.concatenate([session.run(None, {"input": x_test[i:i + 1000].numpy()})[0]
                                        for i in range(0, len(x_test), 1000)]).argmax(1), path.stat().st_size)

    progress("exporting")
    fp32_path, int8_path = workdir / "fp32.onnx", workdir / "netshrink_int8.onnx"
    logits_path = workdir / "netshrink_int8_logits.onnx"
    export(dense, fp32_path, input_shape=input_shape or _shape(model))
    report = export(model, int8_path, int8=True, calibration=calibration, input_shape=input_shape or _shape(model))
    export(model, logits_path, int8=True, int8_logits=True, calibration=calibration,
           input_shape=input_shape or _shape(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8)
        ort_dynamic, ort_static = workdir / "ort_dynamic.onnx", workdir / "ort_static.onnx"
        quantize_dynamic(str(fp32_path), str(ort_dynamic), weight_type=QuantType.QInt8, per_channel=True)
        quantize_static(str(fp32_path), str(ort_static), _Reader(x_cal.numpy()), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    candidates = [torch_candidate("PyTorch fp32", dense), ort_candidate("ONNX Runtime fp32", fp32_path),
                  ort_candidate("netshrink int8 (ONNX Runtime)", int8_path),
                  ort_candidate("netshrink int8, int8 logits (ONNX Runtime)", logits_path),
                  torch_candidate("PyTorch dynamic int8 (Linear)", dynamic),
                  ort_candidate("ONNX Runtime quantize_dynamic", ort_dynamic),
                  ort_candidate("ONNX Runtime quantize_static", ort_static)]
    progress("timing all candidates in interleaved rounds")
    with torch.no_grad():
        batch1 = _interleaved([lambda run=run: run(one) for _, run, _, _ in candidates], repeats)
        batch256 = _interleaved([lambda run=run: run(many) for _, run, _, _ in candidates], batch_repeats)
    rows = []
    for (name, _, predict, size), b1, b256 in zip(candidates, batch1, batch256):
        progress(f"accuracy of {name}")
        with torch.no_grad():
            accuracy = float((predict() == y_test.numpy()).mean())
        rows.append([name, f"{b1[0] * 1e6:.0f}", f"{b1[1] * 1e6:.0f}", f"{b256[0] * 1e6:.0f}", f"{b256[1] * 1e6:.0f}",
                     f"{256 / b256[0]:,.0f}", f"{batch1[0][0] / b1[0]:.2f}x", f"{batch256[0][0] / b256[0]:.2f}x",
                     f"{size:,}", f"{100 * accuracy:.2f}%"])
    report.notes.append("optimized graph, netshrink int8 with int8 logits: " + " -> ".join(optimized_ops(logits_path)))
    report.notes.append("optimized graph, ONNX Runtime quantize_static:       " + " -> ".join(optimized_ops(ort_static)))
    return rows, report


def optimized_ops(path: Path) -> list[str]:
    """The operator sequence ONNX Runtime actually executes for a model, after its optimizer."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable, no NCHWc
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def _shape(model: nn.Module):
    spec = getattr(model, "spec", None)
    return tuple(spec["in_shape"]) if spec else None
