"""mkdocs hooks: the pages generated from the code, never copied by hand.

``<!-- kiln:cli -->`` becomes the CLI reference (every command's ``--help``, as argparse prints it),
``<!-- kiln:profiles -->`` the table of shipped profiles (from ``kiln/profiles/*.yaml``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

WIDTH = "100"  # argparse wraps help to $COLUMNS: a fixed width makes the page the same everywhere


def commands() -> dict[str, argparse.ArgumentParser]:
    """``{"train": parser, ...}``: every kiln command's parser, in --help's order."""
    from kiln.cli import build_parser

    parser = build_parser()
    found = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(found.choices)


def command_help(parser: argparse.ArgumentParser) -> str:
    """What ``kiln COMMAND --help`` prints at the reference's width."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return parser.format_help()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def cli_reference() -> str:
    """One section per command: its one-line purpose, then its full --help."""
    from kiln.cli import build_parser

    top = build_parser()
    found = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    purposes = {action.dest: action.help for action in found._choices_actions}
    sections = ["```text", command_help(top).rstrip(), "```", ""]
    for name, parser in commands().items():
        sections += [f"## kiln {name}", "", f"{purposes.get(name, '').capitalize()}.", "", "```text",
                     command_help(parser).rstrip(), "```", ""]
    return "\n".join(sections)


def profile_table() -> str:
    """The shipped profiles: name, family, parameters, tasks and the one-line description."""
    from kiln import profiles

    rows = ["| profile | family | parameters | tasks | what it is |", "|---|---|---:|---|---|"]
    for name in profiles.available():
        config = profiles.load(name)
        rows.append(f"| `{name}` | {config.family} | {config.params / 1e6:.1f}M | {', '.join(config.tasks)} | "
                    f"{config.description} |")
    return "\n".join(rows)


def command_table() -> str:
    """Each command with its one-line purpose, linking to its reference section."""
    from kiln.cli import build_parser

    top = build_parser()
    found = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| [`kiln {action.dest}`](cli.md#kiln-{action.dest}) | {action.help} |"
             for action in found._choices_actions]
    return "\n".join(rows)


MARKERS = {"<!-- kiln:cli -->": cli_reference, "<!-- kiln:profiles -->": profile_table,
           "<!-- kiln:commands -->": command_table}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each marker with what it stands for."""
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
