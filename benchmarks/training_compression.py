"""Training-time compression on MNIST: quantization-aware training (QAT) at 8/4/2 bits, ternary
and binary weights, each against post-training quantization (PTQ) at the same width, with and
without distillation; structured pruning of LeNet-5 with physical removal; and what masks and
fake quantization cost per training step.

    python benchmarks/training_compression.py            # about 20 minutes on 2 cores
    python benchmarks/training_compression.py --models lenet-300-100 --qat-epochs 1

Writes benchmarks/results/training_compression.md.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

import netshrink
from netshrink.compress.methods import QuantizeActivations, QuantizeWeights, apply
from netshrink.compress.methods.structured import remove_units
from netshrink.tables import markdown
from netshrink.training.batches import batches
from netshrink.training.fit import frozen_copy
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)

DENSE_EPOCHS = {"lenet-300-100": 20, "lenet-5": 10}
WIDTHS = [("8-bit", {"bits": 8}), ("4-bit", {"bits": 4}), ("4-bit, learned step (LSQ)", {"bits": 4, "learned_step": True}),
          ("2-bit", {"bits": 2}), ("2-bit, learned step (LSQ)", {"bits": 2, "learned_step": True}), ("ternary (TWN)", {"bits": 2, "scheme": "ternary"}), ("binary (XNOR scale)", {"bits": 1})]


def error(model, test) -> float:
    return 100 * (1 - netshrink.evaluate(model, test))


def quantized_copy(dense, settings: dict, train) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    apply(model, QuantizeWeights(**settings))
    apply(model, QuantizeActivations(bits=8), calibration=train)
    return model


def qat_rows(name: str, dense, train, test, epochs: float) -> list[list]:
    fp32 = error(dense, test)
    teacher = frozen_copy(dense)
    rows = [["fp32", f"{fp32:.2f}%", "", "", ""]]
    for label, settings in WIDTHS:
        ptq = error(quantized_copy(dense, {k: v for k, v in settings.items() if k != "learned_step"}, train), test)
        results = []
        for distill in (False, True):
            model = quantized_copy(dense, settings, train)
            netshrink.fit(model, train, epochs=epochs, lr=5e-4, augment=2, seed=1,
                          teacher=teacher if distill else None, desc=f"{name} {label}{' +KD' if distill else ''}")
            results.append(error(model, test))
        rows.append([f"w {label}, a 8-bit", f"{ptq:.2f}%", f"{results[0]:.2f}%", f"{results[1]:.2f}%",
                     f"{min(results) - fp32:+.2f}"])
        print(name, rows[-1], flush=True)
    return rows


def median_latency(model, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(max(3, repeats // 10)):
            model(x)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def structured_rows(dense, train, test, epochs: float) -> list[list]:
    example = train.tensors[0][:2]
    small, report = remove_units(dense, keep={"conv1": 0.5, "conv2": 0.5, "fc1": 0.5}, example_input=example)
    before = error(small, test)
    netshrink.fit(small, train, epochs=epochs, lr=5e-4, augment=2, seed=2, teacher=frozen_copy(dense),
                  desc="structured fine-tune")
    rows = []
    for label, model, err in (("dense LeNet-5", dense, error(dense, test)),
                              ("50% of conv channels and fc1 neurons removed, before fine-tuning", small, before),
                              (f"same, after {epochs:g} epochs of fine-tuning with distillation", small, error(small, test))):
        params = sum(p.numel() for p in model.parameters())
        one = median_latency(model, test.tensors[0][:1], 300)
        many = median_latency(model, test.tensors[0][:256], 40)
        rows.append([label, f"{params:,}", f"{err:.2f}%", f"{one * 1e6:.0f}", f"{many * 1e3:.2f}"])
    rows.append(["report", "; ".join(f"{layer}: {detail}" for layer, detail in report.changed), "", "", ""])
    return rows


def step_cost_rows(name: str, dense, train, steps: int = 200) -> list[list]:
    """Median seconds per training step (forward, backward, Adam) with and without compression."""
    variants = {"plain": lambda m: None,
                "prune mask": lambda m: netshrink.prune(m, keep=0.1),
                "mask + 4-bit weights + 8-bit activations": lambda m: (
                    netshrink.prune(m, keep=0.1), netshrink.quantize(m, weight_bits=4, activation_bits=8, calibration=train))}
    timings = {}
    for label, setup in variants.items():
        model = copy.deepcopy(dense)
        setup(model)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        samples = []
        for i, (x, y) in enumerate(batches(train, 128, shuffle=True, generator=torch.Generator().manual_seed(0))):
            if i >= steps:
                break
            started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples.append(time.perf_counter() - started)
        timings[label] = float(np.median(samples[10:]))
    return [[name, label, f"{seconds * 1e3:.2f}", f"{seconds / timings['plain']:.2f}x"] for label, seconds in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DENSE_EPOCHS))
    parser.add_argument("--qat-epochs", type=float, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "training_compression.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    lines = ["# Training-time compression on MNIST", "",
             command_line(__file__),
             f"2 threads, torch {torch.__version__}. Dense models: Adam, cosine schedule, random shifts of up to 2 "
             f"pixels, seed 0. QAT: {args.qat_epochs:g} epochs from the dense model, lr 5e-4, straight-through "
             "estimator; weights per channel, activations 8-bit calibrated min/max. +KD: distillation from the "
             "dense model (T=4, alpha=0.7). 'best vs fp32' is the better of QAT and QAT+KD against fp32, in points.", ""]
    step_rows = []
    for name in args.models:
        dense = netshrink.build_model(name)
        netshrink.fit(dense, train, epochs=DENSE_EPOCHS.get(name, 10), augment=2, seed=0, desc=f"{name} dense")
        lines += [f"## {name}: test error", "",
                  markdown(["weights / activations", "PTQ", "QAT", "QAT + distillation", "best vs fp32 (pts)"],
                           qat_rows(name, dense, train, test, args.qat_epochs)), ""]
        if name == "lenet-5":
            lines += ["## LeNet-5: structured pruning with physical removal", "",
                      "Latency: PyTorch, median of 300 runs at batch 1 and 40 at batch 256, in this run.", "",
                      markdown(["model", "parameters", "test error", "batch 1 (us)", "batch 256 (ms)"],
                               structured_rows(dense, train, test, args.qat_epochs)), ""]
        step_rows += step_cost_rows(name, dense, train)
    lines += ["## Cost of a fine-tuning step with compression in place", "",
              "Median over 190 steps (batch 128, forward + backward + Adam), same run.", "",
              markdown(["model", "transforms", "ms per step", "vs plain"], step_rows), ""]
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
