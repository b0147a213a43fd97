"""The global average pool of an int8 CNN on ONNX Runtime: netshrink's export with the pool as
GlobalAveragePool on the uint8 map, the same export with the pool left as ReduceMean (netshrink
before this rewrite), and ONNX Runtime's own ``quantize_static``, timed on the same architecture.

    python investigations/global_pool.py

resmobile (residual adds, depthwise convolutions, BatchNorm) at full width and with half of each
channel group removed (``remove_units(keep=0.5, multiple_of=8)``, the shape ``deployment.py``
fine-tunes), on Fashion-MNIST images. Latency does not depend on what the weights learned, so
the models are trained one epoch only (enough for realistic activation ranges); accuracy is
``deployment.py``'s business. One interleaved run per model (``netshrink.deploy.bench``'s timing: medians
over alternating rounds), 2 threads, and ONNX Runtime's per-operator profile at batch 256.

Writes investigations/results/global_pool.md.
"""
from __future__ import annotations

import sys
import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import netshrink
from netshrink.deploy import to_onnx as onnx_export
from netshrink.deploy.bench import _interleaved, _Reader, ort_session
from netshrink.deploy.machine import describe
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from common import command_line, operator_table, timing_arguments  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")


def variants(model, calibration: torch.Tensor, folder: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    data = torch.utils.data.TensorDataset(calibration, torch.zeros(len(calibration), dtype=torch.long))
    paths = {"netshrink int8, pool as GlobalAveragePool": folder / "pooled.onnx",
             "netshrink int8, pool as ReduceMean": folder / "reduce.onnx",
             "ONNX Runtime quantize_static": folder / "static.onnx"}
    quantized = copy.deepcopy(model)
    netshrink.quantize(quantized, weight_bits=7, activation_bits=8, calibration=data)
    netshrink.export(quantized, paths["netshrink int8, pool as GlobalAveragePool"], int8=True, calibration=data)
    rewrite = onnx_export._pool_globally
    onnx_export._pool_globally = lambda *args: None  # the export as it was before the rewrite
    try:
        netshrink.export(quantized, paths["netshrink int8, pool as ReduceMean"], int8=True, calibration=data)
    finally:
        onnx_export._pool_globally = rewrite
    netshrink.export(model, folder / "fp32.onnx")
    quantize_static(str(folder / "fp32.onnx"), str(paths["ONNX Runtime quantize_static"]),
                    _Reader([{"input": b.numpy()} for b in calibration.split(64)][:8]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=300, large_repeats=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = netshrink.load_dataset("fashion-mnist", "train")
    images = train.tensors[0]
    dense = netshrink.build_model("resmobile")
    netshrink.fit(dense, torch.utils.data.TensorDataset(*[t[:12000] for t in train.tensors]), epochs=1, lr=2e-3,
                  seed=0, progress=False)
    half, _ = netshrink.remove_units(dense, keep=0.5, multiple_of=8, example_input=images[:2])
    lines = ["# The global average pool of an int8 CNN on ONNX Runtime", "", command_line(__file__),
             f"ONNX Runtime, {args.threads} threads, on {describe()}. Medians over "
             "interleaved rounds (ratios within one run); spread = how far the rounds' medians differ. Every variant "
             "is the same network with the same calibration (512 training images).", ""]
    for title, model in (("resmobile, full width", dense), ("resmobile, half of each channel group removed", half)):
        with tempfile.TemporaryDirectory() as folder:
            paths = variants(model.eval(), images[:512], Path(folder))
            lines += [f"## {title}", "", "| candidate | batch 1 median (ms) | spread | batch 256 median (ms) | spread | "
                      "vs quantize_static, b1 | vs quantize_static, b256 |", "|---|---|---|---|---|---|---|"]
            timings = {}
            for batch, repeats in ((1, args.repeats), (256, args.large_repeats)):
                feed = {"input": images[:batch].numpy()}
                sessions = [ort_session(p, args.threads) for p in paths.values()]
                timings[batch] = _interleaved([lambda s=s: s.run(None, feed) for s in sessions], repeats)
            peer = len(paths) - 1
            for i, name in enumerate(paths):
                one, large = timings[1][i], timings[256][i]
                lines.append(f"| {name} | {1e3 * one.median:.3f} | {100 * one.spread:.0f}% | {1e3 * large.median:.2f} | "
                             f"{100 * large.spread:.0f}% | {timings[1][peer].median / one.median:.2f}x | "
                             f"{timings[256][peer].median / large.median:.2f}x |")
            feed = {"input": images[:256].numpy()}
            lines += ["", "ONNX Runtime's per-operator profile at batch 256 (ms per run):", "",
                      *operator_table(paths, feed, args.threads)]
            lines += ["", "Wall-clock differences smaller than the spread are noise; the profile shows where the time "
                      "went.", ""]
            outputs = [ort_session(p, args.threads).run(None, feed)[0] for p in paths.values()]
            lines += [f"Largest output difference, GlobalAveragePool against ReduceMean: "
                      f"{np.abs(outputs[0] - outputs[1]).max():.3g} (outputs span {np.ptp(outputs[1]):.3g}).", ""]
        print("\n".join(lines[-12:]), flush=True)
    (RESULTS / "global_pool.md").write_text("\n".join(lines))
    print("wrote", RESULTS / "global_pool.md")


if __name__ == "__main__":
    main()
