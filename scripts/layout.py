"""The package's shape in numbers: folders, top-level modules, lines per package, and import circles.

    python scripts/layout.py            # a markdown report
    python scripts/layout.py --check    # exit 1 if any import circle exists

Every import counts, those inside functions too: a circle hidden in a function is still a lower room borrowing
from a higher one. Imports are read with ``ast``, nothing is imported.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "netshrink"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The netshrink modules ``name`` imports (a package's ``__init__`` counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from .methods import GPTQ` -> netshrink.methods
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(name, path, known) for name, path in known.items()}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def room_of(name: str) -> str:
    """The stage package (or top-level module) a module belongs to: ``netshrink.compress.methods.gptq`` -> ``compress``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rooms(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between stage packages and top-level modules."""
    out = defaultdict(set)
    for a, targets in edges.items():
        out[room_of(a)]
        for b in targets:
            if room_of(a) != room_of(b):
                out[room_of(a)].add(room_of(b))
    return dict(out)


def package_of(name: str) -> str:
    parts = name.split(".")
    path = modules()[name]
    if len(parts) == 1 or (len(parts) == 2 and path.name != "__init__.py"):
        return "netshrink (top level)"
    return ".".join(parts[:2])


def report() -> str:
    known = modules()
    edges = graph()
    lines_per = defaultdict(lambda: [0, 0])
    for name, path in known.items():
        entry = lines_per[package_of(name)]
        entry[0] += 1
        entry[1] += len(path.read_text().splitlines())
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__")
    out = [f"- folders: {', '.join(f'`{f}/`' for f in folders)}",
           f"- top-level modules ({len(top)}): {', '.join(f'`{t}`' for t in top)}",
           f"- import circles: {len(circles(edges))}"]
    out += [f"  - {' <-> '.join(c)}" for c in circles(edges)]
    between = rooms(edges)
    out.append(f"- import circles between packages: {len(circles(between))}")
    out += [f"  - {' <-> '.join(c)}" for c in circles(between)]
    out += ["", "| package or module | imports from |", "|---|---|"]
    out += [f"| `{a}` | {', '.join(f'`{b}`' for b in sorted(between[a])) or '-'} |" for a in sorted(between)]
    out += ["", "| package | modules | lines |", "|---|---|---|"]
    out += [f"| {p} | {m} | {n:,} |" for p, (m, n) in sorted(lines_per.items())]
    total = sum(n for _, n in lines_per.values())
    out.append(f"| all | {len(known)} | {total:,} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if an import circle exists (between modules or between packages)")
    args = parser.parse_args()
    edges = graph()
    found = circles(edges) + circles(rooms(edges))
    if args.check:
        for c in found:
            print("import circle:", " <-> ".join(c))
        sys.exit(1 if found else 0)
    print(report())


if __name__ == "__main__":
    main()
