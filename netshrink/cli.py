"""The ``netshrink`` command. Thin: parses arguments, calls the API, prints a table.

Examples::

    netshrink demo                                    # the founding walkthrough on full MNIST
    netshrink train --model lenet-300-100 --data mnist --epochs 10 -o dense.nsk
    netshrink evaluate dense.nsk --data mnist
    netshrink compress dense.nsk --data mnist --recipe deep-compression -o small.nsk
    netshrink compress dense.nsk --data mnist --prune 0.1 --weight-bits 4 --finetune 1 -o small.nsk
    netshrink summary small.nsk
    netshrink export small.nsk --int8 -o small.onnx   # int8 QDQ for ONNX Runtime
    netshrink bench dense.nsk --data mnist            # latency/size/accuracy vs the alternatives
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from .errors import NetshrinkError

console = Console(width=None if sys.stdout.isatty() else 160)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    parser.add_argument("--data", default="mnist", choices=DATASETS,
                        help="data set (default: mnist; 'digits' is tiny and fast)")


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog="netshrink", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make trained PyTorch networks small and fast, and account for what was won and lost.",
        epilog=__doc__.split("Examples::", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train the founding MLP on MNIST and compare every method")
    demo.add_argument("--data", default="mnist", help="data set (default: mnist)")
    demo.add_argument("--epochs", type=float, default=10, help="training epochs (default: 10)")
    demo.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")

    train = sub.add_parser("train", help="train a zoo model and save it as a netshrink file")
    train.add_argument("--model", default="lenet-300-100", choices=MODELS)
    _data_arguments(train)
    train.add_argument("--epochs", type=float, default=10)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("-o", "--output", type=Path, required=True, help="where to write the model")

    evaluate = sub.add_parser("evaluate", help="test accuracy of a saved model")
    evaluate.add_argument("path", type=Path)
    _data_arguments(evaluate)

    compress = sub.add_parser("compress", help="compress a saved model with a recipe or quick options")
    compress.add_argument("path", type=Path, nargs="?", help="model file (or give --model to train one first)")
    compress.add_argument("--model", choices=MODELS, help="train this zoo model first instead of loading one")
    compress.add_argument("--epochs", type=float, default=10, help="with --model: training epochs")
    _data_arguments(compress)
    compress.add_argument("--recipe", help="built-in recipe name or YAML file (see `netshrink recipes`)")
    compress.add_argument("--prune", type=float, metavar="KEEP", help="keep this fraction of weights (0-1]")
    compress.add_argument("--clip-percentile", type=float, metavar="P", help="clip |w| at this percentile")
    compress.add_argument("--weight-bits", type=int, metavar="B", help="quantize weights to B bits (1-8)")
    compress.add_argument("--activation-bits", type=int, metavar="B", help="quantize activations to B bits (2-8)")
    compress.add_argument("--share-bits", type=int, metavar="B", help="share weights via 2^B k-means centroids")
    compress.add_argument("--finetune", type=float, metavar="EPOCHS", help="fine-tune this many epochs at the end")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("-o", "--output", type=Path, required=True)

    export = sub.add_parser("export", help="export a saved model to ONNX (fp32 or int8 QDQ)")
    export.add_argument("path", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--int8", action="store_true", help="int8 weights per channel + uint8 activations (QDQ)")
    _data_arguments(export)

    bench = sub.add_parser("bench", help="latency/size/accuracy: PyTorch, ONNX Runtime, int8 export, baselines")
    bench.add_argument("path", type=Path)
    _data_arguments(bench)
    bench.add_argument("--threads", type=int, default=2, help="threads for every runtime (default: 2)")
    bench.add_argument("--repeats", type=int, default=300, help="timed runs at batch 1 (default: 300)")
    bench.add_argument("--batch-repeats", type=int, default=40, help="timed runs at batch 256 (default: 40)")
    bench.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")

    summary = sub.add_parser("summary", help="per-layer table of a saved model")
    summary.add_argument("path", type=Path)

    sub.add_parser("recipes", help="list the built-in recipes")

    download = sub.add_parser("download", help="download MNIST or Fashion-MNIST (needs a network)")
    download.add_argument("name", choices=("mnist", "fashion-mnist"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except NetshrinkError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(data=args.data, epochs=args.epochs, markdown_path=args.markdown)
    return 0


def cmd_train(args) -> int:
    from . import artifact
    from .data import load_dataset
    from .models import build_model
    from .train import evaluate, fit

    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    model = build_model(args.model, tuple(train.tensors[0].shape[1:]))
    result = fit(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    accuracy = evaluate(model, test)
    size = artifact.save(model, args.output, info={"data": args.data, "test_accuracy": accuracy})
    _print_rows("trained", ["model", "data", "epochs", "seconds", "test accuracy", "file", "bytes"],
                [[args.model, args.data, f"{args.epochs:g}", f"{result['seconds']:.1f}",
                  f"{100 * accuracy:.2f}%", str(args.output), f"{size:,}"]])
    return 0


def cmd_evaluate(args) -> int:
    from . import artifact
    from .data import load_dataset
    from .train import evaluate

    model = artifact.load(args.path)
    accuracy = evaluate(model, load_dataset(args.data, "test"))
    _print_rows("evaluated", ["file", "data", "test accuracy", "error", "bytes"],
                [[str(args.path), args.data, f"{100 * accuracy:.2f}%", f"{100 * (1 - accuracy):.2f}%",
                  f"{args.path.stat().st_size:,}"]])
    return 0


def _quick_recipe(args) -> list[dict]:
    steps: list[dict] = []
    if args.prune is not None:
        steps.append({"prune": {"keep": args.prune}})
    if args.clip_percentile is not None:
        steps.append({"clip": {"percentile": args.clip_percentile}})
    if args.share_bits is not None:
        steps.append({"share": {"bits": args.share_bits}})
    if args.weight_bits is not None:
        steps.append({"quantize": {"bits": args.weight_bits}})
    if args.activation_bits is not None:
        steps.append({"activations": {"bits": args.activation_bits}})
    if args.finetune is not None:
        steps.append({"finetune": {"epochs": args.finetune, "lr": 1e-4}})
    return steps


def cmd_compress(args) -> int:
    from . import artifact
    from .data import load_dataset
    from .models import build_model
    from .recipe import Recipe
    from .report import summary
    from .train import evaluate, fit

    quick = _quick_recipe(args)
    if bool(args.recipe) == bool(quick):
        raise NetshrinkError("give either --recipe or quick options (--prune, --weight-bits, ...), not both or neither")
    if (args.path is None) == (args.model is None):
        raise NetshrinkError("give a model file or --model NAME (to train one first)")
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.from_steps(quick, "quick")  # checked first
    if args.path is not None:
        model = artifact.load(args.path)
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    if args.model is not None:
        model = build_model(args.model, tuple(train.tensors[0].shape[1:]))
        fit(model, train, epochs=args.epochs, seed=args.seed, desc="train dense")
    before = evaluate(model, test)
    dense_bytes = len(artifact.to_bytes(model))
    started = time.perf_counter()
    rows = recipe.run(model, train, test, seed=args.seed,
                      on_row=lambda r: console.print(f"  step {r['step']}: {r['what']}  "
                                                     f"acc {100 * r['accuracy']:.2f}%  ({r['seconds']:.1f}s)"))
    size = artifact.save(model, args.output, recipe=recipe.raw,
                         info={"data": args.data, "test_accuracy": rows[-1]["accuracy"]})
    console.print(summary(model, file_bytes=size).table(f"{args.output} (recipe: {recipe.name})"))
    after = rows[-1]["accuracy"]
    _print_rows(f"result ({time.perf_counter() - started:.0f}s)", ["", "test error", "file bytes", "ratio"],
                [["before", f"{100 * (1 - before):.2f}%", f"{dense_bytes:,}", "1.0x"],
                 ["after", f"{100 * (1 - after):.2f}%", f"{size:,}", f"{dense_bytes / size:.1f}x"]])
    return 0


def cmd_export(args) -> int:
    from . import artifact
    from .data import load_dataset
    from .onnx_export import export

    model = artifact.load(args.path)
    report = export(model, args.output, int8=args.int8,
                    calibration=load_dataset(args.data, "train") if args.int8 else None)
    _print_rows(f"exported {args.output} ({'int8 QDQ' if args.int8 else 'fp32'})", ["layer", "exported as"],
                [list(row) for row in report.layers])
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    return 0


def cmd_bench(args) -> int:
    from . import artifact
    from .bench import COLUMNS, benchmark
    from .data import load_dataset
    from .report import markdown

    if args.threads < 1 or args.repeats < 1 or args.batch_repeats < 1:
        raise NetshrinkError(f"threads and repeats must be >= 1. Received: threads={args.threads}, "
                             f"repeats={args.repeats}, batch_repeats={args.batch_repeats}")
    model = artifact.load(args.path)
    rows, report = benchmark(model, load_dataset(args.data, "test"), load_dataset(args.data, "train"),
                             threads=args.threads, repeats=args.repeats, batch_repeats=args.batch_repeats,
                             progress=lambda name: console.print(f"  measuring {name}", highlight=False))
    _print_rows(f"{args.path} on {args.data}, {args.threads} threads", COLUMNS, rows)
    for note in report.notes:
        console.print(f"note (int8 export): {note}", highlight=False)
    if args.markdown:
        args.markdown.write_text(markdown(COLUMNS, rows) + "\n")
    return 0


def cmd_summary(args) -> int:
    from . import artifact
    from .report import summary

    model = artifact.load(args.path)
    console.print(summary(model, file_bytes=args.path.stat().st_size).table(str(args.path)))
    recipe = model.netshrink_manifest.get("recipe")
    if recipe:
        console.print(f"made by recipe: {recipe}", highlight=False)
    return 0


def cmd_recipes(args) -> int:
    from .recipe import Recipe, builtin_recipes

    _print_rows("built-in recipes", ["name", "steps"],
                [[name, "; ".join(s.describe() for s in Recipe.load(name).steps)] for name in builtin_recipes()])
    return 0


def cmd_download(args) -> int:
    from .data import download

    console.print(f"downloaded to {download(args.name)}")
    return 0


def _print_rows(title: str, columns: list[str], rows: list[list]) -> None:
    from .report import make_table

    console.print(make_table(title, columns, rows))


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "compress": cmd_compress,
            "export": cmd_export, "bench": cmd_bench,
            "summary": cmd_summary, "recipes": cmd_recipes, "download": cmd_download}

if __name__ == "__main__":
    sys.exit(main())
