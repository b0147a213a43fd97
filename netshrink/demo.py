"""The founding walkthrough: train the founding MLP (784-128-10, Adam, 10 epochs) on MNIST, then
apply each method alone and all of them combined, and account for every result in one table. Written with the public API only, as a user would."""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console

import netshrink
from netshrink import ClipWeights, Prune, QuantizeActivations, QuantizeWeights

from .files import atomic_write
from .tables import console as report_console, make_table, markdown

COLUMNS = ["method", "settings", "params", "non-zero", "bits/w", "file bytes", "accuracy", "change"]


def _variants(train):
    """(label, settings, steps): a step is a method config, or an int: epochs of fine-tuning
    (Adam, lr 1e-3 annealed to 0: pruning 90% of a 128-unit MLP needs more than a gentle touch)."""
    calibration = {"calibration": train}
    return [
        ("dense", "fp32", []),
        ("clip", "T = 99th percentile of |w|", [ClipWeights(percentile=99.0)]),
        ("weight quantization", "4-bit symmetric, per channel", [QuantizeWeights(bits=4)]),
        ("weight quantization", "2-bit symmetric, per channel", [QuantizeWeights(bits=2)]),
        ("activation quantization", "8-bit, min/max calibration", [QuantizeActivations(bits=8)]),
        ("activation quantization", "4-bit, min/max calibration", [QuantizeActivations(bits=4)]),
        ("pruning", "keep 30% per layer", [Prune(keep=0.3)]),
        ("pruning", "keep 10% per layer", [Prune(keep=0.1)]),
        ("pruning", "keep 10%, 2 epochs fine-tuning", [Prune(keep=0.1), 2]),
        ("all four", "prune 10%, clip p99.9, w4, a8",
         [Prune(keep=0.1), ClipWeights(percentile=99.9), QuantizeWeights(bits=4), QuantizeActivations(bits=8)]),
        ("all four", "same, 2 epochs fine-tuning",
         [Prune(keep=0.1), ClipWeights(percentile=99.9), QuantizeWeights(bits=4), QuantizeActivations(bits=8), 2]),
    ], calibration


def run_demo(data: str = "mnist", epochs: float = 10, markdown_path: Path | None = None,
             console: Console | None = None) -> list[list]:
    console = console or report_console()
    train, test = netshrink.load_dataset(data, "train"), netshrink.load_dataset(data, "test")
    in_shape = tuple(train.tensors[0].shape[1:])
    dense = netshrink.build_model("mlp", in_shape)
    console.print(f"training the founding MLP on {data} ({len(train.tensors[0]):,} images, {epochs:g} epochs)")
    netshrink.fit(dense, train, epochs=epochs, lr=1e-3, batch_size=128, seed=0, lr_decay=False, desc="train")
    variants, context = _variants(train)
    rows, reference = [], None
    for label, settings, steps in variants:
        model = netshrink.build_model("mlp", in_shape)
        model.load_state_dict(dense.state_dict())
        for step in steps:
            if isinstance(step, int):
                netshrink.fit(model, train, epochs=step, lr=1e-3, seed=1, desc="fine-tune")
            else:
                netshrink.apply(model, step, **context)
        accuracy = netshrink.evaluate(model, test)
        reference = accuracy if reference is None else reference
        report = netshrink.summary(model)  # file bytes: the real coded file
        bits = max(r["bits"] for r in report.rows)
        rows.append([label, settings, f"{report.parameters:,}", f"{report.nonzero_weights:,}", bits,
                     f"{report.file_bytes:,}", f"{100 * accuracy:.2f}%",
                     f"{100 * (accuracy - reference):+.2f} pts"])
        console.print(f"  {label} ({settings}): {100 * accuracy:.2f}%")
    console.print(make_table(f"netshrink demo: founding MLP on {data}", COLUMNS, rows,
                             "bits/w: bits to name one stored value (most over layers and channels); "
                             "file bytes: the real netshrink file on disk, entropy coded"))
    if markdown_path is not None:  # the page says how it was made, so it cannot go stale unnoticed
        header = [f"# The founding walkthrough on {data}", "",
                  f"Command: `netshrink demo --data {data} --epochs {epochs:g} --markdown {markdown_path}` "
                  "(the terminal shows the same table).", "",
                  f"The founding MLP (Flatten, Linear {math.prod(in_shape)}-128, ReLU, Linear 128-10) trained with "
                  f"Adam for {epochs:g} epochs (lr 1e-3, batch 128, seed 0), then each method alone and all four "
                  "combined, applied to a copy of the trained model. 'file bytes' is the real netshrink file, entropy "
                  "coded; 'bits/w' is read off the stored values (bits to name one value in its channel); 'change' is "
                  "test accuracy against the dense model.", ""]
        atomic_write(markdown_path, ("\n".join(header) + "\n" + markdown(COLUMNS, rows) + "\n").encode())
    return rows
