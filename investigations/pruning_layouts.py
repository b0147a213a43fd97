"""Which channels to remove for speed: resmobile's structured-pruning layouts timed on ONNX Runtime
before any fine-tuning, against ONNX Runtime quantize_static of the dense model, in one interleaved run.

    apt-get install dataset-fashion-mnist
    python investigations/pruning_layouts.py --cache /tmp/dep     # reuses deployment.py's dense resmobile

Latency depends on the layout, not on the weights' values, so the layouts are timed untrained
(their accuracy before fine-tuning says nothing and is left out): each is netshrink.remove_units
on the dense model (channel counts multiples of 8), 7-bit weights and calibrated 8-bit
activations, exported as ONNX Runtime fp32 and int8; a layout's latency is the faster of the two.
Uniform keep fractions remove the same share everywhere; the cheapest channels to keep are not
where the multiply-accumulates are. deployment.py fine-tunes the layout chosen here.
"""
from __future__ import annotations

import sys
import argparse
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.deploy.machine import describe
from netshrink.compress.methods.structured import unit_groups
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from common import command_line, macs, timing_arguments  # benchmarks/common.py
from deployment import CNNS, cached, trained  # the dense model deployment.py fine-tunes from

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore")

GROUPS = ("stem.conv", "block1.conv", "block1b.conv", "expand.conv", "separable_pw.conv")
# Keep fractions per group, in GROUPS' order (1/3 and 2/3 written 0.34 and 0.67 so the rounding to
# multiples of 8 lands on 16 and 32 of 48).
LAYOUTS = {
    "uniform 0.5": (0.5,) * 5,
    "uniform 0.67": (0.67,) * 5,
    "stem and expand dense, rest 0.5": (1.0, 0.5, 0.5, 1.0, 0.5),
    "2/3, block1 1/3": (0.67, 0.34, 0.67, 0.67, 0.67),
    "2/3, block1 1/3, separable_pw dense": (0.67, 0.34, 0.67, 0.67, 1.0),
    "2/3, block1 1/3, expand dense": (0.67, 0.34, 0.67, 1.0, 0.67),
    "2/3, block1 1/3, block1b dense": (0.67, 0.34, 1.0, 0.67, 0.67),
    "2/3, block1 1/2, separable_pw dense": (0.67, 0.5, 0.67, 0.67, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timing_arguments(parser, repeats=150, large_repeats=25)
    parser.add_argument("--cache", type=Path, help="deployment.py's cache: its dense resmobile is reused")
    args = parser.parse_args()
    data, epochs = CNNS["resmobile"][:2]
    train, test = netshrink.load_dataset(data, "train"), netshrink.load_dataset(data, "test")
    dense = cached(args.cache, "resmobile-dense.nsk", lambda: trained("resmobile", epochs, train))
    calibration = torch.utils.data.TensorDataset(train.tensors[0][:512], train.tensors[1][:512])
    example = train.tensors[0][:2]
    units = {name: group["units"] for name, group in unit_groups(dense, example).items()}
    layouts, rows = {}, {}
    for label, fractions in LAYOUTS.items():
        model, _ = netshrink.remove_units(dense, keep=dict(zip(GROUPS, fractions)), multiple_of=8, example_input=example)
        kept = {name: group["units"] for name, group in unit_groups(model, example).items()}
        netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=calibration)
        rows[label] = ["/".join(str(kept[g]) for g in GROUPS), f"{macs(model, example) / 1e6:.2f}M"]
        layouts[label] = model
    result = netshrink.benchmark(dense, test, compressed=layouts, calibration=calibration, threads=args.threads,
                                 repeats=args.repeats, large_repeats=args.large_repeats,
                                 progress=lambda s: print(s, flush=True))
    peer = next(r for r in result.rows if r.candidate.name == "ONNX Runtime quantize_static")
    table = []
    for label, (channels, layout_macs) in rows.items():
        runs = [r for r in result.rows if r.candidate.name.startswith(f"netshrink {label} (")]
        cells = [channels, layout_macs]
        for large in (False, True):
            best = min(runs, key=lambda r: r.latency(large))
            timing = best.large if large else best.small
            runtime = best.candidate.name.rsplit("(ONNX Runtime ", 1)[1].rstrip(")")
            cells += [f"{1e3 * timing.median:.3f} ({runtime}, spread {100 * timing.spread:.0f}%)",
                      f"{peer.latency(large) / timing.median:.2f}x"]
        table.append([label, *cells])
    table.sort(key=lambda row: -float(row[-1].rstrip("x")))
    header = ["layout", f"channels kept ({'/'.join(str(units[g]) for g in GROUPS)} dense)", "MACs per image",
              "batch 1 ms", "vs quantize_static b1", "batch 256 ms", "vs quantize_static b256"]
    lines = ["# Structured-pruning layouts of resmobile: latency on ONNX Runtime, untrained", "",
             command_line(__file__),
             f"torch {torch.__version__}, {args.threads} threads, on {describe()}. "
             f"Medians over interleaved rounds in one run; ONNX Runtime quantize_static of the dense model "
             f"(9.70M MACs): {1e3 * peer.latency(False):.3f} ms at batch 1, {1e3 * peer.latency(True):.2f} ms at "
             f"batch 256. Groups: {', '.join(GROUPS)} (block1b.conv also sets shortcut.conv and project.conv: the "
             "residual stream). Sorted by speed at batch 256.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(row) + " |" for row in table), "",
             *(f"- **warning**: {w}" for w in result.warnings)]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pruning_layouts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
