"""netshrink.auto under a latency budget against uniform structured pruning: the zoo's ``resmobile``
(BatchNorm, residual adds, depthwise convolutions) on Fashion-MNIST, test accuracy against ONNX
Runtime latency.

    apt-get install dataset-fashion-mnist
    python benchmarks/auto_latency.py --cache /tmp/latency          # about 40 minutes on 2 cores
    python benchmarks/auto_latency.py --train 3000 --validation 300 --dense-epochs 1 --epochs 0.2 --output /tmp/l.md

The dense model trains on the training images less 2,000 held out for validation: auto scores its
choices and trials on those; the test set only fills the table. **Uniform**: every group keeps the
same share of its units (``remove_units``), then fine-tunes with distillation for the same epochs as
auto's trials (the recipe auto runs for a policy). **Auto**: ``netshrink.auto`` with ``max_latency``
at budgets between the dense latency and the fastest it predicts, measured once and reused. Latency is
ONNX Runtime's at ``--batch`` images, 2 threads, the models exported as ``--runtime`` (int8: what
``netshrink export --int8`` writes); the table's latencies come from one interleaved measurement
of every final model, after the searches, so they compare with each other. A uniform point is
dominated when an auto point is at least as fast (within the measurement) and at least as accurate.

Writes benchmarks/results/auto_latency.md and auto_latency.png.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import netshrink
from netshrink.search.latency import UnitChoice, example_batch, ort_latencies, unit_steps
from netshrink.deploy.machine import describe
from netshrink.compress.methods.structured import unit_groups
from auto_pareto import plot_fronts, resmobile_arguments, resmobile_on_fashion  # benchmarks/auto_pareto.py
from common import command_line, macs, write_results  # benchmarks/common.py (scripts run from this folder's path)

RESULTS = Path(__file__).parent / "results"
UNIFORM = (0.75, 0.5, 0.35)  # share of units every group keeps
# auto's max_latency: this far from the dense model's latency towards the fastest auto predicts (every
# group at its fewest units), each measured in the first search
BUDGETS = (0.3, 0.6, 0.9)
LR = 2e-3


def uniform(dense, keep: float, train, example, args):
    """Every group keeps ``keep`` of its units, through the recipe auto runs for a policy."""
    policy = {group: UnitChoice(keep, 0, 0.0, 0.0) for group in unit_groups(dense, example[:2])}
    model = copy.deepcopy(dense)
    netshrink.Recipe.from_steps(unit_steps(policy, args.epochs, LR, args.augment), "uniform").run(model, train, seed=args.seed)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    resmobile_arguments(parser)
    parser.add_argument("--trials", type=int, default=2, help="auto runs per budget at most")
    parser.add_argument("--batch", type=int, default=256, help="images per timed batch")
    parser.add_argument("--runtime", choices=("fp32", "int8"), default="int8")
    parser.add_argument("--repeats", type=int, default=60, help="timed runs per model in the final measurement")
    parser.add_argument("--output", type=Path, default=RESULTS / "auto_latency.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    dense, fit_data, validation, test = resmobile_on_fashion(args)
    example = example_batch(validation, args.batch)
    calibration = TensorDataset(example_batch(fit_data, 256)) if args.runtime == "int8" else None

    models = {}
    for keep in UNIFORM:
        models[f"uniform keep {keep:g}"] = uniform(dense, keep, fit_data, example, args)
        print(f"uniform keep {keep:g}: test {100 * netshrink.evaluate(models[f'uniform keep {keep:g}'], test):.2f}%", flush=True)
    # The latencies are only known once measured: a first search with a budget nothing misses measures them.
    table = netshrink.auto(dense, fit_data, validation=validation, max_latency=1e3, latency_batch=args.batch,
                           runtime=args.runtime, threads=2, trials=1, epochs=args.epochs, lr=LR, augment=args.augment,
                           seed=args.seed).sensitivity
    dense_s = next(c.latency for c in next(iter(table.values())) if c.keep >= 1)
    fastest_s = dense_s + sum(min(c.latency for c in choices) - dense_s for choices in table.values())
    searches, refusals = [], []
    for fraction in BUDGETS:
        budget = dense_s - fraction * (dense_s - fastest_s)
        name = f"auto {1e3 * budget:.1f} ms"
        try:
            found = netshrink.auto(dense, fit_data, validation=validation, max_latency=budget, latency_batch=args.batch,
                                   runtime=args.runtime, threads=2, trials=args.trials, epochs=args.epochs, lr=LR,
                                   augment=args.augment, seed=args.seed, sensitivity=table, progress=False)
        except netshrink.NetshrinkError as refused:  # a budget below the smallest model, timed whole: said, not hidden
            refusals.append(f"- {name}: refused by auto: {refused}")
            print(refusals[-1], flush=True)
            continue
        models[name] = found.model
        searches.append((name, fraction, found))
        print(f"{name}: {1e3 * found.latency:.3f} ms ({'met' if found.met else 'missed'}), test "
              f"{100 * netshrink.evaluate(found.model, test):.2f}%", flush=True)

    # Every final model in one interleaved measurement, so that their latencies compare.
    names = ["dense", *models]
    timings = dict(zip(names, ort_latencies([dense, *models.values()], example, 2, args.repeats, calibration)))
    accuracy = {"dense": netshrink.evaluate(dense, test), **{n: netshrink.evaluate(m, test) for n, m in models.items()}}
    x = test.tensors[0][:1]
    work = {"dense": macs(dense, x), **{n: macs(m, x) for n, m in models.items()}}
    rows = []
    for name in names:
        t = timings[name]
        rows.append(f"| {name} | {1e3 * t.median:.3f} | {100 * t.spread:.0f}% | {timings['dense'].median / t.median:.2f}x | "
                    f"{work[name] / 1e6:.2f}M | {100 * accuracy[name]:.2f}% |")
    dominance = []
    for keep in UNIFORM:
        name = f"uniform keep {keep:g}"
        beaten = [a for a, _, _ in searches if timings[a].median <= timings[name].median * (1 + timings[name].spread)
                  and accuracy[a] >= accuracy[name]]
        dominance.append(f"- {name} ({1e3 * timings[name].median:.3f} ms, {100 * accuracy[name]:.2f}%): "
                         + (f"dominated by {', '.join(beaten)}" if beaten else "not dominated"))
    search_rows = []
    for name, fraction, found in searches:
        policy = "; ".join(f"{g}: {c.describe()}" for g, c in found.policy.items())
        chosen = next(t for t in found.trials if t["latency"] == found.latency)
        search_rows.append(f"| {name} | {1e3 * found.budget['max_latency']:.3f} | {'yes' if found.met else 'NO'} | "
                           f"{len(found.trials)} | {1e3 * chosen['predicted_latency']:.3f} | {1e3 * found.latency:.3f} | "
                           f"{100 * found.accuracy:.2f}% | {policy} |")
    picture = args.output.with_suffix(".png")
    dense_point = (1e3 * timings["dense"].median, accuracy["dense"])
    fronts = {label: [(1e3 * timings[n].median, accuracy[n], n.split(" ", 1)[1]) for n in names if n.startswith(kind)]
              for label, kind in (("uniform (every group keeps the same share)", "uniform"),
                                  ("netshrink auto (max_latency)", "auto"))}
    plot_fronts(fronts, picture, "ONNX Runtime latency (ms per batch)",
                f"resmobile on Fashion-MNIST, ONNX Runtime {args.runtime}, batch {args.batch}, 2 threads", dense_point)
    groups = unit_groups(dense, example[:2])
    described = ", ".join(f"{g} ({len(i['layers'])} layers, {i['units']} units)" for g, i in groups.items())
    text = "\n".join([
        "# netshrink auto under a latency budget against uniform structured pruning: resmobile on Fashion-MNIST", "",
        command_line(__file__),
        f"Machine: 2 CPU threads, torch {torch.__version__}, {describe()}. Dense resmobile trained "
        f"{args.dense_epochs:g} epochs on {len(fit_data):,} images; auto scores on {args.validation:,} held-out training "
        f"images; accuracies are on the 10,000 test images. Every run (uniform or auto) removes units and then "
        f"fine-tunes {args.epochs:g} epochs with distillation through the same recipe. Groups of units: "
        f"{described}. "
        f"Latency: ONNX Runtime {args.runtime}, batch {args.batch}, 2 threads, median of {args.repeats} runs in "
        f"interleaved rounds. During the searches the dense model measured {1e3 * dense_s:.2f} ms, and every group at its "
        f"fewest units was predicted at {1e3 * fastest_s:.2f} ms: auto's budgets are {', '.join(f'{f:g}' for f in BUDGETS)} "
        f"of the way from the one to the other. Total time {(time.perf_counter() - started) / 60:.0f} min.", "",
        "**Final models, one interleaved measurement**:", "",
        "| model | ms per batch | spread | speed-up vs dense | MACs per image | test accuracy |",
        "|---|---|---|---|---|---|", *rows, "",
        *dominance, "",
        "**Auto's searches** (budget and trial latencies as measured during each search, beside the dense model):", "",
        "| search | budget ms | met | trials | predicted ms | measured ms | validation accuracy | policy |",
        "|---|---|---|---|---|---|---|---|", *search_rows, "", *refusals, *([""] if refusals else []),
        f"![accuracy vs latency]({picture.name})", ""])
    write_results(args.output, text.splitlines())


if __name__ == "__main__":
    main()
