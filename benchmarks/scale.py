"""Scale: save and load synthetic models of 100 million parameters, dense, 8-bit, 4-bit and 90%
sparse, on one core: encode and decode throughput and peak memory.

    python benchmarks/scale.py                    # 100M parameters per model (about 5 minutes)
    python benchmarks/scale.py --params 10e6      # quicker

Each model is 10 x Linear(w, w) with weights drawn from N(0, 0.02^2), the initialisation of BERT
and GPT-2 and close to the bell shape of trained weights; "4-bit, uniform" uses PyTorch's default
(uniform) initialisation instead, the worst case for the fast packed coding. Every model runs
in its own process (``--variant``) with one thread, so memory figures do not mix. Throughput is
the fp32 model's MB (10^6 bytes) over the seconds of the tensor coder alone, and of the whole
``netshrink.save`` and ``netshrink.load``. Peak memory is the
process's resident set size sampled every 5 ms, above what it held before the model was built,
over the fp32 model's bytes: a save holds the model itself (1.0) plus what encoding adds.

Writes benchmarks/results/scale.md.
"""
from __future__ import annotations

import argparse
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

import netshrink
from netshrink import artifact
from netshrink.codec import weights as codec
from netshrink.report import markdown
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


def run_variant(name: str, width: int, layers: int) -> dict:
    """One model: built, compressed, saved, loaded into a fresh model and compared (in this process)."""
    torch.set_num_threads(1)
    init, compress = VARIANTS[name]
    model = build(width, layers, init)
    volume = 4 * sum(p.numel() for p in model.parameters())
    compress(model)
    expected = [layer.weight.detach().clone() for layer in model]  # compared after loading
    # The tensor coder alone, on the arrays a file stores (what save adds: baking transforms,
    # the manifest, checksums, the write; what load adds: rebuilding transforms, copying in).
    arrays = [a for a in artifact.stored_arrays(model).values() if a.dtype == np.float32]
    started = time.perf_counter()
    payloads = [codec.encode(a) for a in arrays]
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for payload, array in zip(payloads, arrays):
        codec.decode(payload, array.shape)
    decode_seconds = time.perf_counter() - started
    del arrays, payloads
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.nsk"
        before = rss_bytes()
        with Peak() as save:
            size = netshrink.save(model, path)
        save_peak = save.peak - before
        del model
        with torch.device("meta"):  # the way to load a model too large to hold twice: no memory until filled
            skeleton = build(width, layers, "uniform")
        before = rss_bytes()
        with Peak() as load:
            loaded = netshrink.load(path, model=skeleton)
        load_peak = load.peak - before
        exact = all(torch.equal(layer.weight.detach(), w) for layer, w in zip(loaded, expected))
        held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in loaded.state_dict().values()}.values())
    # The saved model (1x) is resident during save; a load fills a skeleton built on the meta device.
    return {"name": name, "volume": volume, "size": size, "encode_seconds": encode_seconds,
            "decode_seconds": decode_seconds, "save_seconds": save.seconds, "load_seconds": load.seconds,
            "save_peak": (save_peak + volume) / volume, "load_peak": load_peak / volume, "held": held / volume,
            "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = parser.parse_args()
    width = int(math.sqrt(args.params / args.layers))
    if args.variant:
        print(json.dumps(run_variant(args.variant, width, args.layers)))
        return
    rows = []
    for name in VARIANTS:
        print(f"{name} ...", flush=True)
        result = subprocess.run([sys.executable, __file__, "--variant", name, "--params", str(args.params),
                                 "--layers", str(args.layers)], capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        mb = r["volume"] / 1e6
        rows.append([name, f"{r['size']:,}", f"{r['volume'] / r['size']:.1f}x", f"{mb / r['encode_seconds']:.0f}",
                     f"{mb / r['decode_seconds']:.0f}", f"{mb / r['save_seconds']:.0f}", f"{mb / r['load_seconds']:.0f}",
                     f"{r['save_peak']:.2f}x", f"{r['load_peak']:.2f}x", f"{r['held']:.2f}x",
                     "yes" if r["exact"] else "**NO**"])
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
        "process's resident memory during the call over the fp32 model's bytes, counting the model itself "
        "(1.00x means nothing beyond the model). Loaded model = the bytes of the loaded model's tensors: a "
        "pruned model loaded with its transforms (the default) keeps a float32 mask beside each weight. Exact = "
        "every loaded weight equals the saved one bit for bit.",
        "", markdown(["model", "file bytes", "smaller", "encode MB/s", "decode MB/s", "save MB/s", "load MB/s",
                      "peak, save", "peak, load", "loaded model", "exact"], rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
