"""Rate-aware training on the founding networks: bytes against test error, beside the published records.

    python benchmarks/rate_records.py --cache /tmp/auto                       # LeNet-5 and LeNet-300-100
    python benchmarks/rate_records.py --models lenet-5 --runs dense:0.3 dense:1 --epochs 20
    python benchmarks/rate_records.py --runs auto:0.03 lenet-5=auto/3:0.03     # the second for LeNet-5 only

Each run (``start:tradeoff``) is the recipe below from the same dense model (trained on 54,000
MNIST training images, the split ``auto_compression.py`` uses; cached with ``--cache``):

    - rate: {tradeoff: T}                     # weights and their code trained together
      gradual: {epochs: E, lr: 0.001, distill: true, augment: 2}
    - unused: {}                              # units no later weight reads: zeroed
    - bias: {bits: 8}

Each start runs once and every trade-off continues from a copy of it (distilling from the dense
model, as one recipe would). Start ``dense`` runs it on the dense model; start ``auto`` first runs the pruning step (sparse
variational dropout, gradual) of the policy ``auto`` found for the model
(``benchmarks/results/auto-<model>-variational.yaml``, chosen on validation), so the rate step
codes what that pruning keeps, instead of auto's weight sharing; ``auto/K`` keeps K times fewer
weights in each layer that step prunes (``auto/2:0.03``).

The record is the smallest file whose error on the 6,000 held-out validation images is within the
target; the test split (10,000 images) is only reported. Bytes are the whole ``.nsk`` file on disk
(header, manifest, biases); ratios are 4 bytes per parameter over it. The chosen files are copied
to ``benchmarks/results/rate-<model>.nsk`` with their recipe, every run's file to
``benchmarks/results/rate/``, and every run is plotted against the published points in
``benchmarks/results/rate_records.png``.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

import netshrink
from auto_compression import dense_model, split  # benchmarks/ (scripts run from this folder's path)
from common import command_line, write_results
from netshrink.deploy.machine import describe

RESULTS = Path(__file__).parent / "results"
# Test error (%) each model must stay within, the ratio to beat, and the published (ratio, error %) points.
TARGETS = {
    "lenet-5": {"error": 1.00, "record": 650, "published": {
        "Deep Compression (2016)": (39, 0.74), "Soft weight-sharing (2017)": (162, 0.97),
        "Bayesian Compression (2017)": (419, 1.0), "EPR (Oktay et al., 2019)": (606, 1.0),
        "MIRACLE (Havasi et al., 2019)": (1110, 0.96), "netshrink auto (variational)": (212.3, 0.67)}},
    "lenet-300-100": {"error": 1.90, "record": 130, "also": 1.64, "published": {
        "Deep Compression (2016)": (40, 1.58), "Soft weight-sharing (2017)": (64, 1.94),
        "EPR (Oktay et al., 2019)": (124, 1.9), "netshrink auto (variational)": (100.1, 1.54)}},
}
DEFAULT_EPOCHS = 10  # rate-aware training epochs per run
DEFAULT_RUNS = {"lenet-5": ["dense:0.1", "auto:0.1"], "lenet-300-100": ["dense:0.1", "dense:0.3", "auto:0.1"]}


def recipe(name: str, start: str, tradeoff: float, epochs: float) -> list[dict]:
    steps = []
    if start.startswith("auto"):
        policy = yaml.safe_load((RESULTS / f"auto-{name}-variational.yaml").read_text())
        prune = copy.deepcopy(next(step for step in policy["steps"] if "prune" in step))
        fewer = float(start.partition("/")[2] or 1)
        keep = prune["prune"]["keep"]
        prune["prune"]["keep"] = ({layer: round(k / fewer, 5) for layer, k in keep.items()}
                                  if isinstance(keep, dict) else round(keep / fewer, 5))
        steps.append(prune)
    return steps + [{"rate": {"tradeoff": tradeoff}, "gradual": {"epochs": epochs, "lr": 1e-3, "distill": True, "augment": 2}},
                    {"unused": {}},
                    {"bias": {"bits": 8}}]


def nonzero_weights(model) -> dict[str, int]:
    return {n: int((m.weight != 0).sum()) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for axis, (name, rows) in zip(axes[0], runs.items()):
        target = TARGETS[name]
        for label, (ratio, error) in target["published"].items():
            axis.scatter([ratio], [error], marker="s", color="grey")
            axis.annotate(label, (ratio, error), fontsize=7, xytext=(4, 3), textcoords="offset points")
        starts = sorted({r["start"] for r in rows})
        for start, color in zip(starts, ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")):
            mine = sorted((r for r in rows if r["start"] == start), key=lambda r: r["ratio"])
            where = "the dense model" if start == "dense" else "auto pruning" + (
                f", {start.partition('/')[2]}x fewer kept" if "/" in start else "")
            axis.plot([r["ratio"] for r in mine], [r["test"] for r in mine], "o-", color=color,
                      label=f"netshrink rate, from {where}")
            for r in mine:
                axis.annotate(f"{r['tradeoff']:g}", (r["ratio"], r["test"]), fontsize=7, color=color,
                              xytext=(4, -9), textcoords="offset points")
        axis.axhline(target["error"], color="tab:red", lw=0.8, ls="--", label=f"target {target['error']:.2f}%")
        axis.set_xscale("log")
        axis.set_xlabel("compression ratio (fp32 bytes / file bytes)")
        axis.set_ylabel("test error (%)")
        axis.set_title(name)
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--runs", nargs="+", help="start:tradeoff (start: dense, auto or auto/K: "
                        "auto's pruning keeping K times fewer weights; tradeoff: loss per kilobyte), "
                        "MODEL=start:tradeoff for one model only; default per model")
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help="rate-aware training epochs per run")
    parser.add_argument("--dense-epochs", type=float, default=30)
    parser.add_argument("--cache", type=Path, help="keep dense models here between runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "rate_records.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    fit_data, validation = split(train, 6000, 0)
    lines = ["# Rate-aware training on LeNet-5 and LeNet-300-100: file bytes against test error", "",
             command_line(__file__),
             f"Machine: {describe()}; 2 CPU threads, torch {torch.__version__}. {args.epochs:g} rate-aware epochs per run. Dense models train on 54,000 MNIST images; the "
             "record is the smallest file within the target on the other 6,000 (validation); the test split is "
             "only reported. Bytes are whole `.nsk` files on disk; ratio = 4 bytes per parameter / file bytes.", ""]
    runs = {}
    scratch = Path(tempfile.mkdtemp())
    for name in args.models:
        target = TARGETS[name]
        dense, dense_seconds = dense_model(name, fit_data, args.dense_epochs, 2, 0, args.cache)
        timing = args.cache / f"dense-{name}-{args.dense_epochs:g}-2-0.seconds" if args.cache else None
        if timing is not None and dense_seconds:  # the dense training's wall time, kept beside the cached model
            timing.write_text(f"{dense_seconds:.0f}")
        elif timing is not None and timing.exists():
            dense_seconds = float(timing.read_text())
        dense_bytes = 4 * sum(p.numel() for p in dense.parameters())
        dense_test = 100 * (1 - netshrink.evaluate(dense, test))
        dense_validation = 100 * (1 - netshrink.evaluate(dense, validation))
        rows, starts = [], {}  # each start's pruned model (and its seconds), run once for all its trade-offs
        for run in args.runs or DEFAULT_RUNS[name]:
            only, _, run = run.rpartition("=")
            if only and only != name:
                continue
            start, tradeoff = run.split(":")[0], float(run.split(":")[1])
            steps = recipe(name, start, tradeoff, args.epochs)
            first, rest = steps[:-3], steps[-3:]  # the start's pruning (if any), then the rate steps
            if start not in starts:
                model, started = copy.deepcopy(dense), time.perf_counter()
                if first:
                    netshrink.Recipe.from_steps(first).run(model, fit_data, progress=True)
                starts[start] = (model, time.perf_counter() - started)
            model, started = copy.deepcopy(starts[start][0]), time.perf_counter()
            # the rate steps continue the recipe: they distil from the dense model, as one run would
            netshrink.Recipe.from_steps(rest).run(model, fit_data, progress=True, teacher=dense)
            seconds = (starts[start][1], time.perf_counter() - started)
            longer = f"-{args.epochs:g}ep" if args.epochs != DEFAULT_EPOCHS else ""  # beside, not over, default runs
            path = scratch / f"{name}-{start.replace('/', '_')}-{tradeoff:g}{longer}.nsk"
            netshrink.save(model, path)
            size = path.stat().st_size
            (RESULTS / "rate").mkdir(exist_ok=True)
            shutil.copyfile(path, RESULTS / "rate" / path.name)  # every run's file, to load and evaluate
            rows.append({"start": start, "tradeoff": tradeoff, "bytes": size, "ratio": dense_bytes / size, "path": path, "steps": steps,
                         "validation": 100 * (1 - netshrink.evaluate(model, validation)),
                         "test": 100 * (1 - netshrink.evaluate(model, test)), "seconds": seconds,
                         "nonzero": nonzero_weights(model)})
            print(f"{name} {start}, tradeoff {tradeoff:g}: {size:,} B ({rows[-1]['ratio']:.1f}x), validation error "
                  f"{rows[-1]['validation']:.2f}%, test {rows[-1]['test']:.2f}%", flush=True)
        runs[name] = rows
        within = [r for r in rows if r["validation"] <= target["error"]]
        chosen = min(within, key=lambda r: r["bytes"]) if within else None
        lines += [f"## {name}", "",
                  f"Dense: {dense_bytes:,} B fp32, test error {dense_test:.2f}% (validation {dense_validation:.2f}%), trained in "
                  f"{dense_seconds:.0f} s when it was trained (a cached model keeps the time of the machine that trained it; {args.dense_epochs:g} epochs, shifts of up to 2 pixels). Target: test error <= {target['error']:.2f}%, checked on validation; record to beat "
                  f"{target['record']}x.", "",
                  "| start | trade-off (loss per KB) | file bytes | ratio | validation error | test error | non-zero weights | time (start + rate) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mark = " **(chosen)**" if r is chosen else ""
            lines.append(f"| {r['start']} | {r['tradeoff']:g}{mark} | {r['bytes']:,} | {r['ratio']:.1f}x | {r['validation']:.2f}% | "
                         f"{r['test']:.2f}% | {', '.join(f'{k} {v:,}' for k, v in r['nonzero'].items())} | {r['seconds'][0]:.0f} + {r['seconds'][1]:.0f} s |")
        lines += ["", f"Every run's file: `benchmarks/results/rate/{name}-<start>-<trade-off>[-<epochs>ep].nsk` ('/' "
                  f"in a start written '_'; epochs named when not {DEFAULT_EPOCHS:g})."]
        if "also" in target:
            near = [r for r in rows if r["validation"] <= target["also"]]
            best = min(near, key=lambda r: r["bytes"]) if near else None
            lines += ["", f"Smallest file within {target['also']:.2f}% on validation: " +
                      (f"{best['start']}, trade-off {best['tradeoff']:g}, {best['bytes']:,} B ({best['ratio']:.1f}x), test error "
                       f"{best['test']:.2f}%." if best else "none of these runs.")]
        if chosen is not None:
            kept = RESULTS / f"rate-{name}.nsk"
            shutil.copyfile(chosen["path"], kept)
            recipe_path = RESULTS / f"rate-{name}.yaml"
            recipe_path.write_text(f"# {command_line(__file__).strip()}\n" +
                                   yaml.safe_dump({"name": f"rate-{name}", "steps": chosen["steps"]}, sort_keys=False))
            met = chosen["ratio"] >= target["record"] and chosen["test"] <= target["error"]
            lines += ["", f"Record: `{kept.relative_to(RESULTS.parent.parent)}` ({chosen['bytes']:,} B, "
                      f"{chosen['ratio']:.1f}x, test error {chosen['test']:.2f}%), recipe `{recipe_path.relative_to(RESULTS.parent.parent)}`. "
                      f"Bar ({target['record']}x at <= {target['error']:.2f}%): {'met' if met else 'not met'}.", ""]
        else:
            lines += ["", "No run stayed within the target on validation.", ""]
    png = args.output.with_suffix(".png")
    plot(runs, png)
    lines += [f"![bytes against error]({png.name})", ""]
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
