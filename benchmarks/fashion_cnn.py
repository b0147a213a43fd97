"""A ResNet/MobileNet-style CNN (the zoo's ``resmobile``: BatchNorm, a residual block with a 1x1
projection shortcut, an inverted residual with a depthwise convolution, a depthwise-separable
block) on Fashion-MNIST: every method on the same trained model, and ONNX Runtime int8.

    apt-get install dataset-fashion-mnist
    python benchmarks/fashion_cnn.py                  # about 25 minutes on 2 cores
    python benchmarks/fashion_cnn.py --epochs 2       # quicker

Post-training rows change the trained model without any training; "+ N ft" rows then fine-tune
N epochs with distillation from the dense model (lr 1e-3, cosine). MACs are multiply-accumulates
of the Linear/Conv layers for one image. Bytes are the .nsk file on disk. Writes
benchmarks/results/fashion_cnn.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import netshrink
from netshrink.compress.methods.structured import RemoveUnits
from netshrink.tables import markdown
from common import command_line, macs  # benchmarks/common.py (scripts run from this folder's path)


def ort_accuracy(path: Path, test) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = test.tensors
    predictions = np.concatenate([session.run(None, {"input": x[i:i + 1000].numpy()})[0].argmax(1)
                                  for i in range(0, len(x), 1000)])
    return float((predictions == y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=8, help="dense training epochs (default 8)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = netshrink.load_dataset("fashion-mnist", "train"), netshrink.load_dataset("fashion-mnist", "test")
    folder = Path(tempfile.mkdtemp())
    x_example = test.tensors[0][:8]
    started = time.perf_counter()
    dense = netshrink.build_model("resmobile")
    netshrink.fit(dense, train, epochs=args.epochs, lr=2e-3, augment=2, desc="dense")
    train_seconds = time.perf_counter() - started
    dense_accuracy = netshrink.evaluate(dense, test)
    dense_macs = macs(dense, x_example)
    rows = []

    def row(name, model, seconds, note=""):
        size = netshrink.save(model, folder / "m.nsk")
        accuracy = netshrink.evaluate(model, test)
        rows.append([name, f"{sum(p.numel() for p in netshrink.bake(copy.deepcopy(model)).parameters()):,}",
                     f"{macs(model, x_example) / 1e6:.2f}M", f"{size:,}", f"{100 * accuracy:.2f}%",
                     f"{100 * (accuracy - dense_accuracy):+.2f}", f"{seconds:.0f}", note])
        print(rows[-1], flush=True)
        return accuracy

    def finetune(model, epochs):
        netshrink.fit(model, train, epochs=epochs, lr=1e-3, teacher=dense, desc="fine-tune")

    def timed(steps):
        model = copy.deepcopy(dense)
        begun = time.perf_counter()
        result = steps(model)
        return (result if result is not None else model), time.perf_counter() - begun

    row("dense fp32", dense, train_seconds, f"{args.epochs:g} epochs, shift augmentation")
    calibration = (train.tensors[0][:2048], train.tensors[1][:2048])
    for name, steps in [
        ("clip at the 99.9th percentile", lambda m: netshrink.clip(m, percentile=99.9) and None),
        ("8-bit weights", lambda m: netshrink.quantize(m, weight_bits=8) and None),
        ("8-bit weights + 8-bit activations", lambda m: netshrink.quantize(
            m, weight_bits=8, activation_bits=8, calibration=calibration) and None),
        ("4-bit weights", lambda m: netshrink.quantize(m, weight_bits=4) and None),
        ("4-bit weights + 1 ft", lambda m: (netshrink.quantize(m, weight_bits=4), finetune(m, 1)) and None),
        ("keep 50% (magnitude)", lambda m: netshrink.prune(m, keep=0.5) and None),
        ("keep 50% + 1 ft", lambda m: (netshrink.prune(m, keep=0.5), finetune(m, 1)) and None),
        ("2:4 sparsity + 1 ft", lambda m: (netshrink.apply(m, netshrink.NMSparsity(n=2, m=4)), finetune(m, 1)) and None),
        ("shared weights, 4 bits", lambda m: netshrink.share(m, bits=4) and None),
    ]:
        model, seconds = timed(steps)
        row(name, model, seconds, "post-training" if "ft" not in name else "")

    # Structured: a fraction of the units of every prunable group (residual groups together), then
    # 3 epochs of distillation. keep=0.7 removes about half of the MACs (the goal); 0.5 about 3/4.
    structured_reports, structured = {}, None
    for keep in (0.7, 0.5):
        model, seconds = timed(lambda m: netshrink.apply(m, RemoveUnits(keep=keep), calibration=x_example) and None)
        structured_reports[keep] = netshrink.apply(copy.deepcopy(dense), RemoveUnits(keep=keep), calibration=x_example)
        cut = f"MACs -{100 * (1 - macs(model, x_example) / dense_macs):.0f}%"
        row(f"structured, keep {keep:g} of each channel group (no ft)", model, seconds, cut)
        begun = time.perf_counter()
        finetune(model, 3)
        accuracy = row(f"structured, keep {keep:g} + 3 ft", model, seconds + time.perf_counter() - begun, cut)
        if structured is None:
            structured, structured_accuracy, structured_keep = model, accuracy, keep

    # ONNX Runtime int8 (7-bit weights exact, calibrated 8-bit activations) of the dense and the
    # structured model, against the same models in PyTorch.
    onnx_rows = []
    for name, source in (("dense", dense), (f"structured, keep {structured_keep:g} + 3 ft", structured)):
        model = copy.deepcopy(source)
        netshrink.quantize(model, weight_bits=7, activation_bits=8, calibration=calibration)
        in_torch = netshrink.evaluate(model, test)
        netshrink.export(model, folder / "m.onnx", int8=True)
        in_ort = ort_accuracy(folder / "m.onnx", test)
        onnx_rows.append([name, f"{100 * in_torch:.2f}%", f"{100 * in_ort:.2f}%", f"{100 * (in_ort - in_torch):+.2f}",
                          f"{os.path.getsize(folder / 'm.onnx'):,}"])
        print(onnx_rows[-1], flush=True)

    columns = ["method", "parameters", "MACs / image", "file bytes", "test accuracy", "vs dense (points)", "seconds",
               "note"]
    coupled = [f"{layer}: {detail}" for layer, detail in structured_reports[structured_keep].changed]
    text = "\n".join([
        "# ResNet/MobileNet-style CNN on Fashion-MNIST: every method", "", command_line(__file__),
        f"torch {torch.__version__}, 2 threads. Dense model: zoo `resmobile`, {dense_macs / 1e6:.2f}M MACs per image.", "",
        "Goals: structured pruning removing at least 50% of the MACs within 1 point of dense after a short fine-tune; "
        "int8 ONNX within 0.3 points of PyTorch.", "",
        markdown(columns, rows), "",
        f"Structured pruning at keep {structured_keep:g}: {structured_accuracy * 100:.2f}% after 3 epochs of fine-tuning vs "
        f"{dense_accuracy * 100:.2f}% dense ({100 * (structured_accuracy - dense_accuracy):+.2f} points); what it removed "
        "(residual-coupled layers shrink together, depthwise convolutions follow):", "",
        *[f"- {line}" for line in coupled], "",
        "## ONNX Runtime int8 (7-bit weights, 8-bit calibrated activations)", "",
        markdown(["model", "PyTorch (netshrink)", "ONNX Runtime int8", "difference (points)", "ONNX bytes"], onnx_rows),
        ""])
    (Path(__file__).parent / "results" / "fashion_cnn.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
