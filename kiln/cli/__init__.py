"""The ``kiln`` command. Each command is a small module that parses flags, calls the library and
prints. Nothing here imports torch or transformers at module level, so ``kiln --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln import __version__
from kiln.errors import KilnError

COMMANDS = {
    "train": "kiln.cli.train",
    "evaluate": "kiln.cli.evaluate",
    "predict": "kiln.cli.predict",
    "profiles": "kiln.cli.profiles",
    "estimate": "kiln.cli.estimate",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each command module adds its own sub-parser)."""
    parser = argparse.ArgumentParser(
        prog="kiln", description="Train, evaluate and serve transformer NLP models, offline.",
        epilog="Run 'kiln COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KilnError as err:
        print(f"kiln: {err}" if err.path is None else str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # the environment, not kiln: a path that is a file, no permission, a full disk
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        print(f"{paths}: {err.strerror or err}" if paths else f"kiln: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
