"""Which weights to keep: magnitude against sparse variational dropout, at the same keep fractions.

    python benchmarks/learned_pruning.py --cache /tmp/auto
    python benchmarks/learned_pruning.py --models lenet-300-100 --epochs 6

For each model and per-layer keep map, the same recipe runs twice, once per ranking: gradual pruning
while fine-tuning (``--epochs``, distilled from the dense model, images shifted by up to 2 pixels),
fine-tuning (0.6x the epochs), then from that float model, weight sharing at 3 and at 2 bits with
a short fine-tuning each (0.2x). Dense models train on 54,000 MNIST images (cached with
``--cache``, the same files as auto_compression.py); validation is the other 6,000, and test the
10,000 test images. Bytes are the real files on disk.

Writes benchmarks/results/learned_pruning.md.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import netshrink
from auto_compression import dense_model, split  # benchmarks/ (scripts run from this folder's path)
from common import command_line

SETTINGS = {  # per-layer keep fractions; the first of each is what auto chose with magnitude ranking
    "lenet-300-100": [{"fc1": 0.05, "fc2": 0.3}, {"fc1": 0.025, "fc2": 0.05, "fc3": 0.5},
                      {"fc1": 0.012, "fc2": 0.03, "fc3": 0.3}],
    "lenet-5": [{"conv2": 0.2, "fc1": 0.025, "fc2": 0.3}, {"conv1": 0.5, "conv2": 0.1, "fc1": 0.012, "fc2": 0.1}],
}
RESULTS = Path(__file__).parent / "results"


def run(dense, keep: dict, ranking: str, fit_data, epochs: float, seed: int) -> tuple[object, float]:
    tune = {"distill": True, "augment": 2}
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    netshrink.Recipe.from_steps([
        {"prune": {"keep": keep, "targets": list(keep), "ranking": ranking},
         "gradual": {"epochs": epochs, "lr": 1e-3, "every": 50, **tune}},
        {"finetune": {"epochs": 0.6 * epochs, "lr": 5e-4, **tune}}]).run(model, fit_data, seed=seed, progress=False)
    return model, time.perf_counter() - started


def shared(pruned, dense, bits: int, fit_data, epochs: float, seed: int):
    model = copy.deepcopy(pruned)
    netshrink.share(model, bits=bits)
    netshrink.fit(model, fit_data, epochs=0.2 * epochs, lr=2e-4, teacher=netshrink.training.fit.frozen_copy(dense),
                  augment=2, seed=seed, progress=False)
    netshrink.apply(model, netshrink.QuantizeBiases(bits=8))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=float, default=10, help="gradual pruning epochs (default: 10)")
    parser.add_argument("--dense-epochs", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="keep dense models here between runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "learned_pruning.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    fit_data, validation = split(train, 6000, args.seed)
    lines = ["# Which weights to keep: magnitude against sparse variational dropout", "", command_line(__file__),
             f"Machine: 2 CPU threads, torch {torch.__version__}. {args.epochs:g} epochs of gradual pruning, "
             f"{0.6 * args.epochs:g} of fine-tuning, then sharing with {0.2 * args.epochs:g} epochs each; every "
             "fine-tuning distils from the dense model. Accuracies are validation (6,000 held-out training images) "
             "/ test (10,000); bytes are files on disk, biases on an 8-bit grid.", "",
             "| model | keep | ranking | float val / test | 3-bit bytes | 3-bit val / test | 2-bit bytes | "
             "2-bit val / test | time |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        dense, _ = dense_model(name, fit_data, args.dense_epochs, 2, args.seed, args.cache)
        scores = lambda m: f"{100 * netshrink.evaluate(m, validation):.2f}% / {100 * netshrink.evaluate(m, test):.2f}%"
        lines.append(f"| {name} | dense | | {scores(dense)} | | | | | |")
        for keep in SETTINGS[name]:
            for ranking in ("magnitude", "variational"):
                pruned, seconds = run(dense, keep, ranking, fit_data, args.epochs, args.seed)
                row = [name, ", ".join(f"{k} {v:g}" for k, v in keep.items()), ranking, scores(pruned)]
                for bits in (3, 2):
                    model = shared(pruned, dense, bits, fit_data, args.epochs, args.seed)
                    with tempfile.TemporaryDirectory() as folder:
                        size = netshrink.save(model, Path(folder) / "m.nsk")
                    row += [f"{size:,}", scores(model)]
                lines.append("| " + " | ".join(row + [f"{seconds:.0f}s"]) + " |")
                print(lines[-1], flush=True)
                args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
