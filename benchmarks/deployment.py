"""Deployment: latency, throughput, size and accuracy of the zoo models on MNIST across runtimes,
netshrink's int8 export against the baselines, all measured in one run per model.

    python benchmarks/deployment.py                       # mlp, lenet-300-100, lenet-5 (~6 min)
    python benchmarks/deployment.py --models mlp --threads 1

Each model is trained (seeded), then quantized by netshrink (7-bit weights per channel, which the
default int8 export stores exactly and which are correct on CPUs with or without VNNI; 8-bit
activations calibrated on 8 batches of training data; no fine-tuning) and benchmarked with
netshrink.bench. Writes benchmarks/results/deployment.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import netshrink
from netshrink.bench import COLUMNS, benchmark
from netshrink.report import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

EPOCHS = {"mlp": 10, "lenet-300-100": 10, "lenet-5": 6}


BASELINES = ("PyTorch dynamic int8 (Linear)", "ONNX Runtime quantize_dynamic", "ONNX Runtime quantize_static")


def verdict(rows: list[list], dense_accuracy: float, notes: list[str]) -> str:
    """The issue's bars, checked on this run's numbers, for both netshrink exports."""
    by_name = {row[0]: row for row in rows}
    lines = []
    for ours_name in ("netshrink int8 (ONNX Runtime)", "netshrink int8, int8 logits (ONNX Runtime)"):
        ours = by_name[ours_name]
        parts = []
        for column, label in ((1, "batch 1"), (3, "batch 256")):
            best = min(BASELINES, key=lambda name: float(by_name[name][column].replace(",", "")))
            ratio = float(by_name[best][column].replace(",", "")) / float(ours[column].replace(",", ""))
            parts.append(f"{label} {ratio:.2f}x the speed of the fastest baseline ({best})")
        speedup = float(by_name["PyTorch fp32"][3].replace(",", "")) / float(ours[3].replace(",", ""))
        gap = 100 * dense_accuracy - float(ours[-1].rstrip("%"))
        lines.append(f"- {ours_name}: {'; '.join(parts)}; {speedup:.2f}x dense PyTorch at batch 256 (bar 2x); "
                     f"accuracy {gap:+.2f} points below fp32 (bar 0.2).")
    graphs = [n.split(":", 1)[1].strip() for n in notes if n.startswith("optimized graph")]
    if len(graphs) == 2 and graphs[0] == graphs[1]:
        lines.append("- The int8-logits export and quantize_static optimize to the same operator sequence (listed above): "
                     "they run the same kernels, so the timing difference between those two rows is measurement variation.")
    return "\n".join(["Bars (below 1.00x = slower than that baseline):", *lines,
                      "The plain export keeps the logits in float so its predictions equal netshrink's own "
                      "evaluation; the int8-logits export quantizes them as quantize_static does, so the last "
                      "layer runs as an integer kernel too. Differences of a few percent are within this "
                      "machine's run-to-run noise."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(EPOCHS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300, help="timed runs per candidate at batch 1")
    parser.add_argument("--batch-repeats", type=int, default=40, help="timed runs per candidate at batch 256")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "deployment.md")
    args = parser.parse_args()
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    lines = ["# Deployment on CPU: netshrink int8 export vs the alternatives", "",
             command_line(__file__),
             f"{args.threads} threads for every runtime (torch {torch.__version__}). Latency: median and p90 of "
             f"{args.repeats} runs at batch 1 and {args.batch_repeats} runs at batch 256 after warm-up, taken in ten interleaved rounds (each "
             "candidate in turn, after a 50 ms pause so that ONNX Runtime's spinning worker threads are idle) so "
             "drift hits all alike; speed-ups are against PyTorch fp32 in the same run. netshrink int8 = 7-bit per-channel weights (stored "
             "exactly as int8, correct on CPUs with or without VNNI) + 8-bit activations calibrated by "
             "netshrink, exported as QDQ ONNX and run by ONNX Runtime. quantize_static uses the same 1024 "
             "calibration images.", ""]
    for name in args.models:
        model = netshrink.build_model(name)
        netshrink.fit(model, train, epochs=EPOCHS.get(name, 10), seed=0, desc=f"{name} dense")
        dense_accuracy = netshrink.evaluate(model, test)
        netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=train)
        netshrink_accuracy = netshrink.evaluate(model, test)
        rows, report = benchmark(model, test, train, threads=args.threads, repeats=args.repeats,
                                 batch_repeats=args.batch_repeats, progress=lambda s: print(" ", name, s, flush=True))
        lines += [f"## {name}", "", f"PyTorch fp32 test accuracy {100 * dense_accuracy:.2f}%; netshrink's own "
                  f"evaluation of the quantized model {100 * netshrink_accuracy:.2f}%.", "",
                  markdown(COLUMNS, rows), ""]
        lines += [f"- {layer}: {how}" for layer, how in report.layers] + [f"- note: {n}" for n in report.notes] + [""]
        lines += [verdict(rows, dense_accuracy, report.notes), ""]
        print("\n".join(lines[-len(rows) - 6:]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
