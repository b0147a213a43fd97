"""Scale: save and load synthetic models of 100 million parameters, dense, 8-bit, 4-bit and 90%
sparse, on one core: encode and decode throughput and peak memory.

    python benchmarks/scale.py                    # 100M parameters per model (about 5 minutes)
    python benchmarks/scale.py --params 10e6      # quicker

Each model is 10 x Linear(w, w) with weights drawn from N(0, 0.02^2), the initialisation of BERT
and GPT-2 and close to the bell shape of trained weights; "4-bit, uniform" uses PyTorch's default
(uniform) initialisation instead, the worst case for the fast packed coding. Every model runs
with one thread. Throughput is
the fp32 model's MB (10^6 bytes) over the seconds of the tensor coder alone, and of the whole
``netshrink.save`` and ``netshrink.load``. Peak memory is the
process's resident set size sampled every 5 ms, above what it held after its imports, over the
fp32 model's bytes; the coder, the save and the load each run in a process of their own (memory
freed while building the model is returned to the system before the save is measured).

Writes benchmarks/results/scale.md.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import netshrink
from netshrink.store import artifact
from netshrink.store.codec import weights as codec
from netshrink.tables import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

VARIANTS = {  # name: (initialisation, what netshrink does to the model before it is saved)
    "dense fp32": ("normal", lambda model: None),
    "8-bit": ("normal", lambda model: netshrink.quantize(model, weight_bits=8)),
    "4-bit": ("normal", lambda model: netshrink.quantize(model, weight_bits=4)),
    "4-bit, uniform": ("uniform", lambda model: netshrink.quantize(model, weight_bits=4)),
    "90% sparse fp32": ("normal", lambda model: netshrink.prune(model, keep=0.1)),
    "90% sparse, 4-bit": ("normal", lambda model: (netshrink.prune(model, keep=0.1),
                                                   netshrink.quantize(model, weight_bits=4))),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Samples resident memory every 5 ms while a block runs; ``seconds`` and ``peak`` after it."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(width: int, layers: int, init: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    if init == "normal":
        with torch.no_grad():
            for layer in model:
                layer.weight.normal_(0, 0.02)
    return model


def compressed(name: str, width: int, layers: int) -> torch.nn.Sequential:
    init, compress = VARIANTS[name]
    model = build(width, layers, init)
    compress(model)
    return model


def run_phase(phase: str, name: str, width: int, layers: int, path: Path) -> dict:
    """One phase for one model, in a process of its own: "coder" times the tensor coder alone on
    the arrays a file stores; "save" builds the model and saves it to ``path`` (with its weights
    beside it, to check the load); "load" fills a skeleton built on the meta device from ``path``.
    Peak memory is the process's highest resident size above what it held after its imports."""
    torch.set_num_threads(1)
    baseline = rss_bytes()
    if phase == "coder":
        arrays = [a for a in artifact.stored_arrays(compressed(name, width, layers)).values() if a.dtype == np.float32]
        started = time.perf_counter()
        payloads = [codec.encode(a) for a in arrays]
        encode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for payload, array in zip(payloads, arrays):
            codec.decode(payload, array.shape)
        return {"encode_seconds": encode_seconds, "decode_seconds": time.perf_counter() - started}
    if phase == "save":
        model = compressed(name, width, layers)
        with torch.no_grad():  # (with gradients, a pruned layer's weight would make its mask's float copy for training)
            save_file({str(i): layer.weight.contiguous() for i, layer in enumerate(model)}, path.with_suffix(".expected"))
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory building the model freed goes back first
        with Peak() as save:
            size = netshrink.save(model, path)
        return {"size": size, "save_seconds": save.seconds, "save_peak": save.peak - baseline, "model": held(model)}
    with torch.device("meta"):  # the way to load a model too large to hold twice: no memory until filled
        skeleton = build(width, layers, "uniform")
    with Peak() as load:
        loaded = netshrink.load(path, model=skeleton)
    expected = load_file(path.with_suffix(".expected"))
    exact = all(torch.equal(layer.weight.detach(), expected[str(i)]) for i, layer in enumerate(loaded))
    return {"load_seconds": load.seconds, "load_peak": load.peak - baseline, "loaded": held(loaded), "exact": exact}


def held(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors (shared storage once)."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--phase", choices=("coder", "save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = parser.parse_args()
    width = int(math.sqrt(args.params / args.layers))
    if args.variant:
        print(json.dumps(run_phase(args.phase, args.variant, width, args.layers, args.path)))
        return
    rows = []
    volume = 4 * args.layers * (width * width + width)
    for name in VARIANTS:
        print(f"{name} ...", flush=True)
        r: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            for phase in ("coder", "save", "load"):
                result = subprocess.run([sys.executable, __file__, "--variant", name, "--phase", phase, "--params",
                                         str(args.params), "--layers", str(args.layers), "--path", str(Path(tmp) / "m.nsk")],
                                        capture_output=True, text=True, check=True)
                r.update(json.loads(result.stdout.strip().splitlines()[-1]))
        mb = volume / 1e6
        rows.append([name, f"{r['size']:,}", f"{volume / r['size']:.1f}x", f"{mb / r['encode_seconds']:.0f}",
                     f"{mb / r['decode_seconds']:.0f}", f"{mb / r['save_seconds']:.0f}", f"{mb / r['load_seconds']:.0f}",
                     f"{r['save_peak'] / volume:.2f}x (model {r['model'] / volume:.2f}x)",
                     f"{r['load_peak'] / volume:.2f}x (model {r['loaded'] / volume:.2f}x)", "yes" if r["exact"] else "**NO**"])
        print(rows[-1], flush=True)
    params = args.layers * (width * width + width)
    text = "\n".join([
        "# Scale: saving and loading 100M-parameter models on one core", "",
        command_line(__file__),
        f"{args.layers} x Linear({width}, {width}) = {params:,} parameters ({4 * params / 1e6:,.0f} MB fp32) per "
        "model, one thread, MB of fp32 model per second. Encode and decode: the tensor coder alone "
        "(`codec.weights`) on the arrays the file stores. Save: all of `netshrink.save` (baking the weight "
        "transforms, coding, manifest, checksum, atomic write); load: all of `netshrink.load` into a fresh "
        "model built on the meta device (checksum, decoding, checks, rebuilding the transforms). Peak = the "
        "process's highest resident memory above its imports (each call in a process of its own) over the "
        "fp32 model's bytes, counting the model itself, whose own tensors are given in brackets: a pruned "
        "model with its transforms (as pruned, and as loaded by default) keeps a boolean mask beside each "
        "weight (and, after training steps, a float copy of it until `eval()` or saving lets it go). Exact = "
        "every loaded weight equals the saved one bit for bit.",
        "", markdown(["model", "file bytes", "smaller", "encode MB/s", "decode MB/s", "save MB/s", "load MB/s",
                      "peak, save", "peak, load", "exact"], rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
