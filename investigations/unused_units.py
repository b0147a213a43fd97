"""Weights that feed nothing: how much of a pruned model's file PruneUnused takes away, exactly.

    python investigations/unused_units.py --cache /tmp/auto

LeNet-5 and LeNet-300-100 trained on MNIST (as benchmarks/auto_compression.py trains them, read
from its cache when there), pruned per layer by magnitude to the keeps auto's policies use, shared
at 2 bits, then `PruneUnused`: the units no later layer reads, the kept weights that fed them, the
file before and after, and the largest output difference on the test set (exact: 0).
Writes investigations/results/unused_units.md.
"""
from __future__ import annotations

import sys
import argparse
from pathlib import Path

import torch

import netshrink
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from auto_compression import dense_model, split  # benchmarks/
from common import command_line
from netshrink.store.artifact import to_bytes

POLICIES = {
    "lenet-5": {"conv1": 0.5, "conv2": 0.1, "fc1": 0.012, "fc2": 0.1},
    "lenet-300-100": {"fc1": 0.035, "fc2": 0.08, "fc3": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="dense models trained by auto_compression.py")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "unused_units.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    fit_data, _ = split(train, 6000, 0)
    x = test.tensors[0]
    lines = ["# Weights that feed nothing: PruneUnused on pruned LeNets", "", command_line(__file__),
             "Magnitude pruning per layer to the keeps below, 2-bit sharing, biases as trained; no fine-tuning "
             "(the step changes no output, so fine-tuning would not change what it finds). Bytes are the whole "
             "file.", "",
             "| model | keeps | units no layer reads | kept weights feeding them | file before | file after | smaller "
             "| largest output change (10,000 test images) |", "|---|---|---|---|---|---|---|---|"]
    for name, keeps in POLICIES.items():
        model, _ = dense_model(name, fit_data, 30, 2, 0, args.cache)
        netshrink.apply(model, netshrink.Prune(keep=keeps, targets=tuple(keeps)))
        netshrink.apply(model, netshrink.ShareWeights(bits=2, targets=tuple(keeps)))
        model.eval()
        kept = sum(int((model.get_submodule(n).weight != 0).sum()) for n in keeps)
        before_bytes = len(to_bytes(model))
        with torch.no_grad():
            before = model(x)
        report = netshrink.apply(model, netshrink.PruneUnused(), calibration=x[:2])
        with torch.no_grad():
            change = (model(x) - before).abs().max().item()
        after_kept = sum(int((model.get_submodule(n).weight != 0).sum()) for n in keeps)
        after_bytes = len(to_bytes(model))
        units = "; ".join(f"{layer}: {detail.split(' read')[0]}" for layer, detail in report.changed) or "none"
        lines.append(f"| {name} | {', '.join(f'{k} {v:g}' for k, v in keeps.items())} | {units} | "
                     f"{kept - after_kept:,} of {kept:,} | {before_bytes:,} | {after_bytes:,} | "
                     f"{100 * (1 - after_bytes / before_bytes):.1f}% | {change:.1e} |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
