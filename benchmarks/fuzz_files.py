"""Hostile files: load tens of thousands of mutated netshrink files and count what happens.

    python benchmarks/fuzz_files.py                 # 15,000 files (about 3 minutes on 2 cores)
    python benchmarks/fuzz_files.py --files 1500    # quicker

Seeds: fifteen valid files of different kinds: zoo models (a pruned + shared MLP with 8-bit
activations, a 4-bit LeNet-5, a dense LeNet-300-100, a structured-pruned LeNet-300-100, a GPTQ
3-bit LeNet-300-100 with grids per group of 16 inputs, a pruned resmobile with BatchNorm, residual
adds and depthwise convolutions, a LeNet-300-100 whose 1.2M-value first layer is coded in bands, a
near-lossless LeNet-300-100), a user CNN with BatchNorm loaded into a caller's model, and Hugging
Face models rebuilt from their recorded configs (an 8-bit BERT classifier, a head-pruned BERT, a
head-pruned MPNet keeping slices of its shared position bias, a 4-bit GPT-2 whose Conv1D layers
are stored as Linear), and two files earlier versions wrote (formats 2 and 4). Each mutated file is either ``raw`` damage (bit flips, byte edits,
insertions, deletions, truncation, header-length, JSON-number and version-field edits, manifest
edits) or the same damage ``resealed`` with a recomputed checksum, as a forger would; one kind of
mutation, ``forge``, writes what a forger would into the manifest (huge sizes and counts, shapes
that are not shapes, configs naming code or a Hub repository, label maps of 70,000 entries, fields
no writer makes). See ``netshrink/fuzz.py``.

Outcomes per load:
* ``clean error``: one-line NetshrinkError.
* ``other exception``: anything else escaping ``load`` (a bug).
* ``silent load (raw)``: damaged bytes that loaded anyway (a bug: the checksum must catch it).
* ``valid forgery loaded``: a resealed file that is a consistent netshrink file and loaded.
* ``cannot run``: a loaded model whose forward pass on a tiny input of its kind fails (a bug).
* ``inf/NaN out``: a loaded model whose outputs are not finite (a bug; no seed saves inf or NaN).
* ``over memory``: the load's peak resident memory above twice the honest seed's load plus 64 MiB
  (Linux's peak-RSS counter, reset before each load: numpy and torch allocations alike).
* ``slow``: a load taking over 2 s.
* ``network``: connections attempted during loads (every socket connection is refused and counted).
* ``caller changed``: a failed ``load(path, model=m)`` that left ``m`` different.

Writes benchmarks/results/fuzz_files.md.
"""
from __future__ import annotations

import argparse
import collections
import random
import re
import socket
import tempfile
import time
from pathlib import Path

import torch

import netshrink
from netshrink.store.fuzz import fingerprint, mutate, reseal
from netshrink.deploy.machine import describe
from netshrink.compress.methods.base import baked_state_dict
from netshrink.tables import markdown
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)


class UserCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _transformers_seeds() -> list[tuple[str, torch.nn.Module]]:
    import transformers

    torch.manual_seed(0)
    bert_config = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=40)
    classifier = transformers.BertForSequenceClassification(transformers.BertConfig(**bert_config, num_labels=3)).eval()
    netshrink.quantize(classifier, weight_bits=8)
    pruned = transformers.BertModel(transformers.BertConfig(**bert_config)).eval()
    netshrink.remove_heads(pruned, heads=0.5, neurons=0.5)
    mpnet = transformers.MPNetModel(transformers.MPNetConfig(**bert_config)).eval()
    netshrink.remove_heads(mpnet, heads=0.5)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=120, n_positions=40, n_embd=32, n_layer=2,
                                                                n_head=4)).eval()
    netshrink.quantize(gpt2, weight_bits=4, group_size=16)
    return [("BERT classifier, 8-bit (rebuilt from its config)", classifier),
            ("head-pruned BERT (rebuilt from its config)", pruned),
            ("head-pruned MPNet, kept slices of its position bias", mpnet),
            ("GPT-2, 4-bit, Conv1D stored as Linear", gpt2)]


def seeds(folder: Path) -> list[tuple[str, Path, object, object]]:
    """(label, path, skeleton factory or None, example input or None) for each seed file."""
    train = netshrink.load_dataset("digits", "train")
    made = []
    mlp = netshrink.build_model("mlp", (1, 8, 8))
    netshrink.prune(mlp, keep=0.2)
    netshrink.share(mlp, bits=4)
    netshrink.quantize(mlp, weight_bits=None, activation_bits=8, calibration=train)
    made.append(("pruned+shared MLP, 8-bit activations", mlp, None, {}))
    lenet5 = netshrink.build_model("lenet-5", (1, 28, 28))
    netshrink.quantize(lenet5, weight_bits=4)
    made.append(("4-bit LeNet-5", lenet5, None, {}))
    made.append(("dense LeNet-300-100", netshrink.build_model("lenet-300-100", (1, 8, 8)), None, {}))
    small, _ = netshrink.remove_units(netshrink.build_model("lenet-300-100", (1, 8, 8)), keep=0.5)
    netshrink.prune(small, keep=0.3)
    made.append(("structured + pruned LeNet-300-100", small, None, {}))
    grouped = netshrink.build_model("lenet-300-100", (1, 8, 8))
    netshrink.quantize(grouped, weight_bits=3, method="gptq", group_size=16, calibration=(train.tensors[0][:128],))
    made.append(("GPTQ 3-bit LeNet-300-100, grids per group of 16 (codes + scales)", grouped, None, {}))
    resmobile = netshrink.build_model("resmobile", (1, 16, 16))
    netshrink.prune(resmobile, keep=0.5)
    made.append(("pruned resmobile (BatchNorm, residual adds, depthwise convs)", resmobile, None, {}))
    made.append(("LeNet-300-100 on 64x64 inputs: a 1.2M-value layer coded in bands",
                 netshrink.build_model("lenet-300-100", (1, 64, 64)), None, {}))
    made.append(("near-lossless LeNet-300-100 (max_error=1e-3)", netshrink.build_model("lenet-300-100", (1, 8, 8)), None,
                 {"max_error": 1e-3}))
    cnn = UserCNN()
    cnn(torch.rand(16, 1, 8, 8))
    netshrink.prune(cnn, keep=0.5)
    made.append(("user CNN with BatchNorm, loaded into a caller's model", cnn, UserCNN, {}))
    made += [(label, model, None, {}) for label, model in _transformers_seeds()]
    out = []
    for i, (label, model, skeleton, options) in enumerate(made):
        path = folder / f"seed{i}.nsk"
        netshrink.save(model, path, **options)
        out.append((label, path, skeleton))
    fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures"  # files earlier netshrink versions wrote
    out += [(f"format-{v} LeNet-300-100 (netshrink {release}, checksummed)", fixtures / f"v{v}-lenet-digits.nsk", None)
            for v, release in ((2, "0.2-0.3"), (4, "0.6"))]
    return out


def state_of(model) -> tuple:
    return fingerprint(baked_state_dict(model)), repr(model)


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) << 10


class Meter:
    """Time, peak resident memory (Linux's VmHWM, reset through /proc/self/clear_refs before each
    load) and network connections of one load."""

    def __init__(self) -> None:
        self.connections = 0
        original = socket.socket.connect

        def refuse(sock, address, *args):
            self.connections += 1
            raise OSError("netshrink's fuzz benchmark refuses every connection")

        self.original, socket.socket.connect = original, refuse
        socket.socket.connect_ex = refuse

    def load(self, path: Path, model=None):
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        started = time.perf_counter()
        try:
            return netshrink.load(path, model=model)
        finally:
            self.seconds = time.perf_counter() - started
            self.peak = max(0, _status("VmHWM") - before)


def example_for(model, skeleton):
    """A tiny input of the loaded model's kind, or None."""
    spec = getattr(model, "spec", None)
    if skeleton is UserCNN:
        return torch.rand(2, 1, 8, 8)
    if isinstance(spec, dict):
        return torch.rand(2, *spec["in_shape"])
    if hasattr(model, "dummy_inputs"):
        return dict(model.dummy_inputs)
    return None


def runs(model, skeleton, manifest) -> tuple[bool, bool]:
    """(it runs, its outputs are finite) on a tiny input."""
    example = example_for(model, skeleton)
    if example is None:
        return True, True
    try:
        with torch.no_grad():
            out = model(**example) if isinstance(example, dict) else model(example)
    except Exception:  # noqa: BLE001 - counting exactly these is the point
        return False, True
    tensors = [out] if torch.is_tensor(out) else [v for v in out.values() if torch.is_tensor(v)]
    return True, all(bool(torch.isfinite(t).all()) for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=15_000, help="mutated files in all (default 15,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp())
    rows, totals = [], collections.Counter()
    other_types: collections.Counter = collections.Counter()
    slowest: list[tuple[float, str]] = []
    findings: list[str] = []  # what each failure was, for the result's last section
    loaded_kinds: collections.Counter = collections.Counter()
    started = time.perf_counter()
    seed_files = seeds(folder)
    meter = Meter()
    per_seed = args.files // len(seed_files)
    for label, path, skeleton in seed_files:
        data = path.read_bytes()
        for _ in range(2):  # the second honest load is the reference (the first warms caches)
            meter.load(path, skeleton() if skeleton else None)
        honest_peak = meter.peak
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
            connections = meter.connections
            try:
                model = meter.load(target, caller)
                counts["valid forgery loaded" if resealed else "silent load (raw)"] += 1
                ran, finite = runs(model, skeleton, None)
                counts["cannot run"] += not ran
                counts["inf/NaN out"] += not finite
                loaded_kinds[kind] += resealed
                if not (ran and finite) or not resealed:
                    findings.append(f"{label}: {kind} ({'resealed' if resealed else 'raw'}): "
                                    f"{'loaded silently' if not resealed else 'cannot run' if not ran else 'inf/NaN out'}")
                if caller is not None:
                    caller = skeleton()  # the next mutation loads into a fresh model
            except netshrink.NetshrinkError as exc:
                counts["clean error"] += 1 if "\n" not in str(exc) else 0
                counts["multi-line error"] += 1 if "\n" in str(exc) else 0
                if caller is not None and state_of(caller) != before:
                    counts["caller changed"] += 1
            except Exception as exc:  # noqa: BLE001 - counting exactly these is the point
                counts["other exception"] += 1
                other_types[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                findings.append(f"{label}: {kind}: {type(exc).__name__}: {str(exc)[:80]}")
            counts["over memory"] += meter.peak > 2 * honest_peak + (64 << 20)
            counts["slow"] += meter.seconds > 2
            counts["network"] += meter.connections - connections
            slowest.append((meter.seconds, f"{label}, {kind}"))
            counts["raw" if not resealed else "resealed"] += 1
        totals.update(counts)
        rows.append([label, f"{len(data):,}", counts["raw"], counts["resealed"], counts["clean error"],
                     counts["other exception"], counts["silent load (raw)"], counts["valid forgery loaded"],
                     counts["cannot run"], counts["inf/NaN out"], counts["over memory"], counts["slow"],
                     counts["network"], counts["caller changed"]])
    rows.append(["**all**", "", totals["raw"], totals["resealed"], totals["clean error"], totals["other exception"],
                 totals["silent load (raw)"], totals["valid forgery loaded"], totals["cannot run"], totals["inf/NaN out"],
                 totals["over memory"], totals["slow"], totals["network"], totals["caller changed"]])
    columns = ["seed file", "bytes", "raw", "resealed", "clean error", "other exception", "silent load (raw)",
               "valid forgery loaded", "cannot run", "inf/NaN out", "over memory", "slow (>2 s)", "network",
               "caller changed"]
    slowest.sort(reverse=True)
    lines = ["# Fuzzing netshrink files", "", command_line(__file__), "", f"Machine: {describe()}", "",
             f"{totals['raw'] + totals['resealed']:,} mutated files in {time.perf_counter() - started:.0f} s; "
             "see the script's docstring for what each column means. Slowest loads: "
             + "; ".join(f"{seconds:.2f} s ({what})" for seconds, what in slowest[:3]) + ".", "",
             markdown(columns, rows), ""]
    lines += ["Valid forgeries loaded, by mutation: resealed edits that leave a consistent file, mostly bits "
              "changed inside stored weight values (a forger chooses the weights; no check can tell them from "
              "the original's), and equivalent spellings (a version field \"05\", a field no reader uses):", "",
              ", ".join(f"{kind}: {n}" for kind, n in loaded_kinds.most_common()), ""]
    if other_types:
        lines += ["Exceptions other than NetshrinkError:", ""] + [f"* {n} x {t}" for t, n in other_types.most_common()]
    if findings:
        lines += ["", "Every failure:", ""] + [f"* {finding}" for finding in findings[:50]]
    write_results(Path(__file__).parent / "results" / "fuzz_files.md", lines)


if __name__ == "__main__":
    main()
