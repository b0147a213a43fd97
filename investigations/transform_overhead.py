"""Forward + backward cost of the weight transforms' formulations (why Mask multiplies and why
FakeQuantize uses an in-place grid with an identity backward).

    python investigations/transform_overhead.py

One 300 x 784 weight (LeNet-300-100's fc1), one thread, median of 300 runs of forward + backward,
all formulations in this run. Writes investigations/results/transform_overhead.md.
"""
from __future__ import annotations

import sys
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from netshrink.compress.methods.quantize import FakeQuantize, fake_quantize, quantization_grid, straight_through
from netshrink.tables import markdown
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # their shared parts
from common import command_line  # benchmarks/common.py


def cost(make, repeats: int) -> float:
    for _ in range(20):
        make().sum().backward()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        make().sum().backward()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "transform_overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(300, 784, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    bool_mask = torch.rand(300, 784, generator=torch.Generator().manual_seed(1)) < 0.1
    float_mask, zero = bool_mask.float(), torch.zeros(())

    def fused():
        scale, zero_point, qmin, qmax = quantization_grid(w, 4, "symmetric", True)
        return torch.fake_quantize_per_channel_affine(w, scale.flatten(), zero_point.flatten().to(torch.int32),
                                                      0, qmin, qmax)

    variants = [
        ("identity (w * 1)", lambda: w * 1),
        ("mask: torch.where(mask, w, 0)", lambda: torch.where(bool_mask, w, zero)),
        ("mask: w * float mask (netshrink while training)", lambda: w * float_mask),
        ("mask: w * bool mask (netshrink's stored mask, in eval)", lambda: w * bool_mask),
        ("4-bit: straight-through sum q + (w - w.detach())",
         lambda: straight_through(fake_quantize(w.detach(), 4, "symmetric", True), w)),
        ("4-bit: torch.fake_quantize_per_channel_affine", fused),
        ("4-bit: in-place grid, identity backward (netshrink)", lambda: FakeQuantize(4)(w)),
    ]
    timings = [(label, cost(make, args.repeats)) for label, make in variants]
    base = timings[0][1]
    rows = [[label, f"{seconds * 1e6:.0f}", f"{seconds / base:.2f}x"] for label, seconds in timings]
    text = "\n".join(["# Weight transform formulations: forward + backward cost", "", command_line(__file__),
                      "One 300 x 784 weight, 1 thread, median of "
                      f"{args.repeats} runs, torch {torch.__version__}.", "",
                      markdown(["formulation", "microseconds", "vs identity"], rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
