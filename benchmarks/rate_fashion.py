"""Rate-aware training against netshrink auto on a ResNet/MobileNet-style CNN: the zoo's ``resmobile``
(BatchNorm, residual adds, depthwise convolutions) on Fashion-MNIST, test accuracy against bytes on disk.

    apt-get install dataset-fashion-mnist
    python benchmarks/rate_fashion.py --cache /tmp/pareto          # about 45 minutes on 2 cores
    python benchmarks/rate_fashion.py --train 3000 --validation 300 --dense-epochs 1 --epochs 0.2 --output /tmp/r.md

The dense model is the one ``auto_pareto.py`` starts from (same split, seed and training; shared
``--cache``). **Rate**: for each trade-off, the recipe

    - rate: {tradeoff: T}
      gradual: {epochs: E, lr: 0.002, distill: true, augment: 2}
    - unused: {}
    - bias: {bits: 8}

from the dense model, E the same training epochs every auto trial gets. **Auto**: ``netshrink.auto``
with ``max_bytes`` set to each rate file's size (its sensitivity measured once and reused), auto's
current policies (per-layer pruning and weight sharing). A point is dominated when a point of the
other kind has at most its bytes and at least its test accuracy. Choices are scored on the 2,000
held-out training images; the test set only fills the table.

Writes benchmarks/results/rate_fashion.md and rate_fashion.png.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import netshrink
from auto_pareto import BITS, KEEPS, LR, file_bytes, plot_fronts, resmobile_arguments, resmobile_on_fashion
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)

RESULTS = Path(__file__).parent / "results"


def rate_steps(tradeoff: float, epochs: float, augment: int) -> list[dict]:
    return [{"rate": {"tradeoff": tradeoff}, "gradual": {"epochs": epochs, "lr": LR, "distill": True, "augment": augment}},
            {"unused": {}},
            {"bias": {"bits": 8}}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    resmobile_arguments(parser)
    parser.add_argument("--tradeoffs", type=float, nargs="+", default=[0.003, 0.01, 0.03],
                        help="rate-aware trade-offs (loss per kilobyte), one run each")
    parser.add_argument("--trials", type=int, default=2, help="auto runs per budget at most")
    parser.add_argument("--output", type=Path, default=RESULTS / "rate_fashion.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    dense, fit_data, validation, test = resmobile_on_fashion(args)
    dense_accuracy = netshrink.evaluate(dense, test)
    dense_bytes = 4 * sum(p.numel() for p in dense.state_dict().values() if p.is_floating_point())
    rate_label, auto_label = "netshrink rate-aware training", "netshrink auto (max_bytes = the rate file's)"
    points = {auto_label: [], rate_label: []}
    rows, table = [], None
    for tradeoff in args.tradeoffs:
        steps = rate_steps(tradeoff, args.epochs, args.augment)
        model = copy.deepcopy(dense)
        clock = time.perf_counter()
        netshrink.Recipe.from_steps(copy.deepcopy(steps), "rate").run(model, fit_data, seed=args.seed)
        rate_seconds = time.perf_counter() - clock
        size, accuracy = file_bytes(model, steps), netshrink.evaluate(model, test)
        print(f"rate {tradeoff:g}: {size:,} B, test {100 * accuracy:.2f}% ({rate_seconds:.0f} s)", flush=True)
        clock = time.perf_counter()
        found = netshrink.auto(dense, fit_data, validation=validation, max_bytes=size, epochs=args.epochs, lr=LR,
                               trials=args.trials, keeps=KEEPS, bits=BITS, augment=args.augment, seed=args.seed,
                               sensitivity=table)
        auto_seconds = time.perf_counter() - clock
        table = found.sensitivity
        auto_size, auto_accuracy = file_bytes(found.model, found.steps), netshrink.evaluate(found.model, test)
        print(f"auto at {size:,} B: {auto_size:,} B, test {100 * auto_accuracy:.2f}%", flush=True)
        points[rate_label].append((size, accuracy, f"rate {tradeoff:g}"))
        points[auto_label].append((auto_size, auto_accuracy, f"auto {len(rows) + 1}"))
        policy = "; ".join(f"{n}: {c.describe()}" for n, c in found.policy.items())
        rows.append((tradeoff, size, accuracy, rate_seconds, auto_size, auto_accuracy, auto_seconds, len(found.trials), policy))

    def dominated(size: int, accuracy: float, others: list) -> bool:
        return any(s <= size and a >= accuracy for s, a, _ in others)

    lines = []
    for tradeoff, size, accuracy, rate_seconds, auto_size, auto_accuracy, auto_seconds, trials, policy in rows:
        lines.append(f"| {tradeoff:g} | {size:,} ({dense_bytes / size:.1f}x) | {100 * accuracy:.2f}% | {rate_seconds:.0f} s | "
                     f"{'yes' if dominated(size, accuracy, points[auto_label]) else 'no'} | "
                     f"{auto_size:,} ({dense_bytes / auto_size:.1f}x) | {100 * auto_accuracy:.2f}% | {auto_seconds:.0f} s "
                     f"({trials} trials) | {'yes' if dominated(auto_size, auto_accuracy, points[rate_label]) else 'no'} | "
                     f"{100 * (accuracy - auto_accuracy):+.2f} pts | {policy} |")
    picture = args.output.with_suffix(".png")
    plot_fronts({label: [(size / 1000, accuracy, name) for size, accuracy, name in found_points]
                 for label, found_points in points.items()},
                picture, "file on disk (kB)", "resmobile on Fashion-MNIST: rate-aware training vs netshrink auto",
                (None, dense_accuracy))
    text = "\n".join([
        "# Rate-aware training against netshrink auto: resmobile on Fashion-MNIST", "",
        command_line(__file__),
        f"Machine: 2 CPU threads, torch {torch.__version__}. Dense resmobile ({dense_bytes // 4:,} parameters, "
        f"{dense_bytes:,} B fp32) trained {args.dense_epochs:g} epochs on {len(fit_data):,} images: test accuracy "
        f"{100 * dense_accuracy:.2f}%. Auto scores on {args.validation:,} held-out training images; accuracies below are "
        f"on the 10,000 test images. Rate-aware training runs {args.epochs:g} epochs from the dense model; each auto "
        f"trial fine-tunes {args.epochs:g} epochs in all, both with distillation. Auto's choices: keep "
        f"{', '.join(f'{k:g}' for k in KEEPS)}; shared bits {', '.join('float' if b is None else str(b) for b in BITS)}. "
        f"Total time {(time.perf_counter() - started) / 60:.0f} min (auto's first search includes measuring the "
        "sensitivity table the later ones reuse).", "",
        "| rate trade-off (loss per KB) | rate bytes | rate test accuracy | rate time | rate dominated | auto bytes | "
        "auto test accuracy | auto time | auto dominated | rate - auto | auto policy |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *lines, "",
        f"![accuracy vs bytes]({picture.name})", ""])
    write_results(args.output, text.splitlines())


if __name__ == "__main__":
    main()
