"""The ``netshrink`` command. Thin: parses arguments, checks them, calls the API, prints a table.

Examples::

    netshrink demo                                    # the founding walkthrough on full MNIST
    netshrink train --model lenet-300-100 --data mnist --epochs 10 -o dense.nsk
    netshrink evaluate dense.nsk --data mnist
    netshrink compress dense.nsk --data mnist --recipe deep-compression -o small.nsk
    netshrink compress dense.nsk --data mnist --prune 0.1 --weight-bits 4 --finetune 2 -o small.nsk
    netshrink summary small.nsk
    netshrink export small.nsk --int8 -o small.onnx   # int8 for ONNX Runtime, any x86-64 CPU
    netshrink bench dense.nsk small.nsk --data mnist --plot p.png   # speed and accuracy vs the peers
    netshrink auto dense.nsk --data mnist --max-drop 0.5 -o auto.nsk # per-layer settings chosen for you
    netshrink report auto.nsk -o report.html                         # one page of plots to look at

Every user error (a bad value, a missing file, a model that does not fit the data, an output that
would overwrite its input) is one line on stderr and exit status 2, found before long work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import netshrink

from . import __version__
from .zoo import DATASETS, HELD_OUT, MODELS
from .compress import PRUNERS, QUANTIZERS
from .errors import NetshrinkError


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr and exit status 2 (not a usage dump)."""

    def error(self, message: str):  # noqa: D102
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _number(kind, low: float, low_open: bool = False):
    """An argparse type: a finite ``kind`` (int or float) >= low (> low when low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or value in (float("inf"), float("-inf")) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        return value
    return parse


POSITIVE_INT, POSITIVE, NON_NEGATIVE_INT = _number(int, 1), _number(float, 0, low_open=True), _number(int, 0)


def _validation(text: str):
    """``--validation``: a share in (0, 1) or the word ``test``."""
    if text == "test":
        return text
    share = _number(float, 0, low_open=True)(text)
    if not share < 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1) or 'test', got {text}")
    return share


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="mnist", choices=DATASETS,
                        help="data set (default: mnist; 'digits' is tiny and fast)")


def _training_arguments(parser: argparse.ArgumentParser, epochs: float, lr: float, what: str) -> None:
    parser.add_argument("--epochs", type=POSITIVE, default=epochs, help=f"{what} epochs (default: {epochs:g})")
    parser.add_argument("--lr", type=POSITIVE, default=lr, help=f"Adam learning rate, annealed to 0 (default: {lr:g})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="(default: 128)")
    parser.add_argument("--augment", type=NON_NEGATIVE_INT, default=0, metavar="PIXELS",
                        help="shift training images by up to this many pixels (default: 0; 2 helps LeNet-5)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0; the same seed gives the same model)")


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS", nargs="?", const="auto",
                        help="run as several processes on a Ray cluster (Ray Train), each taking a share of every "
                             "batch, as under torchrun: --ray alone (or 'auto') for the cluster this machine belongs "
                             "to, HOST:PORT of its head, ray://HOST:10001, or 'local' to start one here. Files are read "
                             "and written by path: run from a folder every node shares")
    parser.add_argument("--shard", action="store_true",
                        help="with several processes (torchrun or --ray): split the model, its gradients and Adam's "
                             "state between them while training (FSDP) instead of a whole copy in each (DDP), for a "
                             "model whose training does not fit one process; not for steps that prune gradually or "
                             "learn sparsity, and train keeps no per-epoch checkpoint with it")
    parser.add_argument("--workers", type=POSITIVE_INT, metavar="N",
                        help="with --ray: this many processes, sharing the cluster's CPUs evenly (default: one per "
                             "node, each with as many threads as the narrowest node has CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netshrink", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make trained PyTorch networks small and fast, and account for what was won and lost.",
        epilog=__doc__.split("Examples::", 1)[1])
    parser.add_argument("--version", action="version", version=f"netshrink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train the founding MLP on MNIST and compare every method")
    demo.add_argument("--data", default="mnist", choices=DATASETS, help="data set (default: mnist)")
    demo.add_argument("--epochs", type=POSITIVE, default=10, help="training epochs (default: 10)")
    demo.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")

    train = sub.add_parser(
        "train", help="train a zoo model and save it as a netshrink file",
        description="Train a zoo model on a data set's training split, except a held-out part (--validation, "
                    "drawn with --seed) that it never sees: the file records which part that was, and `netshrink "
                    "auto` scores its choices on exactly that part. The test split is only evaluated.")
    train.add_argument("--model", default="lenet-300-100", choices=MODELS)
    _data_arguments(train)
    _training_arguments(train, epochs=10, lr=1e-3, what="training")
    train.add_argument("--validation", type=_number(float, 0), default=HELD_OUT, metavar="SHARE",
                       help="share of the training split held out, never trained on (default: 0.1; 0 trains on "
                            "all of it, and `auto` then needs --validation test)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT.partial, the model as it was after its last whole epoch (written "
                            "after every epoch and kept when training is interrupted); Adam's moments and the "
                            "learning-rate schedule start afresh for the epochs left")
    train.add_argument("-o", "--output", type=Path, required=True, help="where to write the model")
    _cluster_arguments(train)

    evaluate = sub.add_parser("evaluate", help="test accuracy of a saved model")
    evaluate.add_argument("path", type=Path)
    _data_arguments(evaluate)

    compress = sub.add_parser(
        "compress", help="compress a saved model with a recipe or quick options",
        description="Compress a model with a recipe (see `netshrink recipes`) or quick options, applied in "
                    "this order: prune, clip, share, quantize weights and activations (activations first when "
                    "--weight-method is data-aware, so it sees the inputs the layer will get; weights first when "
                    "rounding), fine-tune (with distillation from the model as it was).")
    compress.add_argument("path", type=Path, nargs="?", help="model file (or give --model to train one first)")
    compress.add_argument("--model", choices=MODELS, help="train this zoo model first instead of loading one")
    _data_arguments(compress)
    compress.add_argument("--recipe", help="built-in recipe name or YAML file (see `netshrink recipes`)")
    compress.add_argument("--prune", type=float, metavar="KEEP", help="keep this fraction of weights (0-1]")
    compress.add_argument("--clip-percentile", type=float, metavar="P", help="clip |w| at this percentile")
    compress.add_argument("--weight-bits", type=int, metavar="B", help="quantize weights to B bits (1-8)")
    compress.add_argument("--activation-bits", type=int, metavar="B", help="quantize activations to B bits (2-8)")
    compress.add_argument("--share-bits", type=int, metavar="B", help="share weights via 2^B k-means centroids")
    compress.add_argument("--prune-method", choices=PRUNERS, default="magnitude",
                          help="how --prune chooses weights: by magnitude, or from calibration data without "
                               "retraining (wanda; sparsegpt also updates the kept weights; '+blocks' then tunes "
                               "each block's kept weights so its output matches the dense model's). Default: magnitude")
    compress.add_argument("--weight-method", choices=QUANTIZERS, default="round",
                          help="how --weight-bits rounds: to nearest, or from calibration data without retraining "
                               "(gptq; round+blocks / gptq+blocks then tune each block's rounding and scales against "
                               "the dense model, as AutoRound; adaround learns each weight's rounding: slower, best for CNNs at 2-4 bits). "
                               "Data-aware methods run after --activation-bits so they see quantized inputs. "
                               "Default: round")
    compress.add_argument("--group-size", type=POSITIVE_INT, metavar="G",
                          help="with --weight-bits (round or gptq): one scale per G inputs of each output channel")
    compress.add_argument("--finetune", type=POSITIVE, metavar="EPOCHS", help="fine-tune this many epochs at the end")
    compress.add_argument("--lr", type=POSITIVE, default=1e-3,
                          help="learning rate of --finetune (and of training with --model; default: 1e-3)")
    compress.add_argument("--epochs", type=POSITIVE, default=10, help="with --model: training epochs (default: 10)")
    compress.add_argument("--augment", type=NON_NEGATIVE_INT, default=0, metavar="PIXELS",
                          help="shift training images by up to this many pixels while training (default: 0)")
    compress.add_argument("--max-error", type=POSITIVE, metavar="E",
                          help="near-lossless file: store each parameter within E of its value where that is "
                               "smaller on disk (e.g. 1e-3); the accuracy shown is the file's. Default: exact")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("-o", "--output", type=Path, required=True)
    _cluster_arguments(compress)

    export = sub.add_parser(
        "export", help="export a saved model for a runtime: ONNX Runtime, OpenVINO, llama.cpp (GGUF), compressed-tensors",
        description="Write a saved model in a runtime's format, taken from the output's name (.onnx, .xml for\n"
                    "OpenVINO, .gguf for llama.cpp) or from --format. Low-bit weights keep their own integer codes\n"
                    "and scales: with --low-bit in ONNX (MatMulNBits), always in OpenVINO (u2/u4/u8 constants),\n"
                    "GGUF (Q4_0/Q4_1/Q8_0 blocks) and compressed-tensors (pack-quantized: a folder that transformers\n"
                    "and vLLM load). A layer whose grid a format cannot hold is named in the table.",
        epilog="examples:\n  netshrink export small.nsk -o small.onnx --low-bit   # 4-bit weights as MatMulNBits\n"
               "  netshrink export small.nsk -o small.xml              # OpenVINO IR with u4 weights\n"
               "  netshrink export small.nsk -o small.gguf             # llama.cpp (BERT or GPT-2 models)\n"
               "  netshrink export small.nsk -o folder --format compressed-tensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("path", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--format", choices=("onnx", "openvino", "gguf", "compressed-tensors"),
                        help="the output format (default: from the output's name)")
    export.add_argument("--low-bit", action="store_true",
                        help="ONNX: write 2-8-bit weights with their own codes and scales (MatMulNBits), float "
                             "activations; the default writes them as fp32")
    export.add_argument("--int8", action="store_true", help="int8 weights per channel + uint8 activations: QDQ operators, "
                        "and a transformer's projections as one fused ONNX Runtime kernel (see --portable)")
    export.add_argument("--vnni", action="store_true",
                        help="with --int8: full-range int8 weights, only for CPUs with VNNI (or ARM); the default "
                             "7-bit weights are correct on every x86-64 CPU (netshrink bench prints which kind it runs on)")
    export.add_argument("--portable", action="store_true",
                        help="with --int8: standard ONNX operators only. By default a transformer's int8 projections "
                             "use ONNX Runtime's MatMulIntegerToFloat kernel with the bias inside (faster; ONNX "
                             "Runtime only)")
    _data_arguments(export)

    bench = sub.add_parser(
        "bench", help="latency and accuracy of netshrink models against the peers, with a Pareto table and plot",
        description="Time and score the dense model (PyTorch), the peers made from it (ONNX Runtime fp32, "
                    "quantize_dynamic, quantize_static, torch.ao, torchao; OpenVINO when installed) and every netshrink "
                    "model (int8 and fp32 in each runtime) in one interleaved run, at batch 1 and a large batch. The first file is the "
                    "dense reference; list compressed files after it. Image models are scored by test accuracy on "
                    "--data; transformer encoders by the cosine of their pooled outputs to the reference's, on "
                    "seeded random token sequences. Example: netshrink bench dense.nsk pruned.nsk --data mnist "
                    "--plot pareto.png")
    bench.add_argument("path", type=Path, help="the dense reference model (.nsk)")
    bench.add_argument("compressed", type=Path, nargs="*", help="netshrink models to compare (default: the reference)")
    bench.add_argument("--data", choices=DATASETS, help="data set for image models (default: mnist)")
    bench.add_argument("--threads", type=POSITIVE_INT, default=2, help="threads for every runtime (default: 2)")
    bench.add_argument("--repeats", type=POSITIVE_INT, default=200, help="timed runs at batch 1 (default: 200)")
    bench.add_argument("--large-repeats", type=POSITIVE_INT, default=30, help="timed runs at the large batch (default: 30)")
    bench.add_argument("--large-batch", type=POSITIVE_INT,
                       help="the large batch (default: 256 images, or 32 sequences of --sequence tokens)")
    bench.add_argument("--sequence", type=POSITIVE_INT, default=128, help="tokens per sequence (default: 128)")
    bench.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "openvino"], metavar="RUNTIME",
                       help="runtimes to measure: onnxruntime, openvino (default: every one installed; OpenVINO "
                            "adds its dense model and NNCF's int8 as peers and runs each model's standard-ONNX int8 graph)")
    bench.add_argument("--profile", action="store_true",
                       help="add the runtime's own per-operator profile of the netshrink and peer graphs the large-batch bar "
                            "compares (ONNX Runtime's profiler, OpenVINO's performance counters)")
    bench.add_argument("--plot", type=Path, metavar="PNG", help="draw accuracy vs latency (the Pareto fronts) here")
    bench.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")

    auto = sub.add_parser(
        "auto", help="choose per-layer pruning and sharing (or, for speed, units removed) under one budget, run it "
                     "and verify it",
        description="Measure how much each layer suffers from each setting (keep fraction x shared bits) on a "
                    "validation split held out of the training data (never the test set), predict each setting's "
                    "bytes with the real coder, solve for the per-layer combination with the least damage, run it "
                    "as a recipe with fine-tuning and distillation, and verify the budget on the real file. "
                    "--max-bytes: the file fits, at the best accuracy found; --max-drop: validation accuracy within "
                    "that many points of the dense model's, in the smallest file found (a search of --trials "
                    "runs); --max-error-rate: validation error at most that many percent, the same search; --max-latency: at most that many milliseconds per batch of --latency-batch inputs on "
                    "ONNX Runtime (--runtime fp32 or int8, --threads), measured on this machine: each group of channels or neurons "
                    "keeps a share of its units (--keeps, default 1 0.75 0.5 0.35 0.25), removed physically, each "
                    "choice timed alone, the least damaging combination under the budget run with fine-tuning "
                    "and timed again. Writes the model, the policy as a recipe anyone can rerun (OUTPUT.yaml) and what the "
                    "search saw (OUTPUT.auto.json, read by `netshrink report`). Exit status 1 when the budget is not met "
                    "(the closest model found is still written, and the table says by how much). "
                    "Example: netshrink auto dense.nsk --data mnist --max-drop 0.5 -o auto.nsk")
    auto.add_argument("path", type=Path, help="the dense model (.nsk)")
    _data_arguments(auto)
    budget = auto.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-bytes", type=POSITIVE_INT, metavar="BYTES", help="the file on disk at most this big")
    budget.add_argument("--max-drop", type=_number(float, 0), metavar="POINTS",
                        help="validation accuracy at most this many points below the dense model's")
    budget.add_argument("--max-error-rate", type=_number(float, 0), metavar="PERCENT",
                        help="validation error at most this many percent (e.g. 1.0: 99%% classified right)")
    budget.add_argument("--max-latency", type=POSITIVE, metavar="MS",
                        help="ONNX Runtime latency at most this many milliseconds per batch, on this machine")
    auto.add_argument("--latency-batch", type=POSITIVE_INT, default=1, metavar="N",
                      help="with --max-latency, inputs per timed batch (default: 1)")
    auto.add_argument("--threads", type=POSITIVE_INT, default=2, help="with --max-latency, ONNX Runtime threads (default: 2)")
    auto.add_argument("--runtime", choices=("fp32", "int8"), default="fp32",
                      help="with --max-latency, the export that is timed: fp32, or int8 as `netshrink export --int8` "
                           "writes it (default: fp32)")
    auto.add_argument("--epochs", type=POSITIVE, default=10, help="fine-tuning epochs per trial (default: 10)")
    auto.add_argument("--lr", type=POSITIVE, default=1e-3, help="fine-tuning learning rate (default: 1e-3)")
    auto.add_argument("--trials", type=POSITIVE_INT, default=5, help="policies run at most (default: 5)")
    auto.add_argument("--validation", type=_validation, default=None, metavar="SHARE|test",
                      help="the data choices are scored on: by default the part of the training split the model's "
                           "file says `netshrink train` held out; SHARE holds out that share of the training split "
                           "(for a model that never saw it); 'test' scores on the test split (then the test error "
                           "is no independent check)")
    auto.add_argument("--augment", type=NON_NEGATIVE_INT, default=0, metavar="PIXELS",
                      help="shift training images by up to this many pixels while fine-tuning (default: 0)")
    auto.add_argument("--keeps", type=_number(float, 0, low_open=True), nargs="+", metavar="KEEP",
                      help="keep fractions each layer may get (default: 1 0.5 0.3 0.2 0.12 0.08 0.05 0.035 0.025 "
                           "0.018 0.012; with --max-latency, shares of units: 1 0.75 0.5 0.35 0.25)")
    auto.add_argument("--bits", type=_number(int, 0), nargs="+", metavar="B",
                      help="shared bit widths each layer may get, 0 for float values (default: 0 8 6 5 4 3 2)")
    auto.add_argument("--bias-bits", type=_number(int, 0), nargs="+", metavar="B",
                      help="bias grids each layer may end on, 0 for float biases (default: 8 6 5 4)")
    auto.add_argument("--ranking", choices=("magnitude", "variational"), default="magnitude",
                      help="which weights pruning keeps: the largest, or those sparse variational dropout learns "
                           "the model needs while it prunes (slower, better at a few percent kept; default: magnitude)")
    auto.add_argument("--coding", choices=("share", "rate"), default="share",
                      help="share: choose each layer's pruning and shared bits (default); rate: train the whole model "
                           "rate-aware (weights and their code learned together, see docs/recipes.md) and search its "
                           "one trade-off for the budget, --trials runs of --epochs each")
    auto.add_argument("--parallel", type=POSITIVE_INT, default=1, metavar="K",
                      help="with --max-drop or --max-error-rate, budgets tried at once in each round of the search (default: 1, a "
                           "bisection); worth raising with --ray")
    auto.add_argument("--ray", metavar="ADDRESS", nargs="?", const="auto",
                      help="run each round's trials as Ray tasks on a cluster: --ray alone (or 'auto') for the cluster "
                           "this machine belongs to (after `ray start --head`), HOST:PORT of a head node (its GCS port, "
                           "6379 unless `ray start --port` chose another), ray://HOST:10001 (Ray Client, needs "
                           "ray[client]), or 'local' to start one here. The same trials and result as without; sooner "
                           "only when the cluster has more cores than this machine (its tasks add start-up and "
                           "transfer time to the same work). Checked in seconds, before any long work")
    auto.add_argument("--seed", type=int, default=0)
    auto.add_argument("-o", "--output", type=Path, required=True, help="where to write the compressed model")

    report = sub.add_parser(
        "report", help="one self-contained HTML page of plots about a saved model",
        description="Bytes per layer (positions, values, the rest) read from the file; with the search record "
                    "`netshrink auto` wrote beside it (FILE.auto.json), each layer's sensitivity curves and the "
                    "search's trials; with --reference and --data, accuracy against bytes and against latency "
                    "(ONNX Runtime) with the peers' points. Example: netshrink report auto.nsk --reference "
                    "dense.nsk --data mnist -o report.html")
    report.add_argument("path", type=Path, help="a netshrink model file")
    report.add_argument("-o", "--output", type=Path, required=True, help="the HTML page to write")
    report.add_argument("--reference", type=Path, help="the dense model: adds the Pareto plots with the peers")
    report.add_argument("--data", choices=DATASETS, help="data set for the Pareto plots (default: mnist)")
    report.add_argument("--search", type=Path, help="auto's search record (default: FILE.auto.json if present)")
    report.add_argument("--repeats", type=POSITIVE_INT, default=50, help="timed runs per point (default: 50)")

    summary = sub.add_parser("summary", help="per-layer table of a saved model")
    summary.add_argument("path", type=Path)

    sub.add_parser("recipes", help="list the built-in recipes")

    download = sub.add_parser("download", help="download MNIST or Fashion-MNIST (needs a network)")
    download.add_argument("name", choices=("mnist", "fashion-mnist"))
    return parser


def import_holding_ctrl_c(*names: str) -> None:
    """Import modules with Ctrl-C held until every import is done, then honoured.

    A KeyboardInterrupt raised inside a C++ extension's initialisation (PyTorch, ONNX Runtime:
    pybind11) aborts the whole process with SIGABRT, a core dump and no cleanup. Commands import
    their heavy libraries here first, so an early Ctrl-C ends in the usual one-line "interrupted".
    Modules that are not installed are skipped: the command that needs one reports it.
    """
    import importlib
    import importlib.util
    import signal
    import threading

    names = [name for name in names if name not in sys.modules and importlib.util.find_spec(name) is not None]
    if not names:
        return
    if threading.current_thread() is not threading.main_thread():  # handlers are main-thread only
        for name in names:
            importlib.import_module(name)
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


# What every command imports; export and bench also load ONNX.
_HEAVY_IMPORTS = ("torch", "numpy", "netshrink.compress.api", "netshrink.store.artifact", "netshrink.training.fit")
_ONNX_IMPORTS = ("onnx", "onnxruntime")


def main(argv: list[str] | None = None) -> int:
    started = False
    try:
        args = build_parser().parse_args(argv)
        import_holding_ctrl_c(*_HEAVY_IMPORTS, *(_ONNX_IMPORTS if args.command in ("export", "bench") else ()),
                              *(("sklearn.datasets",) if getattr(args, "data", None) == "digits" else ()))
        from .training import distributed  # after PyTorch's import above

        if args.command in ON_RAY and (args.ray is not None or args.workers is not None):
            return _on_ray(args)
        started = distributed.start()  # launched by torchrun: one of several processes
        return _run_command(args)
    except NetshrinkError as exc:
        where = f"process {distributed.rank()}: " if started else ""
        sys.stderr.write(f"error: {where}{exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:
        if not _caused_by_ctrl_c(exc):
            raise
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        if started:
            distributed.stop()


ON_RAY = ("train", "compress")  # the commands that run as several processes with --ray


def _on_ray(args) -> int:
    """The command as processes of one job on a Ray cluster: each runs it as under torchrun."""
    from .training.ray_cluster import run_processes

    if args.workers is not None and args.ray is None:
        raise NetshrinkError("--workers goes with --ray")
    _outputs(args, args.output)
    if getattr(args, "path", None) is not None and not args.path.is_file():  # before a cluster is started
        raise NetshrinkError(f"cannot read file {args.path}: no such file")
    processes = f"{args.workers} processes" if args.workers else "one process a node"
    _print(f"on the Ray cluster at {args.ray}: {processes}, each a share of every batch; the first reports")
    return run_processes(_run_command, argparse.Namespace(**{**vars(args), "ray": None}), address=args.ray,
                         workers=args.workers) or 0


def _run_command(args) -> int:
    from .training import distributed

    distributed.shard_training(getattr(args, "shard", False))
    return COMMANDS[args.command](args) or 0


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """Some libraries wrap an interrupt that lands in their code (RuntimeError from __set_name__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _console():
    from .tables import console
    from .training import distributed

    return console(quiet=not distributed.is_main())  # several processes: the first one reports


def _print(text: str) -> None:
    _console().print(text)


def _print_rows(title: str, columns: list[str], rows: list[list]) -> None:
    from .tables import make_table

    _console().print(make_table(title, columns, rows))


def _outputs(args, *paths) -> None:
    """Check every output before any work: writable, not a folder, not the input file."""
    from .files import check_writable

    for path in paths:
        if path is not None:
            check_writable(path, inputs=(getattr(args, "path", None),))


def cmd_demo(args) -> int:
    from .demo import run_demo

    _outputs(args, args.markdown)
    run_demo(data=args.data, epochs=args.epochs, markdown_path=args.markdown)
    return 0


def cmd_train(args) -> int:
    from .training import distributed
    from .training.batches import check_model_fits, hold_out

    _outputs(args, args.output)
    if not args.validation < 1:
        raise NetshrinkError(f"--validation is a share of the training split in [0, 1). Received: {args.validation}")
    partial = args.output.with_name(args.output.name + ".partial")
    train, test = netshrink.load_dataset(args.data, "train"), netshrink.load_dataset(args.data, "test")
    held_out = {"share": args.validation, "seed": args.seed} if args.validation else None
    fitted, validation = hold_out(train, **held_out) if held_out else (train, None)
    model, done = netshrink.build_model(args.model, tuple(train.tensors[0].shape[1:])), 0
    if args.resume:
        model, done = _resumed(partial, args, held_out)
    check_model_fits(model, train)
    per_epoch = -(-len(fitted) // args.batch_size)
    info = {"data": args.data, "held_out": held_out, "model": args.model}

    def checkpoint(step: int, total: int) -> None:  # before each step: after a whole epoch, keep the model
        if step and step % per_epoch == 0:
            netshrink.save(model, partial, info={**info, "epochs_done": done + step // per_epoch, "seed": args.seed})

    try:
        # Sharded training brings the weights back only at its end: no model to keep after each epoch.
        result = netshrink.fit(model, fitted, epochs=args.epochs - done, lr=args.lr, batch_size=args.batch_size,
                               seed=args.seed + done, augment=args.augment,
                               on_step=None if distributed.sharding() and distributed.active() else checkpoint)
    except KeyboardInterrupt:
        if partial.exists():
            sys.stderr.write(f"the model after its last whole epoch is in {partial}: run the same command with "
                             "--resume to continue\n")
        raise
    accuracy = netshrink.evaluate(model, test)
    # What the model was trained on: `auto` scores on the held-out part, and refuses the data it saw.
    size = netshrink.save(model, args.output, info={"data": args.data, "test_accuracy": accuracy, "held_out": held_out})
    partial.unlink(missing_ok=True)
    validated = f"{100 * netshrink.evaluate(model, validation):.2f}%" if validation is not None else "- (none held out)"
    _print_rows("trained", ["model", "data", "epochs", "seconds", "held-out acc.", "test accuracy", "file", "bytes"],
                [[args.model, args.data, f"{args.epochs:g}", f"{result['seconds']:.1f}", validated,
                  f"{100 * accuracy:.2f}%", str(args.output), f"{size:,}"]])
    return 0


def _resumed(partial: Path, args, held_out: dict | None) -> tuple:
    """(the model in ``partial``, its whole epochs done), after checking it is this run's."""
    from .zoo.splits import recorded

    if not partial.exists():
        raise NetshrinkError(f"--resume continues from {partial}, which does not exist: nothing to resume")
    model = netshrink.load(partial, restore=False)
    info = recorded(model)
    wanted = {"data": args.data, "model": args.model, "seed": args.seed, "held_out": held_out}
    if any(info.get(key) != value for key, value in wanted.items()):
        raise NetshrinkError(f"{partial} is not this run's ({', '.join(f'{k}={info.get(k)!r}' for k in wanted)}); "
                             "resume with the same --model, --data, --seed and --validation, or delete it")
    done = info.get("epochs_done")
    if not (type(done) is int and 0 < done < args.epochs):
        raise NetshrinkError(f"{partial} records {done!r} epochs done, not fewer than --epochs {args.epochs:g}")
    return model, done


def cmd_evaluate(args) -> int:

    model = netshrink.load(args.path)
    accuracy = netshrink.evaluate(model, netshrink.load_dataset(args.data, "test"))
    _print_rows("evaluated", ["file", "data", "test accuracy", "error", "bytes"],
                [[str(args.path), args.data, f"{100 * accuracy:.2f}%", f"{100 * (1 - accuracy):.2f}%",
                  f"{args.path.stat().st_size:,}"]])
    return 0


def cmd_compress(args) -> int:
    import time

    from .store.artifact import from_bytes, to_bytes
    from .training.batches import check_model_fits, hold_out
    from .zoo.splits import recorded_hold_out

    quick = netshrink.Recipe.quick_steps(
        prune=args.prune, prune_method=args.prune_method, clip_percentile=args.clip_percentile,
        share_bits=args.share_bits, weight_bits=args.weight_bits, weight_method=args.weight_method,
        group_size=args.group_size, activation_bits=args.activation_bits, finetune=args.finetune, lr=args.lr,
        augment=args.augment, flags=True)
    if bool(args.recipe) == bool(quick):
        raise NetshrinkError("give either --recipe or quick options (--prune, --weight-bits, ...), not both or neither")
    if (args.path is None) == (args.model is None):
        raise NetshrinkError("give a model file or --model NAME (to train one first)")
    _outputs(args, args.output)
    recipe = netshrink.Recipe.load(args.recipe) if args.recipe else netshrink.Recipe.from_steps(quick, "quick")  # checked first
    train, test = netshrink.load_dataset(args.data, "train"), netshrink.load_dataset(args.data, "test")
    if args.path is not None:
        model = netshrink.load(args.path)
        held_out = recorded_hold_out(model, args.data, str(args.path))
    else:
        model = netshrink.build_model(args.model, tuple(train.tensors[0].shape[1:]))
        held_out = {"share": HELD_OUT, "seed": args.seed}  # as `netshrink train` holds it out
    check_model_fits(model, train)
    if held_out is not None:  # the part the model never saw stays unseen: `auto` may score on it later
        train = hold_out(train, held_out["share"], held_out["seed"])[0]
    if args.model is not None:
        netshrink.fit(model, train, epochs=args.epochs, lr=args.lr, seed=args.seed, augment=args.augment, desc="train dense")
    before = netshrink.evaluate(model, test)
    # The input file's own size (a model trained here first: the bytes it would have as a file).
    dense_bytes = args.path.stat().st_size if args.path is not None else len(to_bytes(model))
    started = time.perf_counter()
    rows = recipe.run(model, train, test, seed=args.seed,
                      on_row=lambda r: _print(f"  step {r['step']}: {r['what']}  "
                                              f"acc {100 * r['accuracy']:.2f}%  ({r['seconds']:.1f}s)"))
    after = rows[-1]["accuracy"]
    if args.max_error:  # the file holds rounded parameters: its own accuracy is the one to report
        after = netshrink.evaluate(from_bytes(to_bytes(model, max_error=args.max_error)), test)
    info = {"data": args.data, "test_accuracy": after, "held_out": held_out}
    size = netshrink.save(model, args.output, recipe=recipe.raw, info=info, max_error=args.max_error)
    _console().print(netshrink.summary(model, file_bytes=size).table(f"{args.output} (recipe: {recipe.name})"))
    # The summary above compares with fp32 values (4 bytes a parameter); this, with the input's own file.
    _print_rows(f"result ({time.perf_counter() - started:.0f}s)", ["", "test error", "file bytes", "vs the input file"],
                [["before", f"{100 * (1 - before):.2f}%", f"{dense_bytes:,}", "1.0x"],
                 ["after", f"{100 * (1 - after):.2f}%", f"{size:,}", f"{dense_bytes / size:.1f}x smaller"]])
    return 0


def cmd_export(args) -> int:
    from .deploy import format_of

    for flag in ("vnni", "portable"):
        if getattr(args, flag) and not args.int8:
            raise NetshrinkError(f"--{flag} goes with --int8")
    if args.format != "compressed-tensors":  # a file (that folder's files are checked as they are written)
        _outputs(args, args.output)
    target = format_of(args.output, args.format)
    if target != "onnx" and (args.int8 or args.low_bit):
        raise NetshrinkError(f"--int8 and --low-bit are ONNX choices; {target} always writes low-bit weights as they are")
    import torch

    model = netshrink.load(args.path)
    options = {}
    if target in ("onnx", "openvino"):
        options = dict(int8=args.int8, vnni=args.vnni, portable=args.portable, low_bit=args.low_bit or target == "openvino",
                       calibration=netshrink.load_dataset(args.data, "train") if args.int8 else None)
        if getattr(model, "main_input_name", None) == "input_ids":  # a transformers model: token ids, any length
            ids = torch.ones(1, 16, dtype=torch.long)
            options["example_inputs"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    report = netshrink.export(model, args.output, format=target, **options)
    if report is None:  # one of several processes: the first wrote the file and reports it
        return 0
    _print_rows(f"exported {args.output} ({'int8, ' + report.target if args.int8 else report.target})",
                ["layer", "exported as"], [list(row) for row in report.layers])
    for note in report.notes:
        _print(f"note: {note}")
    return 0


def cmd_bench(args) -> int:
    from .deploy.bench import random_tokens
    from .zoo.models import spec_of

    _outputs(args, args.markdown, args.plot)
    for path in args.compressed:
        if path == args.path:
            raise NetshrinkError(f"{path} is the reference already: list only compressed models after it")
    reference = netshrink.load(args.path)
    compressed = {path.stem: netshrink.load(path) for path in args.compressed} or {args.path.stem: reference}
    if "transformers" in (spec_of(reference) or {}):
        if args.data is not None:
            raise NetshrinkError("--data is for image models; a transformer is scored on random token sequences")
        longest = getattr(reference.config, "max_position_embeddings", None)
        if isinstance(longest, int) and args.sequence > longest:
            raise NetshrinkError(f"--sequence must be at most the model's {longest} positions. "
                                 f"Received: --sequence {args.sequence}")
        data, calibration = random_tokens(reference, length=min(64, args.sequence)), None
    else:
        data, calibration = _image_data(args.data or "mnist", reference, compressed)
    result = netshrink.benchmark(reference, data, compressed=compressed, calibration=calibration, threads=args.threads,
                       repeats=args.repeats, large_repeats=args.large_repeats, large_batch=args.large_batch,
                       sequence=args.sequence, profile=args.profile, runtimes=args.runtimes,
                       progress=lambda step: _print(f"  {step}"))
    _print_rows(f"{args.path.name} and {len(compressed)} netshrink model(s), {args.threads} threads",
                result.columns(), result.table())
    _print(f"machine: {result.machine}")
    for line in [*(f"note: {n}" for n in result.notes), *(f"warning: {w}" for w in result.warnings),
                 *result.verdict()]:
        _print(textwrap.fill(line, 110, subsequent_indent="  "))  # a note of several sentences: lines a person reads
    for name, ops in result.profiles.items():
        _print_rows(f"where the time goes: {name}", ["operator", "ms per run", "share"],
                    [[op, f"{ms:.2f}", f"{100 * share:.0f}%"] for op, ms, share in ops[:10]])
    if args.plot:
        _print(f"plot: {result.plot(args.plot, title=f'{args.path.name}: accuracy vs latency')}")
    if args.markdown:
        from .files import atomic_write

        atomic_write(args.markdown, (result.markdown() + "\n").encode())
    return 0


def _image_data(name: str, reference, compressed: dict):
    from .training.batches import check_model_fits

    test, train = netshrink.load_dataset(name, "test"), netshrink.load_dataset(name, "train")
    for model in (reference, *compressed.values()):
        check_model_fits(model, test)
    return test, train


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.stem + suffix)


def cmd_auto(args) -> int:
    import json

    from .files import atomic_write
    from .training.batches import check_model_fits
    from .zoo.splits import validation_split

    policy_path, search_path = _beside(args.output, ".yaml"), _beside(args.output, ".auto.json")
    _outputs(args, args.output, policy_path, search_path)
    train, test = netshrink.load_dataset(args.data, "train"), netshrink.load_dataset(args.data, "test")
    model = netshrink.load(args.path, restore=False)
    check_model_fits(model, train)
    train, validation, scored_on = validation_split(model, args.data, train, test, args.validation, args.seed,
                                                     str(args.path))
    _print(f"validation: {scored_on}")
    if args.ray is not None:
        from .training.ray_cluster import check_address

        cpus, here = check_address(args.ray), os.cpu_count() or 1
        _print(f"Ray cluster at {args.ray}: {cpus:g} CPUs" + (
            f", no more than this machine's {here}: its tasks add start-up and transfer time, so the search will "
            "take longer than without --ray" if cpus <= here else ""))
    dense_test = netshrink.evaluate(model, test)

    def show(trial: dict) -> None:
        speed = f"{1e3 * trial['latency']:.3f} ms, " if "latency" in trial else ""
        _print(f"  trial {trial['trial']}: {speed}{trial['file_bytes']:,} B, validation accuracy "
               f"{100 * trial['accuracy']:.2f}%  ({'; '.join(f'{n}: {d}' for n, d in trial['policy'].items())})")

    choices = {"keeps": tuple(args.keeps)} if args.keeps else {}
    if args.bits:
        choices["bits"] = tuple(b or None for b in args.bits)
    if args.bias_bits:
        choices["bias_bits"] = None if args.bias_bits == [0] else tuple(args.bias_bits)
    latency = {} if args.max_latency is None else {"max_latency": args.max_latency / 1e3, "threads": args.threads,
                                                   "latency_batch": args.latency_batch, "runtime": args.runtime}
    found = netshrink.auto(model, train, max_bytes=args.max_bytes, max_drop=args.max_drop,
                           max_error_rate=args.max_error_rate, **latency, validation=validation,
                 epochs=args.epochs, lr=args.lr, trials=args.trials, augment=args.augment, seed=args.seed,
                 ranking=args.ranking, parallel=args.parallel, address=args.ray, on_trial=show, coding=args.coding,
                           **choices)
    size = found.save(args.output)
    atomic_write(policy_path, found.yaml().encode())
    test_accuracy = netshrink.evaluate(found.model, test)
    record = {**found.to_json(), "data": args.data, "validation": scored_on, "dense_test_accuracy": dense_test,
              "test_accuracy": test_accuracy}
    atomic_write(search_path, json.dumps(record, indent=1).encode())
    dense_bytes = args.path.stat().st_size
    dense_row = ["dense", f"{100 * found.dense_accuracy:.2f}%" if found.dense_accuracy is not None else "-",
                 f"{100 * (1 - dense_test):.2f}%", f"{dense_bytes:,}", f"{found.dense_bytes / dense_bytes:.1f}x"]
    auto_row = ["auto", f"{100 * found.accuracy:.2f}%" if found.accuracy is not None else "-",
                f"{100 * (1 - test_accuracy):.2f}%", f"{size:,}", f"{found.dense_bytes / size:.1f}x"]
    columns = ["", "validation acc.", "test error" + (" (= validation)" if args.validation == "test" else ""),
               "file bytes", "vs fp32"]
    if found.latency is None:
        weights = {n: m.weight.numel() for n, m in found.model.named_modules() if n in found.policy}
        if not found.policy:  # rate-aware coding: one trade-off, its trials the table
            _print_rows("trials (rate-aware training)", ["trial", "trade-off (loss per KB)", "file bytes",
                                                         "validation accuracy", "within budget"],
                        [[str(t["trial"]), f"{t['tradeoff']:.4g}", f"{t['file_bytes']:,}",
                          f"{100 * t['accuracy']:.2f}%" if t["accuracy"] is not None else "-",
                          "yes" if t["passed"] else "no"] for t in found.trials])
        else:
            _print_rows("policy", ["layer", "weights", "setting", "predicted bytes", "damage (val. loss)"],
                        [[n, f"{weights[n]:,}", c.describe(), f"{c.bytes:,}", f"{c.damage:.4f}"]
                         for n, c in found.policy.items()])
        budget = (f"--max-bytes {args.max_bytes:,}" if args.max_bytes else f"--max-drop {args.max_drop:g}"
                  if args.max_drop is not None else f"--max-error-rate {args.max_error_rate:g}%")
    else:
        units = {n: max(c.units for c in found.sensitivity[n]) for n in found.policy}
        _print_rows("policy", ["group (first layer)", "units", "setting", "latency alone (ms)", "damage (val. loss)"],
                    [[n, f"{units[n]:,}", c.describe(), f"{1e3 * c.latency:.3f}", f"{c.damage:.4f}"]
                     for n, c in found.policy.items()])
        budget = f"--max-latency {args.max_latency:g} ms, batch {args.latency_batch}, {args.threads} threads, {args.runtime}"
        columns.append("ONNX Runtime ms")
        dense_row.append(f"{1e3 * found.dense_latency:.3f}")
        auto_row.append(f"{1e3 * found.latency:.3f} ({found.dense_latency / found.latency:.2f}x faster)")
    _print_rows(f"result ({budget}: {'met' if found.met else 'NOT met'})", columns + ["file"],
                [dense_row + [str(args.path)], auto_row + [str(args.output)]])
    _print(f"policy: {policy_path} (rerun: netshrink compress {args.path} --data {args.data} --recipe {policy_path} "
           f"-o again.nsk); search record: {search_path}")
    return 0 if found.met else 1


def cmd_report(args) -> int:

    _outputs(args, args.output)
    reference = data = calibration = None
    if args.reference is not None:
        reference = netshrink.load(args.reference)
        data, calibration = _image_data(args.data or "mnist", reference, {})
    elif args.data is not None:
        raise NetshrinkError("--data is for the Pareto plots: give --reference DENSE.nsk with it")
    page = netshrink.report_page(args.path, args.output, search=args.search, reference=reference, data=data,
                       calibration=calibration, repeats=args.repeats, progress=lambda step: _print(f"  {step}"))
    _print(f"report: {page} ({page.stat().st_size:,} B; open it in a browser)")
    return 0


def cmd_summary(args) -> int:
    import yaml


    model = netshrink.load(args.path)
    _console().print(netshrink.summary(model, file_bytes=args.path.stat().st_size).table(str(args.path)))
    recipe = model.netshrink_manifest.get("recipe")
    if recipe:
        _print("made by this recipe:\n" + yaml.safe_dump({"steps": recipe}, sort_keys=False).rstrip())
    return 0


def cmd_recipes(args) -> int:
    from .compress.recipe import builtin_recipes

    _print_rows("built-in recipes", ["name", "steps"],
                [[name, "; ".join(s.describe() for s in netshrink.Recipe.load(name).steps)] for name in builtin_recipes()])
    return 0


def cmd_download(args) -> int:
    from .zoo.datasets import download

    _print(f"downloaded to {download(args.name)}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "compress": cmd_compress,
            "export": cmd_export, "bench": cmd_bench, "auto": cmd_auto, "report": cmd_report,
            "summary": cmd_summary, "recipes": cmd_recipes, "download": cmd_download}

if __name__ == "__main__":
    sys.exit(main())
