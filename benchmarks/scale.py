"""Scale: prune, share, encode, save and load a synthetic 100-million-parameter model (no
fine-tuning), timing each phase and its peak resident memory.

    python benchmarks/scale.py                    # 100M parameters (about 2-4 minutes, ~6 GB peak)
    python benchmarks/scale.py --params 10e6      # quicker

Writes benchmarks/results/scale.md.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

import netshrink
from netshrink.report import markdown
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Phase:
    """Times a block and samples resident memory every 10 ms to find its peak."""

    def __init__(self, name: str, rows: list, volume_bytes: int) -> None:
        self.name, self.rows, self.volume = name, rows, volume_bytes

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.started
        self.running = False
        self.thread.join()
        self.rows.append([self.name, f"{seconds:.1f}", f"{self.peak / 2**30:.2f}",
                          f"{self.volume / 2**20 / seconds:.0f}"])
        print(self.rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    width = int(math.sqrt(args.params / args.layers))
    rows: list = []
    with Phase("build (random init)", rows, 0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(args.layers)])
        params = sum(p.numel() for p in model.parameters())
    volume = 4 * params
    with Phase(f"prune (keep {args.keep:.0%})", rows, volume):
        netshrink.prune(model, keep=args.keep)
    with Phase(f"share ({2 ** args.bits} centroids per layer)", rows, volume):
        netshrink.share(model, bits=args.bits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.nsk"
        with Phase("encode + save", rows, volume):
            size = netshrink.save(model, path)
        reference = model[0].weight.detach().clone()
        del model
        skeleton = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(args.layers)])
        with Phase("load + decode + verify", rows, volume):
            loaded = netshrink.load(path, model=skeleton)
        assert torch.equal(loaded[0].weight, reference)
    rows[0][3] = "-"
    text = "\n".join([
        "# Scale: compressing a synthetic 100M-parameter model", "",
        command_line(__file__),
        f"{args.layers} x Linear({width}, {width}) = {params:,} parameters ({volume / 2**20:,.0f} MiB fp32), "
        f"2 threads. File: {size:,} bytes ({volume / size:.1f}x smaller). Peak = resident set size sampled "
        "every 10 ms (the process as a whole, so it includes the model). MB/s = fp32 model MiB / phase seconds.",
        "", markdown(["phase", "seconds", "peak RSS (GiB)", "MiB/s"], rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
