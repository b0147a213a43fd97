"""What every benchmark's committed result starts with."""
from __future__ import annotations

import sys
from pathlib import Path


def command_line(script: str) -> str:
    """The markdown line that tells how to reproduce a result: the exact command that was run."""
    return f"Command: `{' '.join(['python', f'benchmarks/{Path(script).name}', *sys.argv[1:]])}`  "
