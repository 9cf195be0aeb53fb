"""The ``kiln`` command. Each command is a small module that parses flags, calls the library and
prints. Nothing here imports torch or transformers at module level, so ``kiln --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from typing import NoReturn

from kiln.errors import KilnError, RunStopped
from kiln.log import set_verbosity
from kiln.version import __version__

COMMANDS = {
    "train": "kiln.cli.train",
    "evaluate": "kiln.cli.evaluate",
    "predict": "kiln.cli.predict",
    "profiles": "kiln.cli.profiles",
    "estimate": "kiln.cli.estimate",
    "suite": "kiln.cli.suite",
    "tune": "kiln.cli.tune",
    "distill": "kiln.cli.distill",
    "serve": "kiln.cli.serve",
    "describe": "kiln.cli.describe",
    "report": "kiln.cli.report",
    "export": "kiln.cli.export",
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line pointing at ``--help``, not the usage block
    (17 lines for ``kiln train``) that buries the one line that matters. Sub-parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each command module adds its own sub-parser)."""
    parser = Parser(
        prog="kiln", description="Train and evaluate transformer NLP models and predict with them, offline.",
        epilog="Run 'kiln COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(commands)
    for command in commands.choices.values():
        output = command.add_argument_group("output")
        output.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
        output.add_argument("-v", "--verbose", action="count", default=0, help="print debug detail too")
    return parser


def join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Rewrite ``--opt -x`` as ``--opt=-x`` for options that take a value, so that a value that
    starts with '-' (``--budget -5m``, ``--lr -1e-3``) reaches kiln's own checks instead of
    argparse's usage block. A next token that is itself an option (or an abbreviation of one, or a
    short option with its value attached) is left alone: then the value is really missing."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = next((token for token in argv if not token.startswith("-")), None)
    chosen = subparsers[0].choices.get(command) if subparsers and command else None
    options = dict(parser._option_string_actions)
    if chosen is not None:
        options.update(chosen._option_string_actions)
    takes_value = {name for name, action in options.items() if action.nargs is None}

    def is_option(token: str) -> bool:
        name = token.split("=", 1)[0]
        if name in options or token == "--":
            return True
        if token.startswith("--"):
            return any(known.startswith(name) for known in options if known.startswith("--"))
        return token[:2] in options  # -n5: a short option with its value attached

    result: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":  # everything after it is positional
            return result + argv[index:]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if token in takes_value and following is not None and following.startswith("-") \
                and not is_option(following):
            result.append(f"{token}={following}")
            index += 2
        else:
            result.append(token)
            index += 1
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; Ctrl-C exits 130."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(join_dash_values(parser, argv))
    if unknown:  # named by the command's own parser, so that the pointer is to its --help
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command_line = shlex.join(["kiln", *argv])  # what the model card says made the run
    level = logging.getLogger("kiln").level
    set_verbosity(args.quiet, args.verbose)
    try:
        return int(args.run(args) or 0)
    except KilnError as err:
        from kiln.cli.torchrun import worker_error

        line = f"kiln: {err}" if err.path is None else str(err)
        if not worker_error(line):  # under kiln's launcher it prints the line once, not once per rank
            print(line, file=sys.stderr)
        return 2
    except RunStopped as stop:  # a checkpoint is written; the message says how to continue
        from kiln.training.distributed import world

        if world()[0] == 0:
            print(f"kiln: {stop.message}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # the environment, not kiln: a path that is a file, no permission, a full disk
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        print(f"{paths}: {err.strerror or err}" if paths else f"kiln: {err}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("kiln").setLevel(level)  # main() called from Python leaves no trace


if __name__ == "__main__":
    sys.exit(main())
