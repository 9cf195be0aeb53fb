"""The documentation: the site builds strictly and needs nothing online, the CLI reference covers
every command and flag, every flag the pages use exists, the README stays short and links each
guide, and the guides' runnable examples run (a fast few here, all of them in the ``docs`` tier)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted([*DOCS.rglob("*.md"), REPO / "README.md"])
RUNNABLE = re.compile(r"<!-- docs-test(: fast)? -->\n```(?:sh|bash)\n(.*?)```", re.S)


def hooks():
    spec = importlib.util.spec_from_file_location("kiln_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_every_command_and_flag_is_in_the_reference_with_its_help():
    generated = hooks()
    reference = generated.cli_reference()
    for name, parser in generated.commands().items():
        assert f"## kiln {name}" in reference
        for option, action in options(parser).items():
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", reference), f"kiln {name} {option}"
            assert action.help and action.help != argparse.SUPPRESS, f"kiln {name} {option} has no help"


def kiln_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of every ``kiln ...`` command in a page's code blocks (continued
    lines joined)."""
    found, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside and not line.startswith("    kiln "):
            continue
        stripped = line.strip().removeprefix("$ ")
        if pending:
            pending += " " + stripped
        elif stripped.startswith("kiln "):
            pending, start = stripped, number
        if pending and not pending.endswith("\\"):
            found.append((start, pending))
            pending = ""
        elif pending:
            pending = pending[:-1]
    return found


def test_every_flag_the_pages_use_exists():
    commands = hooks().commands()
    unknown = []
    for page in PAGES:
        for number, command in kiln_lines(page.read_text()):
            words = command.split("#", 1)[0].split()
            if len(words) < 2 or words[1] not in commands:
                if len(words) > 1 and not words[1].startswith("-"):
                    unknown.append(f"{page.relative_to(REPO)}:{number}: no command kiln {words[1]}")
                continue
            known = options(commands[words[1]])
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command.split("#", 1)[0]):
                if flag not in known:
                    unknown.append(f"{page.relative_to(REPO)}:{number}: kiln {words[1]} has no {flag}")
    assert unknown == []


def test_the_readme_is_short_and_links_every_guide():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for guide in sorted((DOCS / "guides").glob("*.md")):
        assert f"docs/guides/{guide.name}" in readme, guide.name


def test_the_site_builds_strictly_with_nothing_fetched_when_viewed(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) > 20
    for page in pages:  # scripts, stylesheets, fonts and images come from the site itself
        html = page.read_text()
        remote = re.findall(r"<(?:script|link|img|source)\b[^>]*(?:src|href)=\"(https?:|//)[^\"]*\"", html)
        assert remote == [], page.name
        assert "fonts.googleapis" not in html and "@import url(http" not in html


def runnable(fast_only: bool) -> list:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        for index, match in enumerate(RUNNABLE.finditer(page.read_text())):
            if match[1] or not fast_only:
                blocks.append(pytest.param(match[2], id=f"{page.relative_to(DOCS)}#{index}"))
    return blocks


def run_block(script: str, tmp_path: Path) -> None:
    """Run a page's shell block as a user would, from a directory with kiln's examples beside it."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    if (REPO / "models").is_dir():
        (tmp_path / "models").symlink_to(REPO / "models")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{script}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("script", runnable(fast_only=True))
def test_the_fast_examples_run(script, tmp_path):
    run_block(script, tmp_path)


@pytest.mark.docs
@pytest.mark.parametrize("script", runnable(fast_only=False))
def test_every_runnable_example_runs(script, tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    run_block(script, tmp_path)
