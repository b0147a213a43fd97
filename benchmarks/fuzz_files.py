"""Hostile files: load tens of thousands of mutated netshrink files and count what happens.

    python benchmarks/fuzz_files.py                 # 12,500 files (about 2-4 minutes)
    python benchmarks/fuzz_files.py --files 1000    # quicker

Seeds: six valid files of different kinds (pruned + shared MLP with 8-bit activations, a 4-bit
LeNet-5, a dense LeNet-300-100, a structured-pruned LeNet-300-100, a GPTQ 3-bit LeNet-300-100 with
grids per group of 16 inputs, and a user CNN with BatchNorm loaded into a caller's model). Each mutated file is either ``raw`` damage (bit flips, byte edits,
insertions, deletions, truncation, header-length and JSON-number edits) or the same damage
``resealed`` with a recomputed checksum, as a forger would. See ``netshrink/fuzz.py``.

Outcomes per load:
* ``clean error``: one-line NetshrinkError.
* ``other exception``: anything else escaping ``load`` (a bug).
* ``silent load (raw)``: damaged bytes that loaded anyway (a bug: the checksum must catch it).
* ``valid forgery loaded``: a resealed file that is a consistent netshrink file and loaded.
* ``over memory``: peak traced allocation above 2x the honest seed's load (numpy allocations,
  traced by tracemalloc) plus 1 MiB.
* ``slow``: a load taking over 2 s.
* ``caller changed``: a failed ``load(path, model=m)`` that left ``m`` different.

Writes benchmarks/results/fuzz_files.md.
"""
from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

import netshrink
from netshrink.fuzz import fingerprint, mutate, reseal
from netshrink.methods.base import baked_state_dict
from netshrink.report import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)


class UserCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def seeds(folder: Path) -> list[tuple[str, Path, object]]:
    """(label, path, skeleton factory or None) for each seed file."""
    train = netshrink.load_dataset("digits", "train")
    made = []
    mlp = netshrink.build_model("mlp", (1, 8, 8))
    netshrink.prune(mlp, keep=0.2)
    netshrink.share(mlp, bits=4)
    netshrink.quantize(mlp, weight_bits=None, activation_bits=8, calibration=train)
    made.append(("pruned+shared MLP, 8-bit activations", mlp, None))
    lenet5 = netshrink.build_model("lenet-5", (1, 28, 28))
    netshrink.quantize(lenet5, weight_bits=4)
    made.append(("4-bit LeNet-5", lenet5, None))
    made.append(("dense LeNet-300-100", netshrink.build_model("lenet-300-100", (1, 8, 8)), None))
    small, _ = netshrink.remove_units(netshrink.build_model("lenet-300-100", (1, 8, 8)), keep=0.5)
    netshrink.prune(small, keep=0.3)
    made.append(("structured + pruned LeNet-300-100", small, None))
    grouped = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.quantize(grouped, weight_bits=3, method="gptq", group_size=16, calibration=(train.tensors[0][:128],))
    made.append(("GPTQ 3-bit LeNet-300-100, grids per group of 16 (codes + scales)", grouped, None))
    cnn = UserCNN()
    cnn(torch.rand(16, 1, 8, 8))
    netshrink.prune(cnn, keep=0.5)
    made.append(("user CNN with BatchNorm, loaded into a caller's model", cnn, UserCNN))
    out = []
    for i, (label, model, skeleton) in enumerate(made):
        path = folder / f"seed{i}.nsk"
        netshrink.save(model, path)
        out.append((label, path, skeleton))
    return out


def state_of(model) -> tuple:
    return fingerprint(baked_state_dict(model)), repr(model)


def traced_load(path: Path, model=None):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        return netshrink.load(path, model=model)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        traced_load.last = (peak, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12_500, help="mutated files in all (default 12,500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp())
    rows, totals = [], collections.Counter()
    other_types: collections.Counter = collections.Counter()
    started = time.perf_counter()
    seed_files = seeds(folder)
    per_seed = args.files // len(seed_files)
    for label, path, skeleton in seed_files:
        data = path.read_bytes()
        traced_load(path, skeleton() if skeleton else None)
        honest_peak = traced_load.last[0]
        caller = skeleton() if skeleton else None
        counts = collections.Counter()
        for i in range(per_seed):
            kind, bad = mutate(data, rng)
            resealed = i % 2 == 1
            if resealed:
                bad = reseal(bad)
            if bad == data:
                counts["unchanged (skipped)"] += 1
                continue
            target = folder / "bad.nsk"
            target.write_bytes(bad)
            before = state_of(caller) if caller is not None else None
            try:
                traced_load(target, caller)
                counts["valid forgery loaded" if resealed else "silent load (raw)"] += 1
            except netshrink.NetshrinkError as exc:
                counts["clean error"] += 1 if "\n" not in str(exc) else 0
                counts["multi-line error"] += 1 if "\n" in str(exc) else 0
                if caller is not None and state_of(caller) != before:
                    counts["caller changed"] += 1
            except Exception as exc:  # noqa: BLE001 - counting exactly these is the point
                counts["other exception"] += 1
                other_types[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            peak, seconds = traced_load.last
            counts["over memory"] += peak > 2 * honest_peak + (1 << 20)
            counts["slow"] += seconds > 2
            counts["raw" if not resealed else "resealed"] += 1
        totals.update(counts)
        rows.append([label, f"{len(data):,}", counts["raw"], counts["resealed"], counts["clean error"],
                     counts["other exception"], counts["silent load (raw)"], counts["valid forgery loaded"],
                     counts["over memory"], counts["slow"], counts["caller changed"]])
    rows.append(["**all**", "", totals["raw"], totals["resealed"], totals["clean error"], totals["other exception"],
                 totals["silent load (raw)"], totals["valid forgery loaded"], totals["over memory"], totals["slow"],
                 totals["caller changed"]])
    columns = ["seed file", "bytes", "raw", "resealed", "clean error", "other exception", "silent load (raw)",
               "valid forgery loaded", "over memory", "slow (>2 s)", "caller changed"]
    table = markdown(columns, rows)
    lines = ["# Fuzzing netshrink files", "", command_line(__file__),
             f"{totals['raw'] + totals['resealed']:,} mutated files in {time.perf_counter() - started:.0f} s; "
             "see the script's docstring for what each column means.", "", table, ""]
    if other_types:
        lines += ["Exceptions other than NetshrinkError:", ""] + [f"* {n} x {t}" for t, n in other_types.most_common()]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "fuzz_files.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
