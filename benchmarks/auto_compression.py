"""netshrink.auto on full MNIST: per-layer settings found under an accuracy budget, verified on the
real file and on the test set (which the search never sees).

    python benchmarks/auto_compression.py                       # LeNet-300-100 and LeNet-5
    python benchmarks/auto_compression.py --models lenet-300-100 --trials 4 --cache /tmp/auto
    python benchmarks/auto_compression.py --rankings variational    # one ranking only

Each model is searched with each pruning ranking (magnitude, and what sparse variational dropout
learns), side by side.

The dense model trains on 54,000 training images; the other 6,000 are the validation split auto
scores its choices and trials on. The budget is the issue's target test error (1.64% for
LeNet-300-100, 0.80% for LeNet-5) turned into a drop from the dense model's test error; auto
checks it on validation, and the table reports what the test set says.

Writes benchmarks/results/auto_compression.md, each model's policy recipe
(benchmarks/results/auto-<model>.yaml) and its HTML report, rendered in headless Chromium to
benchmarks/results/auto-<model>.png when a Chromium is installed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import netshrink
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

TARGET_ERROR = {"lenet-300-100": 1.64, "lenet-5": 0.80}
TARGET_RATIO = {"lenet-300-100": 100, "lenet-5": 200}
RESULTS = Path(__file__).parent / "results"


def split(train: TensorDataset, held_out: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = train.tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[order[held_out:]], y[order[held_out:]]), TensorDataset(x[order[:held_out]], y[order[:held_out]])


def dense_model(name: str, fit_data, epochs: float, augment: int, seed: int, cache: Path | None):
    path = cache / f"dense-{name}-{epochs:g}-{augment}-{seed}.nsk" if cache else None
    if path is not None and path.exists():
        return netshrink.load(path), 0.0
    model = netshrink.build_model(name, in_shape=tuple(fit_data.tensors[0].shape[1:]))
    started = time.perf_counter()
    netshrink.fit(model, fit_data, epochs=epochs, lr=1e-3, seed=seed, augment=augment, desc=f"{name} dense")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        netshrink.save(model, path)
    return model, time.perf_counter() - started


def render(html: Path, png: Path) -> bool:
    browser = next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return False
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2600",
                    f"--screenshot={png}", html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return png.exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TARGET_ERROR), choices=list(TARGET_ERROR))
    parser.add_argument("--dense-epochs", type=float, default=30)
    parser.add_argument("--epochs", type=float, default=20, help="fine-tuning epochs per trial")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--augment", type=int, default=2)
    parser.add_argument("--rankings", nargs="+", default=["magnitude", "variational"],
                        choices=["magnitude", "variational"], help="pruning rankings to search with, side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="keep dense models here between runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "auto_compression.md",
                        help="results file; a relative path is taken from this script's folder, as the recorded command shows")
    args = parser.parse_args()
    args.output = Path(__file__).parent / args.output  # an absolute --output stays as it is
    torch.set_num_threads(2)

    train, test = netshrink.load_dataset("mnist", "train"), netshrink.load_dataset("mnist", "test")
    fit_data, validation = split(train, 6000, args.seed)
    lines = ["# netshrink auto on MNIST: the smallest file within a test-error target", "",
             command_line(__file__),
             f"Machine: 2 CPU threads, torch {torch.__version__}. Dense models train on 54,000 images; auto scores "
             "choices and trials on the other 6,000 (validation) and never sees the test set. Ratios are dense fp32 "
             "bytes (4 per parameter) over the real file on disk.", "",
             "| model | pruning ranking | dense test error | target test error | budget (validation drop) | trials | "
             "file bytes | ratio | target ratio | test error | validation drop | bars met | search time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name in args.models:
        model, dense_seconds = dense_model(name, fit_data, args.dense_epochs, args.augment, args.seed, args.cache)
        dense_error = 100 * (1 - netshrink.evaluate(model, test))
        budget = max(0.0, TARGET_ERROR[name] - dense_error)
        for ranking in args.rankings:  # each measures its own sensitivity: what each ranking keeps differs
            started = time.perf_counter()
            found = netshrink.auto(model, fit_data, validation=validation, max_drop=budget, epochs=args.epochs,
                                   trials=args.trials, augment=args.augment, seed=args.seed, ranking=ranking,
                                   on_trial=lambda t: print(f"{name} {ranking} trial {t['trial']}: {t['file_bytes']:,} B, "
                                                            f"val {100 * t['accuracy']:.2f}%", flush=True))
            seconds = time.perf_counter() - started
            stem = f"auto-{name}" + ("" if ranking == "magnitude" else f"-{ranking}")
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{stem}.nsk"
                size = found.save(path)
                (Path(folder) / f"{stem}.auto.json").write_text(json.dumps(found.to_json()))
                error = 100 * (1 - netshrink.evaluate(netshrink.load(path), test))
                page = netshrink.report_page(path, RESULTS / f"{stem}.html")
            rendered = render(page, RESULTS / f"{stem}.png")
            (RESULTS / f"{stem}.yaml").write_text(f"# {command_line(__file__).strip()}\n" + found.yaml())
            ratio = found.dense_bytes / size
            met = error <= TARGET_ERROR[name] and ratio >= TARGET_RATIO[name]
            drop = 100 * (found.dense_accuracy - found.accuracy)
            lines.append(f"| {name} | {ranking} | {dense_error:.2f}% | {TARGET_ERROR[name]:.2f}% | {budget:.2f} pts | "
                         f"{len(found.trials)} | {size:,} | {ratio:.1f}x | {TARGET_RATIO[name]}x | {error:.2f}% | "
                         f"{drop:+.2f} pts | {'yes' if met else 'NO'} | {seconds:.0f}s |")
            details += _details(name, ranking, stem, found, dense_seconds, rendered)
            args.output.write_text("\n".join(lines + [""] + details) + "\n")  # written as each search finishes
    print("\n".join(lines))


def _details(name: str, ranking: str, stem: str, found, dense_seconds: float, rendered: bool) -> list[str]:
    details = [f"## {name}, {ranking} ranking", "", f"Dense training {dense_seconds:.0f}s (0 when cached). Policy "
               f"(`benchmarks/results/{stem}.yaml`), each layer's setting with its predicted bytes "
               "and its damage (validation loss increase alone, before fine-tuning):", "",
               "| layer | setting | predicted bytes | damage |", "|---|---|---|---|"]
    details += [f"| {n} | {c.describe()} | {c.bytes:,} | {c.damage:.4f} |" for n, c in found.policy.items()]
    details += ["", "Trials (each a full run with fine-tuning, verified on its real file):", "",
                "| trial | target bytes | predicted bytes | file bytes | validation accuracy | policy |",
                "|---|---|---|---|---|---|"]
    details += [f"| {t['trial']} | {t['target_bytes']:,} | {t['predicted_bytes']:,} | {t['file_bytes']:,} | "
                f"{100 * t['accuracy']:.2f}% | {'; '.join(f'{k}: {v}' for k, v in t['policy'].items())} |"
                for t in found.trials]
    details += ["", f"Report: `benchmarks/results/{stem}.html`" +
                (f", rendered in headless Chromium: ![report]({stem}.png)" if rendered else
                 " (no Chromium here to render it)"), ""]
    return details


if __name__ == "__main__":
    main()
