"""Tables: the one at the end of every command (rich, on the console) and the ones committed with
benchmark results (markdown). Everything shown is literal text, never rich markup."""
from __future__ import annotations

import io
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text


def console(quiet: bool = False) -> Console:
    """Where commands print: plain text (names from files and recipes are never read as rich markup),
    160 columns when the output is not a terminal (a log keeps whole table rows). ``quiet``: print nothing
    (every process but the first, when several run one command)."""
    return Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False, quiet=quiet)


def make_table(title: str, columns: list[str], rows: list[list], caption: str | None = None) -> Table:
    """A rich table whose every text is literal: layer names and titles from files or recipes
    are never read as rich markup (``[/]`` would crash, ``[link=...]`` would emit a hyperlink)."""
    table = Table(title=Text(title), caption=Text(caption) if caption else None, header_style="bold",
                  title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(Text(column), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[Text(str(v)) for v in row])
    return table


def render(table: Table) -> str:
    console = Console(width=200, file=io.StringIO(), force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def markdown(columns: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (for committed benchmark results)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
