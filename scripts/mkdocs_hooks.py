"""MkDocs hooks for netshrink's documentation site (``mkdocs.yml`` names this file).

The pages in ``docs/`` cite committed results in ``benchmarks/results/`` and ``investigations/results/``
with links that work on a plain checkout (``../benchmarks/results/x.md``). MkDocs only publishes
files inside ``docs/``, so these hooks publish those two folders beside the pages and point the links
at them. Written by hand because MkDocs has no setting for files outside ``docs_dir``.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks/results", "investigations/results")


def on_files(files, config):
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).iterdir()):
            if path.is_file():
                files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"],
                                  config["use_directory_urls"], inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    if "/" in page.file.src_uri:  # a results page: its links are relative to its own folder already
        return markdown
    for folder in ("benchmarks", "investigations"):
        markdown = markdown.replace(f"](../{folder}/", f"]({folder}/")
    return markdown
