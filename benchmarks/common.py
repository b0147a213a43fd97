"""What every benchmark's committed result starts with."""
from __future__ import annotations

import sys
from pathlib import Path


def command_line(script: str) -> str:
    """The markdown line that tells how to reproduce a result: the exact command that was run."""
    return f"Command: `{' '.join(['python', f'benchmarks/{Path(script).name}', *sys.argv[1:]])}`  "


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
