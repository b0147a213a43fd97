"""Reproduce Table 1 of Deep Compression (Han et al. 2016) on full MNIST, on CPU, and measure the
real file on disk.

    python benchmarks/deep_compression.py                # both rows + beyond the paper (~35 min on 2 cores)
    python benchmarks/deep_compression.py --models lenet-300-100 --dense-epochs 20

Writes benchmarks/results/deep_compression.md (markdown tables + the command).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import netshrink
from netshrink.store.codec import weights as codec
from netshrink.store.artifact import stored_arrays
from netshrink.tables import markdown
from netshrink.reporting.summary import nominal_bits
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)

# Beyond the paper: sparser layers and narrower codebooks, same schedule shape, as a sweep.
def _further(keep: dict, bits, gradual_epochs: int, finetune_epochs: int) -> list:
    return [{"prune": {"keep": keep},
             "gradual": {"epochs": gradual_epochs, "lr": 0.001, "every": 100, "augment": 2}},
            {"finetune": {"epochs": finetune_epochs, "lr": 0.0005, "distill": True, "augment": 2}},
            {"share": {"bits": bits}},
            {"finetune": {"epochs": finetune_epochs // 2, "lr": 0.0002, "distill": True, "augment": 2}}]


FURTHER = {
    "lenet-300-100": {
        "further-5%-5bit": _further({"fc1": 0.05, "fc2": 0.07, "fc3": 0.25}, 5, 12, 8),
        "further-4%-4bit": _further({"fc1": 0.04, "fc2": 0.06, "fc3": 0.2}, 4, 12, 8),
    },
    "lenet-5": {
        "further-3%-4bit": _further({"conv1": 0.5, "conv2": 0.08, "fc1": 0.03, "fc2": 0.15},
                                    {"conv1": 5, "conv2": 6, "fc1": 4, "fc2": 4}, 8, 4),
    },
}

PAPER = {"lenet-300-100": {"error": 1.64, "compressed_error": 1.58, "ratio": 40, "kb": 27},
         "lenet-5": {"error": 0.80, "compressed_error": 0.74, "ratio": 39, "kb": 44}}


def layer_table(model) -> tuple[list[str], list[list]]:
    """Per-layer accounting in the shape of the paper's Table 2."""
    state = stored_arrays(model)
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        kept = int((w != 0).sum())
        coded_w, coded_b = len(codec.encode(w)), len(codec.encode(b))
        rows.append([name, f"{w.size:,}", f"{100 * kept / w.size:.1f}%", nominal_bits(torch.from_numpy(w)),
                     f"{8 * coded_w / max(kept, 1):.2f}", f"{coded_w + coded_b:,}",
                     f"{100 * (coded_w + coded_b) / (4 * (w.size + b.size)):.2f}%"])
    columns = ["layer", "weights", "kept", "value bits", "coded bits per kept weight (value + position)",
               "coded bytes (w + b)", "of dense fp32"]
    return columns, rows


def train_dense(name: str, dense_epochs: float, seed: int, augment: int, train, test):
    model = netshrink.build_model(name)
    started = time.perf_counter()
    netshrink.fit(model, train, epochs=dense_epochs, lr=1e-3, seed=seed, augment=augment, desc=f"{name} dense")
    return model, time.perf_counter() - started


def run(name: str, dense, dense_seconds: float, recipe, seed: int, out_dir: Path, train, test) -> dict:
    model = copy.deepcopy(dense)
    dense_error = 100 * (1 - netshrink.evaluate(dense, test))
    params = sum(p.numel() for p in dense.parameters())
    started = time.perf_counter()
    steps = recipe.run(model, train, test, seed=seed,
                       on_row=lambda r: print(f"  {name} step {r['step']}: {r['what']}: "
                                              f"error {100 * (1 - r['accuracy']):.2f}% ({r['seconds']:.0f}s)", flush=True))
    compress_seconds = time.perf_counter() - started
    path = out_dir / f"{name}-{recipe.name}.nsk"
    file_bytes = netshrink.save(model, path, recipe=recipe.raw)
    reloaded = netshrink.load(path)
    error = 100 * (1 - netshrink.evaluate(reloaded, test))
    payload = sum(len(codec.encode(a)) for a in stored_arrays(model).values())
    return {"name": name, "recipe": recipe.name, "params": params, "dense_error": dense_error, "error": error,
            "fp32_bytes": 4 * params, "file_bytes": file_bytes, "payload": payload,
            "dense_seconds": dense_seconds, "compress_seconds": compress_seconds,
            "layers": layer_table(model), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument("--dense-epochs", type=float, default=30)
    parser.add_argument("--augment", type=int, default=2, help="random shift of up to N pixels in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-only", action="store_true", help="skip the configurations beyond the paper")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "deep_compression.md")
    parser.add_argument("--keep-files", type=Path, help="keep the compressed .nsk files in this folder "
                        "(benchmarks/codec.py encodes their weights with every codec)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep_files:
            args.keep_files.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            dense, seconds = train_dense(name, args.dense_epochs, args.seed, args.augment, train, test)
            recipes = [netshrink.Recipe.load(f"deep-compression-{name}")]
            if not args.paper_only:
                recipes += [netshrink.Recipe.from_steps(steps, label) for label, steps in FURTHER[name].items()]
            results += [run(name, dense, seconds, recipe, args.seed, args.keep_files or Path(tmp), train, test)
                        for recipe in recipes]
    lines = ["# Deep Compression on MNIST: paper's Table 1 vs netshrink", "",
             command_line(__file__),
             f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}. "
             "Ratios are against dense fp32 (4 bytes per parameter, what the paper counts). "
             "'payload' is the encoded tensors alone; 'file' is the real .nsk file on disk "
             "(safetensors header + JSON manifest with the recipe and checksums included).", ""]
    columns = ["network", "recipe", "paper error ref -> compressed", "paper size / ratio", "netshrink error dense -> compressed",
               "payload bytes (ratio)", "file bytes on disk (ratio)", "bar met"]
    rows = []
    for r in results:
        p = PAPER[r["name"]]
        ratio = r["fp32_bytes"] / r["file_bytes"]
        met = ratio >= p["ratio"] and r["error"] <= p["error"]
        rows.append([r["name"], r["recipe"], f"{p['error']:.2f}% -> {p['compressed_error']:.2f}%", f"{p['kb']} KB / {p['ratio']}x",
                     f"{r['dense_error']:.2f}% -> {r['error']:.2f}%",
                     f"{r['payload']:,} ({r['fp32_bytes'] / r['payload']:.1f}x)",
                     f"{r['file_bytes']:,} ({ratio:.1f}x)", "yes" if met else "NO"])
    lines += [markdown(columns, rows), ""]
    for r in results:
        lines += [f"## {r['name']}, recipe {r['recipe']}: per layer (shape of the paper's Table 2)", "",
                  markdown(*r["layers"]), "",
                  f"Dense training {r['dense_seconds']:.0f}s; recipe {r['compress_seconds']:.0f}s. Steps:", "",
                  markdown(["step", "what", "test error after", "seconds"],
                           [[s["step"], s["what"], f"{100 * (1 - s['accuracy']):.2f}%", f"{s['seconds']:.0f}"]
                            for s in r["steps"]]), ""]
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
