"""What every benchmark's committed result starts with."""
from __future__ import annotations

import sys
from pathlib import Path


def command_line(script: str) -> str:
    """The markdown line that tells how to reproduce a result: the exact command that was run."""
    return f"Command: `python benchmarks/{Path(script).name} {' '.join(sys.argv[1:])}`".rstrip() + "  "
