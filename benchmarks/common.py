"""What every benchmark's committed result starts with, and how it is written."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def write_results(path: Path, lines: list[str], quiet: bool = False) -> None:
    """Write a benchmark's markdown result to ``path`` (its folder made if missing) and show it
    (``quiet``: only write, for a result written again as each row is measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


def command_line(script: str) -> str:
    """The markdown line that tells how to reproduce a result: the exact command that was run."""
    where = Path(script).resolve()
    return f"Command: `{' '.join(['python', f'{where.parent.name}/{where.name}', *sys.argv[1:]])}`  "


def timing_arguments(parser, repeats: int, large_repeats: int, large: str = "batch 256") -> None:
    """The options every latency benchmark takes: threads, and timed runs at batch 1 and at ``large``."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per candidate at batch 1")
    parser.add_argument("--large-repeats", type=int, default=large_repeats, help=f"timed runs per candidate at {large}")


def operator_table(paths: dict, feed: dict, threads: int, limit: int | None = None) -> list[str]:
    """ONNX Runtime's per-operator profile of each graph in ``paths`` (name: ONNX file) on ``feed``, as
    markdown rows side by side (ms per run), largest operators first (the ``limit`` largest), and
    the sum over all operators."""
    from netshrink.deploy.bench import operator_profile

    profiles = [dict((op, ms) for op, ms, _ in operator_profile(path, feed, threads)) for path in paths.values()]
    ops = sorted({op for p in profiles for op in p}, key=lambda op: -max(p.get(op, 0) for p in profiles))[:limit]
    return ["| operator | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths),
            *(f"| {op} | " + " | ".join(f"{p[op]:.2f}" if op in p else "-" for p in profiles) + " |" for op in ops),
            "| all operators | " + " | ".join(f"{sum(p.values()):.2f}" for p in profiles) + " |"]


def macs(model, x) -> int:
    """Multiply-accumulates of the Linear/Conv layers for one input, counted with forward hooks."""
    import torch

    total = [0]

    def hook(module, args, out):
        total[0] += out[0].numel() * module.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total[0]


def run_offline(main, scratch: Path) -> None:
    """Run a benchmark's ``main`` with models read from disk only, then remove ``scratch`` (the
    files it exported: hundreds of MB), whether it finished or not."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
