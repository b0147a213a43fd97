"""A griffe extension for the API reference: netshrink's docstrings read well as text and run as
doctests; this makes them read well as Markdown too. Doctest lines (``>>>``, ``...`` and their output)
become code blocks (Markdown would read ``>`` as a quote), and Sphinx roles such as
``:func:`netshrink.prune``` become code. Written by hand: no griffe extension does exactly this."""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj):`~?([^`]+)`")


def markdown(text: str) -> str:
    lines, out, in_example = text.splitlines(), [], False
    for line in lines:
        starts = line.lstrip().startswith(">>>")
        if starts and not in_example:
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(line if in_example else ROLE.sub(r"`\1`", line))
    if in_example:
        out.append("```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
