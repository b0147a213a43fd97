"""netshrink.auto against uniform settings on a ResNet/MobileNet-style CNN: the zoo's ``resmobile``
(BatchNorm, residual adds, depthwise convolutions) on Fashion-MNIST, test accuracy against bytes on disk.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_pareto.py                    # about 45 minutes on 2 cores
    python benchmarks/auto_pareto.py --train 3000 --validation 300 --dense-epochs 1 --epochs 0.2 --output /tmp/p.md

The dense model trains on the training images less 2,000 held out for validation: auto scores its
choices and trials on those, and the test set only fills the table. **Uniform**: every layer gets the
same keep fraction and the same shared bits, run through the very recipe auto runs for a policy
(gradual pruning with distillation, fine-tuning, sharing, fine-tuning, biases on an 8-bit grid) with
the same epochs. **Auto**: ``netshrink.auto`` with ``max_bytes`` set to each uniform file's size,
its sensitivity measured once and reused. A uniform point is dominated when an auto point has at most
its bytes and at least its test accuracy.

Writes benchmarks/results/auto_pareto.md and auto_pareto.png.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import netshrink
from netshrink.search.auto import Choice, policy_steps, searched_layers
from auto_compression import dense_model, split  # benchmarks/auto_compression.py
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)

RESULTS = Path(__file__).parent / "results"
UNIFORM = ((0.5, 4), (0.35, 4), (0.25, 3), (0.15, 3))  # (keep, shared bits) for every layer
KEEPS = (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1)
BITS = (None, 8, 5, 4, 3)
LR = 2e-3


def file_bytes(model, steps) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return netshrink.save(model, Path(folder) / "m.nsk", recipe=steps)


def uniform(dense, keep: float, bits: int, train, args):
    """Every layer auto would choose for, the same setting, through auto's own recipe."""
    layers = searched_layers(dense)
    policy = {n: Choice(keep, bits, 0, 0.0) for n in layers}
    biased = tuple(n for n, m in layers.items() if getattr(m, "bias", None) is not None)
    steps = policy_steps(policy, args.epochs, LR, args.augment, True, biased, 8)
    model = copy.deepcopy(dense)
    netshrink.Recipe.from_steps(copy.deepcopy(steps), "uniform").run(model, train, seed=args.seed)
    return model, steps


def resmobile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that start from a dense resmobile on Fashion-MNIST."""
    parser.add_argument("--dense-epochs", type=float, default=6)
    parser.add_argument("--train", type=int, help="use only this many training images (a quick look)")
    parser.add_argument("--validation", type=int, default=2000, help="training images held out for auto's scores")
    parser.add_argument("--augment", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="keep the dense model here between runs")
    parser.add_argument("--epochs", type=float, default=2, help="fine-tuning epochs per run (uniform and auto)")


def resmobile_on_fashion(args):
    """(dense resmobile, the images it trained on, the held-out validation images, the test set)."""
    train, test = netshrink.load_dataset("fashion-mnist", "train"), netshrink.load_dataset("fashion-mnist", "test")
    fit_data, validation = split(train, args.validation, args.seed)
    if args.train:
        fit_data = TensorDataset(*(t[:args.train] for t in fit_data.tensors))
    dense, _ = dense_model("resmobile", fit_data, args.dense_epochs, args.augment, args.seed, args.cache)
    return dense, fit_data, validation, test


def plot_fronts(points: dict[str, list[tuple[float, float, str]]], path: Path, xlabel: str, title: str,
                dense: tuple[float | None, float]) -> None:
    """Test accuracy against a cost (x), a line per kind of run (the first drawn gray, labels
    below), and the dense model as a point, or as a line where its cost is off the chart (None)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, ((label, rows), (color, marker)) in enumerate(zip(points.items(), (("tab:gray", "s"), ("tab:blue", "o")))):
        rows = sorted(rows)
        ax.plot([r[0] for r in rows], [100 * r[1] for r in rows], marker=marker, color=color, label=label)
        for x, accuracy, name in rows:
            ax.annotate(name, (x, 100 * accuracy), textcoords="offset points", xytext=(5, -11 if i == 0 else 6),
                        fontsize=7, color=color)
    if dense[0] is None:
        ax.axhline(100 * dense[1], color="black", linestyle=":", linewidth=1, label="dense fp32")
    else:
        ax.scatter([dense[0]], [100 * dense[1]], color="black", marker="D", label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    resmobile_arguments(parser)
    parser.add_argument("--trials", type=int, default=3, help="auto runs per budget at most")
    parser.add_argument("--output", type=Path, default=RESULTS / "auto_pareto.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    dense, fit_data, validation, test = resmobile_on_fashion(args)
    dense_accuracy = netshrink.evaluate(dense, test)
    dense_bytes = 4 * sum(p.numel() for p in dense.state_dict().values() if p.is_floating_point())
    rows, points = [], {"uniform (every layer the same)": [], "netshrink auto (max_bytes = the uniform file's)": []}
    table = None
    for keep, bits in UNIFORM:
        label = f"keep {keep:g}, {bits}-bit"
        model, steps = uniform(dense, keep, bits, fit_data, args)
        size, accuracy = file_bytes(model, steps), netshrink.evaluate(model, test)
        print(f"uniform {label}: {size:,} B, test {100 * accuracy:.2f}%", flush=True)
        found = netshrink.auto(dense, fit_data, validation=validation, max_bytes=size, epochs=args.epochs, lr=LR,
                               trials=args.trials, keeps=KEEPS, bits=BITS, augment=args.augment, seed=args.seed,
                               sensitivity=table)
        table = found.sensitivity
        auto_size, auto_accuracy = file_bytes(found.model, found.steps), netshrink.evaluate(found.model, test)
        print(f"auto at {size:,} B: {auto_size:,} B, test {100 * auto_accuracy:.2f}%", flush=True)
        points["uniform (every layer the same)"].append((size, accuracy, label))
        points["netshrink auto (max_bytes = the uniform file's)"].append((auto_size, auto_accuracy, f"auto {len(rows) + 1}"))
        dominated = auto_size <= size and auto_accuracy >= accuracy
        policy = "; ".join(f"{n}: {c.describe()}" for n, c in found.policy.items())
        rows.append(f"| {label} | {size:,} ({dense_bytes / size:.1f}x) | {100 * accuracy:.2f}% | auto {len(rows) + 1}: "
                    f"{auto_size:,} ({dense_bytes / auto_size:.1f}x) | {100 * auto_accuracy:.2f}% | "
                    f"{100 * (auto_accuracy - accuracy):+.2f} pts | {'yes' if dominated else 'NO'} | "
                    f"{len(found.trials)} | {policy} |")
    picture = args.output.with_suffix(".png")
    plot_fronts({label: [(size / 1000, accuracy, name) for size, accuracy, name in rows] for label, rows in points.items()},
                picture, "file on disk (kB)", "resmobile on Fashion-MNIST: netshrink auto vs uniform settings",
                (None, dense_accuracy))
    # Fewer bytes at the same accuracy: for each uniform point, the smallest auto file at least as accurate.
    fewer = []
    for size, accuracy, label in points["uniform (every layer the same)"]:
        better = [s for s, a, _ in points["netshrink auto (max_bytes = the uniform file's)"] if a >= accuracy]
        fewer.append(f"- {label}: {size:,} B at {100 * accuracy:.2f}%; the smallest auto file at least as accurate: "
                     + (f"{min(better):,} B ({100 * (1 - min(better) / size):.0f}% fewer bytes)" if better else "none"))
    text = "\n".join([
        "# netshrink auto against uniform settings: resmobile on Fashion-MNIST", "",
        command_line(__file__),
        f"Machine: 2 CPU threads, torch {torch.__version__}. Dense resmobile ({dense_bytes // 4:,} parameters, "
        f"{dense_bytes:,} B fp32) trained {args.dense_epochs:g} epochs on {len(fit_data):,} images: test accuracy "
        f"{100 * dense_accuracy:.2f}%. Auto scores on {args.validation:,} held-out training images; accuracies below are on the "
        f"10,000 test images. Every run (uniform or auto) fine-tunes {args.epochs:g} epochs with distillation, through "
        "the same recipe. Choices: keep "
        f"{', '.join(f'{k:g}' for k in KEEPS)}; shared bits {', '.join('float' if b is None else str(b) for b in BITS)}. "
        f"Total time {(time.perf_counter() - started) / 60:.0f} min.", "",
        "**Same bytes**: auto with `max_bytes` set to each uniform file's size, against that uniform setting.", "",
        "| uniform setting | uniform bytes | uniform test accuracy | auto bytes | auto test accuracy | auto - uniform | "
        "dominated | auto trials | auto policy |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "**Same accuracy**:", "", *fewer, "",
        f"![accuracy vs bytes]({picture.name})", ""])
    write_results(args.output, text.splitlines())


if __name__ == "__main__":
    main()
