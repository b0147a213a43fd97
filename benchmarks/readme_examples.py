"""The README's Python example (full MNIST) and the command-line walkthrough of docs/cli.md (digits),
run verbatim on a fresh folder, with the time each took and the accuracy each compressed model keeps
against its dense model. The tests run the same blocks; this records what they give.

    python benchmarks/readme_examples.py            # about 3 minutes on 2 cores

The Python block under "An example" is written to a file and run as it stands; the lines of the
first bash block of docs/cli.md are run one by one (``netshrink bench`` is left out: its results
live in benchmarks/results/deployment-*.md), each with the time it took. `auto` exits 1 when its
budget is not met and 2 when it refuses a budget it can show is out of reach here: both are
reported, not a failure. Writes benchmarks/results/readme_examples.md.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netshrink.deploy.machine import describe
from common import command_line  # benchmarks/common.py (scripts run from this folder's path)

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = ("netshrink bench",)


def block(markdown: str, heading: str, language: str) -> str:
    section = markdown.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def accuracy(text: str, label: str) -> float:
    return float(re.search(rf"{label}\D*?(\d+\.\d+)%", text).group(1))


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    folder = Path(tempfile.mkdtemp())
    netshrink_command = str(Path(sys.executable).parent / "netshrink")
    rows, log = [], []

    script = folder / "example.py"
    script.write_text(block(readme, "## An example", "python"))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the README's Python example failed:\n{result.stderr}")
    dense, compressed = accuracy(result.stdout, "dense"), accuracy(result.stdout, "compressed")
    size = (folder / "model.nsk").stat().st_size
    rows.append(["Python example", f"{dense:.2f}%", f"{compressed:.2f}%", f"{compressed - dense:+.2f}",
                 f"{size:,}", f"{time.perf_counter() - started:.0f}"])

    dense_cli = None
    for line in block((ROOT / "docs" / "cli.md").read_text(), "# Command line", "bash").splitlines():
        command = line.split("#", 1)[0].strip()
        if not command or command.startswith(SKIPPED):
            continue
        started = time.perf_counter()
        result = subprocess.run([netshrink_command, *shlex.split(command)[1:]], cwd=folder, capture_output=True,
                                text=True, env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent)})
        seconds = time.perf_counter() - started
        searched = command.startswith("netshrink auto")
        why = {1: " (budget not met on this machine)",
               2: f" (refused on this machine: {result.stderr.strip()[:300]})"}.get(result.returncode, "") if searched else ""
        log.append(f"$ {command}  # exit {result.returncode}, {seconds:.0f} s{why}")
        if result.returncode and not searched:
            raise SystemExit(f"`{command}` failed:\n{result.stderr}")
        if command.startswith("netshrink evaluate dense.nsk"):
            dense_cli = accuracy(result.stdout, "dense.nsk")
        if command.startswith("netshrink compress"):
            error_after = float(re.search(r"after\s*│?\s*(\d+\.\d+)%", result.stdout).group(1))
            after = 100 - error_after
            output = shlex.split(command)[shlex.split(command).index("-o") + 1]
            rows.append([f"`{command[len('netshrink '):]}`", f"{dense_cli:.2f}%", f"{after:.2f}%",
                         f"{after - dense_cli:+.2f}", f"{(folder / output).stat().st_size:,}", f"{seconds:.0f}"])
    columns = ["example", "dense test accuracy", "compressed", "change (points)", "file bytes", "seconds"]
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                      + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    text = "\n".join(["# The README's example and the command-line walkthrough, run verbatim", "", command_line(__file__), "",
                      f"Machine: {describe()}", "",
                      "The Python example is on full MNIST (10,000 test images); the commands on scikit-learn's digits "
                      "(360 test images: one image is 0.28 points).", "", table, "",
                      "Commands run:", "", "```", *log, "```", ""])
    (Path(__file__).parent / "results" / "readme_examples.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
